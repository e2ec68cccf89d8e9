"""`TeRASpec`: how one (d_out, d_in) weight update is tensorized and parameterized.

Conventions (stated once, used everywhere in tera_tn):

* A linear layer computes ``y = W0 @ x`` with ``W0`` of shape ``(d_out, d_in)``.
* The update is tensorized in C-order (row-major): ``ΔW[i, j] = X[i_1..i_P, j_1..j_Q]`` where
  ``i = ravel_multi_index((i_1..i_P), row_modes)`` and likewise for ``j``; the first mode is the
  most significant digit. Row modes come first, column modes after.
* When ``prod(row_modes) > d_out`` (padding), the update is computed at the padded size and rows
  ``d_out..`` are sliced away; the same for columns. Padding never leaks into results.
* The network is ``X = G ×_1 A_1 … ×_N A_N`` with frozen core ``G`` of shape ``ranks`` and
  ``A_n`` built from a frozen factor ``U_n`` (shape ``(K_n, R_n)``) and a trainable vector
  ``λ_n``: ``A_n = U_n diag(λ_n)`` for ``diag="rank"`` (len R_n), ``A_n = diag(λ_n) U_n`` for
  ``diag="mode"`` (len K_n), ``A_n = diag(λ_n)`` for ``diag="identity"`` (``U_n = I``, R_n = K_n),
  and ``A_n = diag(μ_n) U_n diag(λ_n)`` for ``diag="both"``, whose trainable vector per mode is
  ``μ_n`` (len K_n) followed by ``λ_n`` (len R_n), one vector of length ``K_n + R_n``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

import numpy as np

from ..checks import check_real, check_size
from .factorize import padded_factorization_of_checked

__all__ = ["TeRASpec", "Diag", "DIAG_PLACEMENTS", "DEFAULT_ORDER", "DEFAULT_DIAG", "BUDGET_FAMILIES", "check_spec"]

Diag = Literal["rank", "mode", "identity", "both"]
DIAG_PLACEMENTS: tuple[str, ...] = ("rank", "mode", "identity", "both")
#: The defaults of :meth:`TeRASpec.from_shape` and of every config built on it, chosen by the adapter
#: study (``experiments/study``): order 3 gives the largest trainable count that stays within VeRA
#: r=256's on a transformer's square layers (lower orders train more numbers; order 2 exceeds it),
#: and accuracy rose with the count; mode-side diagonals match the rank side's accuracy and train
#: cheapest (the frozen ``P G Qᵀ`` is cached per shape group).
DEFAULT_ORDER: int = 3
DEFAULT_DIAG: Diag = "mode"
RanksArg = Union[None, str, int, float, Sequence[int]]
# from_shape factorizes by trial division: a dimension past this is no weight matrix that fits in
# memory, and its search would run for hours. Explicit modes have no such limit.
MAX_FACTORIZED_SIZE = 2**31

#: The families :meth:`TeRASpec.for_budget` chooses from, as ``(diag, order, ranks)`` rows (ranks as
#: for :meth:`TeRASpec.from_shape`), most preferred first: among members with the same trainable
#: count the earlier row wins. The adapter study (``experiments/study``, results in
#: ``experiments/results/study.jsonl``, summarized in the docs' configuration guide) found accuracy
#: rising with the trainable count (on its screen order 2 > 3 > 5 > 4 > 6 > 8) and the diagonal side
#: a tie at equal counts, so the member with the most trainable numbers within the budget is taken.
#: Mode-side rows come first: they train cheapest, and the rank side at full ranks has the same
#: counts (so it never wins and is not listed); the rank side at half ranks reaches counts below the
#: mode side's, and diagonals on both sides reach counts above it.
_BUDGET_ORDERS = (DEFAULT_ORDER, 6, 4, 5, 7, 8, 2)
BUDGET_FAMILIES: tuple[tuple[str, int, Union[str, float]], ...] = (
    *(("mode", order, "full") for order in _BUDGET_ORDERS),
    *(("rank", order, 0.5) for order in _BUDGET_ORDERS),
    *(("both", order, ranks) for ranks in ("full", 0.5) for order in _BUDGET_ORDERS),
)


def check_modes(name: str, modes: Sequence[int]) -> tuple[int, ...]:
    """``modes`` as a tuple of ints when it is a non-empty sequence of positive integers (a 1-D
    numpy array too); else a ValueError naming ``name`` and the offending entry."""
    if isinstance(modes, np.ndarray) and modes.ndim == 1:
        modes = modes.tolist()
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, got {modes!r} ({type(modes).__name__})")
    if len(modes) == 0:
        raise ValueError(f"{name} must hold at least one mode size, got an empty sequence")
    return tuple(check_size(f"{name}[{k}]", m) for k, m in enumerate(modes))


def check_spec(spec: object, caller: str) -> "TeRASpec":
    """``spec`` itself when it is a :class:`TeRASpec`; else a TypeError naming ``caller``."""
    if not isinstance(spec, TeRASpec):
        raise TypeError(f"{caller} expects a TeRASpec as spec, got {type(spec).__name__}: {spec!r:.80}")
    return spec


_DICT_KEYS = ("row_modes", "col_modes", "ranks", "diag", "d_out", "d_in")


@dataclass(frozen=True)
class TeRASpec:
    """Immutable description of one tensorized, TeRA-parameterized weight update.

    Attributes:
        row_modes: ``(I_1..I_P)``, product ≥ ``d_out``.
        col_modes: ``(J_1..J_Q)``, product ≥ ``d_in``.
        ranks: Tucker ranks ``(R_1..R_N)``, ``N = P + Q``, each ``1 ≤ R_n ≤ K_n``; ``None`` at
            construction means full ranks ``R_n = K_n``.
        diag: where the trainable diagonal sits: ``"rank"`` (``U_n Λ_n``; the default when the modes
            are given explicitly, while :meth:`from_shape` defaults to :data:`DEFAULT_DIAG`), ``"mode"``
            (``Λ_n U_n``), ``"identity"`` (``U_n = I``, full ranks only) or ``"both"``
            (``M_n U_n Λ_n``: ``K_n + R_n`` trainable numbers per mode instead of ``R_n``).
        d_out, d_in: the true weight shape; ``None`` means the mode products (no padding).

    Build one with :meth:`from_shape` (automatic balanced factorization with padding) or
    directly from explicit modes, e.g. ``TeRASpec((16, 16, 16), (16, 16, 16))``.
    """

    row_modes: tuple[int, ...]
    col_modes: tuple[int, ...]
    ranks: tuple[int, ...] = field(default=None)  # type: ignore[assignment]
    diag: Diag = "rank"
    d_out: int = field(default=None)  # type: ignore[assignment]
    d_in: int = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        rows = check_modes("row_modes", self.row_modes)
        cols = check_modes("col_modes", self.col_modes)
        modes = rows + cols
        if not isinstance(self.diag, str) or self.diag not in DIAG_PLACEMENTS:
            raise ValueError(f"diag must be one of {DIAG_PLACEMENTS}, got {self.diag!r}")
        if self.ranks is None:
            ranks = modes
        else:
            ranks = check_modes("ranks", self.ranks)
            if len(ranks) != len(modes):
                raise ValueError(
                    f"ranks has {len(ranks)} entries but the spec has {len(modes)} modes "
                    f"(row_modes={rows}, col_modes={cols}); give one rank per mode"
                )
            for n, (r, k) in enumerate(zip(ranks, modes)):
                if r > k:
                    raise ValueError(f"ranks[{n}]={r} exceeds mode size K_{n}={k}; expected 1 <= R_n <= K_n")
        if self.diag == "identity" and ranks != modes:
            raise ValueError(
                f"diag='identity' uses U_n = I and needs full ranks {modes}, got ranks={ranks}"
            )
        d_out = math.prod(rows) if self.d_out is None else check_size("d_out", self.d_out)
        d_in = math.prod(cols) if self.d_in is None else check_size("d_in", self.d_in)
        if d_out > math.prod(rows):
            raise ValueError(
                f"row_modes {rows} multiply to {math.prod(rows)}, less than d_out={d_out}; "
                f"expected a product >= d_out"
            )
        if d_in > math.prod(cols):
            raise ValueError(
                f"col_modes {cols} multiply to {math.prod(cols)}, less than d_in={d_in}; "
                f"expected a product >= d_in"
            )
        for name, value in (("row_modes", rows), ("col_modes", cols), ("ranks", ranks), ("d_out", d_out), ("d_in", d_in)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_shape(
        cls,
        d_out: int,
        d_in: int,
        *,
        order: int | tuple[int, int] = DEFAULT_ORDER,
        ranks: RanksArg = "full",
        diag: Diag = DEFAULT_DIAG,
        max_imbalance: float = 2.0,
        max_padding: float = 0.25,
    ) -> "TeRASpec":
        """A spec for a ``(d_out, d_in)`` weight with balanced mode sizes.

        Args:
            d_out, d_in: weight shape (PyTorch convention, ``y = W @ x``).
            order: total number of modes ``N``, split between rows and columns in proportion to
                ``log d_out : log d_in``; or an explicit ``(P, Q)``. Default :data:`DEFAULT_ORDER` (3).
            ranks: ``"full"`` (``R_n = K_n``), a fraction in (0, 1] (``R_n = ceil(f·K_n)``), an
                int ``r`` (``R_n = min(r, K_n)``), or an explicit per-mode tuple.
            diag: ``"rank"``, ``"mode"``, ``"identity"`` or ``"both"``; default :data:`DEFAULT_DIAG`
                (``"mode"``).
            max_imbalance: a split is balanced when its largest mode is at most this many times
                the geometric mean; otherwise the size is padded to the nearest one that is.
            max_padding: largest padding accepted, as a fraction of the size.
        """
        d_out = check_size("d_out", d_out)
        d_in = check_size("d_in", d_in)
        for name, d in (("d_out", d_out), ("d_in", d_in)):
            if d > MAX_FACTORIZED_SIZE:
                raise ValueError(
                    f"{name}={d} is larger than {MAX_FACTORIZED_SIZE} (2**31), the largest size from_shape "
                    f"factorizes; give the modes explicitly: TeRASpec(row_modes, col_modes, d_out=..., d_in=...)"
                )
        max_imbalance = check_real("max_imbalance", max_imbalance, 1.0, "a finite number >= 1.0 (1.0 = perfectly balanced)")
        max_padding = check_real("max_padding", max_padding, 0.0, "a finite fraction >= 0 (0.25 = up to 25% padding)")
        p, q = cls._split_order(d_out, d_in, order)
        for side, name, d, k in (("row", "d_out", d_out, p), ("column", "d_in", d_in, q)):
            # Modes have size >= 2, so k of them need at least 2**k rows (padding included).
            most = int(math.log2(d) + math.log2(1.0 + max_padding))
            if k > most:
                raise ValueError(
                    f"order {order!r} asks for {k} {side} modes, but {name}={d} (with max_padding="
                    f"{max_padding:g}) allows at most {most} modes of size >= 2; use a lower order"
                )
        rows = padded_factorization_of_checked(d_out, p, max_imbalance, max_padding)
        cols = padded_factorization_of_checked(d_in, q, max_imbalance, max_padding)
        resolved = cls._resolve_ranks(rows + cols, ranks)
        return cls(rows, cols, resolved, diag, d_out, d_in)

    @classmethod
    def for_budget(cls, d_out: int, d_in: int, params: int) -> "TeRASpec":
        """The member of :data:`BUDGET_FAMILIES` with the most trainable numbers ``<= params``.

        Every ``(diag, order, ranks)`` row is built with :meth:`from_shape` for the weight shape
        (rows whose order the shape cannot hold are skipped); among members with equal counts the
        earlier row wins, so the result is deterministic and its count never decreases as
        ``params`` grows. Raises ``ValueError`` when ``params`` is below the smallest member.

        Example: ``TeRASpec.for_budget(768, 768, 1024)`` for a budget of VeRA r=256's count.
        """
        d_out = check_size("d_out", d_out)
        d_in = check_size("d_in", d_in)
        params = check_size("params", params)
        best: TeRASpec | None = None
        smallest: TeRASpec | None = None
        for diag, order, ranks in BUDGET_FAMILIES:
            try:
                spec = cls.from_shape(d_out, d_in, order=order, ranks=ranks, diag=diag)
            except ValueError:  # an order too high for this shape
                continue
            if smallest is None or spec.num_trainable < smallest.num_trainable:
                smallest = spec
            if spec.num_trainable <= params and (best is None or spec.num_trainable > best.num_trainable):
                best = spec
        if smallest is None:
            raise ValueError(f"no TeRA family member fits a {d_out}×{d_in} weight: every order in BUDGET_FAMILIES "
                             f"needs at least 2 rows and 2 columns")
        if best is None:
            raise ValueError(
                f"params={params} is below the smallest TeRA family member for a {d_out}×{d_in} weight, "
                f"{smallest} ({smallest.num_trainable} trainable numbers); give params >= {smallest.num_trainable}"
            )
        return best

    @staticmethod
    def _split_order(d_out: int, d_in: int, order: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(order, (tuple, list)):
            if len(order) != 2:
                raise ValueError(f"order as a pair must be (row_order, col_order), got {order!r}")
            p = check_size("order[0] (row modes)", order[0])
            q = check_size("order[1] (column modes)", order[1])
            return p, q
        n = check_size("order", order)
        if n < 2:
            raise ValueError(f"order must be >= 2 (at least one row and one column mode), got {n}")
        total = math.log(d_out) + math.log(d_in)
        p = round(n * math.log(d_out) / total) if total > 0 else n // 2
        p = min(max(p, 1), n - 1)
        return p, n - p

    @staticmethod
    def _resolve_ranks(modes: tuple[int, ...], ranks: RanksArg) -> tuple[int, ...] | None:
        if ranks is None or (isinstance(ranks, str) and ranks == "full"):
            return None
        if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
            r = check_size("ranks", ranks)
            return tuple(min(r, k) for k in modes)
        if isinstance(ranks, numbers.Real) and not isinstance(ranks, bool):
            if not 0.0 < ranks <= 1.0:
                raise ValueError(f"ranks as a fraction must be in (0, 1], got {ranks!r}")
            return tuple(max(1, math.ceil(float(ranks) * k - 1e-9)) for k in modes)
        if isinstance(ranks, (list, tuple, np.ndarray)):
            return check_modes("ranks", ranks)
        raise ValueError(
            f"ranks must be 'full', a fraction in (0, 1], an int or one int per mode, got {ranks!r} ({type(ranks).__name__})"
        )

    def to_dict(self) -> dict:
        """JSON-ready form (lists of ints); :meth:`from_dict` inverts it exactly."""
        return {
            "row_modes": list(self.row_modes),
            "col_modes": list(self.col_modes),
            "ranks": list(self.ranks),
            "diag": self.diag,
            "d_out": self.d_out,
            "d_in": self.d_in,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TeRASpec":
        """A spec from :meth:`to_dict` output (validated like any other construction)."""
        if not isinstance(d, dict) or "row_modes" not in d or "col_modes" not in d:
            raise ValueError(f"a spec dict needs 'row_modes' and 'col_modes', got {d!r}")
        unknown = sorted(set(d) - set(_DICT_KEYS), key=str)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in spec dict; expected only {_DICT_KEYS}")
        ranks = d.get("ranks")
        return cls(
            check_modes("row_modes", d["row_modes"]),
            check_modes("col_modes", d["col_modes"]),
            None if ranks is None else check_modes("ranks", ranks),
            d.get("diag", "rank"),
            d.get("d_out"),
            d.get("d_in"),
        )

    # --- derived sizes -------------------------------------------------------------------
    @property
    def modes(self) -> tuple[int, ...]:
        """All mode sizes ``K = (I_1..I_P, J_1..J_Q)``."""
        return self.row_modes + self.col_modes

    @property
    def order(self) -> int:
        """Number of modes ``N = P + Q``."""
        return len(self.row_modes) + len(self.col_modes)

    @property
    def n_row(self) -> int:
        """Number of row modes ``P``."""
        return len(self.row_modes)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(prod(row_modes), prod(col_modes))``: the shape the network computes before slicing."""
        return math.prod(self.row_modes), math.prod(self.col_modes)

    @property
    def shape(self) -> tuple[int, int]:
        """The weight shape ``(d_out, d_in)``."""
        return self.d_out, self.d_in

    @property
    def padding(self) -> tuple[int, int]:
        """Padded rows and columns ``(prod(row_modes) - d_out, prod(col_modes) - d_in)``."""
        po, pi = self.padded_shape
        return po - self.d_out, pi - self.d_in

    @property
    def padding_overhead(self) -> float:
        """Extra entries computed because of padding, as a fraction of ``d_out·d_in``."""
        po, pi = self.padded_shape
        return po * pi / (self.d_out * self.d_in) - 1.0

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        """Length of each trainable vector: ``R_n`` for ``diag="rank"``, ``K_n`` for ``"mode"`` and
        ``"identity"``, ``K_n + R_n`` for ``"both"`` (``μ_n`` then ``λ_n``)."""
        if self.diag == "both":
            return tuple(k + r for k, r in zip(self.modes, self.ranks))
        return self.ranks if self.diag == "rank" else self.modes

    @property
    def is_full_rank(self) -> bool:
        return self.ranks == self.modes

    @property
    def num_trainable(self) -> int:
        """Trainable numbers per adapted layer: ``Σ_n len(λ_n)``."""
        return sum(self.scale_sizes)

    @property
    def num_frozen(self) -> int:
        """Frozen numbers per shape group: core ``∏ R_n`` plus factors ``Σ K_n R_n`` (none for identity)."""
        core = math.prod(self.ranks)
        if self.diag == "identity":
            return core
        return core + sum(k * r for k, r in zip(self.modes, self.ranks))

    @property
    def max_rank(self) -> int:
        """Largest rank ΔW reaches for generic λ.

        ``min(∏ R_row, ∏ R_col)`` without padding; with padding, the rank of the kept C-order
        prefix of rows/columns of the Kronecker factors (see :func:`prefix_rank`), which is at
        most ``min(d_out, d_in)`` and can be lower when padding meets reduced ranks.
        """
        p = self.n_row
        masks = [np.ones(k, dtype=bool) for k in self.modes]
        ranks = list(self.ranks)
        return min(prefix_rank(masks[:p], ranks[:p], self.d_out), prefix_rank(masks[p:], ranks[p:], self.d_in))

    def __str__(self) -> str:
        rows = "·".join(map(str, self.row_modes))
        cols = "·".join(map(str, self.col_modes))
        ranks = "full" if self.is_full_rank else "(" + ",".join(map(str, self.ranks)) + ")"
        pad = ""
        if self.padding != (0, 0):
            pad = f", padded {self.padded_shape[0]}×{self.padded_shape[1]} (+{self.padding_overhead:.2%})"
        return (
            f"TeRASpec({self.d_out}×{self.d_in} = [{rows}]×[{cols}], ranks {ranks}, "
            f"diag={self.diag}{pad}; trains {self.num_trainable}, max rank {self.max_rank})"
        )


def prefix_rank(masks: list[np.ndarray], cols: list[int], d: int) -> int:
    """Generic rank of the first ``d`` rows (C-order) of ``A_1 ⊗ … ⊗ A_k``.

    ``A_n`` has zero rows where ``masks[n]`` is False and its other rows are in general
    position in ``R^{cols[n]}`` (any ``m ≤ cols[n]`` of them are independent). The kept rows
    are all rows with a leading digit below ``q`` plus a prefix of the block at digit ``q``;
    the latter adds its own prefix rank while the first ``q`` rows of ``A_1`` do not yet span.
    """
    if not masks:
        return 1 if d >= 1 else 0
    k1 = masks[0].size
    rest_size = math.prod(m.size for m in masks[1:])
    rest_rank = math.prod(min(int(m.sum()), c) for m, c in zip(masks[1:], cols[1:]))
    q, rem = divmod(min(d, k1 * rest_size), rest_size)
    nz = int(masks[0][:q].sum())
    if nz >= cols[0]:
        return cols[0] * rest_rank
    rank = nz * rest_rank
    if rem and q < k1 and masks[0][q]:
        rank += prefix_rank(masks[1:], cols[1:], rem)
    return rank
