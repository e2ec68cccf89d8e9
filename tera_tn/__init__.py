"""tera_tn: TeRA adapters as tensor networks — specs, contraction planning, rank analysis.

ΔW of a (d_out, d_in) layer is tensorized (C-order, row modes first) and written as a Tucker
network with a frozen random core and factors and trainable diagonal scalings λ_n, so a layer
trains only Σ_n R_n numbers while ΔW can be full-rank. Start with :class:`TeRASpec`.

The public names are listed in ``docs/api/index.md``; helpers such as :mod:`tera_tn.analysis.accounting` (peer
methods' parameter counts) stay importable from their modules.
"""

from .analysis.spectrum import tera_conditioning as conditioning
from .analysis.spectrum import tera_singular_values as singular_values
from .contract.contraction import apply, plan
from .core.factors import TeRAFactors, init_scales, random_factors
from .core.network import delta_weight, theoretical_rank
from .core.spec import TeRASpec
from .core.tensorize import matricize, tensorize
from .version import __version__  # noqa: F401  (tera_tn.__version__, by convention)

__all__ = [
    "TeRASpec",
    "TeRAFactors",
    "random_factors",
    "init_scales",
    "delta_weight",
    "theoretical_rank",
    "apply",
    "plan",
    "singular_values",
    "conditioning",
    "tensorize",
    "matricize",
]
