"""Small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """``up`` (12 → 24), ReLU, ``down`` (24 → 12): the model the legacy adapters in tests/data were
    written for, and the one the format and variant tests save and load."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def seeded_mlp(scale: float = 1.0) -> nn.Sequential:
    """The same ``Linear(12, 24)``, ReLU, ``Linear(24, 12)`` on every call (seed 0), the last weight
    times ``scale``: another ``scale`` is another base model with the same shapes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12))
    with torch.no_grad():
        m[2].weight.mul_(scale)
    return m
