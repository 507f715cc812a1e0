"""First program of every worker that ``cpuboost launch`` starts: pin this rank to its cores, then exec.

Run by path (not ``-m``), so it imports neither torch nor cpuboost. Usage (written by the launcher):
``worker.py python|module|exec script [args]`` (how to start the script:
``python script``, ``python -m script`` or the program itself); the CPU lists per local rank come in
``CPUBOOST_LAUNCH_CPUS`` ("0,1;2,3"). The script replaces this process (same PID), so torchrun's signals,
exit codes and error files work exactly as without cpuboost. Affinity survives ``exec`` and is inherited
by every thread and DataLoader worker the script starts.
"""
import os
import sys


def main(argv):
    mode, target = argv[0], argv[1:]
    groups = os.environ.pop("CPUBOOST_LAUNCH_CPUS", "").split(";")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank < len(groups) and groups[local_rank]:
        try:
            os.sched_setaffinity(0, {int(c) for c in groups[local_rank].split(",")})
        except (AttributeError, OSError, ValueError) as exc:
            print(f"cpuboost launch: local rank {local_rank}: core binding skipped ({exc})", file=sys.stderr)
    if mode == "exec":
        command = target
    else:
        command = [sys.executable, "-u"] + ["-m"] * (mode == "module") + target
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
