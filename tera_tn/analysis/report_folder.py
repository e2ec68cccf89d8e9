"""The ``tera-tn report`` folder: several models' comparison tables plus the data of the
trade-off, spectra and planner figures, written into one folder.

:class:`ReportSettings` says what to compute (and is checked when made, before any work);
:func:`build_report` computes a :class:`Report`, which renders itself (``str()``: the tables;
:meth:`Report.to_json`: ``report.json``; :meth:`Report.figures`; :meth:`Report.readme`) and
writes the folder (:meth:`Report.write`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from . import report
from .methods import Method
from .report import ACHIEVED_MODES, DEFAULT_METHODS, ModelReport
from .shapes import model_shapes
from ..checks import check_size
from ..core.spec import TeRASpec

__all__ = ["ReportSettings", "Report", "build_report", "REPORT_STRUCTURED_MAX_SIDE"]

#: ``structured_max_side`` of :class:`ReportSettings`: keeps the default report fast
REPORT_STRUCTURED_MAX_SIDE = 512
_FORMATS = ("png", "svg", "pdf")
_README = """# tera-tn report

Written by `{command}` (tera_tn {version}) on {date}, in {elapsed:.1f} s.

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
_PLOTS = {"tradeoff": "max rank of ΔW vs trainable parameters, {model} (log–log)",
          "spectra": "singular-value spectra of constructed TeRA / LoRA / VeRA updates at equal budget",
          "planner": "planner's predicted time of materialize vs factored against token count"}


@dataclass(frozen=True)
class ReportSettings:
    """What a :func:`build_report` computes; checked when made (cheap: no rank is computed).

    Attributes:
        models: built-in shape sets (:func:`tera_tn.analysis.shapes.available_models`; empty: all),
            kept as their display names.
        methods: method strings (:meth:`tera_tn.analysis.methods.Method.parse`).
        targets: adapt only these modules (suffixes or kinds), or None for every block linear.
        seed, achieved, structured_max_side: as in :func:`model_report`.
        formats: figure formats (``png``, ``svg``, ``pdf``); empty: no figures.
        spectra_shape, planner_shape: the layers of the spectra and planner figures.
        planner_spec: the planner figure's spec (order 6 on ``planner_shape``), made with the
            settings so that a shape it cannot tensorize fails before any work.
    """

    models: tuple[str, ...] = ()
    methods: tuple[str, ...] = DEFAULT_METHODS
    targets: Optional[tuple[str, ...]] = None
    seed: int = 0
    achieved: str = "auto"
    structured_max_side: int = REPORT_STRUCTURED_MAX_SIDE
    formats: tuple[str, ...] = ("png", "svg")
    spectra_shape: tuple[int, int] = (768, 768)
    planner_shape: tuple[int, int] = (4096, 4096)
    planner_spec: TeRASpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .shapes import available_models, model_config

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("models", tuple(model_config(m).name for m in (self.models or available_models())))
        set_("targets", None if self.targets is None else tuple(self.targets))
        for name in self.models:  # an unmatched target fails here, not after minutes of work
            model_shapes(name, None if self.targets is None else list(self.targets))
        set_("methods", tuple(self.methods))
        for m in self.methods:
            Method.parse(m)
        if not self.methods:
            raise ValueError("ReportSettings needs at least one method")
        if self.achieved not in ACHIEVED_MODES:
            raise ValueError(f"ReportSettings achieved must be one of {ACHIEVED_MODES}, got {self.achieved!r}")
        set_("formats", tuple(self.formats))
        if any(f not in _FORMATS for f in self.formats):
            raise ValueError(f"ReportSettings formats must be among {_FORMATS}, got {self.formats!r}")
        set_("seed", check_size("ReportSettings seed", self.seed, low=0))
        set_("spectra_shape", _layer_shape("spectra_shape", self.spectra_shape))
        set_("planner_shape", _layer_shape("planner_shape", self.planner_shape))
        set_("planner_spec", TeRASpec.from_shape(*self.planner_shape, order=6))

    @property
    def method_list(self) -> tuple[Method, ...]:
        return tuple(Method.parse(m) for m in self.methods)

    def to_dict(self) -> dict:
        return {"models": list(self.models), "methods": [m.label for m in self.method_list],
                "method_specs": list(self.methods), "targets": None if self.targets is None else list(self.targets),
                "seed": self.seed, "achieved": self.achieved, "structured_max_side": self.structured_max_side,
                "formats": list(self.formats)}


def _layer_shape(name: str, value: object) -> tuple[int, int]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"ReportSettings {name} must be a layer shape (d_out, d_in), got {value!r}")
    return check_size(f"ReportSettings {name}[0] (d_out)", value[0]), check_size(f"ReportSettings {name}[1] (d_in)", value[1])


@dataclass(frozen=True)
class Report:
    """One table per model plus the data of the report's figures (:func:`build_report`).

    ``str()`` / :meth:`to_text` are the tables, :meth:`to_dict` / :meth:`to_json` every number
    (``report.json``), :meth:`figures` draws the figures and :meth:`write` writes them all into a
    folder. ``elapsed_s`` counts the computation, not the drawing of figures.
    """

    settings: ReportSettings
    models: tuple[ModelReport, ...]
    plots: dict
    created: Any  # datetime.datetime
    elapsed_s: float

    @property
    def plot_files(self) -> tuple[str, ...]:
        """The names of the figure files :meth:`write` writes, in order."""
        stems = [f"tradeoff-{name}" for name in self.plots.get("tradeoff", {})]
        stems += ["spectra", "planner"] if self.plots else []
        return tuple(f"{s}.{f}" for s in stems for f in self.settings.formats)

    def to_text(self, width: int = 140) -> str:
        """The tables (``report.txt``), one per model, at ``width`` characters."""
        return "\n\n".join(rep.to_table(width=width) for rep in self.models)

    def __str__(self) -> str:
        return self.to_text()

    def summary(self) -> str:
        """One line: models, methods, figure files and seconds."""
        return (f"{len(self.models)} model(s), {len(self.settings.methods)} methods, {len(self.plot_files)} plot "
                f"file(s) in {self.elapsed_s:.1f} s")

    def to_dict(self) -> dict:
        """Everything of ``report.json``: settings, one dict per model, the figures' data
        (spectra cut to their 8 largest values) and the folder's file names."""
        from ..version import __version__

        extra = dict(self.plots)
        if "spectra" in extra:  # keep the JSON small: summaries, not 768 values each
            spectra = dict(extra["spectra"])
            spectra["series"] = [{**{k: v for k, v in s.items() if k != "sv"}, "sv_head": s["sv"][:8]}
                                 for s in spectra["series"]]
            extra["spectra"] = spectra
        return {"tool": "tera-tn report", "version": __version__, "created": self.created.isoformat(),
                "elapsed_s": round(self.elapsed_s, 3), "settings": self.settings.to_dict(),
                "models": [rep.to_dict() for rep in self.models], **extra,
                "files": ["README.md", "report.json", "report.txt", *self.plot_files]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        from .summary import strict_json

        return strict_json(self.to_dict(), indent)

    def _figure_makers(self) -> dict:
        from . import plot

        if not self.plots:
            return {}
        makers = {f"tradeoff-{name}": (lambda n=name, d=data: plot.tradeoff_figure(n, data=d))
                  for name, data in self.plots["tradeoff"].items()}
        makers["spectra"] = lambda: plot.spectra_figure(data=self.plots["spectra"])
        makers["planner"] = lambda: plot.planner_figure(data=self.plots["planner"])
        return makers

    def figures(self) -> dict:
        """File stem → matplotlib figure: a trade-off figure per model, the spectra and the
        planner (none when the settings have no formats)."""
        return {stem: make() for stem, make in self._figure_makers().items()}

    def readme(self, command: str = "tera-tn report") -> str:
        """The folder's ``README.md``: what wrote it, and what each file holds."""
        from ..version import __version__

        rows = []
        for name in self.plot_files:
            stem = name.rsplit(".", 1)[0]
            kind, _, model = stem.partition("-")
            rows.append(f"| `{name}` | {_PLOTS.get(kind, '').format(model=model)} |\n")
        return _README.format(command=command, version=__version__, date=self.created.isoformat(sep=" "),
                              elapsed=self.elapsed_s, plot_rows="".join(rows))

    def write(self, folder, *, width: int = 140, command: str = "tera-tn report", on_figure=None) -> tuple[str, ...]:
        """Write the figures, ``report.txt``, ``report.json`` and ``README.md`` into ``folder`` (an
        existing folder; files of the same names are replaced); return the file names.
        ``on_figure(stem)`` is called before each figure is drawn."""
        from pathlib import Path

        from . import figures

        folder = Path(folder)
        for stem, make in self._figure_makers().items():
            if on_figure is not None:
                on_figure(stem)
            figures.save_figure(make(), folder / stem, self.settings.formats)
        (folder / "report.txt").write_text(self.to_text(width) + "\n", encoding="utf-8")
        (folder / "report.json").write_text(self.to_json() + "\n", encoding="utf-8")
        (folder / "README.md").write_text(self.readme(command), encoding="utf-8")
        return tuple(self.to_dict()["files"])


def build_report(settings: Optional[ReportSettings] = None, *, created=None, on_step=None) -> Report:
    """Compute a :class:`Report`: :func:`model_report` of every model in ``settings`` (default
    :class:`ReportSettings`: all built-in models, the default methods) and, when it has figure
    formats, the data of the trade-off, spectra and planner figures.

    ``created`` (a ``datetime``; default now) is recorded; ``on_step(description)`` is called
    before each of its steps (one per model, then one per figure's data).
    """
    import datetime as dt
    import time

    settings = settings if settings is not None else ReportSettings()
    if not isinstance(settings, ReportSettings):
        raise ValueError(f"build_report needs a ReportSettings, got {type(settings).__name__}")
    created = created if created is not None else dt.datetime.now().replace(microsecond=0)
    step = on_step or (lambda description: None)
    targets = None if settings.targets is None else list(settings.targets)
    t0 = time.perf_counter()
    reports = []
    for name in settings.models:
        step(f"report: {name}")
        try:
            reports.append(report.model_report(name, settings.method_list, target_modules=targets, seed=settings.seed,
                                             achieved=settings.achieved,
                                             structured_max_side=settings.structured_max_side))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    plots: dict = {}
    if settings.formats:
        from . import plot

        tradeoff = {}
        for name in settings.models:
            step(f"plot: trade-off {name}")
            tradeoff[name] = plot.tradeoff_data(name, target_modules=targets)
        step("plot: spectra")
        spectra = plot.spectra_data_of_checked(*settings.spectra_shape, seed=settings.seed)
        step("plot: planner")
        planner = plot.planner_data(settings.planner_spec)
        plots = {"tradeoff": tradeoff, "spectra": spectra, "planner": planner}
    return Report(settings, tuple(reports), plots, created, time.perf_counter() - t0)
