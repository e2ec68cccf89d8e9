"""``tera-tn rank`` (:func:`tera_tn.analysis.summary.summarize_update`) and ``tera-tn plan``
(:func:`tera_tn.analysis.summary.summarize_plan`): one layer's rank measures and contraction plan."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from .common import (UsageError, add_spec_arguments, blas_threads, console, nonneg_int, positive_int, progress,
                     spec_from_args)

__all__ = ["add_rank", "add_plan"]


def add_rank(sub) -> None:
    """The ``rank`` subcommand's parser."""
    p = sub.add_parser("rank", help="parameters and rank measures of one TeRA update",
                       description="Spec, parameter counts (vs LoRA/VeRA) and rank measures of one TeRA update: "
                       "the rank theorem's prediction and the exact structured spectrum (no ΔW formed).")
    add_spec_arguments(p)
    p.add_argument("--scales", choices=("random", "ones", "zero_start"), default="random",
                   help="λ at which ranks are measured (default random: |λ| in [0.5, 2])")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the frozen factors and λ (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--structured", dest="structured", action="store_true", default=None,
                   help="always compute the structured spectrum")
    g.add_argument("--no-structured", dest="structured", action="store_false", help="only the rank theorem")
    p.add_argument("--structured-max-side", type=positive_int, default=2048, metavar="N",
                   help="skip the structured spectrum when the core matrix's smaller side exceeds N (default 2048)")
    p.add_argument("--dense", action="store_true", help="also materialize ΔW and SVD it (cross-check; up to 4096x4096)")
    p.add_argument("--threads", type=nonneg_int, default=1, help="BLAS threads (default 1; 0 = library default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_rank)


def _cmd_rank(args) -> int:
    from ..analysis.summary import DENSE_MAX_ELEMENTS, summarize_update

    try:
        spec = spec_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.dense and spec.d_out * spec.d_in > DENSE_MAX_ELEMENTS:
        raise UsageError(f"--dense would SVD a {spec.d_out}×{spec.d_in} matrix; allowed up to 4096×4096")
    with blas_threads(args.threads):
        summary = summarize_update(spec, scales=args.scales, seed=args.seed, structured=args.structured,
                                   structured_max_side=args.structured_max_side, dense=args.dense)
    if args.json:
        print(summary.to_json())
    else:
        console().print(summary)
    return 0


def add_plan(sub) -> None:
    """The ``plan`` subcommand's parser."""
    p = sub.add_parser("plan", help="explain the contraction choice for a token count",
                       description="How the planner computes ΔW·x for N tokens (materialize vs factored): FLOPs, "
                       "largest intermediate, bytes moved and predicted time of both strategies, step by step.")
    add_spec_arguments(p)
    p.add_argument("--tokens", "-n", type=positive_int, required=True, metavar="N",
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
        spec = spec_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with contextlib.ExitStack() as stack:
        staged = None
        if args.plot:
            from ..atomic_files import staging_dir

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
    from ..analysis.summary import summarize_plan

    if args.calibrate:
        from ..contract.costmodel import calibrate

        with progress(1, "calibrating cost model", not args.json) as bar:
            calibrate(args.backend, args.device, args.dtype)
            bar.update(1)
    try:
        summary = summarize_plan(spec, args.tokens, backend=args.backend, device=args.device, dtype=args.dtype,
                                 sweep=args.sweep)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if staged is not None:
        from ..atomic_files import publish
        from ..analysis import figures

        figures.save_figure(summary.figure(), staged, (staged.suffix.lstrip("."),))
        try:
            publish(staged, args.plot, overwrite=args.force)
        except FileExistsError:
            raise UsageError(f"--plot {args.plot!r} appeared while planning; pass --force to overwrite it") from None
    if args.json:
        print(summary.to_json())
        return 0
    console().print(summary, crop=False)  # the explanation is never wrapped or cut
    if args.plot:
        print(f"plot written to {Path(args.plot).resolve()}")
    return 0
