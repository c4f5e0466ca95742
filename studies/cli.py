"""``whybn``: list, run and re-draw the studies (also ``python -m studies``).

whybn list
whybn run STUDY [--preset quick|paper] [--device cpu|cuda] [--seeds N] [--results DIR]
                [--executor local|slurm|submitit-local] [--workers N] [--set key=value ...]
                [--partition P] [--time MIN] [--gpus N] [--cpus-per-task N] [--mem-gb G]
                [--array-parallelism N] [--slurm KEY=VALUE ...] [--slurm-config FILE.toml] [--wait]
whybn status [STUDY] [--preset quick] [--results DIR]                (done / running / failed / diverged)
whybn figures [STUDY] [--preset quick] [--results DIR]
whybn paper [--preset quick] [--results DIR] [--build-dir DIR] [--tex-only]
whybn all [--preset quick] [--device cpu] [--results DIR]          (every study, then the paper)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.lab.store import RUN_STATES, RunStore
from studies.lab.study import RunContext, Study, apply_overrides
from studies.lab.sweep import EXECUTORS, ExecutorSpec, analyze_study, run_sweep, sweep_status
from studies.registry import STUDY_NAMES, get_study

DEFAULT_RESULTS = Path(os.environ.get("WHYBN_RESULTS", "results"))


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler) as an exception, so that a sweep ends the way Ctrl-C
    ends it: its worker processes stop and its finished runs are kept. Unhandled, the signal killed the
    parent alone and left its workers running as orphans. A ``BaseException``: a study's
    ``except Exception`` does not swallow it."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use --device cpu"
            )
        return
    raise CLIError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")


def _study(name: str) -> Study:
    try:
        return get_study(name)
    except KeyError as err:
        raise CLIError(err.args[0]) from None


def _config_from_dict(preset: Any, saved: dict[str, Any]) -> Any:
    """Rebuild a study config saved in sweep.json (JSON lists back to tuples)."""
    hints = typing.get_type_hints(type(preset))
    fields = {f.name for f in dataclasses.fields(preset)}
    values = {}
    for key, value in saved.items():
        if key in fields:
            values[key] = tuple(value) if isinstance(value, list) and "tuple" in str(hints[key]) else value
    return dataclasses.replace(preset, **values)


def _saved_config(study: Study, store: RunStore) -> Any:
    preset = study.preset(store.preset)
    saved = store.read_sweep()
    return preset if saved is None else _config_from_dict(preset, saved["config"])


def cmd_list(args: argparse.Namespace) -> int:
    rows = [(s.name, ", ".join(s.figures), s.reproduces) for s in map(get_study, STUDY_NAMES)]
    widths = [max(len(r[i]) for r in [("study", "figures", "reproduces"), *rows]) for i in range(2)]
    print(f"{'study':<{widths[0]}}  {'figures':<{widths[1]}}  reproduces")
    for name, figures, reproduces in rows:
        print(f"{name:<{widths[0]}}  {figures:<{widths[1]}}  {reproduces}")
    return 0


def _executor_spec(args: argparse.Namespace) -> ExecutorSpec:
    """The executor the CLI flags (and ``--slurm-config``) describe; a bad value is a CLIError."""
    extra = {}
    for item in getattr(args, "slurm", None) or []:
        if "=" not in item:
            raise CLIError(f"--slurm expects KEY=VALUE (an sbatch option, e.g. account=abc), got {item!r}")
        key, value = item.split("=", 1)
        extra[key.strip().replace("-", "_")] = value.strip()
    flags = dict(
        kind=getattr(args, "executor", "local"),
        workers=getattr(args, "workers", None),
        partition=getattr(args, "partition", None),
        time_min=getattr(args, "time", None),
        gpus=getattr(args, "gpus", None),
        cpus_per_task=getattr(args, "cpus_per_task", None),
        mem_gb=getattr(args, "mem_gb", None),
        array_parallelism=getattr(args, "array_parallelism", None),
        slurm=extra or None,
        wait=getattr(args, "wait", None),
    )
    try:
        if getattr(args, "slurm_config", None):
            return ExecutorSpec.from_toml(args.slurm_config, **flags)
        return ExecutorSpec(**{k: v for k, v in flags.items() if v is not None})
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


def _run_one(
    study: Study, args: argparse.Namespace, sets: Sequence[str] = (), seeds: int | None = None
) -> int:
    try:
        config = apply_overrides(study.preset(args.preset), sets, seeds=seeds)
    except (KeyError, ValueError, TypeError) as err:
        raise CLIError(err.args[0]) from None
    store = RunStore(args.results, study.name, args.preset)
    executor = _executor_spec(args)
    ctx = RunContext(device=args.device, progress=sys.stderr.isatty() and executor.workers == 1)
    try:
        report = run_sweep(study, config, store, ctx=ctx, executor=executor)
    except (ValueError, KeyError, FileNotFoundError) as err:  # the grid: unknown names, missing data
        raise CLIError(err.args[0] if isinstance(err, KeyError) and err.args else str(err)) from None
    except BrokenPipeError:  # `whybn run … | head`: the reader of the progress lines has gone
        raise
    except OSError as err:  # the results directory: read-only, full
        raise CLIError(f"cannot write results: {err.strerror or err}") from None
    if report.submitted:
        print(
            f"{study.name}: {len(report.submitted)} run(s) submitted to SLURM; follow them with "
            f"`whybn status {study.name} --preset {args.preset} --results {args.results}`, then draw the "
            f"figures with `whybn figures {study.name} --preset {args.preset} --results {args.results}`"
        )
        return 0
    print(
        f"{study.name}: {len(report.ran)} run(s) done ({len(report.diverged)} diverged), "
        f"{len(report.skipped)} already finished, {len(report.busy)} running elsewhere, "
        f"{len(report.failed)} failed, in {report.seconds:.1f}s"
    )
    if report.failed:
        first_id, first_reason = next(iter(report.failed.items()))
        failures = (
            f"{len(report.failed)} run(s) failed, the first ({first_id}) with {first_reason}; "
            f"`whybn status {study.name} --preset {args.preset} --results {args.results}` lists them"
        )
        if not report.ran and not report.skipped and not report.busy:
            print(f"{study.name}: no run finished, so there is nothing to draw: {failures}")
            return 1
    try:
        paths = analyze_study(study, config, store)
    except FileNotFoundError as err:
        if report.busy:  # every run is in another sweep's hands: nothing to draw yet
            print(f"{study.name}: no finished runs yet to draw ({err})")
            return 0 if report.ok else 1
        raise CLIError(str(err)) from None
    except Exception as err:
        diverged = _all_diverged(study, config, store)
        if not report.failed and not diverged:
            raise
        print(
            f"whybn: {study.name}: drawing the figures from the runs that finished failed "
            f"({type(err).__name__}: {err}); {failures if report.failed else diverged}",
            file=sys.stderr,
        )
        return 1
    print(f"{study.name}: figures and claims in {store.figures_dir} ({len(paths)} files)")
    return 0 if report.ok else 1


def _all_diverged(study: Study, config: Any, store: RunStore) -> str:
    """A sentence if every finished run of the sweep diverged (its figures may have nothing to show),
    else ``""``."""
    states = sweep_status(study, config, store)
    if states["done"] or not states["diverged"]:
        return ""
    return (
        f"every finished run diverged ({len(states['diverged'])}): a smaller learning rate, or "
        f"`whybn status {study.name}` to list them"
    )


def cmd_run(args: argparse.Namespace) -> int:
    if args.executor != "slurm":  # on SLURM the device is the compute node's, checked there
        _check_device(args.device)
    return _run_one(_study(args.study), args, args.set, args.seeds)


def _state_counts(states: dict[str, list[str]]) -> str:
    """``done 3  diverged 0  running 1 ...``: the number of runs in each of ``RUN_STATES``."""
    return "  ".join(f"{state} {len(states[state])}" for state in RUN_STATES)


def cmd_status(args: argparse.Namespace) -> int:
    """Counts of the runs of a study's last sweep by state, the failures with their reasons, the
    runs in progress with their host and process."""
    if args.study is None:  # one line per study that has a sweep at this preset
        for name in STUDY_NAMES:
            store = RunStore(args.results, name, args.preset)
            if store.base.is_dir():
                study = get_study(name)
                print(f"{name:<20} {_state_counts(sweep_status(study, _saved_config(study, store), store))}")
            else:
                print(f"{name:<20} not run (`whybn run {name} --preset {args.preset}`)")
        return 0
    study = _study(args.study)
    store = RunStore(args.results, study.name, args.preset)
    if not store.base.is_dir():
        raise CLIError(
            f"no sweep of {study.name!r} under {store.base}; start one with `whybn run {study.name}`"
        )
    try:
        states = sweep_status(study, _saved_config(study, store), store)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    total = sum(len(states[s]) for s in RUN_STATES)
    print(f"{study.name} ({args.preset}, {store.base}): {total} run(s)")
    print(f"  {_state_counts(states)}")
    for run_id in states["failed"]:
        failure = store.failure(run_id) or {}
        print(f"  failed   {run_id}: {failure.get('reason', '?')}")
    for run_id in states["running"]:
        print(f"  running  {run_id}: {store.holder(run_id)}")
    for run_id in states["diverged"]:
        print(f"  diverged {run_id}")
    probe_failures = {r: store.summary(r)["probe_failures"] for r in states["done"] + states["diverged"]}
    if any(probe_failures.values()):
        n_runs = sum(1 for n in probe_failures.values() if n)
        print(
            f"  {sum(probe_failures.values())} probe failure(s) in {n_runs} finished run(s) "
            "(records with metric 'failed' and their reason)"
        )
    if states["other"]:
        print(f"  ({len(states['other'])} other run(s) on disk from another config of this preset)")
    jobs = store.base / "slurm" / "jobs.json"
    if jobs.is_file():
        ids = sorted({j.split("_")[0] for j in json.loads(jobs.read_text())["jobs"].values()})
        print(f"  SLURM job array(s): {', '.join(ids)} (squeue -j {ids[0]})" if ids else "")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    names = [args.study] if args.study else list(STUDY_NAMES)
    for name in names:
        study = _study(name)
        store = RunStore(args.results, study.name, args.preset)
        if not args.study and not store.runs_dir.is_dir():
            print(f"{name}: no results under {store.base}; skipped")
            continue
        config = _saved_config(study, store)
        try:
            paths = analyze_study(study, config, store)
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
        except Exception as err:
            diverged = _all_diverged(study, config, store)
            if not diverged:
                raise
            print(
                f"whybn: {name}: drawing the figures failed ({type(err).__name__}: {err}); {diverged}",
                file=sys.stderr,
            )
            return 1
        print(f"{name}: {len(paths)} files in {store.figures_dir}")
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    """Generate every table, macro and section from results/, then build paper/build/main.pdf."""
    from analysis.paper import LatexError, build_pdf, latex_problems, write_paper_tex

    studies = [get_study(name) for name in STUDY_NAMES]
    out = write_paper_tex(studies, args.results, args.preset)
    print(f"paper: TeX in {out}")
    if args.tex_only:
        return 0
    build_dir = args.build_dir
    if build_dir is None and Path(args.results).resolve() != DEFAULT_RESULTS.resolve():
        build_dir = out / "build"  # a paper from other results must not overwrite paper/build
    try:
        pdf = build_pdf(args.results, args.preset, build_dir=build_dir)
    except LatexError as err:
        raise CLIError(str(err)) from None
    problems = latex_problems((pdf.parent / "main.log").read_text(errors="replace"))
    for line in problems:
        print(f"paper: warning: {line}", file=sys.stderr)
    print(f"paper: {pdf}")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    if args.executor != "slurm":
        _check_device(args.device)
    status = 0
    timings = {}
    for name in STUDY_NAMES:
        start = time.perf_counter()
        status |= _run_one(get_study(name), args)
        timings[name] = time.perf_counter() - start
    for name, seconds in timings.items():
        print(f"{name:<24} {seconds:7.1f}s")
    if args.paper and not _executor_spec(args).waits:
        print("whybn all: runs submitted to SLURM; once they end: `whybn figures && whybn paper`")
        return status
    if args.paper:
        args.build_dir, args.tex_only = None, shutil.which("latexmk") is None
        if args.tex_only:
            print("whybn all: latexmk not found; wrote the paper's TeX only (`make tex` installs TeX)")
        status |= cmd_paper(args)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whybn", description="Why does batch normalization work? Measure it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,run,status,figures,paper,all}")

    def common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
        p.add_argument(
            "--preset", default="quick", help="quick (minutes on 2 CPU cores) or paper (full grid)"
        )
        p.add_argument(
            "--results", type=Path, default=DEFAULT_RESULTS, help="results directory (default: results)"
        )
        if device:
            p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
            p.add_argument(
                "--threads",
                type=int,
                default=1,
                help="torch intra-op threads (default 1: on 2 cores the quick presets' small models "
                "synchronize more than they compute; hessian_spectrum ran in 105 s on one thread and 277 s "
                "on two, the training-bound studies 5-15%% slower)",
            )

    p = sub.add_parser("list", help="studies, with the figures each regenerates")
    p.set_defaults(func=cmd_list)

    def executors(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("where runs execute")
        g.add_argument(
            "--executor",
            choices=EXECUTORS,
            default="local",
            help="local: --workers processes here; slurm: a SLURM job array through submitit; "
            "submitit-local: the SLURM code path on this machine",
        )
        g.add_argument("--workers", type=int, default=None, help="local processes (default 1: this one)")
        g.add_argument("--partition", default=None, help="SLURM partition")
        g.add_argument("--time", type=int, default=None, metavar="MIN", help="SLURM time limit per run (60)")
        g.add_argument("--gpus", type=int, default=None, help="GPUs per run (default 1 with --device cuda)")
        g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per run (default --threads)")
        g.add_argument("--mem-gb", type=float, default=None, help="memory per run")
        g.add_argument("--array-parallelism", type=int, default=None, help="array tasks running at once (64)")
        g.add_argument(
            "--slurm",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="more sbatch options (account=...)",
        )
        g.add_argument("--slurm-config", type=Path, default=None, help="TOML file with the options above")
        g.add_argument(
            "--wait",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="wait for the SLURM jobs, then draw (default: submit and return)",
        )

    p = sub.add_parser("run", help="run a study's grid (finished runs are skipped), then draw its figures")
    p.add_argument("study", help="study name (see `whybn list`)")
    common(p)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    executors(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="done / running / failed / diverged runs of a study's sweep")
    p.add_argument("study", nargs="?", default=None, help="study name (default: a line for every study)")
    common(p, device=False)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("figures", help="re-draw figures and claims from existing results")
    p.add_argument("study", nargs="?", default=None)
    common(p, device=False)
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser(
        "paper", help="tables, numbers and sections from results/, then paper/build/main.pdf (latexmk)"
    )
    common(p, device=False)
    p.add_argument(
        "--build-dir",
        type=Path,
        default=None,
        help="where latexmk writes (default: paper/build; with --results DIR: DIR/paper/PRESET/build)",
    )
    p.add_argument("--tex-only", action="store_true", help="write the generated TeX, do not run latexmk")
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser("all", help="every study at a preset, then the paper")
    common(p)
    p.add_argument(
        "--no-paper", dest="paper", action="store_false", help="run the studies only, not `whybn paper`"
    )
    executors(p)
    p.set_defaults(func=cmd_all)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise CLIError(f"--threads must be a positive integer, got {threads}")
            import torch

            torch.set_num_threads(threads)
        return args.func(args)
    except CLIError as err:
        print(f"whybn: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as err:  # runs with DONE are kept; those in flight are redone
        print(
            "whybn: interrupted; finished runs are kept, and the same command resumes with the rest",
            file=sys.stderr,
        )
        return 143 if isinstance(err, Terminated) else 130
    except BrokenPipeError:  # `whybn status | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command in ("run", "all"):  # a sweep stopped with it: say so (stderr), not as a results error
            print(
                "whybn: stopped: the output pipe was closed; finished runs are kept, and the same command "
                "resumes with the rest",
                file=sys.stderr,
            )
            return 141
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
