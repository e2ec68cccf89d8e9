"""What every figure of tera_tn shares: the palette, the style and reproducible saving.

Figures are built without ``pyplot`` (no global figure state, no GUI backend) and saved with
byte-identical output for the same figure (no dates, fixed SVG ids). matplotlib is imported lazily
(``pip install tera_tn[plot]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

__all__ = ["COLORS", "new_figure", "save_figure", "style"]

# Colour-blind-safe palette (Okabe–Ito) in a fixed order, so colours never depend on state.
COLORS = {
    "lora": "#E69F00",
    "vera": "#009E73",
    "hira": "#CC79A7",
    "tera": ("#0072B2", "#56B4E9", "#D55E00", "#332288", "#882255", "#117733"),
    "ref": "#555555",
}
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "svg.hashsalt": "tera_tn",
    "svg.fonttype": "path",
}



def new_figure(width: float, height: float, ncols: int = 1):
    """``(figure, [axes])``: a constrained-layout figure of ``ncols`` panels in the project's style."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("tera_tn's figures need matplotlib: pip install 'tera_tn[plot]'") from err
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def style():
    """The project's matplotlib style as a context (drawing inside it keeps fonts and grids alike)."""
    import matplotlib

    return matplotlib.rc_context(RC)


def save_figure(fig, path: Union[str, Path], formats: Sequence[str] = ("png", "svg"), *, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats`` (``path``'s own suffix is
    replaced); reproducible bytes (no timestamps, fixed SVG ids). Returns the written paths."""
    path = Path(path)
    out = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            raise ValueError(f"figure format must be png, svg or pdf, got {fmt!r}")
        target = path.with_suffix("." + fmt)
        meta = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}}[fmt]
        with style():
            fig.savefig(target, format=fmt, dpi=dpi, metadata=meta)
        out.append(target)
    return out
