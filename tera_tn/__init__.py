"""tera_tn: TeRA adapters as tensor networks — specs, contraction planning, rank analysis.

ΔW of a (d_out, d_in) layer is tensorized (C-order, row modes first) and written as a Tucker
network with a frozen random core and factors and trainable diagonal scalings λ_n, so a layer
trains only Σ_n R_n numbers while ΔW can be full-rank. Start with :class:`TeRASpec`.

The public names are listed in ``docs/api.md``; helpers such as :mod:`tera_tn.analysis.accounting` (peer
methods' parameter counts) stay importable from their modules.
"""

from ._deprecated import moved_modules, moved_names
from .analysis.spectrum import tera_conditioning as conditioning
from .analysis.spectrum import tera_singular_values as singular_values
from .contract.contraction import ContractionPlan, apply, plan
from .contract.costmodel import CostModel, calibrate
from .core.factors import TeRAFactors, init_scales, random_factors
from .core.network import delta_weight, theoretical_rank
from .core.spec import DEFAULT_DIAG, DEFAULT_ORDER, TeRASpec
from .core.tensorize import matricize, tensorize

__version__ = "0.1.0"

__all__ = [
    "TeRASpec",
    "DEFAULT_ORDER",
    "DEFAULT_DIAG",
    "TeRAFactors",
    "random_factors",
    "init_scales",
    "delta_weight",
    "theoretical_rank",
    "apply",
    "plan",
    "ContractionPlan",
    "CostModel",
    "calibrate",
    "singular_values",
    "conditioning",
    "tensorize",
    "matricize",
]

# The flat layout's module paths (tera_tn.<module>) import for one release, with a warning.
_MOVED_MODULES = {
    f"tera_tn.{name}": f"tera_tn.{layer}.{name}"
    for layer, names in (
        ("core", ("spec", "factorize", "tensorize", "factors", "network", "modeproduct")),
        ("contract", ("costmodel", "contraction")),
        ("analysis", ("rank", "spectrum", "accounting", "shapes", "report", "plot")),
    )
    for name in names
}
moved_modules(__name__, _MOVED_MODULES)

__getattr__ = moved_names(
    "tera_tn",
    {
        **{old.rpartition(".")[2]: new for old, new in _MOVED_MODULES.items()},
        "tera_singular_values": "tera_tn.singular_values",
        "tera_conditioning": "tera_tn.conditioning",
        "scaled_factors": "tera_tn.core.network.scaled_factors",
        "StrategyCost": "tera_tn.contract.contraction.StrategyCost",
        "LayerCost": "tera_tn.analysis.accounting.LayerCost",
        "MethodTotals": "tera_tn.analysis.accounting.MethodTotals",
        "layer_cost": "tera_tn.analysis.accounting.layer_cost",
        "method_totals": "tera_tn.analysis.accounting.method_totals",
    },
)
