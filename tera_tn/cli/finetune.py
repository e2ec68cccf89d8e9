"""``tera-tn finetune``: the MiniLM fine-tuning recipe (:mod:`tera_tn.finetune`) on the user's
labelled text (:mod:`tera_tn.textdata`), one run per seed, recorded as
:class:`tera_tn.finetune_runs.FinetuneRuns`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import UsageError, nonneg_int, positive_float, positive_int

__all__ = ["add_finetune"]


def add_finetune(sub) -> None:
    """The ``finetune`` subcommand's parser."""
    from ..finetune import DEFAULT_LR, FinetuneConfig

    p = sub.add_parser(
        "finetune", help="fine-tune a local model on your labelled text with TeRA, LoRA or VeRA",
        description="Fine-tune a local Hugging Face encoder (default: the bundled all-MiniLM-L6-v2) as a text "
        "classifier on your own labelled data (CSV or JSON lines) with TeRA, LoRA or VeRA, one run per seed; "
        "writes the adapters, heads and a results table into a new folder.")
    p.add_argument("--data-path", required=True, metavar="FILE",
                   help="training data: .csv (with a header), .jsonl (one JSON object per line) or .json (one array "
                        "of objects)")
    p.add_argument("--validation-path", metavar="FILE",
                   help="validation data (default: --val-fraction of --data-path, split by seed)")
    p.add_argument("--test-path", metavar="FILE", help="test data, evaluated once per seed (optional)")
    p.add_argument("--text-column", default="text", help="column holding the text (default text)")
    p.add_argument("--label-column", default="label", help="column holding the label (default label)")
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of the data files (default utf-8, with or without a byte-order mark; e.g. "
                        "cp1252 or latin-1 for CSV from older Excel versions)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="share of --data-path held out for validation when no --validation-path (default 0.1)")
    p.add_argument("--method", choices=("tera", "lora", "vera"), default="tera", help="adapter (default tera)")
    p.add_argument("--adapter", type=_adapter_options, default={}, metavar="K=V,...",
                   help="options of the method's PEFT config, e.g. order=4,ranks=0.5 (TeRA) or r=16 (LoRA)")
    p.add_argument("--model", metavar="DIR", help="local model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--lr", type=positive_float, metavar="LR",
                   help="learning rate of the adapter (default: " +
                   ", ".join(f"{m} {DEFAULT_LR[m]:g}" for m in ("tera", "lora", "vera")) + ")")
    p.add_argument("--head-lr", type=positive_float, default=FinetuneConfig.head_lr, metavar="LR",
                   help="learning rate of the classification head (default %(default)g); on many-class data "
                        "a larger one can matter more than the adapter's")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data (default 3)")
    p.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="tokens per text (default 128; at most the model's positions, 512 for the default model)")
    p.add_argument("--seeds", type=_seed_list, default=(0,), metavar="S,...", help="seeds, one run each (default 0)")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch CPU threads (default 0: torch's choice; at most the CPUs this process may use)")
    p.add_argument("--out", "-o", default="tera-tn-finetune", metavar="DIR",
                   help="new output folder (default ./tera-tn-finetune)")
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="replace an earlier 'tera-tn finetune' output folder (never any other folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _seed_list(text: str) -> tuple[int, ...]:
    seeds = tuple(nonneg_int(s.strip()) for s in text.split(","))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _adapter_options(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or ``taskset``'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cmd_finetune(args) -> int:
    from .. import finetune as ft
    from ..classifier import save_classifier
    from ..atomic_files import OutputFolderError, claim_dir, release_dir, staging_dir, write_atomic
    from ..finetune_runs import FinetuneRuns
    from ..textdata import read_text_data

    # every argument is checked here, before the model (seconds) or any training (minutes)
    for flag in ("data_path", "validation_path", "test_path"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} is not a file; expected a CSV or JSON-lines file")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model!r} is not a model folder (no config.json); expected a local "
                         "Hugging Face model folder")
    try:
        model_dir = Path(args.model) if args.model is not None else ft.default_model_dir()
    except ImportError as err:
        raise UsageError(str(err)) from None
    cpus = _available_cpus()
    if args.threads > cpus:
        raise UsageError(f"--threads {args.threads} exceeds the {cpus} CPUs this process may use; expected 0 "
                         f"(torch's choice) to {cpus}")
    limit = ft.max_positions(model_dir)
    if limit is not None and args.max_length > limit:
        raise UsageError(f"--max-length {args.max_length} exceeds the {limit} token positions of the model in "
                         f"{str(model_dir)!r}; expected at most {limit}")
    # adapter arguments are checked against the method's PEFT config here (a ValueError: exit 2)
    configs = [ft.FinetuneConfig(method=args.method, adapter=args.adapter, lr=args.lr, head_lr=args.head_lr,
                                 epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                                 max_length=args.max_length, seed=s) for s in args.seeds]

    def read(path: str, min_classes: int = 2):
        return read_text_data(path, args.text_column, args.label_column, encoding=args.encoding,
                              min_classes=min_classes)

    try:
        data = read(args.data_path)
        # a validation or test file may hold a single class (only training needs two); its labels
        # are re-indexed onto the training file's
        parts = {"validation": args.validation_path, "test": args.test_path}
        extra = {k: read(p, min_classes=1).relabel(data.labels) for k, p in parts.items() if p is not None}
    except OSError as err:
        raise UsageError(f"cannot read the data: {err}") from None
    created = not os.path.lexists(args.out)
    try:
        out = claim_dir(args.out, kind="finetune", overwrite=args.overwrite)
    except (OutputFolderError, NotADirectoryError) as err:
        raise UsageError(f"--out: {err}") from None
    except OSError as err:
        raise UsageError(f"cannot create output folder {args.out!r}: {err.strerror or err}; expected a writable "
                         "folder path") from None

    runs = FinetuneRuns(labels=data.labels, method=args.method, adapter=args.adapter, model=str(model_dir.resolve()),
                        data={"train": args.data_path, "validation": args.validation_path, "test": args.test_path},
                        text_column=args.text_column, label_column=args.label_column, seeds=args.seeds)
    published = False
    try:
        import torch
        from tqdm.auto import tqdm

        if args.threads:
            torch.set_num_threads(args.threads)
        model = ft.load_model(model_dir)
        test = extra["test"].examples if "test" in extra else None
        for config in configs:
            if "validation" in extra:
                train, validation = data.examples, extra["validation"].examples
            else:
                split = data.split(args.val_fraction, config.seed)
                train, validation = split.train, split.validation
            bar = tqdm(desc=f"{args.method} seed {config.seed}", unit="step", disable=args.no_progress, leave=False)

            def step(i: int, total: int, loss: float) -> None:
                bar.total = total
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            result = ft.finetune(config, train, validation, test, model=model, num_labels=len(data.labels),
                                 on_step=step)
            bar.close()
            # each seed's folder appears whole (written aside, then renamed), then results.json is
            # rewritten atomically: a run killed at any point leaves every finished seed recorded
            name = f"seed{config.seed}"
            with staging_dir(out, name) as tmp:
                save_classifier(result, tmp, labels=data.labels, model_dir=model_dir, text_column=args.text_column,
                                label_column=args.label_column)
                os.rename(tmp, out / name)
            published = True
            runs = runs.with_run(config.seed, result.metrics)
            write_atomic(out / "results.json", (runs.to_json() + "\n").encode(), overwrite=True)
    except BaseException:
        if not published:  # nothing of this run was written: the folder is not left claimed
            release_dir(out, created=created)
        raise
    print(runs.to_text())
    print(f"results written to {out.resolve()}/", flush=True)
    return 0
