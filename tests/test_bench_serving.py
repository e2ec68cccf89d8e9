"""Smoke run of bench/serving.py on tiny sizes so it cannot rot (no timing assertions)."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import serving  # noqa: E402


def test_serving_smoke(tmp_path):
    assert serving.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "serving.json").read_text())
    cfg = serving.SMOKE
    assert set(results["points"]) == {str(a) for a in cfg.adapters}
    per_adapter = results["lambda_numbers_per_adapter"]
    for a, point in results["points"].items():
        expected = {"tera_mixed", "tera_loop", "tera_single", "tera_merged", "base"}
        if int(a) == cfg.lora_adapters:
            expected.add("lora_mixed")
            assert point["lora_bytes_per_adapter"] > 0
        assert set(point["median_s"]) == expected
        assert all(v > 0 for v in point["median_s"].values())
        # The mixed batch computes what the loop of single-adapter forwards computes.
        assert point["mixed_vs_loop_max_abs_diff"] < 1e-4
        assert point["distinct_in_batch"] == cfg.batch if int(a) >= cfg.batch else point["distinct_in_batch"] <= int(a)
        assert point["store_bytes_per_adapter"] <= per_adapter * 4 * 9 / 8 + 4
