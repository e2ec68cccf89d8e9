"""PyTorch backend for training TeRA adapters.

* :class:`TeRAConfig` + :func:`add_tera`: adapt the ``nn.Linear`` layers of any model in place
  (everything else frozen) and get a parameter summary.
* :class:`TeRALinear`: one adapted layer, built from a base Linear and a :class:`~tera_tn.TeRASpec`.
* :class:`FactorBank`: the frozen factors, one set per shape group, generated from the seed.
* :func:`merge_and_unload`: a plain model with ΔW folded in; :func:`save_tera` /
  :func:`load_tera`: safetensors adapter checkpoints (λ + spec + seed, a few KB).
* :func:`tera_linear` / :class:`TeRALinearFunction`: the memory-lean autograd path.

See ``docs/torch.md``.
"""

from .autograd import FrozenNetwork, TeRALinearFunction, tera_linear
from .bank import FactorBank
from .checkpoint import CheckpointMismatch, load_tera, read_tera_metadata, save_tera
from .config import TeRAConfig
from .layer import TeRALinear
from .model import LayerSummary, TeRASummary, add_tera, ddp_ignore_factor_bank, merge_and_unload, tera_layers, tera_summary
from .planning import LayerPlan, layer_plan

__all__ = [
    "TeRAConfig",
    "TeRALinear",
    "FactorBank",
    "FrozenNetwork",
    "TeRALinearFunction",
    "tera_linear",
    "add_tera",
    "tera_layers",
    "tera_summary",
    "merge_and_unload",
    "ddp_ignore_factor_bank",
    "TeRASummary",
    "LayerSummary",
    "save_tera",
    "load_tera",
    "read_tera_metadata",
    "CheckpointMismatch",
    "LayerPlan",
    "layer_plan",
]
