"""``tera-tn report``: the comparison of TeRA with LoRA, VeRA and HiRA on the built-in model shape
sets, computed by :func:`tera_tn.analysis.report_folder.build_report` and written into a new folder."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Optional

from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER
from .common import UsageError, blas_threads, console, nonneg_int, parse_shape, positive_int, progress

__all__ = ["DEFAULT_REPORT_DIR", "add_report"]

#: folder ``tera-tn report`` writes to when ``--out`` is not given (a timestamped sibling is used
#: when it already exists)
DEFAULT_REPORT_DIR = "tera-tn-report"


def add_report(sub) -> None:
    """The ``report`` subcommand's parser."""
    from ..analysis.report import ACHIEVED_MODES, DEFAULT_METHODS
    from ..analysis.report_folder import REPORT_STRUCTURED_MAX_SIDE

    p = sub.add_parser("report", help="rank/parameter report of TeRA vs LoRA, VeRA, HiRA on built-in model shapes",
                       description="Compare TeRA with LoRA, VeRA and HiRA on built-in model shape sets: print one "
                       "table per model and write tables, plots and JSON into a new folder.")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="built-in shape sets (default: all of them; see 'tera-tn report --list-models')")
    p.add_argument("--list-models", action="store_true", help="list the built-in shape sets and exit")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="methods such as lora:r=8 vera:r=256 hira:r=32 tera:order=6,ranks=0.5 (default: "
                        # The list the report runs, so the help cannot drift from it.
                        + " ".join(DEFAULT_METHODS)
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
    p.add_argument("--structured-max-side", type=positive_int, default=REPORT_STRUCTURED_MAX_SIDE, metavar="N",
                   help=f"auto mode: largest core-matrix side computed numerically (default {REPORT_STRUCTURED_MAX_SIDE})")
    p.add_argument("--spectra-shape", type=parse_shape, default=(768, 768), metavar="D_OUTxD_IN",
                   help="layer of the spectra plot (default 768x768)")
    p.add_argument("--planner-shape", type=parse_shape, default=(4096, 4096), metavar="D_OUTxD_IN",
                   help="layer of the planner plot, order 6 (default 4096x4096)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of frozen factors and random λ (default 0)")
    p.add_argument("--threads", type=nonneg_int, default=1,
                   help="BLAS threads for the SVDs (default 1: fastest for many small SVDs; 0 = library default)")
    p.add_argument("--width", type=positive_int, default=140, help="table width in characters (default 140)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the output folder")
    p.set_defaults(func=_cmd_report)


def _claim_report_folder(out: Optional[str], force: bool, now: _dt.datetime) -> tuple[Path, bool]:
    """Claim the report's output folder atomically, before any computation; return it and whether
    this run created it (a failed run then removes it). Two runs never share a folder."""
    from ..atomic_files import OutputFolderError, claim_dir, unique_sibling

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


def _cmd_report(args) -> int:
    from ..analysis.report import DEFAULT_METHODS
    from ..analysis.report_folder import ReportSettings

    if args.list_models:
        from ..analysis.shapes import MODEL_CONFIGS

        for name, cfg in MODEL_CONFIGS.items():
            print(f"{name:<18} hidden {cfg.hidden_size:>5}  ffn {cfg.intermediate_size:>6}  "
                  f"layers {cfg.num_hidden_layers:>3}  ({cfg.source})")
        return 0
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")] or (not formats and not args.no_plots)
    try:  # cheap checks (an unmatched --targets too) that must fail before the folder is claimed
        settings = ReportSettings(models=tuple(args.models or ()), methods=tuple(args.methods or DEFAULT_METHODS),
                                  targets=args.targets, seed=args.seed, achieved=args.achieved,
                                  structured_max_side=args.structured_max_side,
                                  formats=() if bad or args.no_plots else tuple(formats),
                                  spectra_shape=args.spectra_shape, planner_shape=args.planner_shape)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if bad:
        raise UsageError(f"--formats takes png, svg and/or pdf, got {args.formats!r}")
    now = _dt.datetime.now().replace(microsecond=0)
    folder, fresh = _claim_report_folder(args.out, args.force, now)
    try:
        return _write_report(args, settings, folder, now)
    except BaseException:
        if fresh:  # a failed or interrupted run leaves no half-written folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_report(args, settings, folder: Path, now: _dt.datetime) -> int:
    from ..analysis.report_folder import build_report

    out = console(args.quiet)
    n = len(settings.models)
    bar = progress(n + (2 * n + 4 if settings.formats else 0), "report", not args.quiet and not args.no_progress)

    def step(description: str) -> None:
        bar.set_description(description)
        bar.update(1)

    try:
        with blas_threads(args.threads):
            report = build_report(settings, created=now, on_step=step)
            report.write(folder, width=args.width, command=" ".join(["tera-tn", "report", *args._argv]),
                         on_figure=lambda stem: step(f"plot: {stem}"))
    finally:
        bar.close()
    if not args.quiet:  # already rendered at --width; rich would re-wrap to the terminal
        print(report.to_text(args.width) + "\n")
    out.print(report.summary())
    # Always name the folder, even with --quiet: it is the command's result.
    print(f"report written to {folder.resolve()}/", flush=True)
    return 0
