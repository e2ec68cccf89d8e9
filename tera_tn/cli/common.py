"""What every ``tera-tn`` command shares: the one-line usage error, argument types, the spec
arguments of ``rank`` and ``plan``, the console, the progress bar and the BLAS thread limit."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any, Optional

from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER

__all__ = ["UsageError", "Parser", "int_at_least", "positive_int", "nonneg_int", "positive_float", "parse_shape",
           "parse_modes", "parse_order", "parse_ranks", "add_spec_arguments", "spec_from_args", "blas_threads",
           "console", "progress"]


class UsageError(Exception):
    """A bad argument detected after parsing (reported like an argparse error, exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------
def int_at_least(low: int, what: str):
    """An argparse type accepting integers >= ``low``; the error names the value and ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1, "positive")
nonneg_int = int_at_least(0, "non-negative")


def parse_shape(text: str) -> tuple[int, int]:
    """``"768x3072"`` (also ``768,3072`` or ``768×3072``) → ``(768, 3072)``."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        d_out, d_in = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape D_OUTxD_IN such as 4096x4096, got {text!r}") from None
    if d_out < 1 or d_in < 1:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive, got {text!r}")
    return d_out, d_in


def parse_modes(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``"16.16.16:16.16.16"`` (row modes : column modes) → two tuples."""
    rows, sep, cols = text.partition(":")
    try:
        if not sep:
            raise ValueError
        out = tuple(tuple(int(x) for x in side.replace(",", ".").split(".")) for side in (rows, cols))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ROW_MODES:COL_MODES such as 16.16.16:16.16.16, got {text!r}") from None
    return out  # type: ignore[return-value]


def parse_order(text: str):
    """``6`` or ``3x3`` (rows × columns)."""
    try:
        if "x" in text.lower():
            p, q = (int(v) for v in text.lower().split("x"))
            return (p, q)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an order such as 6 or 3x3, got {text!r}") from None


def parse_ranks(text: str):
    """``full``, a fraction (``0.5``), an int cap (``8``) or per-mode ``8/8/8/8``."""
    t = text.strip().lower()
    try:
        if t == "full":
            return "full"
        if "/" in t:
            return tuple(int(v) for v in t.split("/"))
        if t.isdigit():
            return int(t)
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected full, a fraction, an int or R1/R2/..., got {text!r}") from None


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shape", nargs="?", type=parse_shape, metavar="D_OUTxD_IN",
                   help="weight shape (PyTorch: out_features x in_features), e.g. 4096x4096")
    p.add_argument("--modes", type=parse_modes, metavar="ROWS:COLS",
                   help="explicit mode sizes instead of the automatic factorization, e.g. 16.16.16:16.16.16")
    p.add_argument("--order", type=parse_order, default=DEFAULT_ORDER,
                   help=f"number of modes N, or PxQ (default {DEFAULT_ORDER})")
    p.add_argument("--ranks", type=parse_ranks, default="full",
                   help="Tucker ranks: full (default), a fraction, an int cap, or R1/R2/... per mode")
    p.add_argument("--diag", choices=("rank", "mode", "identity", "both"), default=DEFAULT_DIAG,
                   help=f"where the trained diagonals sit: mode = diag(λ_n) U_n, rank = U_n diag(λ_n) "
                        f"(default {DEFAULT_DIAG})")


def spec_from_args(args) -> Any:
    from ..core.spec import TeRASpec

    if args.shape is None and args.modes is None:
        raise UsageError("give a shape D_OUTxD_IN, --modes ROWS:COLS, or both")
    if args.modes is not None:
        rows, cols = args.modes
        ranks = args.ranks
        if ranks == "full":
            ranks = None
        elif not isinstance(ranks, tuple):
            ranks = TeRASpec._resolve_ranks(rows + cols, ranks)
        d_out, d_in = args.shape if args.shape is not None else (None, None)
        return TeRASpec(rows, cols, ranks, args.diag, d_out, d_in)
    return TeRASpec.from_shape(*args.shape, order=args.order, ranks=args.ranks, diag=args.diag)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# console, progress, threads
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def blas_threads(n: Optional[int]):
    """Limit BLAS threads (threadpoolctl when installed). Rank analysis runs many small SVDs,
    where extra BLAS threads only add contention: on a busy 2-core machine a 1536×384 SVD
    takes ~0.2 s with one thread and several seconds with oversubscribed threads."""
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def console(quiet: bool = False):
    from rich.console import Console

    console = Console(file=sys.stdout, quiet=quiet, highlight=False, soft_wrap=False)
    if not console.is_terminal:  # pipes and files: do not squeeze tables into 80 columns
        console.width = 120
    return console


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)
