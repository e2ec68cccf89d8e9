"""PyTorch backend for training TeRA adapters.

* :class:`TeRALayersConfig` + :func:`add_tera`: adapt the ``nn.Linear`` layers of any model in place
  (everything else frozen) and get a parameter summary.
* :class:`TeRALinear`: one adapted layer, built from a base Linear and a :class:`~tera_tn.TeRASpec`;
  the PEFT-free face of :class:`~tera_tn.torch.adapter.TeRAAdapters`, the layer code the PEFT
  method runs too.
* :func:`merge_and_unload`: a plain model with ΔW folded in; :func:`save_tera` /
  :func:`load_tera`: safetensors adapter checkpoints (λ + spec + seed, a few KB) that rebuild
  the adapted layers when loaded into the plain base model.
* :func:`read_tera_metadata`: the one reader of the adapter format, for files of either API.

The frozen factors (:class:`tera_tn.torch.bank.FactorBank`), the memory-lean autograd path
(:func:`tera_tn.torch.autograd.tera_linear`) and planning (:mod:`tera_tn.torch.planning`) stay
importable from their modules.

See ``docs/torch.md``.
"""

from .checkpoint import CheckpointMismatch, load_tera, read_tera_metadata, save_tera
from .config import TeRALayersConfig
from .layer import TeRALinear
from .model import add_tera, merge_and_unload, tera_layers, tera_summary

__all__ = [
    "TeRALayersConfig",
    "TeRALinear",
    "add_tera",
    "tera_layers",
    "tera_summary",
    "merge_and_unload",
    "save_tera",
    "load_tera",
    "read_tera_metadata",
    "CheckpointMismatch",
]
