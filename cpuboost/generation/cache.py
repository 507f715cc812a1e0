"""Static KV caches made by cpuboost, not by ``generate(cache_implementation="static", max_cache_len=...)``:
that keyword is new in transformers 5.2x (5.5.x and 4.x reject it as an unused model kwarg), while a
``StaticCache`` passed as ``past_key_values`` works the same way in 4.51 and every 5.x. One cache per
concurrent call: a pool hands each call its own, so calls on one graph never share KV state."""
from __future__ import annotations

import copy
import functools
import inspect
import threading
from typing import Any, Optional

import torch
from torch import nn


def cache_refusal(model: nn.Module) -> Optional[str]:
    """None when a plain ``StaticCache`` serves ``model`` in this transformers, else why not."""
    import transformers

    wanted = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    major = int(transformers.__version__.split(".")[0])
    if major < 5 and wanted not in (None, "static"):
        return (f"the model asks for a {wanted!r} cache, which transformers {transformers.__version__} does not "
                "build as a plain StaticCache (transformers >= 5 does)")
    if major < 5 and not getattr(model, "_supports_static_cache", False):
        return f"{type(model).__name__} does not support a static cache in transformers {transformers.__version__}"
    return None


def new_static_cache(model: nn.Module, batch: int, length: int) -> Any:
    """A ``StaticCache`` for ``batch`` rows of ``length`` positions, built with whatever arguments this
    transformers' constructor takes (4.x: batch, dtype and device up front; 5.x: laid out on first use)."""
    from transformers import StaticCache

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    accepted = inspect.signature(StaticCache.__init__).parameters
    offered = {"config": config, "max_cache_len": length, "max_batch_size": batch, "batch_size": batch,
               "dtype": _cache_dtype(model), "device": "cpu"}
    cache = StaticCache(**{k: v for k, v in offered.items() if k in accepted})
    for layer in getattr(cache, "layers", ()) or ():
        if _one_dtype_layer(type(layer)):
            layer.update = _values_as_keys(layer.update)
    unmark_static(cache)
    return cache


@functools.lru_cache(maxsize=None)
def _one_dtype_layer(layer_type: type) -> bool:
    """Layers that lay out values in the keys' dtype (transformers 5.5.x). Under autocast keys come out of RoPE
    in fp32 and values out of a bf16 linear, so storing a value fails ("index_copy_(): self and source expected
    to have the same dtype"); 5.2x lays each out in its own dtype."""
    try:
        source = inspect.getsource(layer_type.lazy_initialization)
    except (AttributeError, OSError, TypeError):
        return False
    return "value_states.dtype" not in source


def _values_as_keys(update: Any) -> Any:
    def update_in_keys_dtype(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return update(key_states, value_states.to(key_states.dtype), *args, **kwargs)

    return update_in_keys_dtype


def _cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype keys and values arrive in: RoPE multiplies them by fp32 cos/sin, so fp32 unless the model's
    embeddings (hence its whole residual stream) are low precision."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def unmark_static(cache: Any) -> None:
    """StaticCache marks its tensors as static addresses (for CUDA graphs), which freezing would bake into
    the graph as constants (stale cache, index errors). On CPU the mark buys nothing: drop it."""
    if cache is None:
        return
    tensors = []
    for layer in getattr(cache, "layers", ()) or ():  # transformers 5.x: one object per layer
        tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    for name in ("key_cache", "value_cache"):  # transformers 4.x: lists of tensors
        value = cache.__dict__.get(name)
        tensors += list(value) if isinstance(value, list) else []
    for tensor in tensors:
        if hasattr(tensor, "_dynamo_static_input_type"):
            del tensor._dynamo_static_input_type


def layer_states(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer: ``layers[i].keys`` in transformers 5.x, ``key_cache[i]`` in 4.x."""
    layers = getattr(cache, "layers", None)
    if layers:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def shell_layers(cache: Any, tensors: list[list[torch.Tensor]]) -> Any:
    """A copy of ``cache`` whose per-layer tensors are ``tensors`` (``packaged.cache_tensors``' order), so an
    exported step reads and writes the tensors it is given. The one-dtype fix is bound to the copy's layers."""
    shell = copy.copy(cache)
    layers = getattr(cache, "layers", None)
    if layers:
        shell.layers = []
        for layer, mine in zip(layers, tensors):
            twin = copy.copy(layer)
            names = sorted(k for k, v in vars(layer).items() if isinstance(v, torch.Tensor))
            twin.__dict__.update(zip(names, mine))
            if "update" in vars(layer):  # new_static_cache's wrapper, bound to the original layer
                twin.update = _values_as_keys(type(layer).update.__get__(twin))
            shell.layers.append(twin)
    else:
        shell.key_cache, shell.value_cache = [t[0] for t in tensors], [t[1] for t in tensors]
    return shell


def fill(target: Any, source: Any) -> None:
    """Write ``source``'s keys and values (positions 0..n-1) into ``target`` through its public ``update``,
    which lays out 5.x's lazy layers and works the same in 4.51."""
    for index, (keys, values) in enumerate(layer_states(source)):
        positions = torch.arange(keys.shape[-2])
        target.update(keys, values, index, {"cache_position": positions})


class CachePool:
    """Free static caches per (batch, length): a call takes one (or makes one) and gives it back reset."""

    def __init__(self, model: nn.Module) -> None:
        self._model, self._free, self._lock = model, {}, threading.Lock()

    def take(self, batch: int, length: int) -> Any:
        with self._lock:
            free = self._free.get((batch, length))
            if free:
                return free.pop()
        return new_static_cache(self._model, batch, length)

    def give_back(self, batch: int, length: int, cache: Any) -> None:
        cache.reset()
        unmark_static(cache)  # 5.x lays layers out lazily and marks them on the first update
        with self._lock:
            self._free.setdefault((batch, length), []).append(cache)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
