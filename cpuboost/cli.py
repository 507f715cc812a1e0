"""The ``cpuboost`` command: ``env`` (what this machine can do), ``bench`` (measure paths side by side)
and ``launch`` (run a script with tuned CPU settings; implemented in ``cpuboost.launch``).

This is an application entry point, so unlike the library it may configure logging and thread counts,
and only for the duration of the command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from typing import Iterator, Optional, Sequence

EXAMPLES = """examples:
  cpuboost env                           # paste into bug reports
  cpuboost env --json
  cpuboost bench resnet50 --plot r.png   # eager vs torch.compile vs cpuboost, fp32 and bf16
  cpuboost bench bert --batch 8 --paths eager_fp32,cpuboost_fp32 --json bert.json
  cpuboost bench mymodels.py:make_model --dtype fp32
  cpuboost bench --list-paths
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpuboost", description="Make PyTorch models fast on CPUs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{env,bench,cache,launch}")
    sub.required = True

    env = sub.add_parser("env", help="CPU features, installed backends and why any is unusable, recommended dtype")
    env.add_argument("--json", action="store_true", help="print JSON (for machines) instead of text")

    bench = sub.add_parser("bench", help="time eager, torch.compile and cpuboost paths side by side",
                           description="Builds each path, then times them in interleaved rounds in this process; "
                                       "prints median, spread, speedup vs eager fp32, GFLOP/s and %% of a GEMM "
                                       "peak measured now, and each path's build time.")
    bench.add_argument("model", nargs="?", help="resnet50 | bert | vit | mlp | convnet | MODULE_OR_FILE.py:factory "
                                                "(a factory returns (model, inputs) and may take batch=)")
    bench.add_argument("--batch", type=int, default=None, help="batch size (default: 1 for resnet50/bert/vit, "
                                                               "64 for mlp, 32 for convnet)")
    bench.add_argument("--seq", type=int, default=128, help="sequence length for bert (default 128)")
    bench.add_argument("--dtype", choices=("all", "fp32", "bf16", "fp16"), default="all",
                       help="keep only paths of this dtype (eager fp32 always runs as the baseline)")
    bench.add_argument("--paths", default="default", help="comma-separated paths or groups (see --list-paths); "
                                                         "default: the eager, torch.compile and cpuboost paths "
                                                         "in fp32 and bf16, plus installed peers (IPEX, OpenVINO)")
    bench.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    bench.add_argument("--round-seconds", type=float, default=0.3,
                       help="target time per path per round; sets repetitions (default 0.3)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads for this run (default: torch's)")
    bench.add_argument("--json", metavar="OUT.json", help="write results as JSON")
    bench.add_argument("--plot", metavar="OUT.png", help="write a bar chart (needs matplotlib: cpuboost[bench])")
    bench.add_argument("--no-peak", action="store_true", help="skip measuring the GEMM peak")
    bench.add_argument("--list-paths", action="store_true", help="list paths and groups, then exit")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    bench.add_argument("-v", "--verbose", action="store_true", help="debug messages on stderr")
    bench.set_defaults(usage_parser=bench)  # so errors found after parsing print this subcommand's usage

    cache = sub.add_parser("cache", help="the persistent cache of decisions and compiled graphs: info | clear",
                           description="Where cpuboost keeps what it decided and compiled per model and input "
                                       "signature (CPUBOOST_CACHE_DIR, default ~/.cache/cpuboost; 'off' disables).")
    cache.add_argument("action", choices=("info", "clear"), help="info: where, how many entries, how big; "
                                                                 "clear: remove every entry")
    cache.add_argument("--dir", default=None, help="the cache folder (default: CPUBOOST_CACHE_DIR or "
                                                   "~/.cache/cpuboost)")
    cache.add_argument("--json", action="store_true", help="print JSON instead of text")

    sub.add_parser("launch", add_help=False, help="run a script with tuned CPU threads/affinity "
                                                  "(see: cpuboost launch --help)")
    return parser


@contextlib.contextmanager
def _stderr_logging(level: int) -> Iterator[None]:
    """Progress from the cpuboost loggers to stderr for this command only."""
    logger = logging.getLogger("cpuboost")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _env(args: argparse.Namespace) -> int:
    from .machine import envinfo

    info = envinfo.collect()
    print(json.dumps(info, indent=2) if args.json else envinfo.format_text(info))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .persist.store import DecisionStore

    store = DecisionStore.from_option(args.dir)
    if args.action == "clear":
        before = store.info()
        store.clear()
        print(f"cleared {before.get('entries', 0)} entries from {before.get('root')}" if store.enabled
              else "the cache is off (CPUBOOST_CACHE_DIR=off): nothing to clear")
        return 0
    info = store.info()
    if args.json:
        print(json.dumps(info, indent=2))
    elif not info["enabled"]:
        print(f"cpuboost cache: {info['root']} is not used: it, or a folder above it, is not private to you "
              "(chmod go-w it)" if info.get("unsafe") else "cpuboost cache: off (CPUBOOST_CACHE_DIR=off)")
    else:
        print(f"cpuboost cache: {info['root']}\n- entries: {info['entries']}\n- size: {info['bytes'] / 2**20:.1f} MiB "
              f"of {info['max_bytes'] / 2**30:.1f} GiB\n- writable: {info['writable']}")
    return 0


def _list_paths() -> int:
    from . import bench

    for name in bench.list_paths():
        path = bench.get_path(name)
        why = path.available()
        state = "available" if why is None else f"unavailable: {why}"
        print(f"{name:<24} {path.dtype:<5} {path.label:<34} {state}")
    print("\ngroups:")
    for group, members in bench.GROUPS.items():
        print(f"  {group:<8} {','.join(members)}")
    print("  (peers = installed optional backends such as IPEX and OpenVINO)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench import plot as benchplot, workloads as models
    from .bench.results import write_json
    from .errors import CpuBoostError

    sub = args.usage_parser
    if args.list_paths:
        return _list_paths()
    if not args.model:
        sub.error("a model is required: resnet50, bert, vit, mlp, convnet or MODULE_OR_FILE.py:factory")
    for name in ("batch", "rounds", "threads", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            sub.error(f"--{name} {value} must be a positive integer")
    if args.round_seconds <= 0:
        sub.error(f"--round-seconds {args.round_seconds} must be positive")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(out)) if out else None
        if folder and not os.path.isdir(folder):  # found now, not after minutes of benchmarking
            sub.error(f"{flag} {out}: folder {folder} does not exist")
    try:
        if args.plot:
            benchplot.require_matplotlib()
        paths = bench.resolve_paths(args.paths, args.dtype)
        level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
        with _stderr_logging(level), _threads(args.threads):
            workload = models.load(args.model, args.batch, seq=args.seq)
            result = bench.run(workload, paths, rounds=args.rounds, round_seconds=args.round_seconds,
                               progress=None if not args.quiet else False, measure_peak=not args.no_peak)
    except CpuBoostError as exc:
        sub.error(str(exc))
    print(result.table())
    if args.json:
        write_json([result], args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        benchplot.plot([result], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if any(p.timed for p in result.paths) else 1


def _launch(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("cpuboost.launch") is None:
        print("cpuboost launch: not available in this installation (cpuboost.launch is missing); "
              "use `torchrun` or `python -m torch.backends.xeon.run_cpu` directly", file=sys.stderr)
        return 2
    from .launch import main as launch_main  # imported only when asked for

    return launch_main(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cpuboost`` console script and ``python -m cpuboost``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":  # everything after "launch" belongs to the launcher, untouched
        return _launch(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "env":
            return _env(args)
        if args.command == "cache":
            return _cache(args)
        return _bench(args)
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 1
