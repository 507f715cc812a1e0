"""Shared fixtures and hypothesis profiles: many cheap eager examples, few compiled ones."""
from __future__ import annotations

import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings

# The default (what CI runs) draws the same examples on every run: a property that passed here fails there only
# when the code or the CPU differs, never by the luck of the draw (two stops failed CI on examples no local run
# had drawn). HYPOTHESIS_PROFILE=explore draws fresh ones on each run: run it to hunt, keep what it finds as
# @example.
_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("default", deadline=None, suppress_health_check=_HEALTH, derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("explore", deadline=None, suppress_health_check=_HEALTH, print_blob=True)
# HYPOTHESIS_PROFILE=quick: a few examples per property, for a fast local loop
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
    yield
    # A background build a test left running would share the CPU with the next test's races: let it finish.
    for thread in threading.enumerate():
        if thread.name.startswith("cpuboost build") and thread is not threading.current_thread():
            thread.join(timeout=300)
            assert not thread.is_alive(), f"{thread.name} still building after 300 s"


@pytest.fixture
def two_threads():
    """Two torch threads for one test (the backends' own thread settings are checked against it), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
