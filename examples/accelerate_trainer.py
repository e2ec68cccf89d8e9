"""Fine-tune with TeRA (PEFT) and the transformers Trainer, on one or several processes.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_trainer.py --smoke --out run
    torchrun --nproc_per_node 2 examples/accelerate_trainer.py --smoke --out run     # same thing
    python examples/accelerate_trainer.py --smoke --out run                          # one process

``--multi_gpu`` is accelerate's multi-process launcher; on a machine without a GPU it runs the
processes on the CPU over gloo (``--cpu`` would start a single process).

The Trainer wraps the model in DistributedDataParallel. Every rank regenerates TeRA's frozen
factors from the seed, and they are not module buffers, so DDP sends only λ's gradients (and the
classifier head's, trained as a PEFT ``modules_to_save``). Rank 0 alone saves the adapter, and
writes ``check.json``: the logged losses, the buffers DDP broadcasts, and the logits of a fixed
batch, which a fresh process reproduces after ``PeftModel.from_pretrained`` (see ``reload``).

``--smoke`` trains a tiny BERT built from a config (no download) on a synthetic task; without
it, ``--model`` names a Hugging Face model and the task is the same synthetic one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model

from tera_tn.peft import TeraConfig

SEED = 0
VOCAB = 64


def base_model(name: str | None) -> transformers.PreTrainedModel:
    """The base model, identical in every process (seeded init for the tiny smoke model)."""
    torch.manual_seed(SEED)
    if name:
        return transformers.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class Synthetic(torch.utils.data.Dataset):
    """Label 1 when the sequence holds more low-id than high-id tokens: learnable from embeddings."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, 12), generator=gen)
        self.labels = ((self.ids < VOCAB // 2).sum(dim=1) > 6).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def probe() -> torch.Tensor:
    return Synthetic(4, seed=99).ids


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def reload(out: Path, name: str | None = None):
    """The trained model rebuilt from the saved adapter (in a fresh process: import tera_tn.peft first)."""
    return PeftModel.from_pretrained(base_model(name), str(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps")
    parser.add_argument("--model", default=None, help="Hugging Face model name (default: a tiny BERT from a config)")
    parser.add_argument("--out", type=Path, default=Path("tera-trainer-run"))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.smoke else 300)

    model = get_peft_model(
        base_model(args.model),
        TeraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], order=4, seed=SEED),
    )
    training = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=SEED,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    trainer = transformers.Trainer(model=model, args=training, train_dataset=Synthetic(512, seed=1))
    trainer.train()
    trainer.save_model(str(args.out))  # the adapter, written by the main process only
    if trainer.is_world_process_zero():
        wrapped = trainer.model_wrapped
        broadcast = [n for n, _ in wrapped.module.named_buffers()] if hasattr(wrapped, "modules_buffers") else []
        check = {
            "world_size": training.world_size,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "ddp_broadcast_buffers": broadcast,
            "probe_logits": logits(model, probe()).tolist(),
        }
        (args.out / "check.json").write_text(json.dumps(check, indent=1))
        print(f"losses {check['losses'][0]:.3f} -> {check['losses'][-1]:.3f}; adapter saved to {args.out}")


if __name__ == "__main__":
    main()
