"""The golden and legacy-checkpoint comparisons hold on other kernel paths, not only this CPU's.

CI runs on whichever machine it gets (AMD or Intel, different BLAS kernels, 1 or 2 threads), and a
golden compared tighter than its dtype allows passes on the machine that wrote it and fails on
the next. One machine cannot be another CPU, so the golden tests run again in fresh processes with
the thread count pinned to 1 and 2 and with the generic kernels forced: OpenBLAS's oldest x86
core type (numpy), ATen's default CPU capability and MKL's SSE4.2 code path (torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KERNEL_PATHS = {
    "1 thread": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "generic kernels": {"OPENBLAS_CORETYPE": "Prescott", "ATEN_CPU_CAPABILITY": "default",
                        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "COMPATIBLE"},
}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(KERNEL_PATHS))
def test_golden_values_hold_on_another_kernel_path(path, tmp_path):
    env = {**os.environ, **KERNEL_PATHS[path], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           str(TESTS / "test_golden.py"),
           f"{TESTS / 'test_torch_checkpoint.py'}::test_legacy_checkpoint_loads_into_a_plain_model",
           f"--basetemp={tmp_path / 'pytest'}"]
    out = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{path}: golden tests failed\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
