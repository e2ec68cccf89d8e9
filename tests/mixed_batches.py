"""A check shared by the tests of every adapter form that mixed-adapter batches serve."""

from __future__ import annotations

import torch


def assert_each_row_served_by_its_adapter(model, x: torch.Tensor, names: list[str]) -> None:
    """``model(x, adapter_names=names)`` (a PEFT model in eval mode) equals running every row alone
    through its adapter (``"__base__"``: with the adapters disabled). Leaves ``names[-1]`` active."""
    got = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = model(x[i : i + 1])
        else:
            model.set_adapter(name)
            want = model(x[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-6)
