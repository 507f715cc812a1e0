"""Persistence: the cache of decisions and compiled artifacts that survives a restart (``store``, ``keys``,
``warm``), and deployment packages (``package``, ``aoti``, ``treespec``, ``deploy``). Imports nothing at
load: ``cpuboost.save``/``cpuboost.load`` reach ``deploy`` when first called."""
