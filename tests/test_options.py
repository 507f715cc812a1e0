"""Options: validated, frozen, environment overrides read only when a model is optimized."""
import dataclasses

import pytest
import torch

import cpuboost
from cpuboost.errors import InvalidOptionError, UnknownDtypeError, UnknownOptionError
from cpuboost.options import Options, resolve_options


def test_defaults_and_frozen():
    """Defaults are bf16, fusion on, auto backend and mode, verification on; the value is immutable."""
    opts = resolve_options({}, environ={})
    assert (opts.dtype, opts.fusion, opts.backend, opts.mode, opts.verify) == (
        torch.bfloat16, True, "auto", "auto", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.fusion = False


def test_unknown_option_lists_valid_names():
    """A misspelled option is an error naming it and every valid option."""
    with pytest.raises(UnknownOptionError, match=r"'fuse'.*fusion") as info:
        resolve_options({"fuse": True}, environ={})
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("name,value", [("backend", "tensorrt"), ("mode", "serve"), ("fusion", "maybe"),
                                        ("verify", 3), ("cache_size", 0), ("cache_size", True)])
def test_bad_values_name_value_and_choices(name, value):
    """Out-of-range option values raise InvalidOptionError naming the option and value."""
    with pytest.raises(InvalidOptionError, match=name) as info:
        resolve_options({name: value}, environ={})
    assert repr(value) in str(info.value)


def test_environment_replaces_defaults_not_explicit_arguments():
    """CPUBOOST_DTYPE/FUSION/BACKEND change defaults; explicit arguments still win."""
    env = {"CPUBOOST_DTYPE": "fp32", "CPUBOOST_FUSION": "0", "CPUBOOST_BACKEND": "eager"}
    opts = resolve_options({}, environ=env)
    assert (opts.dtype, opts.fusion, opts.backend) == (torch.float32, False, "eager")
    opts = resolve_options({"dtype": "bf16", "fusion": True}, environ=env)
    assert (opts.dtype, opts.fusion, opts.backend) == (torch.bfloat16, True, "eager")


def test_bad_environment_value_is_an_error_naming_it():
    """A CPUBOOST_DTYPE typo is reported, not ignored."""
    with pytest.raises(UnknownDtypeError, match="'bf61'"):
        resolve_options({}, environ={"CPUBOOST_DTYPE": "bf61"})


def test_environment_read_at_call_time_not_decoration(monkeypatch):
    """CPUBOOST_DTYPE set after decoration still applies to the next factory call."""

    @cpuboost.cpu_optimized(fusion=False)
    def make():
        return torch.nn.Linear(3, 3)

    monkeypatch.setenv("CPUBOOST_DTYPE", "fp32")
    assert "dtype=fp32" in cpuboost.explain(make()).options


def test_options_object_is_hashable_and_comparable():
    """Equal options compare equal (usable as cache keys)."""
    assert Options(dtype="bf16") == Options(dtype=torch.bfloat16)
    assert hash(Options(dtype="fp32")) == hash(Options(dtype="float32"))
