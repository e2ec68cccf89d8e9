"""The ``tera-tn`` command.

* ``tera-tn report`` — the main job: compares TeRA with LoRA, VeRA and HiRA on the built-in model
  shape sets (parameters, adapter file size, ranks), prints one table per model and writes the
  tables, trade-off/spectrum/planner plots (PNG and SVG) and a JSON file into a new folder.
* ``tera-tn rank`` — spec, parameter counts and every rank measure of one TeRA update.
* ``tera-tn plan`` — how the contraction planner computes ``ΔW x`` for a token count, and why.
* ``tera-tn finetune`` — the MiniLM fine-tuning benchmark (:mod:`tera_tn.finetune`).
* ``tera-tn export`` — a saved TeRA adapter as a LoRA adapter for LoRA servers (:mod:`tera_tn.peft.export`).

Bad arguments print one ``error:`` line on stderr and exit with status 2, before any heavy work
(output paths are checked and claimed first); a failure of the machine during the work (a full
disk) prints one ``error:`` line and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

# Already loaded with the tera_tn package; the parser's defaults are the library's.
from .core.spec import DEFAULT_DIAG, DEFAULT_ORDER

__all__ = ["main", "build_parser", "DEFAULT_REPORT_DIR", "UsageError"]

#: folder ``tera-tn report`` writes to when ``--out`` is not given (a timestamped sibling is used
#: when it already exists)
DEFAULT_REPORT_DIR = "tera-tn-report"
#: structured spectra (a numerical check of the rank) are computed when the core matrix's smaller
#: side is at most this; larger groups use the rank theorem. Keeps the default report fast.
DEFAULT_STRUCTURED_MAX_SIDE = 512


class UsageError(Exception):
    """A bad argument detected after parsing (reported like an argparse error, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------
def _int_at_least(low: int, what: str):
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


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _shape(text: str) -> tuple[int, int]:
    """``"768x3072"`` (also ``768,3072`` or ``768×3072``) → ``(768, 3072)``."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        d_out, d_in = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape D_OUTxD_IN such as 4096x4096, got {text!r}") from None
    if d_out < 1 or d_in < 1:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive, got {text!r}")
    return d_out, d_in


def _modes(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def _order(text: str):
    """``6`` or ``3x3`` (rows × columns)."""
    try:
        if "x" in text.lower():
            p, q = (int(v) for v in text.lower().split("x"))
            return (p, q)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an order such as 6 or 3x3, got {text!r}") from None


def _ranks(text: str):
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


def _add_spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shape", nargs="?", type=_shape, metavar="D_OUTxD_IN",
                   help="weight shape (PyTorch: out_features x in_features), e.g. 4096x4096")
    p.add_argument("--modes", type=_modes, metavar="ROWS:COLS",
                   help="explicit mode sizes instead of the automatic factorization, e.g. 16.16.16:16.16.16")
    p.add_argument("--order", type=_order, default=DEFAULT_ORDER,
                   help=f"number of modes N, or PxQ (default {DEFAULT_ORDER})")
    p.add_argument("--ranks", type=_ranks, default="full",
                   help="Tucker ranks: full (default), a fraction, an int cap, or R1/R2/... per mode")
    p.add_argument("--diag", choices=("rank", "mode", "identity", "both"), default=DEFAULT_DIAG,
                   help=f"where the trained diagonals sit: mode = diag(λ_n) U_n, rank = U_n diag(λ_n) "
                        f"(default {DEFAULT_DIAG})")


def _spec_from_args(args) -> Any:
    from .core.spec import TeRASpec

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


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _blas_threads(n: Optional[int]):
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


def _console(quiet: bool = False):
    from rich.console import Console

    console = Console(file=sys.stdout, quiet=quiet, highlight=False, soft_wrap=False)
    if not console.is_terminal:  # pipes and files: do not squeeze tables into 80 columns
        console.width = 120
    return console


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _dump(data) -> str:
    """JSON text; ``inf``/``nan`` become strings so the file stays strict JSON."""
    return json.dumps(_sanitize(data), indent=2, default=_json_default, allow_nan=False)


def _sanitize(data):
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _sanitize(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_sanitize(v) for v in data]
    return data


# --------------------------------------------------------------------------------------------
# tera-tn report
# --------------------------------------------------------------------------------------------
def _claim_report_folder(out: Optional[str], force: bool, now: _dt.datetime) -> tuple[Path, bool]:
    """Claim the report's output folder atomically, before any computation; return it and whether
    this run created it (a failed run then removes it). Two runs never share a folder."""
    from ._files import OutputFolderError, claim_dir, unique_sibling

    if out is None:
        try:
            return unique_sibling(DEFAULT_REPORT_DIR, now.strftime("%Y%m%d-%H%M%S"), kind="report"), True
        except OSError as err:
            raise UsageError(f"cannot create a report folder in {os.getcwd()!r}: {err.strerror or err}") from None
    if not out.strip():
        raise UsageError("--out expects a folder path, got ''")
    fresh = not os.path.lexists(out)
    try:
        return claim_dir(out, kind="report", overwrite=force), fresh
    except (OutputFolderError, NotADirectoryError) as err:
        raise UsageError(f"--out: {err}") from None
    except OSError as err:  # not a folder, no permission, read-only or special file system
        reason = err.strerror or str(err)
        raise UsageError(f"--out {out!r} cannot be used as the report folder ({reason}); "
                         "expected a writable folder path") from None


_README = """# tera-tn report

Written by `tera-tn {argv}` (tera_tn {version}) on {date}, in {elapsed:.1f} s.

| file | content |
|---|---|
| `report.json` | every number below, plus settings, trade-off points, spectra and planner predictions |
| `report.txt` | the tables printed on the console, one per model |
{plot_rows}
Columns: *trainable* numbers over all adapted layers; *% dense* of the layers' dense weights;
*frozen shared* numbers stored once (TeRA core and factors per shape group, VeRA's A/B);
*adapter file* the exact size of the adapter_model.safetensors PEFT writes (fp32 trainable
tensors; for TeRA also its signature, at the default seed and α); *max rank* of ΔW
(smallest over layers); *rank @ random λ* for TeRA, from the exact structured spectrum
(numerical rank, float64 threshold) for small core matrices or the rank theorem otherwise.
"""


def _cmd_report(args) -> int:
    from .analysis import report as report_mod
    from .analysis.shapes import available_models, model_config, model_shapes

    try:
        models = [model_config(m).name for m in (args.models or available_models())]
        for name in models:  # cheap; an unmatched --targets must fail before the folder is claimed
            model_shapes(name, args.targets)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        methods = [report_mod.Method.parse(m) for m in (args.methods or report_mod.DEFAULT_METHODS)]
    except ValueError as err:
        raise UsageError(str(err)) from None
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or (not formats and not args.no_plots):
        raise UsageError(f"--formats takes png, svg and/or pdf, got {args.formats!r}")
    now = _dt.datetime.now().replace(microsecond=0)
    folder, fresh = _claim_report_folder(args.out, args.force, now)
    try:
        return _write_report(args, folder, now, models, methods, formats)
    except BaseException:
        if fresh:  # a failed or interrupted run leaves no half-written folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_report(args, folder: Path, now: _dt.datetime, models: list, methods: list, formats: list) -> int:
    from . import __version__
    from .analysis import report as report_mod

    console = _console(args.quiet)
    show_progress = not args.quiet and not args.no_progress

    t0 = time.perf_counter()
    plots: list[str] = []
    n_steps = len(models) + (0 if args.no_plots else len(models) + 2)
    bar = _progress(n_steps, "report", show_progress)
    reports = []
    try:
        with _blas_threads(args.threads):
            for name in models:
                bar.set_description(f"report: {name}")
                try:
                    rep = report_mod.model_report(name, methods, target_modules=args.targets, seed=args.seed,
                                                  achieved=args.achieved,
                                                  structured_max_side=args.structured_max_side)
                except ValueError as err:
                    raise UsageError(f"{name}: {err}") from None
                reports.append(rep)
                bar.update(1)
            extra: dict[str, Any] = {}
            if not args.no_plots:
                from .analysis import plot
                from .analysis.figures import save_figure

                tradeoffs = {}
                for name in models:
                    bar.set_description(f"plot: trade-off {name}")
                    data = plot.tradeoff_data(name, target_modules=args.targets)
                    tradeoffs[name] = data
                    fig = plot.tradeoff_figure(name, data=data)
                    plots += [str(p.name) for p in save_figure(fig, folder / f"tradeoff-{name}", formats)]
                    bar.update(1)
                bar.set_description("plot: spectra")
                spectra = plot.spectra_data(*args.spectra_shape, seed=args.seed)
                plots += [p.name for p in save_figure(plot.spectra_figure(data=spectra), folder / "spectra", formats)]
                bar.update(1)
                bar.set_description("plot: planner")
                from .core.spec import TeRASpec

                planner = plot.planner_data(TeRASpec.from_shape(*args.planner_shape, order=6))
                plots += [p.name for p in save_figure(plot.planner_figure(data=planner), folder / "planner", formats)]
                bar.update(1)
                for s in spectra["series"]:  # keep the JSON small: summaries, not 768 values each
                    s["sv_head"] = s["sv"][:8]
                    del s["sv"]
                extra = {"tradeoff": tradeoffs, "spectra": spectra, "planner": planner}
    finally:
        bar.close()

    elapsed = time.perf_counter() - t0
    tables = [rep.to_table(width=args.width) for rep in reports]
    if not args.quiet:
        for text in tables:  # already rendered at --width; rich would re-wrap to the terminal
            print(text + "\n")
    (folder / "report.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    payload = {
        "tool": "tera-tn report",
        "version": __version__,
        "created": now.isoformat(),
        "elapsed_s": round(elapsed, 3),
        "settings": {
            "models": models,
            "methods": [m.label for m in methods],
            "method_specs": list(args.methods or report_mod.DEFAULT_METHODS),
            "targets": args.targets,
            "seed": args.seed,
            "achieved": args.achieved,
            "structured_max_side": args.structured_max_side,
            "formats": [] if args.no_plots else formats,
        },
        "models": [rep.to_dict() for rep in reports],
        **extra,
        "files": ["README.md", "report.json", "report.txt", *plots],
    }
    (folder / "report.json").write_text(_dump(payload) + "\n", encoding="utf-8")
    plot_rows = "".join(f"| `{p}` | {_describe_plot(p)} |\n" for p in plots)
    (folder / "README.md").write_text(_README.format(
        argv=" ".join(["report", *args._argv]), version=__version__, date=now.isoformat(sep=" "),
        elapsed=elapsed, plot_rows=plot_rows), encoding="utf-8")
    console.print(f"{len(models)} model(s), {len(methods)} methods, {len(plots)} plot file(s) in {elapsed:.1f} s")
    # Always name the folder, even with --quiet: it is the command's result.
    print(f"report written to {folder.resolve()}/", flush=True)
    return 0


def _describe_plot(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("tradeoff-"):
        return f"max rank of ΔW vs trainable parameters, {stem[len('tradeoff-'):]} (log–log)"
    if stem == "spectra":
        return "singular-value spectra of constructed TeRA / LoRA / VeRA updates at equal budget"
    if stem == "planner":
        return "planner's predicted time of materialize vs factored against token count"
    return ""


# --------------------------------------------------------------------------------------------
# tera-tn rank
# --------------------------------------------------------------------------------------------
def _cmd_rank(args) -> int:
    import numpy as np

    from .analysis.accounting import layer_cost
    from .core.factors import init_scales, random_factors
    from .core.network import delta_weight, theoretical_rank
    from .analysis.rank import rank_summary
    from .analysis.spectrum import tera_rank_summary

    try:
        spec = _spec_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    side = min(math.prod(spec.ranks[: spec.n_row]), math.prod(spec.ranks[spec.n_row:]))
    if args.dense and spec.d_out * spec.d_in > 4096 * 4096:
        raise UsageError(f"--dense would SVD a {spec.d_out}×{spec.d_in} matrix; allowed up to 4096×4096")
    scales = init_scales(spec, args.scales, seed=args.seed if args.scales == "random" else None)
    result: dict[str, Any] = {
        "spec": str(spec),
        "shape": list(spec.shape),
        "row_modes": list(spec.row_modes),
        "col_modes": list(spec.col_modes),
        "ranks": list(spec.ranks),
        "diag": spec.diag,
        "padding_overhead": spec.padding_overhead,
        "trainable": spec.num_trainable,
        "frozen_shared": spec.num_frozen,
        "max_rank": spec.max_rank,
        "scales": args.scales,
        "seed": args.seed,
        "theoretical_rank": theoretical_rank(spec, scales),
        "comparison": {
            label: {"trainable": lc.trainable, "max_rank": lc.max_rank}
            for label, lc in (
                (f"LoRA r={r}", layer_cost("lora", *spec.shape, r=r)) for r in (8, 32)
            )
        },
    }
    result["comparison"]["VeRA r=256"] = {k: getattr(layer_cost("vera", *spec.shape, r=256), k) for k in ("trainable", "max_rank")}
    structured = args.structured if args.structured is not None else side <= args.structured_max_side
    t0 = time.perf_counter()
    with _blas_threads(args.threads):
        if structured:
            factors = random_factors(spec, args.seed)
            s64 = tera_rank_summary(spec, factors, scales, dtype="float64")
            s32 = tera_rank_summary(spec, factors, scales, dtype="float32")
            result["structured"] = {"float64": s64.to_dict(), "float32_threshold": s32.to_dict()}
        if args.dense:
            factors = random_factors(spec, args.seed)
            dw = np.asarray(delta_weight(spec, factors, scales))
            result["dense"] = rank_summary(dw).to_dict()
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(_dump(result))
        return 0
    from rich.table import Table

    console = _console()
    console.print(str(spec), markup=False)
    t = Table(title="parameters (one layer)", title_justify="left")
    t.add_column("method")
    t.add_column("trainable", justify="right")
    t.add_column("max rank ΔW", justify="right")
    t.add_row("TeRA", f"{spec.num_trainable:,}", str(spec.max_rank))
    for label, c in result["comparison"].items():
        t.add_row(label, f"{c['trainable']:,}", str(c["max_rank"]))
    console.print(t)
    console.print(f"frozen shared per shape group: {spec.num_frozen:,}; padding overhead {spec.padding_overhead:.2%}")
    console.print(f"theoretical rank at λ = {args.scales}: {result['theoretical_rank']} (rank theorem)")
    rows = []
    if "structured" in result:
        rows.append(("structured, float64 threshold", result["structured"]["float64"]))
        rows.append(("structured, float32 threshold", result["structured"]["float32_threshold"]))
    if "dense" in result:
        rows.append(("dense SVD of ΔW", result["dense"]))
    if rows:
        t = Table(title=f"rank measures of ΔW (seed {args.seed})", title_justify="left")
        for h in ("source", "numerical", "stable", "effective", "energy 99%", "σ_max", "condition"):
            t.add_column(h, justify="left" if h == "source" else "right")
        for label, s in rows:
            t.add_row(label, str(s["numerical_rank"]), f"{s['stable_rank']:.1f}", f"{s['effective_rank']:.1f}",
                      str(s["energy_rank"]), f"{s['sigma_max']:.3g}",
                      s["condition_number"] if isinstance(s["condition_number"], str) else f"{s['condition_number']:.3g}")
        console.print(t)
    else:
        console.print(f"(structured spectrum skipped: core matrix side {side} > {args.structured_max_side}; "
                      "pass --structured to compute it)")
    return 0


# --------------------------------------------------------------------------------------------
# tera-tn plan
# --------------------------------------------------------------------------------------------
def _plot_target(text: str, force: bool) -> tuple[Path, str]:
    """Check ``--plot FILE`` before any work: a known format, a folder that exists (or can be
    created) and is writable, and no existing file unless ``--force``."""
    target = Path(text)
    fmt = target.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf") or not target.name:
        raise UsageError(f"--plot must end in .png, .svg or .pdf, got {text!r}")
    if target.is_dir():
        raise UsageError(f"--plot {text!r} is a folder; expected a file path such as {str(target / 'planner.png')!r}")
    if os.path.lexists(target) and not force:
        raise UsageError(f"--plot {text!r} exists; pass --force to overwrite it")
    return target, fmt


def _cmd_plan(args) -> int:
    try:
        spec = _spec_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with contextlib.ExitStack() as stack:
        staged = None
        if args.plot:
            from ._files import staging_dir

            target, fmt = _plot_target(args.plot, args.force)
            try:  # creating the staging folder proves the plot's folder is writable, before any work
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = stack.enter_context(staging_dir(target.parent, target.name)) / f"plot.{fmt}"
            except OSError as err:
                raise UsageError(f"--plot {args.plot!r} cannot be written ({err.strerror or err}); "
                                 "expected a file path in a writable folder") from None
        return _run_plan(args, spec, staged)


def _run_plan(args, spec, staged: Optional[Path]) -> int:
    """The plan command once its arguments are checked; ``staged`` is where ``--plot`` is drawn
    before it is moved onto its target."""
    from .contract.contraction import plan

    if args.calibrate:
        from .contract.costmodel import calibrate

        with _progress(1, "calibrating cost model", not args.json) as bar:
            calibrate(args.backend, args.device, args.dtype)
            bar.update(1)
    try:
        p = plan(spec, args.tokens, backend=args.backend, device=args.device, dtype=args.dtype)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sweep = None
    if args.sweep:
        from .analysis.plot import planner_data

        sweep = planner_data(spec, [2**k for k in range(0, 17)], backend=args.backend, device=args.device, dtype=args.dtype)
    if staged is not None:
        from ._files import publish
        from .analysis.figures import save_figure
        from .analysis.plot import planner_data, planner_figure

        data = sweep or planner_data(spec, sorted({*(2**k for k in range(17)), args.tokens}),
                                     backend=args.backend, device=args.device, dtype=args.dtype)
        save_figure(planner_figure(data=data), staged, (staged.suffix.lstrip("."),))
        try:
            publish(staged, args.plot, overwrite=args.force)
        except FileExistsError:
            raise UsageError(f"--plot {args.plot!r} appeared while planning; pass --force to overwrite it") from None
    if args.json:
        out = {
            "spec": str(spec), "n_tokens": p.n_tokens, "backend": list(p.backend), "strategy": p.strategy,
            "speedup": p.speedup,
            "materialize": {k: getattr(p.materialize, k) for k in ("flops", "largest_intermediate", "bytes_moved", "seconds", "steps")},
            "factored": {k: getattr(p.factored, k) for k in ("flops", "largest_intermediate", "bytes_moved", "seconds", "steps")},
        }
        if sweep:
            out["sweep"] = sweep
        print(_dump(out))
        return 0
    print(p)
    if sweep:
        from rich.table import Table

        t = Table(title="predicted ms per call by token count", title_justify="left")
        for h in ("tokens", "materialize", "factored", "chosen"):
            t.add_column(h, justify="right")
        for n, m, f, c in zip(sweep["n_tokens"], sweep["materialize_s"], sweep["factored_s"], sweep["chosen"]):
            t.add_row(f"{n:,}", f"{m * 1e3:.3f}", f"{f * 1e3:.3f}", c)
        _console().print(t)
        if sweep["switches"]:
            for sw in sweep["switches"]:
                print(f"switch from {sw['from']} to {sw['to']} at n = {sw['n_tokens']:,}")
        else:
            print(f"no switch: {sweep['chosen'][0]} for every n from 1 to {sweep['n_tokens'][-1]:,}")
    if args.plot:
        print(f"plot written to {Path(args.plot).resolve()}")
    return 0


# --------------------------------------------------------------------------------------------
# tera-tn finetune
# --------------------------------------------------------------------------------------------
def _add_finetune(sub) -> None:
    from .finetune import DEFAULT_LR, FinetuneConfig

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
    p.add_argument("--lr", type=_positive_float, metavar="LR",
                   help="learning rate of the adapter (default: " +
                   ", ".join(f"{m} {DEFAULT_LR[m]:g}" for m in ("tera", "lora", "vera")) + ")")
    p.add_argument("--head-lr", type=_positive_float, default=FinetuneConfig.head_lr, metavar="LR",
                   help="learning rate of the classification head (default %(default)g); on many-class data "
                        "a larger one can matter more than the adapter's")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training data (default 3)")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--max-length", type=_positive_int, default=128,
                   help="tokens per text (default 128; at most the model's positions, 512 for the default model)")
    p.add_argument("--seeds", type=_seed_list, default=(0,), metavar="S,...", help="seeds, one run each (default 0)")
    p.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch CPU threads (default 0: torch's choice; at most the CPUs this process may use)")
    p.add_argument("--out", "-o", default="tera-tn-finetune", metavar="DIR",
                   help="new output folder (default ./tera-tn-finetune)")
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="replace an earlier 'tera-tn finetune' output folder (never any other folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _seed_list(text: str) -> tuple[int, ...]:
    seeds = tuple(_nonneg_int(s.strip()) for s in text.split(","))
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


def _strict_metrics(row: dict) -> dict:
    """``row`` as strict JSON: a non-finite number becomes null, is named under ``nonfinite`` and
    flags the run ``diverged`` (NaN/Infinity are not JSON; a loss that blew up is a divergence)."""
    bad = {k: repr(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad, "diverged": True}


def _cmd_finetune(args) -> int:
    from . import finetune as ft
    from ._files import OutputFolderError, claim_dir, release_dir, staging_dir, write_atomic

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
        return ft.read_examples(path, args.text_column, args.label_column, encoding=args.encoding,
                                min_classes=min_classes)

    try:
        examples, names = read(args.data_path)
        # a validation or test file may hold a single class: only training needs two
        parts = {"validation": args.validation_path, "test": args.test_path}
        extra = {k: _examples_as(read(p, min_classes=1), names, p) for k, p in parts.items() if p is not None}
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

    rows: list[dict] = []
    record = {"labels": list(names), "method": args.method, "adapter": args.adapter, "model": str(model_dir.resolve()),
              "data": {"train": args.data_path, "validation": args.validation_path, "test": args.test_path},
              "text_column": args.text_column, "label_column": args.label_column, "seeds": list(args.seeds),
              "complete": False, "runs": rows}
    published = False
    try:
        import random

        import torch
        from tqdm.auto import tqdm

        if args.threads:
            torch.set_num_threads(args.threads)
        model = ft.load_model(model_dir)
        for config in configs:
            train, validation = examples, extra.get("validation")
            if validation is None:
                shuffled = list(examples)
                random.Random(config.seed).shuffle(shuffled)
                n_val = max(1, round(args.val_fraction * len(shuffled)))
                validation, train = shuffled[:n_val], shuffled[n_val:]
            bar = tqdm(desc=f"{args.method} seed {config.seed}", unit="step", disable=args.no_progress, leave=False)

            def step(i: int, total: int, loss: float) -> None:
                bar.total = total
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            result = ft.finetune(config, train, validation, extra.get("test"), model=model, num_labels=len(names),
                                 on_step=step)
            bar.close()
            # each seed's folder appears whole (written aside, then renamed), then results.json is
            # rewritten atomically: a run killed at any point leaves every finished seed recorded
            name = f"seed{config.seed}"
            with staging_dir(out, name) as tmp:
                ft.save_adapter(result, tmp, labels=names, model_dir=model_dir, text_column=args.text_column,
                                label_column=args.label_column)
                os.rename(tmp, out / name)
            published = True
            rows.append(_strict_metrics({"seed": config.seed, **result.metrics}))
            record["complete"] = len(rows) == len(configs)
            write_atomic(out / "results.json", (json.dumps(record, indent=2, allow_nan=False) + "\n").encode(),
                         overwrite=True)
    except BaseException:
        if not published:  # nothing of this run was written: the folder is not left claimed
            release_dir(out, created=created)
        raise
    print(f"{'seed':>4}  {'val acc':>7}  {'test acc':>8}  {'trainable':>10}  {'lr':>7}  {'train s':>7}")
    for r in rows:
        test = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "-"
        print(f"{r['seed']:>4}  {r['val_accuracy']:>7.4f}  {test:>8}  {r['trainable_params']:>10,}  {r['lr']:>7g}  "
              f"{r['train_time_s']:>7.1f}{'  (diverged)' if r['diverged'] else ''}")
    print(f"results written to {out.resolve()}/", flush=True)
    return 0


def _examples_as(read: tuple, names: tuple, path: str) -> list:
    """Re-index a second file's labels onto the training file's label names."""
    examples, their = read
    unknown = sorted(set(their) - set(names))
    if unknown:
        raise UsageError(f"{path!r} has labels {unknown[:5]} that the training data lacks; expected labels "
                         f"among {list(names)[:20]}")
    index = {n: i for i, n in enumerate(names)}
    return [(t, index[their[y]]) for t, y in examples]


# --------------------------------------------------------------------------------------------
# tera-tn export
# --------------------------------------------------------------------------------------------
def _add_export(sub) -> None:
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


# vLLM's max_lora_rank values (tera_tn.peft.export.VLLM_RANKS; repeated so --help never imports torch)
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

    from .peft.export import _check_folder, _check_rank_set, _criterion, export_lora

    # the library's own checks, before the model is loaded (seconds to minutes)
    try:
        _criterion(args.rank, args.energy, args.budget)
        _check_rank_set(rank_set)
        _check_folder(Path(args.out), args.overwrite)
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


# --------------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``tera-tn`` argument parser (subcommands report, rank, plan, finetune)."""
    from . import __version__
    from .analysis.report import ACHIEVED_MODES

    parser = _Parser(prog="tera-tn", description="TeRA adapters as tensor networks: reports, rank analysis, "
                     "contraction planning and fine-tuning.",
                     epilog="Run 'tera-tn COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"tera_tn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("report", help="rank/parameter report of TeRA vs LoRA, VeRA, HiRA on built-in model shapes",
                       description="Compare TeRA with LoRA, VeRA and HiRA on built-in model shape sets: print one "
                       "table per model and write tables, plots and JSON into a new folder.")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="built-in shape sets (default: all of them; see 'tera-tn report --list-models')")
    p.add_argument("--list-models", action="store_true", help="list the built-in shape sets and exit")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="methods such as lora:r=8 vera:r=256 hira:r=32 tera:order=6,ranks=0.5 (default: "
                        # The list the report runs (report.DEFAULT_METHODS), so the help cannot drift from it.
                        + " ".join(__import__("tera_tn.analysis.report", fromlist=["DEFAULT_METHODS"]).DEFAULT_METHODS)
                        + f"; a bare 'tera' is the library's default: order {DEFAULT_ORDER}, diag={DEFAULT_DIAG!r}, "
                        "full ranks)")
    p.add_argument("--targets", nargs="+", metavar="MODULE",
                   help="adapt only these modules (suffixes or kinds: q k v o up down ...); default all block linears")
    p.add_argument("--out", "-o", metavar="DIR",
                   help=f"output folder (default ./{DEFAULT_REPORT_DIR}, or a timestamped one when that exists)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier report in the --out folder (only a folder 'tera-tn report' wrote)")
    p.add_argument("--formats", default="png,svg", help="plot formats, comma separated (default png,svg)")
    p.add_argument("--no-plots", action="store_true", help="tables and JSON only")
    p.add_argument("--achieved", choices=ACHIEVED_MODES, default="auto",
                   help="how TeRA's rank at random λ is computed (default auto: structured spectrum for small "
                        "core matrices, rank theorem otherwise)")
    p.add_argument("--structured-max-side", type=_positive_int, default=DEFAULT_STRUCTURED_MAX_SIDE, metavar="N",
                   help=f"auto mode: largest core-matrix side computed numerically (default {DEFAULT_STRUCTURED_MAX_SIDE})")
    p.add_argument("--spectra-shape", type=_shape, default=(768, 768), metavar="D_OUTxD_IN",
                   help="layer of the spectra plot (default 768x768)")
    p.add_argument("--planner-shape", type=_shape, default=(4096, 4096), metavar="D_OUTxD_IN",
                   help="layer of the planner plot, order 6 (default 4096x4096)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of frozen factors and random λ (default 0)")
    p.add_argument("--threads", type=_nonneg_int, default=1,
                   help="BLAS threads for the SVDs (default 1: fastest for many small SVDs; 0 = library default)")
    p.add_argument("--width", type=_positive_int, default=140, help="table width in characters (default 140)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the output folder")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("rank", help="parameters and rank measures of one TeRA update",
                       description="Spec, parameter counts (vs LoRA/VeRA) and rank measures of one TeRA update: "
                       "the rank theorem's prediction and the exact structured spectrum (no ΔW formed).")
    _add_spec_arguments(p)
    p.add_argument("--scales", choices=("random", "ones", "zero_start"), default="random",
                   help="λ at which ranks are measured (default random: |λ| in [0.5, 2])")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the frozen factors and λ (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--structured", dest="structured", action="store_true", default=None,
                   help="always compute the structured spectrum")
    g.add_argument("--no-structured", dest="structured", action="store_false", help="only the rank theorem")
    p.add_argument("--structured-max-side", type=_positive_int, default=2048, metavar="N",
                   help="skip the structured spectrum when the core matrix's smaller side exceeds N (default 2048)")
    p.add_argument("--dense", action="store_true", help="also materialize ΔW and SVD it (cross-check; up to 4096x4096)")
    p.add_argument("--threads", type=_nonneg_int, default=1, help="BLAS threads (default 1; 0 = library default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_rank)

    p = sub.add_parser("plan", help="explain the contraction choice for a token count",
                       description="How the planner computes ΔW·x for N tokens (materialize vs factored): FLOPs, "
                       "largest intermediate, bytes moved and predicted time of both strategies, step by step.")
    _add_spec_arguments(p)
    p.add_argument("--tokens", "-n", type=_positive_int, required=True, metavar="N",
                   help="tokens per call (batch × sequence)")
    p.add_argument("--backend", choices=("torch", "numpy"), default="torch", help="cost-model backend (default torch)")
    p.add_argument("--device", default="cpu", help="cost-model device (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                   help="cost-model dtype (default float32)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine first (about a second)")
    p.add_argument("--sweep", action="store_true", help="also tabulate both strategies for n = 1, 2, 4, … 65536")
    p.add_argument("--plot", metavar="FILE", help="write the planner-cost-vs-tokens plot (.png, .svg or .pdf)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the explanation")
    p.set_defaults(func=_cmd_plan)

    _add_finetune(sub)
    _add_export(sub)
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
    if args.command == "report" and args.list_models:
        from .analysis.shapes import MODEL_CONFIGS

        for name, cfg in MODEL_CONFIGS.items():
            print(f"{name:<18} hidden {cfg.hidden_size:>5}  ffn {cfg.intermediate_size:>6}  "
                  f"layers {cfg.num_hidden_layers:>3}  ({cfg.source})")
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
