"""Train TeRA under DDP or FSDP2 with torchrun (plain-torch API or PEFT).

    torchrun --nproc_per_node 2 examples/ddp_fsdp.py --smoke                  # PEFT + DDP
    torchrun --nproc_per_node 2 examples/ddp_fsdp.py --smoke --fsdp           # PEFT + FSDP2
    torchrun --nproc_per_node 2 examples/ddp_fsdp.py --smoke --api torch      # add_tera + DDP
    python examples/ddp_fsdp.py --smoke                                       # one process

Every rank builds the same base model and regenerates the same frozen factors from the seed;
the factors are not module buffers, so DDP/FSDP never send them: only λ's gradients travel.
Rank 0 saves the adapter (under FSDP2, λ are gathered first; nothing else is).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP


def tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)  # the same base weights on every rank
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def wrap(api: str, fsdp: bool):
    """The model to train, wrapped for the chosen engine, and the unwrapped model (to save)."""
    model = tiny_bert()
    if api == "torch":
        from tera_tn.torch import TeRALayersConfig, add_tera

        add_tera(model, TeRALayersConfig(target_modules=["query", "value", "dense"], order=4, seed=5))
        return DDP(model), model
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    model = get_peft_model(model, TeraConfig(target_modules=["query", "value", "dense"], order=4, seed=5))
    if not fsdp:
        return DDP(model), model
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    return model, model


def save(api: str, fsdp: bool, model, out: Path) -> None:
    if api == "torch":
        from tera_tn.torch import save_tera

        if dist.get_rank() == 0:
            save_tera(model, out / "adapter.safetensors", overwrite=True)
        return
    from tera_tn.peft import save_adapter

    state = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank takes part; λ only (frozen weights skipped), onto rank 0.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
    if dist.get_rank() == 0:
        save_adapter(model, out, overwrite=True, **({"state_dict": state} if fsdp else {}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api", choices=["peft", "torch"], default="peft")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP (PEFT only)")
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    parser.add_argument("--out", type=Path, default=Path("tera-ddp-run"))
    args = parser.parse_args(argv)
    if args.fsdp and args.api == "torch":
        parser.error("--fsdp goes with --api peft")
    if "RANK" not in os.environ:  # started without torchrun: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    trained, model = wrap(args.api, args.fsdp)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(5 if args.smoke else 200):
        ids, labels = torch.randint(0, 64, (8, 12), generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        loss = trained(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f}")
    save(args.api, args.fsdp, model, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
