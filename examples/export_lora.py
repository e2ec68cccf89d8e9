"""Export a TeRA adapter as LoRA, reload it with PEFT as a plain LoRA adapter and compare outputs.

    python examples/export_lora.py            # a small BERT (hidden 256, 4 layers)
    python examples/export_lora.py --smoke    # a tiny BERT (hidden 64, 2 layers): seconds

Writes ./export-lora-example/{base,exact,rank16} (replaced on every run). The TeRA adapter has
random λ, standing in for a trained one; with a trained adapter, also measure the task metric of
each export (the per-layer errors say how much of ΔW is kept, not what that costs on the task).
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from tera_tn.peft import TeraConfig, export_lora


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model")
    ap.add_argument("--out", default="export-lora-example", help="folder for the base model and the exports")
    args = ap.parse_args(argv)
    hidden, layers = (64, 2) if args.smoke else (256, 4)
    out = Path(args.out)

    # A base model saved to a folder, as a server would load it, and a TeRA adapter on it.
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, vocab_size=1000)
    BertModel(config).save_pretrained(out / "base")
    model = get_peft_model(BertModel.from_pretrained(out / "base"),
                           TeraConfig(target_modules=["query", "value"], order=4, alpha=0.1, scale_init="random", seed=0))
    with torch.no_grad():  # distinct λ per layer, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.5 + torch.rand_like(p))
    model.eval()
    batch = {"input_ids": torch.randint(0, 1000, (4, 16))}

    # 1. Exact: every non-zero singular value, ranks rounded up to vLLM's max_lora_rank values.
    exact = export_lora(model, out / "exact", check_inputs=batch, overwrite=True)
    print(exact, end="\n\n")
    # 2. Truncated to rank 16: a fraction of the numbers; the report says what it costs.
    small = export_lora(model, out / "rank16", rank=16, dtype=torch.bfloat16, check_inputs=batch, overwrite=True)
    print(small, end="\n\n")

    # Reload the exact export onto a fresh base with PEFT alone: a LoraConfig adapter.
    lora = PeftModel.from_pretrained(BertModel.from_pretrained(out / "base"), out / "exact").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = lora(**batch).last_hidden_state
    err = float((got - want).norm() / want.norm())
    print(f"PEFT LoRA reload of the exact export vs the TeRA model: relative error {err:.2e}")
    assert err < 1e-4, err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
