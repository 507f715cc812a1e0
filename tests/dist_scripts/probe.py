"""Prints what a rank was given (no torch import, so it starts fast); exits with --exit-code on rank 1."""
import json
import os
import sys

print("PROBE " + json.dumps({"local_rank": int(os.environ["LOCAL_RANK"]), "cpus": sorted(os.sched_getaffinity(0)),
                             "omp": os.environ.get("OMP_NUM_THREADS"), "argv": sys.argv[1:]}), flush=True)
if os.environ["LOCAL_RANK"] == "1" and "--exit-code" in sys.argv:
    sys.exit(int(sys.argv[sys.argv.index("--exit-code") + 1]))
