"""Compiled graphs of transformers models keep serving when another model-output type appears in the process.

transformers 5.x registers each ``ModelOutput`` subclass as a pytree node on its first instance and keeps the
registered types in a module-level set; dynamo traces that membership test into every graph that builds an
output (``BaseModelOutputWithPast``, ``CausalLMOutputWithPast``...) and guards on the set. The first instance of
any other output type anywhere in the process (another model's forward, or importing optimum-intel, which
defines its own) then failed those guards: a decode step fell back to eager (Qwen2-shaped, 2 layers: 12.6 ->
23.4 ms per token after ``from optimum.intel import OVModelForCausalLM``) and forward graphs were rebuilt.
Marked constant for dynamo, the registration still runs (at trace time) and leaves no guard on the set."""
from __future__ import annotations

import sys

import torch


def steady_output_registration() -> None:
    """Mark transformers' output-type registration constant for dynamo, where transformers is loaded (never
    imported here). The function object gets one attribute; eager calls are unchanged."""
    generic = sys.modules.get("transformers.utils.generic")
    register = getattr(generic, "_register_model_output_pytree_node", None)
    if callable(register) and not getattr(register, "_dynamo_marked_constant", False):
        torch._dynamo.assume_constant_result(register)
