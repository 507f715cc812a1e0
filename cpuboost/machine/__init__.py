"""Facts about this machine (ISA, cores, compiler) and the ``cpuboost env`` report."""
