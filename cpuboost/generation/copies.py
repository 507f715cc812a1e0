"""Private copies of the user's model for generation: they share every tensor with it except the matmul
weights, which each copy holds once in the dtype it runs (never re-cast per step, and the user's model is
never touched)."""
from __future__ import annotations

import copy
import functools
import itertools
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import rope


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` holding the very same Parameter and buffer objects (no tensor copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    with torch.no_grad():
        return copy.deepcopy(model, memo)


class FlatLinear(nn.Linear):
    """``nn.Linear`` on a 2-D view of its input. CPU bf16 linear of a strided 3-D input (the LM head after
    ``logits_to_keep`` slicing in prefill) takes a bmm path that copies the whole weight on every call:
    70 ms instead of 5 ms for a 16000x512 head on one thread here. Same GEMM, same numerics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return nn.functional.linear(x, self.weight, self.bias)
        out = nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def matmul_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every layer whose weight is a matmul operand autocast runs in low precision: ``nn.Linear`` and
    transformers' ``Conv1D`` (GPT-2's addmm)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            yield name, module


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Give each matmul layer of ``model`` (a shared copy) its own ``dtype`` weight and bias; tied weights
    (an LM head sharing the embedding) are untied in the copy only, so the embedding stays fp32."""
    cast: dict[int, nn.Parameter] = {}
    for _, module in matmul_layers(model):
        if type(module) is nn.Linear:
            module.__class__ = FlatLinear
        for name in ("weight", "bias"):
            param = module._parameters.get(name)
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = cast[id(param)]
    return len(cast)


def math_attention(model: nn.Module) -> Optional[str]:
    """Switch a private copy from SDPA to transformers' eager (math) attention, which Inductor fuses in the
    decode graph; SDPA stays an opaque flash-attention call per layer costing more than the layer's matmuls
    for one query (1.47x -> 1.61x over eager fp32 here). Flash/flex/custom attention is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:  # a model that cannot switch keeps SDPA, and says so
        return f"attention stays sdpa ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return f"the decode copy runs {config._attn_implementation} attention (the model's is sdpa)"


def prefill_on(static: nn.Module, prefill: nn.Module, cache_arg: str, graph: Any = None) -> None:
    """Calls of ``static`` with more than one new token (the prefill) run ``prefill``'s forward: the same tensors
    with the model's own SDPA attention, which beats the math attention the decode graph fuses once the query
    is long (1.27x at prompt 128 here). One-token calls (the decode graph traces these) keep ``static``'s own.
    ``cache_arg``: the name this transformers passes the KV cache under; ``graph``: a compiled prefill
    (prefill.PrefillGraph) that serves the exact-cache prefill once it has been verified and has won."""
    decode = type(static).forward

    @functools.wraps(decode.__get__(static))  # transformers reads forward's signature (logits_to_keep, kwargs)
    def forward(*args: Any, **kwargs: Any) -> Any:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 and tokens.shape[1] > 1:
            return _prefill_exact(prefill, tokens, cache_arg, args, kwargs, graph)
        return decode(static, *args, **kwargs)

    static.forward = forward


def _prefill_exact(prefill: nn.Module, tokens: torch.Tensor, name: str, args: tuple, kwargs: dict,
                   graph: Any = None) -> Any:
    """The prefill on a StaticCache exactly as long as the prompt, whose keys and values then go into the
    bucket's cache (same dtype: both laid out from this model's tensors). On the bucket's cache the prompt's
    attention ran over the whole bucket under a mask: prompt 1024 in the 2048 bucket spent twice the attention
    FLOPs (TTFT 1601 ms against eager bf16's 1435, Qwen2 shape). A first prefill (positions from 0) only; any
    other call, or a cache that is not a plain StaticCache, runs as given."""
    from transformers import StaticCache

    from .cache import fill, new_static_cache

    bucket, position = kwargs.get(name), kwargs.get("cache_position")
    fresh = position is None or (isinstance(position, torch.Tensor) and position.numel() > 0 and int(position[0]) == 0)
    if type(bucket) is not StaticCache or not fresh:
        return prefill.forward(*args, **kwargs)
    length = tokens.shape[1]
    mask = _keys_cut(kwargs.get("attention_mask"), length)
    call = {**kwargs, name: new_static_cache(prefill, tokens.shape[0], length), "attention_mask": mask}
    out = graph.run(call) if graph is not None and not args else None
    if out is None:
        out = prefill.forward(*args, **call)
    exact = call[name]
    fill(bucket, exact)
    for field in ("past_key_values", "cache"):  # generate() carries the returned cache to the decode steps
        if getattr(out, field, None) is exact:
            setattr(out, field, bucket)
    return out


def _keys_cut(mask: Any, length: int) -> Any:
    """A 4-d mask generate() laid out for the bucket (5.x: one per attention type, in a dict) cut to the
    prompt's keys: the positions past the prompt are masked in it anyway. 2-d masks pass as they are."""
    if isinstance(mask, dict):
        return {k: _keys_cut(v, length) for k, v in mask.items()}
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] > length:
        return mask[..., :length].contiguous()  # the compiled prefill's guards expect a dense mask
    return mask


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (quantized ones by their
    packed data and scales), except the input embedding table and the rotary tables, of which a step reads
    one row per sequence."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(getattr(embeddings, "weight", None))}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip.discard(id(getattr(head, "weight", None)))  # a tied head reads the whole table
    seen, total = set(), 0
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(tensor) in seen or id(tensor) in skip or name.rpartition(".")[2] in rope.TABLES:
            continue
        seen.add(id(tensor))
        total += stored_bytes(tensor)
    return total


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies, looking inside quantized tensor subclasses (torchao's hold ``qdata``/``scale``)."""
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = inner()
        return sum(stored_bytes(getattr(tensor, n)) for n in names if isinstance(getattr(tensor, n), torch.Tensor))
    return tensor.numel() * tensor.element_size()
