"""The ``tera-tn`` command.

* ``tera-tn report`` — the main job: compares TeRA with LoRA, VeRA and HiRA on the built-in model
  shape sets (parameters, adapter file size, ranks), prints one table per model and writes the
  tables, trade-off/spectrum/planner plots (PNG and SVG) and a JSON file into a new folder.
* ``tera-tn rank`` — spec, parameter counts and every rank measure of one TeRA update.
* ``tera-tn plan`` — how the contraction planner computes ``ΔW x`` for a token count, and why.
* ``tera-tn finetune`` — the MiniLM fine-tuning benchmark (:mod:`tera_tn.finetune`).
* ``tera-tn export`` — a saved TeRA adapter as a LoRA adapter for LoRA servers (:mod:`tera_tn.peft.export`).

One module per command group (``report``, ``analysis``: rank and plan, ``finetune``, ``export``)
parses its arguments, calls the library and prints or writes what it returns.

Bad arguments print one ``error:`` line on stderr and exit with status 2, before any heavy work
(output paths are checked and claimed first); a failure of the machine during the work (a full
disk) prints one ``error:`` line and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

from .common import Parser, UsageError
from .report import DEFAULT_REPORT_DIR

__all__ = ["main", "build_parser", "DEFAULT_REPORT_DIR", "UsageError"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tera-tn`` argument parser (subcommands report, rank, plan, finetune)."""
    from ..version import __version__
    from . import analysis, export, finetune, report

    parser = Parser(prog="tera-tn", description="TeRA adapters as tensor networks: reports, rank analysis, "
                     "contraction planning and fine-tuning.",
                     epilog="Run 'tera-tn COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"tera_tn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    report.add_report(sub)
    analysis.add_rank(sub)
    analysis.add_plan(sub)
    finetune.add_finetune(sub)
    export.add_export(sub)
    return parser


# --------------------------------------------------------------------------------------------
# known, harmless messages of third-party libraries
# --------------------------------------------------------------------------------------------
# Each is hidden only while a ``tera-tn`` command runs (never by the library, whose users see all
# of them) and only by its exact origin: the logger that emits it and the words it says.
_ANSI = None


def _plain(text: str) -> str:
    import re

    global _ANSI
    _ANSI = _ANSI or re.compile(r"\x1b\[[0-9;]*m")
    return _ANSI.sub("", text)


def _only_pooler_unexpected(message: str) -> bool:
    """A transformers LOAD REPORT whose only rows are the BERT pooler's weights, UNEXPECTED because
    the recipe loads sentence encoders without their pooler (``add_pooling_layer=False``)."""
    if "LOAD REPORT" not in message:
        return False
    rows = [[c.strip() for c in line.split("|")] for line in _plain(message).splitlines() if "|" in line]
    rows = [r for r in rows if r and r[0] and r[0] != "Key"]
    return bool(rows) and all(r[0].startswith("pooler.") and len(r) > 1 and r[1] == "UNEXPECTED" for r in rows)


#: logger name -> test of a record's message: True hides it
_KNOWN_NOISE = {
    # torchao (imported by PEFT and transformers) tries its CUDA/other-Python kernels on every import
    "torchao": lambda m: m.startswith("Failed to load ") and "torchao" in m and ".so" in m,
    # torchao registers enums with torch's pytree, which torch 2.x now deprecates
    "torch.utils._pytree": lambda m: "is an Enum subclass and is now natively supported by torch.compile" in m,
    # bitsandbytes asks the kernel hub for a CPU 4-bit kernel (offline: the trust check is skipped, the load fails)
    "bitsandbytes.backends.cpu.ops": lambda m: m.startswith("Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": lambda m: (m.startswith("Skipping publisher trust check for")
                                            and "kernels-community/quantization-bitsandbytes" in m),
    "transformers.modeling_utils": _only_pooler_unexpected,
}
#: (warning category, regex the message starts with, module regex): PEFT still reads a property
#: transformers deprecated
_KNOWN_WARNINGS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),)


class _KnownNoiseFilter:
    def __init__(self, test) -> None:
        self.test = test

    def filter(self, record) -> bool:
        try:
            return not self.test(record.getMessage())
        except Exception:  # a message that cannot be formatted is not one of ours to judge
            return True


@contextlib.contextmanager
def _known_noise_hidden():
    """Hide the known, harmless third-party messages while a command runs; restore everything after
    (loggers, warning filters, environment), so a program calling :func:`main` keeps its own."""
    import logging
    import warnings

    added = []
    for name, test in _KNOWN_NOISE.items():
        logger, f = logging.getLogger(name), _KnownNoiseFilter(test)
        logger.addFilter(f)
        added.append((logger, f))
    # transformers' "Loading weights" progress bar: the environment variable is read when
    # huggingface_hub is first imported; after that only transformers' own switch works
    env_set = "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "huggingface_hub" not in sys.modules
    if env_set:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging = sys.modules.get("transformers.utils.logging")
    bars_were_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars_were_on:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category, message, module in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            yield
    finally:
        for logger, f in added:
            logger.removeFilter(f)
        if env_set:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tera-tn`` console script; returns the exit status."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # never open a window
    except ImportError:  # plots are then unavailable; tables still work
        pass
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 0
    args._argv = argv[1:]
    prog = f"tera-tn {args.command}"
    try:
        with _known_noise_hidden():
            return int(args.func(args) or 0)
    except (UsageError, ValueError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tera-tn plan ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as err:  # the machine, not the arguments: a full disk, a vanished folder
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """Multi-line messages (lists of problems) joined so that an error stays one line."""
    lines = (line.strip() for line in str(err).splitlines())
    return "; ".join(line[2:] if line.startswith("- ") else line for line in lines if line)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
