"""The one training loop: schedule, clipping, early stop on a non-finite loss, the divergence rule."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from tera_tn.training import loss_diverged, train_steps  # noqa: E402


def _quadratic(target: float = 3.0):
    w = torch.nn.Parameter(torch.zeros(()))
    return w, (lambda batch: (w - target) ** 2 * batch)


def test_the_loss_falls_and_steps_stop_at_the_budget():
    w, loss_of = _quadratic()
    reported: list[tuple[int, int]] = []
    losses = train_steps(loss_of, [1.0] * 12, [{"params": [w], "lr": 0.5}], steps=10, warmup_ratio=0.2,
                         on_step=lambda step, total, loss: reported.append((step, total)))
    assert len(losses) == 10 and losses[-1] < losses[0] and not loss_diverged(losses)
    assert reported == [(s, 10) for s in range(1, 11)]


def test_warm_up_then_linear_decay():
    w = torch.nn.Parameter(torch.zeros(()))
    opt_rates = []

    def loss_of(batch):
        return (w - 1.0) ** 2

    import torch.optim as optim

    real = optim.AdamW

    class Recording(real):
        def step(self, *a, **k):
            opt_rates.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    optim.AdamW = Recording
    try:
        train_steps(loss_of, range(8), [{"params": [w], "lr": 1.0}], steps=8, warmup_ratio=0.25)
    finally:
        optim.AdamW = real
    assert opt_rates == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_clipping_bounds_the_gradient_norm_before_the_step():
    w = torch.nn.Parameter(torch.zeros(4))
    norms: list[float] = []

    def loss_of(batch):
        return 100.0 * (w - 1.0).square().sum()

    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        norms.append(float(w.grad.norm()))
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        train_steps(loss_of, range(3), [{"params": [w], "lr": 0.1}], steps=3, warmup_ratio=0.0, max_grad_norm=0.5)
    finally:
        torch.optim.AdamW.step = real_step
    assert len(norms) == 3 and all(n <= 0.5 + 1e-6 for n in norms)


def test_a_non_finite_loss_ends_the_run_and_counts_as_diverged():
    w = torch.nn.Parameter(torch.zeros(()))
    losses = train_steps(lambda b: w * 0 + b, [1.0, float("nan"), 1.0, 1.0], [{"params": [w], "lr": 0.1}],
                         steps=4, warmup_ratio=0.0)
    assert len(losses) == 2 and math.isnan(losses[1]) and loss_diverged(losses)


def test_divergence_rule():
    assert loss_diverged([1.0, 1.0, 1.0, 1.0])  # never fell
    assert not loss_diverged([4.0, 3.0, 2.0, 1.0])
    assert not loss_diverged([1.0]) and not loss_diverged([1.0, 2.0, 3.0])  # too short to judge
    assert loss_diverged([1.0, float("inf")])
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        train_steps(lambda b: b, [], [], steps=0, warmup_ratio=0.0)
