"""Sweeps beyond one process: local workers, submitit's executor, locks, status, and the faults they survive.

The toy runs append their id to the file named by ``$WHYBN_TEST_ATTEMPTS`` (worker processes and submitit
jobs inherit the environment), so a test can count how often each run was *executed*, not only whether
its results exist.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from studies import cli
from studies.lab.store import DONE, FAILED, RECORDS, RunStore, environment, read_records
from studies.lab.study import RunContext, Study
from studies.lab.sweep import (
    ExecutorSpec,
    RequeuedRun,
    RunTask,
    _submitit_executor,
    execute_run,
    lost_run_outcome,
    plan_runs,
    run_sweep,
    sweep_status,
)

REPO = Path(__file__).resolve().parents[1]
ATTEMPTS = "WHYBN_TEST_ATTEMPTS"
FAIL = "WHYBN_TEST_FAIL"
SLEEP = "WHYBN_TEST_SLEEP"
CRASH = "WHYBN_TEST_CRASH"


@dataclass(frozen=True)
class SweepConfig:
    norms: tuple[str, ...] = ("none", "bn")
    seeds: int = 2
    diverge_norm: str = ""  # runs of this norm train with a huge learning rate and diverge


def sweep_grid(config: SweepConfig) -> list[dict]:
    return [
        {
            "arch": "mlp",
            "norm": n,
            "dataset": "gaussian",
            "seed": s,
            "diverge": n == config.diverge_norm,
        }
        for n in config.norms
        for s in range(config.seeds)
    ]


def sweep_run(rc: dict, ctx: RunContext) -> list[dict]:
    if os.environ.get(ATTEMPTS):
        with open(os.environ[ATTEMPTS], "a") as f:
            f.write(f"{rc['norm']}-{rc['seed']} {os.getpid()}\n")
    time.sleep(float(os.environ.get(SLEEP, "0")))  # outside the config: a resumed sweep may be faster
    if os.environ.get(CRASH) == f"{rc['norm']}-{rc['seed']}":  # a worker killed outright (OOM-like)
        os._exit(137)
    if os.environ.get(FAIL) == rc["norm"]:  # outside the config: the same run succeeds once it is unset
        raise RuntimeError(f"boom in {rc['norm']}")
    if rc["diverge"]:
        import torch

        from studies.lab.train import TrainConfig, train

        torch.manual_seed(rc["seed"])
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(
            torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
        )
        result = train(model, data, config=TrainConfig(steps=50, lr=1e6, batch_size=16), seed=rc["seed"])
        return result.records
    return [{"step": t, "probe": "train", "metric": "loss", "value": float(rc["seed"] + t)} for t in range(3)]


SWEEP = Study(
    name="sweeptoy",
    title="sweep toy",
    reproduces="-",
    figures=(),
    presets={"quick": SweepConfig()},
    grid=sweep_grid,
    run=sweep_run,
    analyze=lambda df, config, out: [],
)


def attempts(path: Path) -> list[str]:
    return sorted(line.split()[0] for line in path.read_text().splitlines()) if path.exists() else []


def all_records(store: RunStore) -> dict[str, list[dict]]:
    return {run_id: store.load(run_id)[1] for run_id in store.run_ids(done=True)}


@pytest.fixture
def attempt_log(tmp_path, monkeypatch):
    path = tmp_path / "attempts.log"
    monkeypatch.setenv(ATTEMPTS, str(path))
    return path


def quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ executors


def test_local_workers_give_the_serial_results(tmp_path, attempt_log):
    config = SweepConfig(seeds=3)
    serial = RunStore(tmp_path / "serial", "sweeptoy", "quick")
    parallel = RunStore(tmp_path / "parallel", "sweeptoy", "quick")
    run_sweep(SWEEP, config, serial, log=quiet)
    attempt_log.unlink()
    report = run_sweep(SWEEP, config, parallel, executor=ExecutorSpec(workers=2), log=quiet)
    assert len(report.ran) == 6 and report.ok and not report.skipped
    pids = {line.split()[1] for line in attempt_log.read_text().splitlines()}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes did the work
    assert attempts(attempt_log) == sorted(f"{n}-{s}" for n in ("none", "bn") for s in range(3))
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert {k: strip(v) for k, v in all_records(parallel).items()} == {
        k: strip(v) for k, v in all_records(serial).items()
    }
    again = run_sweep(SWEEP, config, parallel, executor=ExecutorSpec(workers=2), log=quiet)
    assert len(again.skipped) == 6 and not again.ran


def test_submitit_local_executor_runs_the_job_array_and_records_failures(tmp_path, attempt_log, monkeypatch):
    store = RunStore(tmp_path, "sweeptoy", "quick")
    config = SweepConfig()
    monkeypatch.setenv(FAIL, "bn")
    report = run_sweep(SWEEP, config, store, executor=ExecutorSpec(kind="submitit-local"), log=quiet)
    assert sorted(report.ran) == sorted(r for r, c in plan_runs(SWEEP, config) if c["norm"] == "none")
    assert len(report.failed) == 2 and all("boom in bn" in r for r in report.failed.values())
    jobs = json.loads((store.base / "slurm" / "jobs.json").read_text())
    assert jobs["executor"] == "submitit-local" and set(jobs["jobs"]) == {
        r for r, _ in plan_runs(SWEEP, config)
    }
    for run_id in report.failed:
        failure = json.loads((store.run_dir(run_id) / FAILED).read_text())
        assert failure["reason"] == "RuntimeError: boom in bn" and "Traceback" in failure["details"]
    states = sweep_status(SWEEP, config, store)
    assert len(states["done"]) == 2 and len(states["failed"]) == 2 and not states["running"]
    # the failed runs are retried by the next sweep (here they succeed), the finished ones skipped
    monkeypatch.delenv(FAIL)
    report = run_sweep(SWEEP, config, store, executor=ExecutorSpec(kind="submitit-local"), log=quiet)
    assert len(report.ran) == 2 and len(report.skipped) == 2 and report.ok
    assert attempts(attempt_log).count("bn-0") == 2 and attempts(attempt_log).count("none-0") == 1
    assert not any((store.run_dir(r) / FAILED).exists() for r in store.run_ids())


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` and ``srun`` stand-ins on PATH: sbatch keeps the script it is given and prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "submitted.sh"


def test_slurm_submits_one_job_array_with_the_options_and_returns(
    tmp_path, fake_slurm, attempt_log, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    argv = ["run", "sweeptoy", "--results", str(tmp_path / "r"), "--executor", "slurm", "--device", "cuda"]
    argv += ["--partition", "gpu", "--time", "120", "--cpus-per-task", "4", "--mem-gb", "16"]
    argv += ["--array-parallelism", "3", "--slurm", "account=bnlab", "--slurm", "qos=high"]
    assert cli.main(argv) == 0  # --device cuda is not checked here, on the login node, but on the nodes
    out = capsys.readouterr().out
    assert "4 run(s) submitted to SLURM" in out and "whybn status sweeptoy" in out
    script = fake_slurm.read_text()
    for option in (
        "--array=0-3%3",
        "--partition=gpu",
        "--time=120",
        "--gpus-per-node=1",
        "--cpus-per-task=4",
        "--mem=16GB",
        "--account=bnlab",
        "--qos=high",
        "--job-name=whybn-sweeptoy",
    ):
        assert f"#SBATCH {option}\n" in script, option
    store = RunStore(tmp_path / "r", "sweeptoy", "quick")
    jobs = json.loads((store.base / "slurm" / "jobs.json").read_text())["jobs"]
    assert sorted(jobs.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    assert not attempt_log.exists() and store.run_ids() == []  # nothing ran here
    assert cli.main(["status", "sweeptoy", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "pending 4" in out and "SLURM job array(s): 4242" in out
    cpu = _submitit_executor(ExecutorSpec(kind="slurm"), store, RunContext(device="cpu"), threads=2)
    assert "gpus_per_node" not in cpu._executor.parameters and cpu._executor.parameters["cpus_per_task"] == 2


def test_a_preempted_or_timed_out_slurm_task_is_requeued_with_its_run(tmp_path, attempt_log):
    """What submitit calls when SLURM signals a timeout or preemption: the same run, resubmitted."""
    store = RunStore(tmp_path, "sweeptoy", "quick")
    run_id, config = plan_runs(SWEEP, SweepConfig(seeds=1))[0]
    task = RunTask(SWEEP, str(tmp_path), "quick", run_id, config)
    resubmission = RequeuedRun().checkpoint(task)
    assert isinstance(resubmission.function, RequeuedRun) and resubmission.args == (task,)
    store.begin(run_id, config, environment(seed=0))  # the killed attempt left an unfinished directory
    outcome = resubmission.function(*resubmission.args)
    assert outcome.status == "done" and store.is_done(run_id) and attempts(attempt_log) == ["none-0"]


def test_a_run_lost_with_its_worker_after_its_done_counts_as_finished(tmp_path, attempt_log):
    """The race behind a broken pool: a worker writes its run's DONE, then the pool breaks (another
    worker died) before the result comes back. The store decides: that run finished; one that never
    got to DONE failed, without a FAILED file, and is redone by the next sweep."""
    store = RunStore(tmp_path, "sweeptoy", "quick")
    (done_id, done_config), (lost_id, lost_config) = plan_runs(SWEEP, SweepConfig(norms=("bn",), seeds=2))
    finished = execute_run(RunTask(SWEEP, str(tmp_path), "quick", done_id, done_config))
    outcome = lost_run_outcome(RunTask(SWEEP, str(tmp_path), "quick", done_id, done_config), "worker died")
    assert (outcome.status, outcome.records) == ("done", finished.records) and finished.records > 0
    store.begin(lost_id, lost_config, environment(seed=1))  # started, killed before its DONE
    outcome = lost_run_outcome(RunTask(SWEEP, str(tmp_path), "quick", lost_id, lost_config), "worker died")
    assert (outcome.status, outcome.reason) == ("failed", "worker died")
    assert not (store.run_dir(lost_id) / FAILED).exists() and store.state(lost_id) == "interrupted"
    again = run_sweep(SWEEP, SweepConfig(norms=("bn",), seeds=2), store, log=quiet)
    assert again.ran == [lost_id] and again.skipped == [done_id]


def test_slurm_without_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    assert cli.main(["run", "sweeptoy", "--results", str(tmp_path), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "sbatch/srun not found" in err and "--executor submitit-local" in err


def test_executor_waits_by_default_except_on_slurm():
    assert not ExecutorSpec(kind="slurm").waits and ExecutorSpec(kind="submitit-local").waits
    assert ExecutorSpec(kind="slurm", wait=True).waits and ExecutorSpec().waits


def test_slurm_config_file_and_flags(tmp_path):
    path = tmp_path / "slurm.toml"
    path.write_text('[slurm]\npartition = "a100"\ntime_min = 30\n[slurm.slurm]\naccount = "x"\n')
    spec = ExecutorSpec.from_toml(path, kind="slurm", time_min=45, partition=None)
    assert spec.partition == "a100" and spec.time_min == 45 and spec.slurm == {"account": "x"}
    path.write_text('partiton = "a100"\n')
    with pytest.raises(ValueError, match=r"unknown key.*partiton"):
        ExecutorSpec.from_toml(path, kind="slurm")
    with pytest.raises(ValueError, match="no such file"):
        ExecutorSpec.from_toml(tmp_path / "missing.toml")
    args = cli.build_parser().parse_args(
        [
            "run",
            "x",
            "--executor",
            "slurm",
            "--partition",
            "p",
            "--time",
            "90",
            "--gpus",
            "2",
            "--slurm",
            "qos=high",
        ]
    )
    spec = cli._executor_spec(args)
    assert (spec.kind, spec.partition, spec.time_min, spec.gpus, dict(spec.slurm)) == (
        "slurm",
        "p",
        90,
        2,
        {"qos": "high"},
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "pbs"}, "--executor: expected one of local, slurm, submitit-local"),
        ({"workers": 0}, "--workers: expected a positive integer"),
        ({"kind": "slurm", "time_min": -5}, "--time-min: expected a positive integer"),
        ({"kind": "slurm", "gpus": -1}, "--gpus: expected an integer >= 0"),
        ({"kind": "slurm", "mem_gb": 0}, "--mem-gb: expected a positive number"),
        ({"kind": "slurm", "workers": 4}, "--workers applies to --executor local"),
    ],
)
def test_bad_executor_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExecutorSpec(**kwargs)


# --------------------------------------------------------------------------------------------- status


def test_status_counts_every_state(tmp_path, capsys, monkeypatch):
    config = SweepConfig(norms=("none", "bn", "ln"), seeds=2, diverge_norm="ln")
    store = RunStore(tmp_path, "sweeptoy", "quick")
    run_sweep(SWEEP, config, store, log=quiet)
    planned = dict(plan_runs(SWEEP, config))
    by_name = {f"{c['norm']}-{c['seed']}": r for r, c in planned.items()}
    # none-0 done, none-1 failed, bn-0 interrupted (killed: no DONE), bn-1 running, ln-* diverged
    (store.run_dir(by_name["bn-0"]) / DONE).unlink()
    (store.run_dir(by_name["none-1"]) / DONE).unlink()
    store.fail(by_name["none-1"], "RuntimeError: out of patience")
    (store.run_dir(by_name["bn-1"]) / DONE).unlink()
    monkeypatch.setattr(cli, "STUDY_NAMES", ("sweeptoy",))
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    with store.claim(by_name["bn-1"]) as mine:
        assert mine
        states = sweep_status(SWEEP, config, store)
        assert cli.main(["status", "sweeptoy", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert {k: sorted(v) for k, v in states.items()} == {
        "done": [by_name["none-0"]],
        "diverged": sorted([by_name["ln-0"], by_name["ln-1"]]),
        "running": [by_name["bn-1"]],
        "failed": [by_name["none-1"]],
        "interrupted": [by_name["bn-0"]],
        "pending": [],
        "other": [],
    }
    assert "6 run(s)" in out and "done 1  diverged 2  running 1  failed 1  interrupted 1  pending 0" in out
    assert f"failed   {by_name['none-1']}: RuntimeError: out of patience" in out
    assert f"running  {by_name['bn-1']}: " in out and f"pid {os.getpid()}" in out
    assert store.state(by_name["bn-1"]) == "interrupted"  # the lock is released with the block


def test_status_of_every_study(tmp_path, capsys, monkeypatch):
    run_sweep(SWEEP, SweepConfig(seeds=1), RunStore(tmp_path, "sweeptoy", "quick"), log=quiet)
    monkeypatch.setattr(cli, "STUDY_NAMES", ("sweeptoy", "other"))
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    assert cli.main(["status", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == "sweeptoy done 2 diverged 0 running 0 failed 0 interrupted 0 pending 0".split()
    assert lines[1].startswith("other") and "not run (`whybn run other --preset quick`)" in lines[1]


def test_status_of_a_study_never_run_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    assert cli.main(["status", "sweeptoy", "--results", str(tmp_path)]) == 2
    assert "no sweep of 'sweeptoy'" in capsys.readouterr().err


def test_status_counts_probe_failures(tmp_path, capsys, monkeypatch):
    store = RunStore(tmp_path, "sweeptoy", "quick")
    run_sweep(SWEEP, SweepConfig(seeds=1), store, log=quiet)
    run_id = store.run_ids()[0]
    config, rows = store.load(run_id)
    rows += [{"step": 2, "probe": "sharpness", "metric": "failed", "value": float("nan"), "reason": "no"}] * 2
    (store.run_dir(run_id) / DONE).unlink()
    store.finish(run_id, config, rows)
    assert store.summary(run_id) == {
        "time": store.summary(run_id)["time"],
        "records": 5,
        "diverged": False,
        "probe_failures": 2,
    }
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    assert cli.main(["status", "sweeptoy", "--results", str(tmp_path)]) == 0
    assert "2 probe failure(s) in 1 finished run(s)" in capsys.readouterr().out


def test_old_done_files_are_summarized_from_the_records(tmp_path):
    store = RunStore(tmp_path, "sweeptoy", "quick")
    store.begin("r", {"seed": 0}, environment(seed=0))
    store.finish("r", {"seed": 0}, [{"probe": "train", "metric": "diverged", "value": 1.0}])
    assert json.loads((store.run_dir("r") / DONE).read_text())["diverged"] is True
    (store.run_dir("r") / DONE).write_text("2026-01-01T00:00:00+0000\n")  # the format before this change
    assert store.summary("r") == {"records": 1, "diverged": True, "probe_failures": 0}
    assert store.state("r") == "diverged"


# --------------------------------------------------------------------------------------------- faults


def test_a_diverging_run_is_recorded_as_diverged_and_the_sweep_goes_on(tmp_path):
    config = SweepConfig(norms=("ln", "none"), seeds=1, diverge_norm="ln")
    store = RunStore(tmp_path, "sweeptoy", "quick")
    report = run_sweep(SWEEP, config, store, log=quiet)
    assert report.ok and len(report.ran) == 2 and len(report.diverged) == 1
    diverged = report.diverged[0]
    rows = read_records(store.run_dir(diverged) / RECORDS)
    assert [r["step"] for r in rows if r["metric"] == "diverged"] != [] and rows[-1]["metric"] == "diverged"
    assert store.state(diverged) == "diverged" and sweep_status(SWEEP, config, store)["done"] != []


SWEEP_SCRIPT = """
import sys
from tests.test_sweep import SWEEP, SweepConfig
from studies.lab.store import RunStore
from studies.lab.sweep import ExecutorSpec, run_sweep
results, workers, seeds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = SweepConfig(norms=("bn",), seeds=seeds)
store = RunStore(results, "sweeptoy", "quick")
report = run_sweep(SWEEP, config, store, executor=ExecutorSpec(workers=workers), log=lambda s: None)
print(len(report.ran), len(report.skipped), len(report.busy), len(report.failed))
"""


def launch(results: Path, workers: int, seeds: int, sleep: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, str(results), str(workers), str(seeds)],
        cwd=REPO,
        env={**os.environ, SLEEP: str(sleep)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: kill it with its workers, as a scheduler would
    )


def group_exited(pgid: int, *, timeout: float) -> bool:
    """Whether every process of group ``pgid`` (a sweep and its workers) is gone within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_sweep_with_workers_killed_by_sigkill_resumes_with_every_run_once(tmp_path, attempt_log):
    store = RunStore(tmp_path, "sweeptoy", "quick")
    proc = launch(tmp_path, workers=2, seeds=6, sleep=1.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        len(store.run_ids(done=True)) >= 1 and any(store.holder(r) for r in store.run_ids(done=False))
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # its workers die after it, each letting go of its run's lock as it exits; a resume that starts
    # before then finds those runs held ("busy"), as it should
    assert group_exited(proc.pid, timeout=10), "the killed sweep's workers did not exit"
    done_before = set(store.run_ids(done=True))
    interrupted = set(store.run_ids(done=False))
    assert done_before and interrupted and len(done_before) < 6
    report = run_sweep(SWEEP, SweepConfig(norms=("bn",), seeds=6), store, log=quiet)
    assert set(report.skipped) == done_before and len(report.ran) == 6 - len(done_before)
    assert len(store.run_ids()) == len(store.run_ids(done=True)) == 6
    for run_id in store.run_ids():
        config, rows = store.load(run_id)  # every file parses: nothing truncated
        assert [r["value"] for r in rows] == [float(config["seed"] + t) for t in range(3)]
        assert {p.name for p in store.run_dir(run_id).iterdir()} == {"config.json", "env.json", RECORDS, DONE}
    # the runs finished before the kill were never executed again
    assert all(attempts(attempt_log).count(f"bn-{store.load(r)[0]['seed']}") == 1 for r in done_before)


def test_two_sweeps_on_one_directory_never_run_a_run_twice(tmp_path, attempt_log):
    first = launch(tmp_path, workers=1, seeds=6, sleep=0.6)
    second = launch(tmp_path, workers=1, seeds=6, sleep=0.6)
    outs = [p.communicate(timeout=180)[0].split() for p in (first, second)]
    assert first.returncode == second.returncode == 0
    store = RunStore(tmp_path, "sweeptoy", "quick")
    assert len(store.run_ids(done=True)) == 6
    assert attempts(attempt_log) == sorted(f"bn-{s}" for s in range(6))  # each executed exactly once
    ran = sum(int(o[0]) for o in outs)
    assert ran == 6 and all(int(o[0]) >= 1 for o in outs)  # they split the runs: each ran some
    assert all(int(o[0]) + int(o[1]) + int(o[2]) == 6 for o in outs)


def test_full_disk_is_a_clear_error_before_any_training(tmp_path, attempt_log, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr("studies.lab.store.shutil.disk_usage", lambda p: real(p)._replace(free=3 * 2**20))
    store = RunStore(tmp_path, "sweeptoy", "quick")
    with pytest.raises(OSError, match=r"has 3.0 MiB free; 4 run\(s\) need about 64.0 MiB") as err:
        run_sweep(SWEEP, SweepConfig(), store, log=quiet)
    assert err.value.errno == errno.ENOSPC and not attempt_log.exists() and store.run_ids() == []
    monkeypatch.setattr(cli, "get_study", lambda name: SWEEP)
    assert cli.main(["run", "sweeptoy", "--results", str(tmp_path)]) == 2
    assert "cannot write results" in capsys.readouterr().err and not attempt_log.exists()


def test_read_only_results_directory_is_a_clear_error_before_any_training(tmp_path, attempt_log, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("studies.lab.store.tempfile.mkstemp", read_only)
    with pytest.raises(OSError, match="is not writable") as err:
        run_sweep(SWEEP, SweepConfig(), RunStore(tmp_path, "sweeptoy", "quick"), log=quiet)
    assert err.value.errno == errno.EROFS and not attempt_log.exists()


def test_disk_full_while_writing_records_stops_the_sweep_and_leaves_the_run_unfinished(tmp_path, monkeypatch):
    import studies.lab.store as store_module

    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_records", full)
    store = RunStore(tmp_path, "sweeptoy", "quick")
    with pytest.raises(OSError, match="No space left"):
        run_sweep(SWEEP, SweepConfig(), store, log=quiet)
    assert store.run_ids(done=True) == [] and len(store.run_ids(done=False)) == 1  # stopped at the first


def claims_beside(store: RunStore, poll, n: int) -> list[bool]:
    """``n`` claims of run "r" (claimed once before, so its lock file exists), made while
    ``poll(stop)`` runs in a thread until ``stop`` is set."""
    import threading

    with store.claim("r") as mine:
        assert mine
    stop = threading.Event()
    thread = threading.Thread(target=poll, args=(stop,))
    thread.start()
    try:
        claims = []
        for _ in range(n):
            with store.claim("r") as mine:
                claims.append(mine)
    finally:
        stop.set()
        thread.join()
    return claims


def test_status_probes_do_not_make_a_sweep_skip_a_run(tmp_path):
    """`whybn status` looks at a run's lock with a shared lock of a few microseconds; a sweep that tries
    to take the run at that moment must not conclude that another sweep holds it."""
    store = RunStore(tmp_path, "sweeptoy", "quick")

    def poll(stop) -> None:
        while not stop.is_set():
            store.holder("r")

    assert all(claims_beside(store, poll, 200))
    with store.claim("r") as mine, store.claim("r") as other:
        assert mine and not other  # a real holder still excludes


def test_a_slow_status_probe_does_not_make_a_sweep_skip_a_run(tmp_path):
    """A `whybn status` probe slowed by load holds its shared lock for 30 ms of every 32: four tries
    50 ms apart met it every time and the sweep skipped the run (the flake of the test above). A claim
    now tells a shared holder from an exclusive one and waits for the probe; another sweep's exclusive
    lock is still refused at once."""
    import fcntl

    store = RunStore(tmp_path, "sweeptoy", "quick")

    def slow_poll(stop) -> None:
        fd = os.open(store.lock_path("r"), os.O_RDONLY)
        try:
            while not stop.is_set():
                fcntl.flock(fd, fcntl.LOCK_SH)
                time.sleep(0.03)
                fcntl.flock(fd, fcntl.LOCK_UN)
                time.sleep(0.002)
        finally:
            os.close(fd)

    assert claims_beside(store, slow_poll, 10) == [True] * 10
    with store.claim("r") as mine:
        start = time.monotonic()
        with store.claim("r") as other:
            assert mine and not other
        assert time.monotonic() - start < 0.5  # refused without waiting out the patience


def test_figures_are_the_same_files_every_time_and_the_rng_is_left_alone(tmp_path):
    """Strip-plot jitter draws from numpy's global RNG: drawing is seeded, and the caller's state kept."""
    import numpy as np

    from studies.lab.sweep import analyze_study

    def analyze(df, config, out_dir):
        import matplotlib.pyplot as plt
        import seaborn as sns

        from analysis.style import save_figure

        fig, ax = plt.subplots()
        sns.stripplot(data=df, x="norm", y="value", ax=ax, jitter=0.3)
        save_figure(fig, out_dir, "strip")
        return []

    study = Study(**{**SWEEP.__dict__, "analyze": analyze})
    store = RunStore(tmp_path, "sweeptoy", "quick")
    run_sweep(study, SweepConfig(seeds=3), store, log=quiet)
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    analyze_study(study, SweepConfig(seeds=3), store)
    first = {p.name: p.read_bytes() for p in store.figures_dir.iterdir()}
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    np.random.uniform()  # noqa: NPY002  (another state: the figures must not depend on it)
    analyze_study(study, SweepConfig(seeds=3), store)
    assert {p.name: p.read_bytes() for p in store.figures_dir.iterdir()} == first


def test_figures_and_paper_use_only_the_runs_of_the_last_sweeps_config(tmp_path):
    """An earlier sweep with another grid left its runs in the same directory: they used to be averaged
    into the figures and claims of the new one (claims with n = 2 drawn from 6 runs)."""
    from analysis.paper import _load, study_results
    from studies.lab.sweep import analyze_study

    seen = []
    study = Study(**{**SWEEP.__dict__, "analyze": lambda df, config, out: seen.append(df) or []})
    store = RunStore(tmp_path, "sweeptoy", "quick")
    run_sweep(study, SweepConfig(norms=("none", "bn"), seeds=2), store, log=quiet)
    config = SweepConfig(norms=("bn",), seeds=2)
    run_sweep(study, config, store, log=quiet)
    assert len(store.run_ids(done=True)) == 4
    with pytest.warns(UserWarning, match=r"2 run\(s\) under .* belong to another config"):
        analyze_study(study, config, store)
    planned = {run_id for run_id, _ in plan_runs(study, config)}
    assert set(seen[-1]["run_id"]) == planned and set(seen[-1]["norm"]) == {"bn"}
    assert set(_load(study, tmp_path, "quick")["run_id"]) == planned
    assert study_results(study, tmp_path, "quick").n_done == 2


def test_a_worker_that_dies_fails_the_runs_in_flight_and_the_next_sweep_redoes_them(
    tmp_path, attempt_log, monkeypatch
):
    store = RunStore(tmp_path, "sweeptoy", "quick")
    config = SweepConfig(norms=("bn",), seeds=4)
    monkeypatch.setenv(CRASH, "bn-1")
    report = run_sweep(SWEEP, config, store, executor=ExecutorSpec(workers=2), log=quiet)
    assert report.failed and all("worker process died" in r for r in report.failed.values())
    assert len(report.ran) + len(report.failed) == 4 and len(store.run_ids(done=True)) == len(report.ran)
    monkeypatch.delenv(CRASH)
    again = run_sweep(SWEEP, config, store, executor=ExecutorSpec(workers=2), log=quiet)
    assert again.ok and sorted(again.ran) == sorted(report.failed) and len(store.run_ids(done=True)) == 4


def test_rows_that_cannot_be_stored_fail_their_run_and_the_sweep_goes_on(tmp_path):
    """A value that is not a number (here a 2-element array) raised out of ``store.finish``: the sweep
    stopped, the run stayed "interrupted" without a reason, and the CLI called it bad input."""

    def run(rc: dict, ctx: RunContext) -> list[dict]:
        value = np.array([1.0, 2.0]) if rc["seed"] == 0 else 1.0
        return [{"step": 0, "probe": "train", "metric": "loss", "value": value}]

    study = Study(**{**SWEEP.__dict__, "run": run})
    store = RunStore(tmp_path, "sweeptoy", "quick")
    report = run_sweep(study, SweepConfig(norms=("bn",), seeds=3), store, log=quiet)
    assert len(report.ran) == 2 and list(report.failed) == [r for r in store.run_ids() if "s0" in r]
    (failed,) = report.failed.values()
    assert failed.startswith("its records cannot be stored: ValueError")
    assert store.state(next(iter(report.failed))) == "failed"


SIGTERM_SCRIPT = """
import sys
from studies import cli
from tests.test_sweep import SWEEP
cli.STUDY_NAMES, cli.get_study = ("sweeptoy",), lambda name: SWEEP
sys.exit(cli.main(["run", "sweeptoy", "--results", sys.argv[1], "--workers", "2", "--seeds", "6"]))
"""


def test_sigterm_ends_the_sweep_and_its_workers_and_the_same_command_resumes(tmp_path, attempt_log):
    """SIGTERM (kill's default, timeout's, a scheduler's) killed the parent alone: its workers ran the
    runs queued to them, then waited forever, and a resumed sweep counted their runs as "running
    elsewhere". Now the CLI stops the workers and exits 143; nothing is lost or done twice."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, SLEEP: "1.0"},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    store = RunStore(tmp_path, "sweeptoy", "quick")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not store.run_ids(done=True):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # the parent only, as `kill PID` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted; finished runs are kept" in err
    if not group_exited(proc.pid, timeout=10):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the sweep's workers outlived it")
    done_before = set(store.run_ids(done=True))
    assert 1 <= len(done_before) < 12
    report = run_sweep(SWEEP, SweepConfig(seeds=6), store, log=quiet)
    assert set(report.skipped) == done_before and not report.busy and report.ok
    assert len(store.run_ids(done=True)) == 12
    assert all(attempts(attempt_log).count(f"{store.load(r)[0]['norm']}-{store.load(r)[0]['seed']}") == 1
               for r in done_before)  # fmt: skip
