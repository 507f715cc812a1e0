"""cpuboost: make PyTorch models fast on CPUs with one decorator and one context manager.

``import cpuboost`` is light: no IPEX, OpenVINO or Inductor import, no thread or environment changes.
"""
from .amp import cpu_amp
from .api import cpu_optimized, explain, optimize, unwrap
from .errors import CpuBoostError
from .core import registry as _registry
from .core.registry import list_passes, register_pass
from .passes import register_builtins as _register_builtins

__all__ = sorted(
    ["CpuBoostError", "cpu_amp", "cpu_optimized", "explain", "list_passes", "load", "optimize", "register_pass",
     "save", "unwrap"]
)
__version__ = "0.1.0"

_registry.add_builtin_loader(_register_builtins)


def save(optimized, path):
    """Write a self-contained package of the signatures ``optimized`` has built (see ``persist.deploy.save``)."""
    from .persist.deploy import save as _save

    return _save(optimized, path)


def load(path, **kwargs):
    """A package written by ``save``, as a model that answers without compiling (``persist.deploy.load``)."""
    from .persist.deploy import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str):
    """``cpuboost.bench`` without a second import, loaded only when first touched (import stays light)."""
    if name == "bench":
        import importlib

        return importlib.import_module(".bench", __name__)
    raise AttributeError(f"module 'cpuboost' has no attribute {name!r}")
