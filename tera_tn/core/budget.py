"""A whole model's TeRA specs for a total parameter budget (:func:`specs_for_budget`).

:meth:`TeRASpec.for_budget` sizes one weight shape; a model adapts several shapes (a
transformer's square attention projections and its wide FFN matrices), each shape group sharing
one spec and one frozen network. This spends one total across them: of every combination of
:data:`~tera_tn.core.spec.BUDGET_FAMILIES` members (one per shape) that fits the budget, the one
with the most trainable numbers, and among those the most even (the largest smallest count per
``d_out + d_in``, the scale LoRA's and VeRA's counts grow with). The family counts are coarse
(a member's next larger sibling often doubles it), so per-shape greedy steps strand much of a
budget; the search is exhaustive with pruning (a shape has some 20-30 members; transformers
adapt 2-4 distinct shapes).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..checks import check_size
from .spec import BUDGET_FAMILIES, TeRASpec

__all__ = ["family_members", "specs_for_budget"]


def family_members(d_out: int, d_in: int) -> list[TeRASpec]:
    """The members of :data:`BUDGET_FAMILIES` for a ``d_out × d_in`` weight, one per trainable count
    (the earlier row where counts tie), by increasing count."""
    by_count: dict[int, TeRASpec] = {}
    for diag, order, ranks in BUDGET_FAMILIES:
        try:
            spec = TeRASpec.from_shape(d_out, d_in, order=order, ranks=ranks, diag=diag)
        except ValueError:  # an order too high for this shape
            continue
        by_count.setdefault(spec.num_trainable, spec)
    return [by_count[c] for c in sorted(by_count)]


def _layer_counts(shapes: Iterable) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for i, shape in enumerate(shapes):
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
            raise ValueError(f"layer shapes must be (d_out, d_in) pairs, got entry {i}: {shape!r}")
        key = (check_size(f"shapes[{i}][0] (d_out)", shape[0]), check_size(f"shapes[{i}][1] (d_in)", shape[1]))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError("specs_for_budget needs the shapes of at least one adapted layer, got none")
    return counts


def specs_for_budget(shapes: Iterable[tuple[int, int]] | Mapping[tuple[int, int], int],
                     params: int) -> dict[tuple[int, int], TeRASpec]:
    """One spec per weight shape whose trainable numbers, summed over every adapted layer, are at
    most ``params`` and as many as the greedy rule of this module reaches.

    Args:
        shapes: every adapted layer's ``(d_out, d_in)`` (a shape repeats once per layer), or
            ``{shape: number of layers}``.
        params: the budget of trainable adapter numbers for the whole model.

    Returns ``{(d_out, d_in): TeRASpec}``, ready for ``TeRALayersConfig(specs=...)`` or
    ``TeraConfig(specs=...)``. Raises ``ValueError`` when even the smallest members exceed ``params``.
    """
    if isinstance(shapes, Mapping):
        shapes = [s for s, n in shapes.items() for _ in range(check_size(f"shapes[{s!r}] (layers)", n))]
    counts = _layer_counts(shapes)
    params = check_size("params", params)
    members = {shape: family_members(*shape) for shape in counts}
    for shape, found in members.items():
        if not found:
            raise ValueError(f"no TeRA family member fits a {shape[0]}×{shape[1]} weight")
    order = sorted(counts)
    base = sum(members[sh][0].num_trainable * counts[sh] for sh in order)
    if base > params:
        smallest = ", ".join(f"{counts[sh]}× {members[sh][0]}" for sh in order)
        raise ValueError(f"params={params} is below the smallest TeRA adapters of these layers ({smallest}: {base} "
                         f"trainable numbers); give params >= {base}")
    best: tuple | None = None
    chosen = [0] * len(order)
    # most the shapes from i on can add: a bound that prunes combinations that cannot beat the best total
    most = [0] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        most[i] = most[i + 1] + members[order[i]][-1].num_trainable * counts[order[i]]

    def search(i: int, total: int, spare: int, balance: float) -> None:
        # spare: what the shapes from i on need at least (their smallest members); balance: the
        # smallest count per (d_out + d_in) so far. (total reachable, balance) bounds the final key.
        nonlocal best
        if best is not None and (min(params, total + most[i]), balance) <= best[0]:
            return
        if i == len(order):
            best = ((total, balance), tuple(chosen))
            return
        sh = order[i]
        rest = spare - members[sh][0].num_trainable * counts[sh]
        for k, spec in enumerate(members[sh]):
            t = total + spec.num_trainable * counts[sh]
            if t + rest > params:
                break  # members are sorted by count: every later one is larger
            chosen[i] = k
            search(i + 1, t, rest, min(balance, spec.num_trainable / (sh[0] + sh[1])))

    search(0, 0, base, float("inf"))
    at = dict(zip(order, best[1]))
    return {shape: members[shape][at[shape]] for shape in counts}
