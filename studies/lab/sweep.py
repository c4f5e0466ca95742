"""Grids of runs: execute every run of a study that is not finished yet, here or on a cluster, then analyze.

A study's grid (arch × norm × seed × learning rate …) becomes runs (:func:`plan_runs`), each with a stable
id and its own directory. :func:`run_sweep` executes the unfinished ones with an :class:`ExecutorSpec`:

``local``           ``workers`` processes on this machine (1: in this process, one run after another)
``slurm``           a SLURM job array through ``submitit``, one array task per run (partition, time,
                    GPUs, CPUs, memory and array parallelism from the CLI or a TOML file)
``submitit-local``  the same submitit code path, with submitit's local executor (no cluster needed:
                    what the tests drive)

Wherever it runs, a run goes through :func:`execute_run`: take the run's lock, check ``DONE`` again,
write ``config.json``/``env.json``, train and probe, write ``records.jsonl`` and ``DONE`` last. A run that
raises is marked ``FAILED`` with its reason and the sweep goes on; a run whose loss goes NaN/inf is a
finished run that *diverged* (the training loop records it); a run another sweep holds is left to it.
Nothing is written before the grid is valid and the results directory is writable with room to spare.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import threading
import time
import tomllib
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import submitit

from studies.lab.store import RUN_STATES, SWEEP, RunStore, environment, make_run_id, write_json
from studies.lab.study import RunContext, Study

__all__ = [
    "EXECUTORS",
    "ExecutorSpec",
    "RequeuedRun",
    "RunOutcome",
    "RunTask",
    "SweepReport",
    "analyze_study",
    "execute_run",
    "lost_run_outcome",
    "plan_runs",
    "run_sweep",
    "sweep_status",
]

#: Where runs execute (``whybn run --executor``).
EXECUTORS = ("local", "slurm", "submitit-local")


# ---------------------------------------------------------------------------------------------- planning


def plan_runs(study: Study, config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(run_id, run_config)`` for every run of the grid; ids are unique and stable.

    Every run config is validated (known arch, norm and dataset, data present) before anything runs.
    """
    from studies.lab.validate import validate_runs

    planned = []
    seen: dict[str, dict[str, Any]] = {}
    for run_config in study.grid(config):
        run_config = {"study": study.name, **run_config}
        run_id = make_run_id(run_config, study.run_id_keys)
        if run_id in seen:
            raise ValueError(f"study {study.name!r}: two runs of the grid share the config of {run_id}")
        seen[run_id] = run_config
        planned.append((run_id, run_config))
    if not planned:
        fields = dataclasses.fields(config) if dataclasses.is_dataclass(config) else ()
        empty = [f"{f.name}=()" for f in fields if getattr(config, f.name) == ()]
        why = f" ({', '.join(empty)})" if empty else ""
        raise ValueError(
            f"study {study.name!r}: the grid has no runs{why}; give each list at least one value"
        )
    validate_runs(study, planned)
    return planned


# ------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunTask:
    """Everything a process needs to execute one run (pickled to worker processes and SLURM jobs)."""

    study: Study
    results: str
    preset: str
    run_id: str
    config: Mapping[str, Any]
    ctx: RunContext = field(default_factory=RunContext)
    threads: int | None = None


@dataclass(frozen=True)
class RunOutcome:
    """What became of one run: ``done``, ``diverged`` (finished; training diverged), ``failed`` (raised;
    ``reason``), ``skipped`` (already finished) or ``busy`` (another process holds it)."""

    run_id: str
    status: str
    seconds: float = 0.0
    records: int = 0
    reason: str = ""


def execute_run(task: RunTask) -> RunOutcome:
    """Execute one run under its lock; never raises for a failure of the run itself (it is recorded):
    an exception of the study's code, or rows that cannot be stored (a value that is not a number, an
    object JSON cannot hold), which left the run "interrupted" and stopped the sweep.

    Errors writing the results (disk full, read-only) do raise: every later run would fail the same way.
    """
    if task.threads is not None:
        import torch

        torch.set_num_threads(task.threads)
    store = RunStore(Path(task.results), task.study.name, task.preset)
    with store.claim(task.run_id) as mine:
        if not mine:
            return RunOutcome(task.run_id, "busy", reason=store.holder(task.run_id) or "")
        if store.is_done(task.run_id):  # finished by another sweep since this one planned it
            return RunOutcome(task.run_id, "skipped")
        start = time.perf_counter()
        config = dict(task.config)
        store.begin(task.run_id, config, environment(seed=config.get("seed"), device=task.ctx.device))
        try:
            rows = task.study.run(config, task.ctx)
        except Exception as err:  # a broken run must not take the sweep down: FAILED, retried next time
            reason = f"{type(err).__name__}: {err}"
            store.fail(task.run_id, reason, traceback.format_exc(limit=8))
            return RunOutcome(task.run_id, "failed", time.perf_counter() - start, reason=reason)
        try:
            n = store.finish(task.run_id, config, rows)
        except (TypeError, ValueError) as err:  # rows that cannot be stored; an OSError is the disk's
            reason = f"its records cannot be stored: {type(err).__name__}: {err}"
            store.fail(task.run_id, reason, traceback.format_exc(limit=8))
            return RunOutcome(task.run_id, "failed", time.perf_counter() - start, reason=reason)
        status = "diverged" if store.summary(task.run_id)["diverged"] else "done"
        return RunOutcome(task.run_id, status, time.perf_counter() - start, n)


class RequeuedRun(submitit.helpers.Checkpointable):
    """``execute_run`` as a SLURM array task that is requeued when preempted or out of time.

    submitit signals the job before SLURM kills it, calls :meth:`checkpoint`, and resubmits the same
    task (at most ``max_num_timeout`` = 3 times for timeouts): the requeued task takes the run's lock
    once the killed process has released it, finds no ``DONE``, and redoes the run from scratch.
    """

    def __call__(self, task: RunTask) -> RunOutcome:
        return execute_run(task)

    def checkpoint(self, task: RunTask) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(RequeuedRun(), task)


def _execute_pickled(blob: bytes) -> RunOutcome:
    """``execute_run`` on a cloudpickled task (a study defined in a test or a notebook pickles too)."""
    return execute_run(cloudpickle.loads(blob))


# ------------------------------------------------------------------------------------------ executors


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


@dataclass(frozen=True)
class ExecutorSpec:
    """Where a sweep's runs execute.

    ``kind``: one of ``EXECUTORS``. ``workers``: processes of the local executor (1 runs in this process).
    SLURM (``slurm`` and ``submitit-local``): ``partition``; ``time_min`` per run; ``gpus`` per run
    (default: 1 when the device is CUDA, else 0); ``cpus_per_task`` (default: the torch threads);
    ``mem_gb``; ``array_parallelism`` (array tasks running at once); ``slurm``: further ``sbatch``
    options, e.g. ``{"account": "abc", "qos": "high"}`` (submitit's ``slurm_<key>``); ``folder``: where
    submitit keeps its pickles and logs (default ``<results>/<study>/<preset>/slurm``); ``wait``: block
    until the jobs end and analyze (default: False on SLURM, True for ``submitit-local``).
    """

    kind: str = "local"
    workers: int = 1
    partition: str | None = None
    time_min: int = 60
    gpus: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 64
    slurm: Mapping[str, Any] = field(default_factory=dict)
    folder: str | None = None
    wait: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        for name in ("workers", "time_min", "array_parallelism"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        if self.gpus is not None and (
            isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0
        ):
            raise ValueError(f"--gpus: expected an integer >= 0, got {self.gpus!r}")
        _positive("--cpus-per-task", self.cpus_per_task, allow_none=True)
        _positive("--mem-gb", self.mem_gb, allow_none=True)
        if self.workers > 1 and self.kind != "local":
            raise ValueError(f"--workers applies to --executor local; {self.kind} uses --array-parallelism")

    @property
    def waits(self) -> bool:
        return self.wait if self.wait is not None else self.kind != "slurm"

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> ExecutorSpec:
        """A spec from a TOML file (``[slurm]`` table or top-level keys named like the fields, e.g.
        ``partition = "gpu"``, ``time_min = 120``, ``[slurm.slurm] account = "abc"``); ``overrides``
        that are not None win (the CLI's flags)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--slurm-config: no such file {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--slurm-config: {path} is not valid TOML ({err})") from None
        data = data.get("slurm", data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"--slurm-config: {path}: unknown key(s) {', '.join(unknown)}; "
                f"keys: {', '.join(sorted(fields))}"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def _submitit_executor(spec: ExecutorSpec, store: RunStore, ctx: RunContext, threads: int | None) -> Any:
    import shutil

    folder = Path(spec.folder) if spec.folder else store.base / "slurm"
    cluster = "local" if spec.kind == "submitit-local" else "slurm"
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ValueError(
            "--executor slurm: sbatch/srun not found on this machine; submit from a SLURM login node, or "
            "try the same code path here with --executor submitit-local"
        )
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    gpus = spec.gpus if spec.gpus is not None else int(ctx.device.startswith("cuda"))
    params: dict[str, Any] = {
        "name": f"whybn-{store.study}",
        "timeout_min": spec.time_min,
        "cpus_per_task": spec.cpus_per_task or threads or 1,
        "nodes": 1,
        "tasks_per_node": 1,
        "slurm_array_parallelism": spec.array_parallelism,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if spec.mem_gb is not None:
        params["mem_gb"] = spec.mem_gb
    if spec.partition:
        params["slurm_partition"] = spec.partition
    params.update({f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in spec.slurm.items()})
    executor.update_parameters(**params)
    return executor


# --------------------------------------------------------------------------------------------- sweeps


@dataclass
class SweepReport:
    """What one sweep did (for a SLURM sweep that does not wait: what it submitted)."""

    ran: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)  # run_id -> SLURM job id (no waiting)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, outcome: RunOutcome) -> None:
        if outcome.status in ("done", "diverged"):
            self.ran.append(outcome.run_id)
            if outcome.status == "diverged":
                self.diverged.append(outcome.run_id)
        elif outcome.status == "skipped":
            self.skipped.append(outcome.run_id)
        elif outcome.status == "busy":
            self.busy.append(outcome.run_id)
        else:
            self.failed[outcome.run_id] = outcome.reason


def _describe(outcome: RunOutcome) -> str:
    if outcome.status in ("done", "diverged"):
        extra = ", DIVERGED" if outcome.status == "diverged" else ""
        return f"{outcome.records} records in {outcome.seconds:.1f}s{extra}"
    if outcome.status == "failed":
        return f"FAILED: {outcome.reason}"
    if outcome.status == "busy":
        return f"running elsewhere ({outcome.reason})" if outcome.reason else "running elsewhere"
    return "finished by another sweep"


def run_sweep(
    study: Study,
    config: Any,
    store: RunStore,
    *,
    ctx: RunContext | None = None,
    executor: ExecutorSpec | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> SweepReport:
    """Run every unfinished run of ``study`` at ``config`` into ``store``; finished runs are skipped.

    ``threads``: torch threads of each worker process or SLURM task (default: this process's).
    Raises ``ValueError`` for an invalid grid and ``OSError`` for an unwritable or full results
    directory, before any run starts.
    """
    import torch

    ctx = ctx or RunContext()
    executor = executor or ExecutorSpec()
    threads = threads or torch.get_num_threads()
    start = time.perf_counter()
    planned = plan_runs(study, config)
    store.check_writable()
    store.remove_stale_temp_files()
    report = SweepReport()
    todo = []
    for run_id, run_config in planned:
        if store.is_done(run_id):
            report.skipped.append(run_id)
        else:
            todo.append(RunTask(study, str(store.root), store.preset, run_id, run_config, ctx, threads))
    if todo:
        store.check_free_space(len(todo))
    submitter = (
        _submitit_executor(executor, store, ctx, threads) if todo and executor.kind != "local" else None
    )
    write_json(store.base / SWEEP, {"config": dataclasses.asdict(config), "runs": [r for r, _ in planned]})
    position = {run_id: i for i, (run_id, _) in enumerate(planned, start=1)}

    serial = executor.kind == "local" and executor.workers == 1

    def record(outcome: RunOutcome) -> None:
        report.add(outcome)
        if serial:  # the run's id was logged when it started
            log(f"  {_describe(outcome)}")
        else:
            where = f"[{study.name} {position[outcome.run_id]}/{len(planned)}] {outcome.run_id}"
            log(f"{where}: {_describe(outcome)}")

    if serial:
        for task in todo:
            log(f"[{study.name} {position[task.run_id]}/{len(planned)}] {task.run_id}")
            record(execute_run(task))
    elif todo and executor.kind == "local":
        _run_in_processes(todo, executor.workers, record)
    elif todo:
        _run_on_submitit(todo, executor, submitter, store, report, record, log)
    report.seconds = time.perf_counter() - start
    return report


def lost_run_outcome(task: RunTask, reason: str) -> RunOutcome:
    """The outcome of a run whose result was lost with its worker: what the store says.

    A run that wrote its ``DONE`` before the pool broke finished (``done`` or ``diverged``, with its
    record count); any other is ``failed`` with ``reason`` and no ``FAILED`` file, so the next sweep
    redoes it."""
    store = RunStore(Path(task.results), task.study.name, task.preset)
    if store.is_done(task.run_id):
        summary = store.summary(task.run_id)
        status = "diverged" if summary.get("diverged") else "done"
        return RunOutcome(task.run_id, status, records=int(summary.get("records", 0)))
    return RunOutcome(task.run_id, "failed", reason=reason)


def _exit_with_parent(parent: int) -> None:
    """A pool worker's initializer: end the worker when the sweep's process is gone (killed with
    SIGKILL, or by a signal it did not handle), instead of running the runs already queued to it and
    then waiting forever on the queue. Its run in flight is left unfinished and redone by the next
    sweep."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="whybn-parent-watch", daemon=True).start()


def _run_in_processes(tasks: list[RunTask], workers: int, record: Callable[[RunOutcome], None]) -> None:
    """Tasks in ``workers`` fresh (spawned) processes.

    A worker that dies (killed for memory, a crash in native code) breaks the pool: the runs in flight
    and those not started yet are reported failed ("worker process died"), without ``FAILED`` files, and
    the next sweep redoes them; the runs finished before are kept, including one whose worker wrote its
    ``DONE`` but whose result the broken pool never delivered (:func:`lost_run_outcome`).

    An interruption of this process (Ctrl-C, or SIGTERM as the CLI turns it into an exception) ends
    the workers at once: their runs in flight are redone by the next sweep. (Shut down normally, the
    pool ran the runs already queued to its workers first, and a SIGTERM left them running on as
    orphans; those now also end with their parent.)"""
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads are up
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=context,
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        futures = {pool.submit(_execute_pickled, cloudpickle.dumps(task)): task for task in tasks}
        try:
            for future in concurrent.futures.as_completed(futures):
                task = futures[future]
                try:
                    record(future.result())
                except concurrent.futures.process.BrokenProcessPool as err:
                    record(lost_run_outcome(task, f"worker process died ({err})"))
        except BaseException:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise


def _run_on_submitit(
    tasks: list[RunTask],
    spec: ExecutorSpec,
    executor: Any,
    store: RunStore,
    report: SweepReport,
    record: Callable[[RunOutcome], None],
    log: Callable[[str], None],
) -> None:
    """One job-array task per run; with ``spec.waits``, block until each ends and record its outcome."""
    jobs = executor.map_array(RequeuedRun(), tasks)
    job_ids = {task.run_id: str(job.job_id) for task, job in zip(tasks, jobs, strict=True)}
    write_json(store.base / "slurm" / "jobs.json", {"executor": spec.kind, "jobs": job_ids})
    array = str(jobs[0].job_id).split("_")[0] if jobs else ""
    log(
        f"{store.study}: submitted {len(jobs)} run(s) ({spec.kind}, job array {array}); "
        f"logs in {executor.folder}"
    )
    if not spec.waits:
        report.submitted = job_ids
        return
    for task, job in zip(tasks, jobs, strict=True):
        try:
            record(job.result())
        except Exception as err:  # the job itself died: timeout, node failure, out of memory
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            reason = f"job {job.job_id} failed: {last}"
            if store.run_dir(task.run_id).is_dir() and not store.is_done(task.run_id):
                store.fail(task.run_id, reason, str(err)[-4000:])
            record(lost_run_outcome(task, reason))  # a job that died after its DONE finished its run


# --------------------------------------------------------------------------------------------- status


def sweep_status(study: Study, config: Any, store: RunStore) -> dict[str, list[str]]:
    """Each run of the grid by state (``RUN_STATES``), plus ``other``: runs on disk not in this grid."""
    states: dict[str, list[str]] = {state: [] for state in (*RUN_STATES, "other")}
    planned = [run_id for run_id, _ in plan_runs(study, config)]
    for run_id in planned:
        states[store.state(run_id)].append(run_id)
    states["other"] = sorted(set(store.run_ids()) - set(planned))
    return states


# ------------------------------------------------------------------------------------------- analysis


def analyze_study(study: Study, config: Any, store: RunStore) -> list[Path]:
    """Draw the study's figures and write claims.json from the finished runs of the last sweep in
    ``store`` (the run ids its ``sweep.json`` lists; every finished run where there is none). Runs of
    another config in the same directory (an earlier sweep with other steps or another grid) are left
    out, with a warning that counts them."""
    from analysis.claims import write_claims
    from analysis.load import load_runs

    saved = store.read_sweep()
    planned = saved.get("runs") if saved is not None else None
    others = sorted(set(store.run_ids()) - set(planned)) if planned is not None else []
    if others:
        warnings.warn(
            f"{study.name}: {len(others)} run(s) under {store.runs_dir} belong to another config and are "
            f"left out of the figures and claims (`whybn status` lists them): {', '.join(others[:3])}"
            + (" ..." if len(others) > 3 else ""),
            stacklevel=2,
        )
    df = load_runs(store.root, study.name, store.preset, config_columns=study.config_columns, run_ids=planned)
    if df.empty:
        raise FileNotFoundError(
            f"no finished runs of {study.name!r} under {store.runs_dir}; run `whybn run {study.name}` first"
        )
    store.figures_dir.mkdir(parents=True, exist_ok=True)
    # seaborn's strip-plot jitter draws from numpy's global RNG: seed it for the drawing (so a figure
    # is the same file every time it is drawn from the same records) and give the caller its state back
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(0)  # noqa: NPY002
    try:
        claims = study.analyze(df, config, store.figures_dir)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    write_claims(store.figures_dir / "claims.json", claims)
    return sorted(store.figures_dir.iterdir())
