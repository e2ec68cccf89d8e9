"""tera_tn: TeRA adapters as tensor networks — specs, contraction planning, rank analysis.

ΔW of a (d_out, d_in) layer is tensorized (C-order, row modes first) and written as a Tucker
network with a frozen random core and factors and trainable diagonal scalings λ_n, so a layer
trains only Σ_n R_n numbers while ΔW can be full-rank. Start with :class:`TeRASpec`.
"""

from .accounting import LayerCost, MethodTotals, layer_cost, method_totals
from .contraction import ContractionPlan, StrategyCost, apply, plan
from .costmodel import CostModel, calibrate
from .factors import TeRAFactors, init_scales, random_factors
from .network import delta_weight, scaled_factors, theoretical_rank
from .spec import TeRASpec
from .spectrum import tera_conditioning, tera_singular_values
from .tensorize import matricize, tensorize

__version__ = "0.1.0"

__all__ = [
    "TeRASpec",
    "TeRAFactors",
    "random_factors",
    "init_scales",
    "delta_weight",
    "scaled_factors",
    "apply",
    "plan",
    "ContractionPlan",
    "StrategyCost",
    "CostModel",
    "calibrate",
    "theoretical_rank",
    "tera_singular_values",
    "tera_conditioning",
    "tensorize",
    "matricize",
    "LayerCost",
    "MethodTotals",
    "layer_cost",
    "method_totals",
    "__version__",
]
