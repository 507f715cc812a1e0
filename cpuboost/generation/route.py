"""Which models and which generate() calls take the static-cache route, and how big a cache a call needs."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CpuBoostError

MIN_BUCKET = 128
# Arguments that take over the cache or the compile: honoured, so the static route steps aside.
CALLER_CACHE_ARGS = ("cache", "past_key_values", "cache_implementation", "compile_config", "disable_compile",
                     "prefill_chunk_size", "assistant_model", "prompt_lookup_num_tokens", "custom_generate")


class GenerationLengthError(CpuBoostError, ValueError):
    """``generate()`` asked for more positions than the runner's static KV cache holds."""


def can_route(model: Any) -> Optional[str]:
    """None when ``model.generate`` can run on a :class:`GenerationRunner`, else the reason it cannot."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        return f"{type(model).__name__} has no generate() method"
    try:
        from transformers import GenerationMixin
    except ImportError:
        return "transformers is not installed; only its GenerationMixin.generate is routed"
    if not isinstance(model, GenerationMixin):
        return f"{type(model).__name__}.generate is its own, not transformers' GenerationMixin.generate"
    if getattr(type(model).generate, "__qualname__", "") != "GenerationMixin.generate":
        return (f"{type(model).__name__} overrides generate() ({type(model).generate.__qualname__}); "
                "cpuboost cannot tell what it runs")
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not routed yet (only decoder-only causal LMs)"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantized by transformers (hf_quantizer); its own kernels serve"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model has parameters off the CPU (or split across devices)"
    return None


class CallPlan:
    """What one generate() call asks for, read the way transformers reads it."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        config = kwargs.get("generation_config") or model.generation_config
        self._kwargs = kwargs

        def setting(name: str, default: Any = None) -> Any:
            value = kwargs[name] if name in kwargs else getattr(config, name, default)
            return default if value is None else value

        self.prompt = prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        self.refusal: Optional[str] = None
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point:
            self.refusal = "no input_ids prompt to size the static cache by (inputs_embeds are not routed yet)"
            return
        self.prompt_len = prompt.shape[1]
        self.copies = int(setting("num_return_sequences", 1)) if setting("do_sample", False) else 1
        self.batch = prompt.shape[0] * self.copies
        self.max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        self.needed = self.prompt_len + self.max_new if self.max_new is not None else int(setting("max_length", 20))
        caller = [name for name in CALLER_CACHE_ARGS if kwargs.get(name) is not None]
        if caller:
            self.refusal = f"the call passes {', '.join(caller)}; transformers handles it as asked"
        elif int(setting("num_beams", 1)) > 1:
            self.refusal = "beam search (num_beams > 1) runs on a dynamic cache"
        elif setting("use_cache", True) is False:
            self.refusal = "use_cache=False"

    def bucket(self, max_cache_len: int) -> int:
        """The static cache length serving this call (128, 256, ... capped at ``max_cache_len``)."""
        if self.needed > max_cache_len:
            room = max_cache_len - self.prompt_len
            fix = f"ask for max_new_tokens <= {room}" if room > 0 else "shorten the prompt"
            what = (f"max_new_tokens={self.max_new} after a {self.prompt_len}-token prompt"
                    if self.max_new is not None else f"max_length={self.needed}")
            msg = (f"{what} needs a {self.needed}-position KV cache; this model's static cache holds "
                   f"{max_cache_len} (max_cache_len, by default config.max_position_embeddings). "
                   f"Either {fix}, or build the runner with max_cache_len>={self.needed}.")
            raise GenerationLengthError(msg)
        return min(MIN_BUCKET << max(0, math.ceil(math.log2(self.needed / MIN_BUCKET))), max_cache_len)

    def probe(self, steps: int = 2) -> dict:
        """``steps`` greedy steps on this call's prompt and graph shapes, returning the raw logits of each."""
        probe = {k: self._kwargs[k] for k in ("attention_mask", "pad_token_id", "eos_token_id") if k in self._kwargs}
        probe.update(input_ids=self.prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                     num_beams=1, output_logits=True, return_dict_in_generate=True)
        for name in {"input_ids", "attention_mask"} & probe.keys():  # sampled sequences: rows of the batch
            probe[name] = probe[name].repeat_interleave(self.copies, 0)
        return probe
