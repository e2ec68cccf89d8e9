"""mkdocs hook: generate the documentation's figures with tera_tn.analysis.plot while the site builds.

Figures are rendered in memory and added to the build as generated files under ``figures/``
(nothing is written into ``docs/``), so they always match the library that built the site.
"""

from __future__ import annotations

import io


FIGURES = {
    "tradeoff-bert-base": ("tradeoff_figure", ("bert-base",), {}),
    "tradeoff-llama-2-7b": ("tradeoff_figure", ("llama-2-7b",), {}),
    "spectra": ("spectra_figure", (768, 768), {}),
    "planner": ("planner_figure", (), {}),
}


def on_files(files, config, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    from mkdocs.structure.files import File

    from tera_tn.analysis import plot

    for name, (fn, args, kw) in FIGURES.items():
        fig = getattr(plot, fn)(*args, **kw)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        files.append(File.generated(config, f"figures/{name}.png", content=buf.getvalue()))
    return files
