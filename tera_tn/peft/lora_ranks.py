"""LoRA ranks chosen from a layer's exact singular values, for :func:`~tera_tn.peft.export_lora`.

Pure math on spectra (numpy, no torch): the checks of the criterion (one of a fixed ``rank``, a
kept ``energy`` fraction or a total ``budget`` of LoRA numbers) and of the rank set, the exact
rank of ``ΔW`` from its float64 spectrum, and the rank of every layer under each criterion,
rounded UP to the next entry of the rank set (vLLM's ``max_lora_rank`` values by default).

A layer here is anything with ``name``, ``shape`` ``(d_out, d_in)`` and ``nonzero`` (its exact
rank, :func:`exact_rank`).
"""

from __future__ import annotations

import heapq
import numbers
from typing import Optional, Union

import numpy as np

__all__ = ["VLLM_RANKS", "rank_criterion", "check_rank_set", "exact_rank", "choose_ranks"]

#: the LoRA ranks vLLM accepts as ``max_lora_rank``: the default ``rank_set``
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# --------------------------------------------------------------------------------------------
# argument checks: they run before any SVD or file
# --------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def rank_criterion(rank, energy, budget) -> tuple[str, Union[int, float]]:
    """``(kind, value)`` of the one criterion given: ``("rank", k)``, ``("energy", f)`` or
    ``("budget", n)``; ``("energy", 1.0)`` (the exact export) when none is. Raises ValueError
    for more than one or a bad value."""
    given = [(k, v) for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) > 1:
        raise ValueError(
            f"give at most one of rank, energy and budget, got {', '.join(f'{k}={v!r}' for k, v in given)}"
        )
    if not given:
        return "energy", 1.0  # every non-zero singular value: the exact export
    kind, value = given[0]
    if kind == "energy":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
            raise ValueError(f"energy must be a fraction in (0, 1] of Σσ² to keep per layer, got {value!r}")
        return kind, float(value)
    if not _is_int(value) or value <= 0:
        what = "LoRA rank per layer" if kind == "rank" else "total of LoRA numbers, Σ rank·(d_out + d_in)"
        raise ValueError(f"{kind} must be a positive integer ({what}), got {value!r}")
    return kind, int(value)


def check_rank_set(rank_set) -> Optional[tuple[int, ...]]:
    """``rank_set`` as a sorted tuple of distinct positive ranks (None stays None); ValueError
    for anything else."""
    if rank_set is None:
        return None
    expected = f"a non-empty collection of positive LoRA ranks such as {VLLM_RANKS}, or None"
    if isinstance(rank_set, (str, bytes)) or not hasattr(rank_set, "__iter__"):
        raise ValueError(f"rank_set must be {expected}, got {rank_set!r}")
    values = list(rank_set)
    if not values or not all(_is_int(r) and r > 0 for r in values):
        raise ValueError(f"rank_set must be {expected}, got {rank_set!r}")
    return tuple(sorted({int(r) for r in values}))


# --------------------------------------------------------------------------------------------
# rank choice
# --------------------------------------------------------------------------------------------
def exact_rank(sv: np.ndarray, shape: tuple[int, int]) -> int:
    """Singular values above float64 rounding, ``max(d_out, d_in)·eps·σ_1``: ΔW's exact rank."""
    if sv.size == 0 or sv[0] <= 0:
        return 0
    return int(np.count_nonzero(sv > max(shape) * np.finfo(np.float64).eps * sv[0]))


def _round_up(k: int, rank_set: Optional[tuple[int, ...]], name: str, why: str) -> int:
    if rank_set is None:
        return max(k, 1)
    for r in rank_set:
        if r >= k:
            return r
    raise ValueError(
        f"layer {name} needs rank {k} ({why}) but the largest rank in rank_set is {rank_set[-1]}; pass a "
        "rank_set with a larger rank, rank_set=None, or a lower rank/energy"
    )


def _energy_rank(sv: np.ndarray, nonzero: int, energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i<k} σ_i² ≥ energy · Σσ²`` (float64), ``rank(ΔW)`` for energy 1.

    PEFT's converter does this in float32, where the cumulative sum stops growing once the
    remaining σ² fall below its rounding, so its threshold 1.0 can drop the last directions.
    """
    if energy >= 1.0 or nonzero == 0:
        return nonzero
    cum = np.cumsum(sv[:nonzero].astype(np.float64) ** 2)
    return min(int(np.searchsorted(cum, energy * cum[-1], side="left")) + 1, nonzero)


def _budget_ranks(layers: list, spectra: list, budget: int, rank_set: Optional[tuple[int, ...]]) -> list[int]:
    """Written ranks under a total of ``budget`` LoRA numbers, given greedily by marginal energy.

    Every layer starts at the smallest allowed rank. Then the step (to the next allowed rank) with
    the largest gain per number is taken while it fits: gain is the fraction of the layer's own
    ``Σσ²`` the step adds, so layers count alike whatever the scale of their ΔW (outputs go through
    normalization; a layer with a large ΔW is not more important for being large).
    """
    start = rank_set[0] if rank_set else 1
    costs = [sum(layer.shape) for layer in layers]
    minimum = start * sum(costs)
    if budget < minimum:
        raise ValueError(
            f"budget {budget:,} is smaller than the {minimum:,} LoRA numbers the {len(layers)} layers need at "
            f"their minimum rank {start} (Σ rank·(d_out + d_in)); expected a budget of at least {minimum:,}"
        )
    ranks = [start] * len(layers)
    shares = []
    for sv, layer in zip(spectra, layers):
        e = sv[: layer.nonzero].astype(np.float64) ** 2
        total = e.sum()
        shares.append(np.concatenate([[0.0], np.cumsum(e / total)]) if total > 0 else np.zeros(1))

    def step(i: int):
        r = ranks[i]
        nxt = next((x for x in rank_set if x > r), None) if rank_set else r + 1
        cap = len(shares[i]) - 1  # the layer's rank: later steps add nothing
        if nxt is None or r >= cap:
            return None
        gain = shares[i][min(nxt, cap)] - shares[i][min(r, cap)]
        return (-(gain / ((nxt - r) * costs[i])), i, nxt) if gain > 0 else None

    left = budget - minimum
    heap = [s for s in map(step, range(len(layers))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i, nxt = heapq.heappop(heap)
        cost = (nxt - ranks[i]) * costs[i]
        if cost > left:
            continue  # steps are taken in order, so this layer cannot grow further
        left -= cost
        ranks[i] = nxt
        s = step(i)
        if s is not None:
            heapq.heappush(heap, s)
    return ranks


def choose_ranks(layers: list, spectra: list, kind: str, value, rank_set) -> list[int]:
    """The written rank of every layer (``spectra`` its singular values, descending) under
    :func:`rank_criterion`'s ``(kind, value)``, rounded up to ``rank_set``."""
    if kind == "budget":
        return _budget_ranks(layers, spectra, value, rank_set)
    out = []
    for layer, sv in zip(layers, spectra):
        if kind == "rank":
            k, why = min(value, min(layer.shape)), f"rank={value}"
        else:
            k, why = _energy_rank(sv, layer.nonzero, value), f"energy={value:g}"
        out.append(_round_up(k, rank_set, layer.name, why))
    return out
