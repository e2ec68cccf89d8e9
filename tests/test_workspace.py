"""The kernel's buffers and threads live in an explicit Workspace, entered with use_workspace()."""

from __future__ import annotations

import numpy as np
import pytest

from tera_tn.backends import numpy as numpy_backend
from tera_tn.core import blocked_kernel as bk
from tera_tn.core import workspace as wsmod
from tera_tn.core.modeproduct import multi_mode_product
from tera_tn.core.workspace import DEFAULT_WORKSPACE, Workspace, current_workspace, use_workspace


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(bk, "_BLOCKING_MIN_ELEMS", 1)
    monkeypatch.setattr(bk, "_WORKERS_MIN_ELEMS", 1)
    monkeypatch.setattr(bk, "_MIN_BLOCK_ROWS", 2)
    monkeypatch.setattr(numpy_backend, "SCRATCH_BYTES", 4096)


def _operands():
    rng = np.random.default_rng(0)
    core = rng.standard_normal((6, 5, 7, 4))
    return core, [rng.standard_normal((9, 6)), rng.standard_normal((8, 5)), rng.standard_normal((3, 7)), rng.standard_normal((4, 4))]


def test_opt_in_and_nesting():
    assert current_workspace() is None
    mine = Workspace()
    with use_workspace() as ws:
        assert ws is DEFAULT_WORKSPACE and current_workspace() is ws
        with use_workspace(mine):
            assert current_workspace() is mine
        assert current_workspace() is DEFAULT_WORKSPACE
    assert current_workspace() is None
    with pytest.raises(TypeError, match="Workspace or None"):
        with use_workspace("default"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="max_cached_bytes"):
        Workspace(-1)


def test_outside_a_workspace_nothing_is_kept(small_blocks):
    core, mats = _operands()
    ref = multi_mode_product(core, mats)
    mine = Workspace()
    before = len(DEFAULT_WORKSPACE._buffers)
    with use_workspace(mine):
        inside = multi_mode_product(core, mats)
    assert mine._buffers and mine._pool is not None  # buffers cached, threads lent
    assert len(DEFAULT_WORKSPACE._buffers) == before
    np.testing.assert_allclose(inside, ref, rtol=1e-12, atol=1e-12)
    with use_workspace(mine):
        np.testing.assert_allclose(multi_mode_product(core, mats), ref, rtol=1e-12, atol=1e-12)
    mine.close()
    assert not mine._buffers and mine._pool is None


def test_torch_layers_enter_the_default_workspace(small_blocks, monkeypatch):
    torch = pytest.importorskip("torch")
    from tera_tn.torch.frozen import layer_product

    seen = []
    real = wsmod.Workspace.buffer

    def spy(self, *args):
        seen.append(self)
        return real(self, *args)

    monkeypatch.setattr(wsmod.Workspace, "buffer", spy)
    core, mats = _operands()
    y = layer_product(torch.from_numpy(core), [torch.from_numpy(m) for m in mats])
    np.testing.assert_allclose(y.numpy(), multi_mode_product(core, mats), rtol=1e-12, atol=1e-12)
    assert seen and all(s is DEFAULT_WORKSPACE for s in seen)
    assert current_workspace() is None
