"""cpu_amp: torch's own CPU autocast state, fresh per use, nestable, thread and recursion safe."""
import threading
import warnings

import pytest
import torch

from cpuboost import CpuBoostError, cpu_amp


def _state():
    return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")


def test_enables_bf16_autocast_visible_to_torch():
    """Inside cpu_amp(), torch reports CPU autocast on with bf16, and matmuls run in bf16."""
    assert not torch.is_autocast_enabled("cpu")
    with cpu_amp():
        assert _state() == (True, torch.bfloat16)
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("fp16", torch.float16), ("float16", torch.float16),
                                        (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_accepts_names_and_torch_dtypes(name, dtype):
    """Every documented spelling of a low-precision dtype selects that autocast dtype."""
    with cpu_amp(name):
        assert _state() == (True, dtype)


def test_fp32_disables_autocast_even_inside_an_outer_region():
    """cpu_amp('fp32') runs fp32 inside torch.autocast and restores the outer state after."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cpu_amp("fp32"):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
        assert _state() == (True, torch.bfloat16)


def test_nests_with_torch_autocast_both_ways():
    """cpu_amp inside torch.autocast and torch.autocast inside cpu_amp each restore the outer state."""
    with torch.autocast("cpu", dtype=torch.float16):
        with cpu_amp("bf16"):
            assert _state() == (True, torch.bfloat16)
        assert _state() == (True, torch.float16)
    with cpu_amp("bf16"):
        with torch.autocast("cpu", enabled=False):
            assert not torch.is_autocast_enabled("cpu")
        assert _state() == (True, torch.bfloat16)


def test_same_instance_reused_and_nested():
    """One instance can be entered again while already active and unwinds in order."""
    amp = cpu_amp()
    with amp:
        with amp:
            assert torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_state_restored_after_exception():
    """An exception inside cpu_amp leaves autocast exactly as it was before."""
    with pytest.raises(KeyError):
        with cpu_amp():
            raise KeyError("boom")
    assert not torch.is_autocast_enabled("cpu")


def test_decorator_fresh_state_per_call_and_recursion():
    """A decorated recursive function sees autocast at every depth and none after returning."""
    seen = []

    @cpu_amp("bf16")
    def depth(n):
        seen.append(_state())
        return 0 if n == 0 else 1 + depth(n - 1)

    assert depth(5) == 5
    assert seen == [(True, torch.bfloat16)] * 6
    assert not torch.is_autocast_enabled("cpu")


def test_decorator_preserves_name_doc_signature():
    """The decorated function keeps its name, docstring and signature."""
    import inspect

    def step(x, *, scale=2):
        """Doc."""
        return x

    wrapped = cpu_amp()(step)
    assert wrapped.__name__ == "step" and wrapped.__doc__ == "Doc."
    assert inspect.signature(wrapped) == inspect.signature(step)


def test_decorated_generator_reenters_autocast_each_resume():
    """A decorated generator runs each step under autocast but never leaks it to the caller."""

    @cpu_amp()
    def gen():
        for _ in range(3):
            yield torch.is_autocast_enabled("cpu")

    outside = []
    for inside in gen():
        outside.append(torch.is_autocast_enabled("cpu"))
        assert inside
    assert outside == [False, False, False]


def test_threads_do_not_share_state():
    """A thread inside cpu_amp does not turn autocast on for another thread using the same instance."""
    amp = cpu_amp()
    entered, release, results = threading.Event(), threading.Event(), {}

    def holder():
        with amp:
            entered.set()
            release.wait(5)
            results["holder"] = torch.is_autocast_enabled("cpu")

    def other():
        entered.wait(5)
        results["other"] = torch.is_autocast_enabled("cpu")
        with amp:
            results["other_inside"] = torch.is_autocast_enabled("cpu")
        results["other_after"] = torch.is_autocast_enabled("cpu")
        release.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert results == {"holder": True, "other": False, "other_inside": True, "other_after": False}


@pytest.mark.parametrize("bad", ["int8", "bf32", "", None, torch.int32, 16])
def test_bad_dtype_names_the_value_and_choices(bad):
    """An unknown dtype raises a CpuBoostError (and ValueError) naming the value and the choices."""
    with pytest.raises(CpuBoostError) as info:
        cpu_amp(bad)
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value) and "'bf16'" in str(info.value)


def test_disabled_is_a_no_op():
    """enabled=False leaves autocast off."""
    with cpu_amp(enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_warns_once_when_bf16_is_emulated():
    """On a CPU without AVX512_BF16/AMX, entering bf16 autocast warns once per process; never otherwise."""
    from cpuboost import amp
    from cpuboost.machine import hardware

    amp._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cpu_amp():
            pass
        with cpu_amp():
            pass
    perf = [w for w in caught if issubclass(w.category, amp.CpuBoostPerformanceWarning)]
    assert len(perf) == (0 if hardware.detect().native_bf16 else 1)
