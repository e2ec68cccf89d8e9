"""One training loop for every recipe of the project: AdamW, a linear warm-up then linear decay,
optional gradient clipping, and the rule that calls a run diverged.

:func:`tera_tn.finetune.finetune` (classification) and the study's generative proxy both train
through :func:`train_steps`, so a comparison between their methods never hides a difference in
the optimizer, the schedule or the clipping.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

__all__ = ["loss_diverged", "train_steps"]


def train_steps(loss_of: Callable[[object], "torch.Tensor"], batches: Iterable, param_groups: Sequence[dict], *,  # noqa: F821
                steps: int, warmup_ratio: float, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                on_step: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Run one optimizer step per batch of ``batches`` (at most ``steps``) and return the losses.

    ``loss_of(batch)`` returns the scalar loss; ``param_groups`` are AdamW's groups (each with its
    own ``lr``). The rate rises linearly over the first ``round(warmup_ratio·steps)`` steps and
    falls linearly to 0 at ``steps``; ``max_grad_norm`` clips the global gradient norm of every
    group's parameters. ``on_step(step, steps, loss)`` reports progress. A non-finite loss ends
    the run: nothing more can be learnt from it.
    """
    import torch

    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    params = [p for group in param_groups for p in group["params"]]
    opt = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay)
    warm = int(round(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    losses: list[float] = []
    for step, batch in enumerate(batches, 1):
        if step > steps:
            break
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, steps, losses[-1])
        if not math.isfinite(losses[-1]):
            break
    return losses


def loss_diverged(losses: Sequence[float]) -> bool:
    """True when a loss became non-finite, or when the last quarter of at least 4 steps ends no
    lower than the first quarter (with fewer steps the quarters overlap and say nothing)."""
    if not all(map(math.isfinite, losses)):
        return True
    q = max(1, len(losses) // 4)
    return len(losses) >= 4 and sum(losses[-q:]) / q >= sum(losses[:q]) / q
