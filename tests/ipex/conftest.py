"""`pytest -m ipex` asks for these tests explicitly: there an unusable IPEX is an error, not a silent skip."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if (config.option.markexpr or "").strip() != "ipex":
        return  # the main run: tests here skip with the reason when IPEX is not usable
    from cpuboost.backends.ipex import availability

    verdict = availability()
    if not verdict.usable:
        raise pytest.UsageError(f"-m ipex asked for the IPEX tests, but IPEX is not usable here: {verdict.reason}")
