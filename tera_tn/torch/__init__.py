"""PyTorch backend for training TeRA adapters.

* :class:`TeRAConfig` + :func:`add_tera`: adapt the ``nn.Linear`` layers of any model in place
  (everything else frozen) and get a parameter summary.
* :class:`TeRALinear`: one adapted layer, built from a base Linear and a :class:`~tera_tn.TeRASpec`;
  the PEFT-free face of :class:`~tera_tn.torch.adapter.TeRAAdapters`, the layer code the PEFT
  method runs too.
* :class:`FactorBank`: the frozen factors, one set per shape group, generated from the seed.
* :func:`merge_and_unload`: a plain model with ΔW folded in; :func:`save_tera` /
  :func:`load_tera`: safetensors adapter checkpoints (λ + spec + seed, a few KB) that rebuild
  the adapted layers when loaded into the plain base model.
* :func:`tera_linear`: the memory-lean autograd path (:mod:`tera_tn.torch.autograd`).

Planning (:mod:`tera_tn.torch.planning`) and the autograd internals stay importable from their
modules.

See ``docs/torch.md``.
"""

from .autograd import tera_linear
from .bank import FactorBank
from .checkpoint import CheckpointMismatch, load_tera, read_tera_metadata, save_tera
from .config import TeRAConfig
from .layer import TeRALinear
from .model import TeRASummary, add_tera, merge_and_unload, tera_layers, tera_summary

__all__ = [
    "TeRAConfig",
    "TeRALinear",
    "FactorBank",
    "tera_linear",
    "add_tera",
    "tera_layers",
    "tera_summary",
    "TeRASummary",
    "merge_and_unload",
    "save_tera",
    "load_tera",
    "read_tera_metadata",
    "CheckpointMismatch",
]
