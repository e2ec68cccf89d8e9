"""Every examples/*.py runs with --smoke (small settings) so none can rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# seconds per script; real-model examples (MiniLM) get more
TIMEOUT = {"finetune_minilm.py": 300, "peft_minilm.py": 300}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_smoke(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, str(script), "--smoke"]
    if script.name == "plot_tradeoffs.py":
        args += ["--out", str(tmp_path / "figs")]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT.get(script.name, 120))
    assert proc.returncode == 0, f"{script.name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"


def test_every_example_takes_smoke():
    assert EXAMPLES, "no examples found"
    for script in EXAMPLES:
        assert "--smoke" in script.read_text(), f"{script.name} must accept --smoke"
