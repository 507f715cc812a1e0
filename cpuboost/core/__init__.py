"""The inference flow: the plan (registry), the optimized module, the signature cache, weight freshness,
the build ladder and race, verification and the report (the persistent store is ``cpuboost.persist``)."""
