"""`cpuboost launch`: threads and core slices per rank, the torchrun command it builds, real launches."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, strategies as st

from cpuboost.distributed import launch

from dist_scripts.runner import HERE, launch_cmd, rank_env, run

PROBE = str(HERE / "probe.py")


def _cores(n_cores: int, siblings: int) -> list[list[int]]:
    """Linux-style numbering: core i has CPUs i, i + n, i + 2n, ..."""
    return [[c + k * n_cores for k in range(siblings)] for c in range(n_cores)]


@given(n_cores=st.integers(1, 64), siblings=st.integers(1, 2), ranks=st.integers(1, 16))
def test_threads_are_cores_per_rank_and_slices_are_disjoint(n_cores, siblings, ranks):
    """OMP_NUM_THREADS = cores // ranks (at least 1); each rank gets an equal, disjoint slice of whole cores."""
    plan = launch.plan_launch(ranks, _cores(n_cores, siblings), {})
    per = n_cores // ranks
    assert plan.env["OMP_NUM_THREADS"] == str(max(1, per))
    if ranks > n_cores or (ranks == 1):
        assert plan.binding is None and launch.CPUS_VAR not in plan.env
        return
    assert len(plan.binding) == ranks
    assert all(len(group) == per * siblings for group in plan.binding)
    flat = [cpu for group in plan.binding for cpu in group]
    assert len(flat) == len(set(flat))
    assert plan.env[launch.CPUS_VAR] == ";".join(",".join(map(str, g)) for g in plan.binding)


@given(user=st.sampled_from(["1", "3", "8"]), ranks=st.integers(1, 4))
def test_user_omp_num_threads_is_kept(user, ranks):
    """A user's OMP_NUM_THREADS is never overridden (and binding is off when it exceeds the slice)."""
    plan = launch.plan_launch(ranks, _cores(8, 1), {"OMP_NUM_THREADS": user})
    assert "OMP_NUM_THREADS" not in plan.env and any("already set: kept" in n for n in plan.notes)
    if plan.binding is not None:
        assert int(user) <= 8 // ranks


@pytest.mark.parametrize("var", ["OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"])
def test_user_affinity_settings_turn_binding_off(var):
    """If the user manages affinity, the launcher does not bind and says why."""
    plan = launch.plan_launch(2, _cores(4, 1), {var: "x"})
    assert plan.binding is None and any(var in n for n in plan.notes)


def test_no_bind_reason_and_multi_node_note():
    """--no-bind is reported; multi-node plans warn that nodes sharing a machine need --no-bind."""
    assert launch.plan_launch(2, _cores(4, 1), {}, no_bind="--no-bind").binding is None
    notes = launch.plan_launch(2, _cores(4, 1), {}, multi_node=True).notes
    assert any("--no-bind" in n for n in notes)


def test_physical_cores_groups_hyperthreads():
    """Logical CPUs sharing a (package, core) become one physical core."""
    topology = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)}
    assert launch.physical_cores([4, 3, 2, 1, 0], topology.__getitem__) == [[0, 2], [1, 3], [4]]


def _command(argv: list[str], bind: bool = True) -> list[str]:
    args = launch._parser().parse_args(argv)
    plan = launch.plan_launch(2, _cores(4, 1), {}, no_bind=None if bind else "off")
    return launch.build_command(argv, args, plan)


def test_command_starts_the_script_through_the_binding_worker():
    """The script and its arguments (even ones that look like ours) follow the worker; our flags are dropped."""
    argv = ["--nproc-per-node", "2", "--no-bind", "--standalone", "train.py", "--lr", "1", "--no-bind", "-m"]
    assert _command(argv) == ["--nproc-per-node", "2", "--standalone", launch._WORKER, "python", "train.py",
                              "--lr", "1", "--no-bind", "-m"]


@pytest.mark.parametrize("flag, mode", [("-m", "module"), ("--module", "module"), ("--no-python", "exec")])
def test_command_moves_script_mode_flags_to_the_worker(flag, mode):
    """torchrun's -m / --no-python apply to the user's program, after the worker pinned the rank."""
    cmd = _command(["--nproc-per-node", "2", flag, "pkg.train", "x"])
    assert cmd == ["--nproc-per-node", "2", launch._WORKER, mode, "pkg.train", "x"]


def test_command_without_binding_is_plain_torchrun():
    """With binding off the user's torchrun arguments are used as they are (minus our flags)."""
    assert _command(["--dry-run", "-m", "pkg.train", "x"], bind=False) == ["-m", "pkg.train", "x"]


def test_dry_run_prints_the_choices_and_changes_nothing(monkeypatch, capsys):
    """--dry-run prints threads, binding and the torchrun command, runs nothing, leaves os.environ alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    assert launch.main(["--dry-run", "--nproc-per-node", "2", "--standalone", "train.py", "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "2 local rank(s)" in err and "OMP_NUM_THREADS=" in err and "core binding" in err
    assert "-m torch.distributed.run --nproc-per-node 2 --standalone" in err and "train.py --epochs 3" in err
    assert dict(os.environ) == before


def test_dry_run_keeps_the_users_threads(monkeypatch, capsys):
    """OMP_NUM_THREADS set by the user is reported as kept and not put on the command."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.main(["--dry-run", "--nproc-per-node", "2", "train.py"]) == 0
    err = capsys.readouterr().err
    assert "OMP_NUM_THREADS=1 (already set: kept)" in err and "running: OMP_NUM_THREADS" not in err


def test_bad_nproc_is_a_usage_error(capsys):
    """An --nproc-per-node torchrun does not understand exits with a usage error."""
    with pytest.raises(SystemExit) as exc:
        launch.main(["--dry-run", "--nproc-per-node", "lots", "train.py"])
    assert exc.value.code == 2 and "--nproc-per-node 'lots'" in capsys.readouterr().err


@pytest.mark.distributed
def test_real_launch_pins_ranks_sets_threads_and_passes_exit_codes(monkeypatch, tmp_path):
    """python -m cpuboost.launch, 2 ranks: one thread and distinct cores each; rank 1 exiting 3 fails the job."""
    env = rank_env()
    env.pop("OMP_NUM_THREADS")
    monkeypatch.setattr("dist_scripts.runner.rank_env", lambda: env)
    done, _ = run(launch_cmd("--nproc-per-node", "2", "--standalone", PROBE, str(tmp_path), "--exit-code", "3"),
                  timeout=60)
    assert done.returncode == 1  # torchrun saw rank 1's exit code through the binding worker
    assert "exitcode  : 3" in done.stderr and "local_rank: 1" in done.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["argv"] == ["--exit-code", "3"] for r in ranks)
    cores = launch.physical_cores(launch.available_cpus())
    assert all(r["omp"] == str(max(1, len(cores) // 2)) for r in ranks)
    if len(cores) >= 2:
        assert ranks[0]["cpus"] and ranks[1]["cpus"] and set(ranks[0]["cpus"]).isdisjoint(ranks[1]["cpus"])
        assert "cpuboost launch: core binding (local ranks)" in done.stderr
