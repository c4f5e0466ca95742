"""``whybn``: list, run and re-draw the studies (also ``python -m studies``).

whybn list
whybn run STUDY [--preset quick|paper] [--device cpu|cuda] [--seeds N] [--results DIR]
                [--executor local] [--set key=value ...]
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
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.lab.store import RunStore
from studies.lab.study import RunContext, Study, apply_overrides
from studies.lab.sweep import analyze_study, run_sweep
from studies.registry import STUDY_NAMES, get_study

DEFAULT_RESULTS = Path(os.environ.get("WHYBN_RESULTS", "results"))


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})"
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
    path = store.base / "sweep.json"
    if path.is_file():
        return _config_from_dict(preset, json.loads(path.read_text())["config"])
    return preset


def cmd_list(args: argparse.Namespace) -> int:
    rows = [(s.name, ", ".join(s.figures), s.reproduces) for s in map(get_study, STUDY_NAMES)]
    widths = [max(len(r[i]) for r in [("study", "figures", "reproduces"), *rows]) for i in range(2)]
    print(f"{'study':<{widths[0]}}  {'figures':<{widths[1]}}  reproduces")
    for name, figures, reproduces in rows:
        print(f"{name:<{widths[0]}}  {figures:<{widths[1]}}  {reproduces}")
    return 0


def _run_one(
    study: Study, args: argparse.Namespace, sets: Sequence[str] = (), seeds: int | None = None
) -> int:
    try:
        config = apply_overrides(study.preset(args.preset), sets, seeds=seeds)
    except (KeyError, ValueError, TypeError) as err:
        raise CLIError(err.args[0]) from None
    store = RunStore(args.results, study.name, args.preset)
    ctx = RunContext(device=args.device, progress=sys.stderr.isatty())
    report = run_sweep(study, config, store, ctx=ctx)
    print(
        f"{study.name}: {len(report.ran)} run(s) done, {len(report.skipped)} already finished, "
        f"{len(report.failed)} failed, in {report.seconds:.1f}s"
    )
    paths = analyze_study(study, config, store)
    print(f"{study.name}: figures and claims in {store.figures_dir} ({len(paths)} files)")
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    _check_device(args.device)
    return _run_one(_study(args.study), args, args.set, args.seeds)


def cmd_figures(args: argparse.Namespace) -> int:
    names = [args.study] if args.study else list(STUDY_NAMES)
    for name in names:
        study = _study(name)
        store = RunStore(args.results, study.name, args.preset)
        if not args.study and not store.runs_dir.is_dir():
            print(f"{name}: no results under {store.base}; skipped")
            continue
        try:
            paths = analyze_study(study, _saved_config(study, store), store)
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
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
    _check_device(args.device)
    status = 0
    timings = {}
    for name in STUDY_NAMES:
        start = time.perf_counter()
        status |= _run_one(get_study(name), args)
        timings[name] = time.perf_counter() - start
    for name, seconds in timings.items():
        print(f"{name:<24} {seconds:7.1f}s")
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,run,figures,paper,all}")

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

    p = sub.add_parser("run", help="run a study's grid (finished runs are skipped), then draw its figures")
    p.add_argument("study", help="study name (see `whybn list`)")
    common(p)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    p.add_argument("--executor", choices=["local"], default="local", help="where runs execute")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_run)

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
    p.set_defaults(func=cmd_all)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
