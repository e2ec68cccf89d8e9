"""tera_tn: TeRA adapters as tensor networks — specs, contraction planning, rank analysis.

ΔW of a (d_out, d_in) layer is tensorized (C-order, row modes first) and written as a Tucker
network with a frozen random core and factors and trainable diagonal scalings λ_n, so a layer
trains only Σ_n R_n numbers while ΔW can be full-rank. Start with :class:`TeRASpec`.

The public names are listed in ``docs/api.md``; helpers such as :mod:`tera_tn.accounting` (peer
methods' parameter counts) stay importable from their modules.
"""

from ._deprecated import moved_names
from .contraction import ContractionPlan, apply, plan
from .costmodel import CostModel, calibrate
from .factors import TeRAFactors, init_scales, random_factors
from .network import delta_weight, theoretical_rank
from .spec import TeRASpec
from .spectrum import tera_conditioning as conditioning
from .spectrum import tera_singular_values as singular_values
from .tensorize import matricize, tensorize

__version__ = "0.1.0"

__all__ = [
    "TeRASpec",
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

__getattr__ = moved_names(
    "tera_tn",
    {
        "tera_singular_values": "tera_tn.singular_values",
        "tera_conditioning": "tera_tn.conditioning",
        "scaled_factors": "tera_tn.network.scaled_factors",
        "StrategyCost": "tera_tn.contraction.StrategyCost",
        "LayerCost": "tera_tn.accounting.LayerCost",
        "MethodTotals": "tera_tn.accounting.MethodTotals",
        "layer_cost": "tera_tn.accounting.layer_cost",
        "method_totals": "tera_tn.accounting.method_totals",
    },
)
