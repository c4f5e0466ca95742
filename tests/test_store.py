"""Results store and sweep: layout, atomic writes, DONE last, finished runs skipped, killed runs redone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from studies.lab.store import (
    CONFIG,
    DONE,
    ENV,
    RECORD_FIELDS,
    RECORDS,
    RunStore,
    environment,
    make_run_id,
    read_records,
    write_atomic,
    write_records,
)
from studies.lab.study import RunContext, Study
from studies.lab.sweep import plan_runs, run_sweep

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToyConfig:
    norms: tuple[str, ...] = ("none", "bn")
    seeds: int = 2
    scale: float = 1.0


def toy_grid(config: ToyConfig) -> list[dict]:
    return [
        {"arch": "mlp", "norm": n, "dataset": "gaussian", "seed": s, "scale": config.scale}
        for n in config.norms
        for s in range(config.seeds)
    ]


CALLS: list[str] = []


def toy_run(rc: dict, ctx: RunContext) -> list[dict]:
    CALLS.append(f"{rc['norm']}-{rc['seed']}")
    if rc.get("scale") == -1 and rc["norm"] == "bn":
        raise RuntimeError("boom")
    return [{"step": t, "probe": "train", "metric": "loss", "value": rc["scale"] * t} for t in range(3)]


TOY = Study(
    name="toy",
    title="toy",
    reproduces="-",
    figures=(),
    presets={"quick": ToyConfig()},
    grid=toy_grid,
    run=toy_run,
    analyze=lambda df, config, out: [],
)


def test_layout_and_records(tmp_path):
    CALLS.clear()
    store = RunStore(tmp_path, "toy", "quick")
    report = run_sweep(TOY, ToyConfig(), store, log=lambda s: None)
    assert len(report.ran) == 4 and not report.skipped and report.ok
    for run_id in store.run_ids():
        d = store.run_dir(run_id)
        assert {p.name for p in d.iterdir()} == {CONFIG, ENV, RECORDS, DONE}
        config, rows = store.load(run_id)
        assert [r["value"] for r in rows] == [0.0, 1.0, 2.0]
        assert list(rows[0])[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
        assert rows[0]["run_id"] == run_id and rows[0]["study"] == "toy"
        assert rows[0]["norm"] == config["norm"] and rows[0]["seed"] == config["seed"]
        env = json.loads((d / ENV).read_text())
        assert env["seed"] == config["seed"] and env["versions"]["torch"].startswith("2.13")
        assert "commit" in env["git"]
        # the vector kernels that rounded its float32 (AVX2 and AVX512 machines give other records)
        assert env["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]["model"]


def test_finished_runs_skipped_and_unfinished_redone(tmp_path):
    CALLS.clear()
    store = RunStore(tmp_path, "toy", "quick")
    run_sweep(TOY, ToyConfig(), store, log=lambda s: None)
    # simulate a run killed mid-way: DONE missing, records half written
    victim = store.run_ids()[0]
    (store.run_dir(victim) / DONE).unlink()
    (store.run_dir(victim) / RECORDS).write_text('{"step": 0, "val')
    CALLS.clear()
    report = run_sweep(TOY, ToyConfig(), store, log=lambda s: None)
    assert report.ran == [victim] and len(report.skipped) == 3
    assert len(CALLS) == 1
    _, rows = store.load(victim)
    assert [r["value"] for r in rows] == [0.0, 1.0, 2.0]


def test_failed_run_left_unfinished_and_sweep_goes_on(tmp_path):
    store = RunStore(tmp_path, "toy", "quick")
    report = run_sweep(TOY, ToyConfig(scale=-1), store, log=lambda s: None)
    assert len(report.failed) == 2 and len(report.ran) == 2 and not report.ok
    assert all("boom" in msg for msg in report.failed.values())
    assert len(store.run_ids(done=True)) == 2 and len(store.run_ids(done=False)) == 2


def test_run_ids_unique_stable_and_readable():
    planned = plan_runs(TOY, ToyConfig())
    ids = [r for r, _ in planned]
    assert len(set(ids)) == 4 and ids == [r for r, _ in plan_runs(TOY, ToyConfig())]
    assert ids[0].startswith("mlp-none-s0-")
    assert make_run_id({"arch": "a", "seed": 1, "x": 1}) != make_run_id({"arch": "a", "seed": 1, "x": 2})
    assert make_run_id({"b": 1, "a": 2}) == make_run_id({"a": 2, "b": 1})


def test_duplicate_grid_points_rejected():
    dup = Study(**{**TOY.__dict__, "grid": lambda c: [{"arch": "a", "seed": 0}] * 2})
    with pytest.raises(ValueError, match="share the config"):
        plan_runs(dup, ToyConfig())


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    # mkstemp makes 0600 files: records and claims were unreadable to the group that could read figures
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
        os.umask(0o077)
        write_atomic(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_a_sweep_removes_temp_files_that_killed_writes_left(tmp_path):
    store = RunStore(tmp_path, "toy", "quick")
    run_sweep(TOY, ToyConfig(), store, log=lambda _: None)
    stale = [store.base / ".tmp-sweep.json-x1", store.figures_dir / ".tmp-claims.json-x2"]
    stale.append(store.runs_dir / ".tmp-write-check-x3")
    fresh = store.base / ".tmp-sweep.json-in-flight"  # another sweep's write, still going
    for path in [*stale, fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    for path in stale:
        os.utime(path, (0, 0))  # SIGKILLed long ago
    run_sweep(TOY, ToyConfig(), store, log=lambda _: None)
    assert not any(p.exists() for p in stale) and fresh.exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_atomic(tmp_path / "a.txt", "hello")
    write_atomic(tmp_path / "a.txt", "world")
    assert (tmp_path / "a.txt").read_text() == "world"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_records_roundtrip_nonfinite_and_corrupt_line(tmp_path):
    path = tmp_path / RECORDS
    write_records(path, [{"value": float("nan")}, {"value": float("inf")}, {"value": 1.5}])
    rows = read_records(path)
    assert (
        rows[0]["value"] != rows[0]["value"] and rows[1]["value"] == float("inf") and rows[2]["value"] == 1.5
    )
    with open(path, "a") as f:
        f.write('{"value": 2.0, "trunc')
    with pytest.raises(ValueError, match=rf"{RECORDS}:4: corrupt record"):
        read_records(path)


def test_begin_refuses_finished_run_and_bad_ids(tmp_path):
    store = RunStore(tmp_path, "toy", "quick")
    store.begin("r1", {"seed": 0}, environment(seed=0))
    store.finish("r1", {"seed": 0}, [{"metric": "m", "value": 1}])
    with pytest.raises(FileExistsError):
        store.begin("r1", {"seed": 0}, {})
    with pytest.raises(ValueError, match="run_id"):
        store.run_dir("../escape")
    with pytest.raises(FileNotFoundError, match="not begun"):
        store.finish("r2", {}, [])


def test_provenance_names_the_code_that_ran(tmp_path):
    import shutil
    import subprocess

    from studies.lab.store import SOURCE_PACKAGES, git_commit, source_digest

    env = environment(seed=3)
    assert env["seed"] == 3 and env["source"] == source_digest() and len(env["source"]["sha256"]) == 64
    # the digest follows the code: a copy hashes the same, one changed byte does not
    for package in SOURCE_PACKAGES:
        caches = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / package, tmp_path / "copy" / package, ignore=caches)
    assert source_digest(tmp_path / "copy")["sha256"] == source_digest(REPO)["sha256"]
    store_py = tmp_path / "copy" / "studies" / "lab" / "store.py"
    store_py.write_text(store_py.read_text() + "\n")
    source_digest.cache_clear()  # it is computed once per process and root
    assert source_digest(tmp_path / "copy")["sha256"] != source_digest(REPO)["sha256"]
    # an installed copy in an ignored directory of a checkout: the checkout's HEAD is not its commit
    repo = tmp_path / "checkout"
    (repo / ".venv" / "site").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".venv/\n")
    subprocess.run([*git, "-C", str(repo), "add", ".gitignore"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "x"], check=True)
    assert git_commit(repo)["commit"] is not None and git_commit(repo)["dirty"] is False
    assert git_commit(repo / ".venv" / "site") == {"commit": None, "dirty": None}
    assert git_commit(tmp_path / "copy") == {"commit": None, "dirty": None}  # outside any checkout


def test_git_dirty_is_about_the_source_packages_and_read_once(tmp_path):
    """Writing results into a tracked results/ marked every later run's code "dirty" (283 of 649
    committed runs); a commit made during a sweep was named by runs that ran the code before it."""
    import subprocess

    from studies.lab.store import git_commit

    repo = tmp_path / "checkout"
    for path in ("probes/a.py", "results/r/claims.json"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "results/r/claims.json").write_text("x = 2\n")
    assert git_commit(repo)["dirty"] is False
    git_commit.cache_clear()
    (repo / "probes/a.py").write_text("x = 2\n")
    first = git_commit(repo)
    assert first["dirty"] is True
    subprocess.run([*git, "commit", "-qam", "y"], check=True)
    assert git_commit(repo) == first  # once per process, like the source digest
    git_commit.cache_clear()
    assert git_commit(repo)["commit"] != first["commit"] and git_commit(repo)["dirty"] is False
    (repo / "probes/new.py").write_text("")  # untracked code is code too
    git_commit.cache_clear()
    assert git_commit(repo)["dirty"] is True


def test_read_only_results_directory_fails_before_training(tmp_path):
    import os

    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir"
        target.write_text("x")  # root ignores permissions: use a path that cannot be a directory
        store = RunStore(target, "toy", "quick")
    else:
        tmp_path.chmod(0o500)
        store = RunStore(tmp_path, "toy", "quick")
    CALLS.clear()
    with pytest.raises(OSError):
        run_sweep(TOY, ToyConfig(), store, log=lambda s: None)
    assert CALLS == []


SLOW_SWEEP = """
import sys, time
from tests.test_store import TOY, ToyConfig
from studies.lab.store import RunStore
from studies.lab.study import Study
from studies.lab.sweep import run_sweep

def slow_run(rc, ctx):
    time.sleep(0.3 if rc["seed"] == 0 else 60)  # the second run hangs until killed
    return [{"step": 0, "probe": "train", "metric": "loss", "value": float(rc["seed"])}]

study = Study(**{**TOY.__dict__, "run": slow_run})
run_sweep(study, ToyConfig(norms=("bn",), seeds=2), RunStore(sys.argv[1], "toy", "quick"), log=lambda s: None)
"""


def test_sigkill_mid_sweep_then_resume(tmp_path):
    """A sweep killed with SIGKILL mid-run resumes: every run present exactly once, no corrupt file."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SWEEP, str(tmp_path)], cwd=repo)
    store = RunStore(tmp_path, "toy", "quick")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        len(store.run_ids(done=True)) == 1 and store.run_ids(done=False)
    ):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert len(store.run_ids(done=True)) == 1 and len(store.run_ids(done=False)) == 1
    finished = store.run_ids(done=True)[0]
    CALLS.clear()
    report = run_sweep(TOY, ToyConfig(norms=("bn",), seeds=2), store, log=lambda s: None)
    assert report.skipped == [finished] and len(report.ran) == 1 and len(CALLS) == 1
    assert len(store.run_ids()) == len(store.run_ids(done=True)) == 2
    for run_id in store.run_ids():
        store.load(run_id)  # parses: no truncated file anywhere
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []
