"""Writes what this rank was given to DIR/rank<N>.json (no torch import, so it starts fast).

``probe.py DIR [--exit-code C] [args]``: with --exit-code, local rank 1 exits with C once rank 0 has written.
"""
import json
import os
import sys
import time

out_dir = sys.argv[1]
rank = int(os.environ["LOCAL_RANK"])
with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
    json.dump({"cpus": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
               "argv": sys.argv[2:]}, fh)
if rank == 1 and "--exit-code" in sys.argv:
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(out_dir, "rank0.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(int(sys.argv[sys.argv.index("--exit-code") + 1]))
