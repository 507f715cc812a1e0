"""Shared fixtures and hypothesis profiles: many cheap eager examples, few compiled ones."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# HYPOTHESIS_PROFILE=quick: a few examples per property, for a fast local loop (CI runs the default)
settings.register_profile("quick", parent=settings.get_profile("default"), max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _clean_cpuboost_env(monkeypatch):
    """Tests start without CPUBOOST_* overrides, whatever the shell has set, and with the persistent cache
    off: each test decides afresh and none writes the user's cache (warm-start tests pass cache_dir=)."""
    for var in list(os.environ):
        if var.startswith("CPUBOOST_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("CPUBOOST_CACHE_DIR", "off")
    torch.manual_seed(0)


@pytest.fixture
def two_threads():
    """Two torch threads for one test (the backends' own thread settings are checked against it), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
