"""Plot TeRA's rank/parameter trade-off, update spectra and planner cost with tera_tn.analysis.plot.

    python examples/plot_tradeoffs.py --out figures            # llama-2-7b trade-off, 768² spectra
    python examples/plot_tradeoffs.py --smoke --out /tmp/figs  # MiniLM, 128² spectra, PNG only

Writes into a new folder (refuses an existing non-empty one).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.analysis import plot
from tera_tn.analysis.figures import save_figure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tera-tn-figures", help="output folder (must be new or empty)")
    ap.add_argument("--model", default="llama-2-7b", help="built-in shape set for the trade-off plot")
    ap.add_argument("--smoke", action="store_true", help="small settings")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model = "all-MiniLM-L6-v2" if args.smoke else args.model
    shape = (128, 128) if args.smoke else (768, 768)
    formats = ("png",) if args.smoke else ("png", "svg")

    data = plot.tradeoff_data(model)
    for s in data["series"]:
        best = max(s["points"], key=lambda p: p["max_rank"] / p["trainable"])
        print(f"{s['label']:<14} e.g. {best['config']}: {best['trainable']:,} trained, max rank {best['max_rank']}")
    written = save_figure(plot.tradeoff_figure(model, data=data), out / f"tradeoff-{model}", formats)
    written += save_figure(plot.spectra_figure(*shape), out / "spectra", formats)
    spec = TeRASpec.from_shape(1024, 1024, order=6) if args.smoke else None
    pdata = plot.planner_data(spec)
    written += save_figure(plot.planner_figure(data=pdata), out / "planner", formats)
    (out / "tradeoff.json").write_text(json.dumps(data, indent=2))
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
