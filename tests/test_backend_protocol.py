"""Every backend module provides what the package calls through ``namespace(x)``."""

from __future__ import annotations

import importlib

import pytest

from tera_tn.backends import backend_module
from tera_tn.backends.protocol import Backend, KernelBackend, backend_names, kernel_names, missing

BACKENDS = ["numpy", "torch", pytest.param("jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed"))]


def test_names_are_listed():
    assert {"name", "mutable", "tensordot", "svdvals", "timing_kernels"} <= set(backend_names())
    assert {"mm", "scratch", "worker_scopes", "SCRATCH_BYTES"} <= set(kernel_names())
    assert not set(backend_names()) & set(kernel_names())


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_provides_protocol(name):
    mod = backend_module(name)
    assert missing(mod) == []
    assert mod.name == name
    assert isinstance(mod, Backend)
    assert isinstance(mod, KernelBackend) == bool(mod.mutable)


@pytest.mark.parametrize("name", BACKENDS)
def test_missing_name_is_caught(name, monkeypatch):
    mod = backend_module(name)
    monkeypatch.delattr(mod, "svdvals")
    assert missing(mod) == ["svdvals"]
    assert not isinstance(mod, Backend)
    if mod.mutable:
        monkeypatch.undo()
        monkeypatch.delattr(mod, "mm")
        assert missing(mod) == ["mm"]
        assert not isinstance(mod, KernelBackend)
