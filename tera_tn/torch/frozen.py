"""The frozen operands of one shape group as torch tensors: the Tucker network's core ``G`` and
factors ``U_n``, in one dtype on one device.

:class:`FrozenNetwork` is what the autograd path (:mod:`tera_tn.torch.autograd`) multiplies by;
the factor bank (:mod:`tera_tn.torch.bank`) keeps one per (shape group, dtype, device), shared by
every layer of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.modeproduct import multi_mode_product
from ..core.spec import TeRASpec
from ..core.workspace import default_scope

__all__ = ["FrozenNetwork", "layer_product"]


def layer_product(core: torch.Tensor, matrices) -> torch.Tensor:
    """:func:`~tera_tn.core.modeproduct.multi_mode_product` as the torch layers run it: in the
    workspace the caller entered, else in :data:`~tera_tn.core.workspace.DEFAULT_WORKSPACE`
    (its cached buffers and worker threads keep the layers' CPU products fast)."""
    if torch.compiler.is_compiling():
        return multi_mode_product(core, matrices)
    with default_scope():
        return multi_mode_product(core, matrices)


@dataclass(frozen=True)
class FrozenNetwork:
    """Frozen operands of one shape group, in one dtype and on one device.

    Attributes:
        spec: the spec they belong to.
        core: ``G`` of shape ``spec.ranks``.
        factors: ``U_n`` of shape ``(K_n, R_n)``; all ``None`` for ``diag="identity"``.
    """

    spec: TeRASpec
    core: torch.Tensor
    factors: tuple[Optional[torch.Tensor], ...]

    @property
    def g_mat(self) -> torch.Tensor:
        """``G`` as a ``(∏R_row, ∏R_col)`` matrix (a view)."""
        p = self.spec.n_row
        return self.core.reshape(math.prod(self.spec.ranks[:p]), math.prod(self.spec.ranks[p:]))

    def to(self, dtype: torch.dtype, device: torch.device) -> "FrozenNetwork":
        """The same operands in ``dtype`` on ``device`` (``self`` when nothing changes)."""
        core = self.core.to(device=device, dtype=dtype)
        factors = tuple(None if u is None else u.to(device=device, dtype=dtype) for u in self.factors)
        if core is self.core and all(a is b for a, b in zip(factors, self.factors)):
            return self
        return FrozenNetwork(self.spec, core, factors)

    def frozen_product(self) -> torch.Tensor:
        """``P G Qᵀ`` padded to ``(∏K_row, ∏K_col)``, computed once per network and kept.

        With the diagonals on the mode side only (``diag="mode"``) this is all of ``ΔW`` but the
        diagonals, ``ΔW = α diag(⊗μ_row) P G Qᵀ diag(⊗μ_col)``, so such a layer's forward and
        backward are elementwise passes and GEMMs with no mode products at all. The bank holds one
        network per (shape group, dtype, device), so this costs one ``d_out × d_in`` tensor per
        shape group, shared by every layer of the group.
        """
        found = self.__dict__.get("_frozen_product")
        if found is None:
            # A tensor made under inference_mode could never join an autograd graph later.
            with torch.inference_mode(False), torch.no_grad():
                found = layer_product(self.core, list(self.factors)).reshape(self.spec.padded_shape)
            self.__dict__["_frozen_product"] = found  # a cache, not a field: bypass the frozen setattr
        return found

    @property
    def row_factors(self) -> tuple[Optional[torch.Tensor], ...]:
        return self.factors[: self.spec.n_row]

    @property
    def col_factors(self) -> tuple[Optional[torch.Tensor], ...]:
        return self.factors[self.spec.n_row :]
