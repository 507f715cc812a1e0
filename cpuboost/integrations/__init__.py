"""Glue for the frameworks users already train and serve with; each module imports its framework itself.

- ``cpuboost.integrations.transformers``: ``trainer_parts(model, args)`` for ``transformers.Trainer``.
- ``cpuboost.integrations.lightning``: ``CpuBoostCallback`` for ``lightning.Trainer``.

Pipelines and accelerate need no glue: an optimized model is taken where the original is (contract 12).
"""
