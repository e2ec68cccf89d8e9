"""Shared test configuration: hypothesis profiles and device parametrization."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci" bounds the examples so the whole suite stays within its time budget; neither profile has
# a deadline because timing on a shared 2-core machine is noisy.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
