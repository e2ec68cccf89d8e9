"""``tera-tn export``: a saved TeRA adapter as a LoRA adapter for LoRA servers
(:func:`tera_tn.peft.export.export_lora`, whose report is printed)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError

__all__ = ["add_export"]


def add_export(sub) -> None:
    """The ``export`` subcommand's parser."""
    p = sub.add_parser(
        "export", help="write a TeRA adapter as a LoRA adapter that vLLM, LoRAX, TGI or SGLang can load",
        description="Export a saved TeRA adapter as a standard PEFT LoRA adapter (truncated SVD of each layer's "
        "ΔW, scaling 1) and print per layer the rank, kept energy and relative error (tera_tn.peft.export_lora). "
        "Without --rank/--energy/--budget every non-zero singular value is kept: the exact export.")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="folder of the TeRA adapter (PEFT's save_pretrained)")
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face folder of the base model")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="new or empty folder for the LoRA adapter")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, metavar="R", help="the same LoRA rank in every layer (capped at min(d_out, d_in))")
    g.add_argument("--energy", type=float, metavar="F",
                   help="per layer the smallest rank keeping this fraction of Σσ², in (0, 1]")
    g.add_argument("--budget", type=int, metavar="N",
                   help="total LoRA numbers Σ rank·(d_out + d_in), spread over the layers by marginal energy")
    p.add_argument("--rank-set", default=",".join(map(str, _VLLM_RANKS)), metavar="R,...|none",
                   help="ranks are rounded up to one of these (default: vLLM's max_lora_rank values); 'none': any rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the LoRA tensors (default float32)")
    p.add_argument("--modules-to-save", choices=("refuse", "separate", "include"), default="refuse",
                   help="the adapter's modules_to_save (e.g. a classifier head), which LoRA servers cannot load: "
                        "refuse (default), write them to modules_to_save.safetensors beside the LoRA files, or "
                        "include them (PEFT loads them, vLLM does not)")
    p.add_argument("--overwrite", action="store_true", help="replace the LoRA files of a non-empty --out folder")
    p.set_defaults(func=_cmd_export)


# vLLM's max_lora_rank values (tera_tn.peft.lora_ranks.VLLM_RANKS; repeated so --help never imports torch)
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_TASK_MODELS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def _cmd_export(args) -> int:
    if args.rank_set.strip().lower() == "none":
        rank_set = None
    else:
        try:
            rank_set = tuple(int(r) for r in args.rank_set.split(","))
        except ValueError:
            raise UsageError(f"--rank-set expects comma-separated ranks such as 8,16,32, or 'none'; got "
                             f"{args.rank_set!r}") from None
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{args.adapter!r} holds no adapter_config.json; expected a TeRA adapter folder")
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model!r} is not a model folder (no config.json); expected a local "
                         "Hugging Face model folder")

    import transformers
    from peft import PeftConfig, PeftModel

    from ..peft.export import export_lora
    from ..peft.lora_folder import check_export_folder
    from ..peft.lora_ranks import check_rank_set, rank_criterion

    # the library's own checks, before the model is loaded (seconds to minutes)
    try:
        rank_criterion(args.rank, args.energy, args.budget)
        check_rank_set(rank_set)
        check_export_folder(Path(args.out), args.overwrite)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    config = PeftConfig.from_pretrained(args.adapter)
    if getattr(config.peft_type, "value", config.peft_type) != "TERA":
        raise UsageError(f"{args.adapter!r} holds a {config.peft_type} adapter; expected a TeRA adapter folder")
    # The class the adapter was trained on: its task's auto class, else the class the base folder
    # was saved from (module names must match the adapter's), else the bare AutoModel.
    task = getattr(config.task_type, "value", config.task_type)
    saved = (json.loads((Path(args.model) / "config.json").read_text()).get("architectures") or [None])[0]
    cls = _TASK_MODELS.get(task) or (saved if saved and hasattr(transformers, saved) else "AutoModel")
    base = getattr(transformers, cls).from_pretrained(args.model, local_files_only=True)
    model = PeftModel.from_pretrained(base, args.adapter)
    report = export_lora(model, args.out, rank=args.rank, energy=args.energy, budget=args.budget, rank_set=rank_set,
                         dtype=args.dtype, modules_to_save=args.modules_to_save, overwrite=args.overwrite)
    print(report)
    return 0
