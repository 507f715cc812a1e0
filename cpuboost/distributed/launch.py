"""``cpuboost launch [torchrun args] script.py [script args]``: torchrun with CPU settings chosen per rank.

torchrun does the launching, rendezvous, restarts and failure reports; this adds only what a CPU job
needs and torchrun leaves out:

- threads: ``OMP_NUM_THREADS = physical cores / local ranks`` (torchrun alone would use 1), unless the
  variable is already set, in which case it is kept;
- core binding: local rank *i* is pinned to the *i*-th equal slice of the physical cores available to
  this process (with their hyperthreads), the split ``torch.backends.xeon.run_cpu`` makes under torchrun.
  Each worker pins itself with ``sched_setaffinity`` and then execs the script (same process, so
  torchrun's signals and exit codes reach it). ``run_cpu`` itself is not used as the worker program: it
  returns 0 when the program it starts fails, which would hide a dead rank from torchrun.

Nothing the user has set is overridden; ``--no-bind`` turns binding off (use it when several "nodes" share
one machine); ``--dry-run`` prints the choices and the torchrun command without running it.
Multi-node is the same command with torchrun's ``--nnodes/--node-rank/--rdzv-*`` options on every node.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import Mapping, Optional, Sequence

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
CPUS_VAR = "CPUBOOST_LAUNCH_CPUS"
_AFFINITY_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
_OUR_FLAGS = ("--no-bind", "--dry-run")
_SCRIPT_MODE_FLAGS = ("-m", "--module", "--no-python", "--no_python")


@dataclasses.dataclass
class LaunchPlan:
    """What the launcher decided for this node, and why (each ``notes`` line is printed)."""

    local_ranks: int
    physical_cores: int
    env: dict[str, str]
    binding: Optional[list[list[int]]]
    notes: list[str]


def _cpu_core(cpu: int) -> tuple[int, int]:
    base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
    try:
        with open(f"{base}/physical_package_id", encoding="ascii") as a, open(f"{base}/core_id", encoding="ascii") as b:
            return int(a.read()), int(b.read())
    except (OSError, ValueError):
        return (0, cpu)  # unknown topology: every logical CPU counts as a core


def physical_cores(cpus: Sequence[int], core_of=_cpu_core) -> list[list[int]]:
    """Logical CPUs grouped by physical core (siblings together), cores in order of their first CPU."""
    groups: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(core_of(cpu), []).append(cpu)
    return list(groups.values())


def available_cpus() -> list[int]:
    """The logical CPUs this process may run on (a taskset/cgroup restriction is respected)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def plan_launch(local_ranks: int, cores: list[list[int]], environ: Mapping[str, str], *,
                no_bind: Optional[str] = None, can_bind: bool = True, multi_node: bool = False) -> LaunchPlan:
    """Threads and core slices for ``local_ranks`` workers on ``cores`` (physical cores as CPU lists).

    ``no_bind`` is a reason to skip binding (a flag the user gave); ``environ`` is only read.
    """
    n_cores = len(cores)
    cpus = sum(len(c) for c in cores)
    notes = [f"{local_ranks} local rank(s) on {n_cores} physical core(s) ({cpus} logical CPU(s) available)"]
    env: dict[str, str] = {}
    per_rank = n_cores // local_ranks
    user_threads = environ.get("OMP_NUM_THREADS")
    if user_threads:
        notes.append(f"OMP_NUM_THREADS={user_threads} (already set: kept)")
        threads = _int_or_none(user_threads)
    else:
        threads = max(1, per_rank)
        env["OMP_NUM_THREADS"] = str(threads)
        notes.append(f"OMP_NUM_THREADS={threads} per rank (physical cores / local ranks)")
    why_not = no_bind or _why_not_bind(environ, can_bind, local_ranks, n_cores, threads)
    if why_not:
        notes.append(f"core binding: off ({why_not})")
        return LaunchPlan(local_ranks, n_cores, env, None, notes)
    binding = [sum(cores[i * per_rank:(i + 1) * per_rank], []) for i in range(local_ranks)]
    env[CPUS_VAR] = ";".join(",".join(map(str, group)) for group in binding)
    shown = ", ".join(f"rank {i} -> CPUs {_ranges(g)}" for i, g in enumerate(binding))
    notes.append(f"core binding (local ranks): {shown}")
    if n_cores % local_ranks:
        notes.append(f"{n_cores % local_ranks} core(s) left idle so every rank gets the same share")
    if multi_node:
        notes.append("every node binds its own ranks from its first core: if several nodes share one "
                     "machine (testing), pass --no-bind")
    return LaunchPlan(local_ranks, n_cores, env, binding, notes)


def _why_not_bind(environ: Mapping[str, str], can_bind: bool, local_ranks: int, n_cores: int,
                  threads: Optional[int]) -> Optional[str]:
    """The reason binding would do harm or nothing here, or None to bind."""
    per_rank = n_cores // local_ranks
    user_affinity = [v for v in _AFFINITY_VARS if environ.get(v)]
    if user_affinity:
        return f"{', '.join(user_affinity)} already set: affinity left to you"
    if not can_bind:
        return "this OS has no sched_setaffinity"
    if per_rank < 1:
        return f"more local ranks ({local_ranks}) than physical cores ({n_cores}): ranks share cores"
    if threads is not None and threads > per_rank:
        return f"OMP_NUM_THREADS={threads} is more than the {per_rank} core(s) per rank"
    if local_ranks == 1:
        return "one rank uses every available core"
    return None


def _ranges(cpus: list[int]) -> str:
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def _parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "cpuboost launch"
    parser.description = ("torchrun with CPU settings per rank: OMP_NUM_THREADS = physical cores / local ranks "
                          "(unless already set) and each local rank pinned to its share of the cores. Every "
                          "torchrun option works the same; cpuboost adds --no-bind and --dry-run.")
    parser.allow_abbrev = False  # so "-m"/"--no-python" are spelled out and found reliably
    parser.add_argument("--no-bind", action="store_true", help="do not pin ranks to cores (cpuboost)")
    parser.add_argument("--dry-run", action="store_true", help="print the choices and the command, run nothing")
    return parser


def build_command(argv: Sequence[str], args: argparse.Namespace, plan: LaunchPlan) -> list[str]:
    """torchrun's argument list: the user's, with the script started through the binding worker."""
    script_at = len(argv) - len(args.training_script_args) - 1
    prefix = [a for a in argv[:script_at] if a not in _OUR_FLAGS]
    script = list(argv[script_at:])
    if plan.binding is None:
        return prefix + script
    prefix = [a for a in prefix if a not in _SCRIPT_MODE_FLAGS]
    mode = "module" if args.module else "exec" if args.no_python else "python"
    return prefix + [_WORKER, mode, *script]


def _say(line: str) -> None:
    print(f"cpuboost launch: {line}", file=sys.stderr, flush=True)


def _run_torchrun(command: list[str], env: Mapping[str, str]) -> int:
    """torchrun's own ``main`` in this process, with ``env`` added only for its duration."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        torchrun_main(command)
    except ChildFailedError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # rendezvous timeouts, signals: torchrun's reason, without its agent traceback
        sigval = getattr(exc, "sigval", None)
        _say(f"torchrun stopped: {type(exc).__name__}: {exc}")
        return 128 + int(sigval) if sigval is not None else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``cpuboost launch``: parse torchrun's arguments, choose threads and binding, print them, run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        local_ranks = determine_local_world_size(args.nproc_per_node)
    except ValueError as exc:
        parser.error(f"--nproc-per-node {args.nproc_per_node!r}: {exc}")
    if local_ranks < 1:
        parser.error(f"--nproc-per-node {args.nproc_per_node!r} gives {local_ranks} processes; at least 1 is needed")
    cores = physical_cores(available_cpus())
    no_bind = "--no-bind" if args.no_bind else None
    if args.run_path:
        no_bind = "--run-path runs the script inside torchrun's own process"
    plan = plan_launch(local_ranks, cores, os.environ, no_bind=no_bind, can_bind=hasattr(os, "sched_setaffinity"),
                       multi_node=parse_min_max_nnodes(str(args.nnodes))[1] > 1)
    command = build_command(argv, args, plan)
    for note in plan.notes:
        _say(note)
    shown = [f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())]
    _say("running: " + " ".join(shown + [shlex.join([sys.executable, "-m", "torch.distributed.run", *command])]))
    if args.dry_run:
        return 0
    return _run_torchrun(command, plan.env)


if __name__ == "__main__":
    sys.exit(main())
