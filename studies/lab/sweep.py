"""Grids of runs: execute every run of a study that is not finished yet, then analyze.

The local executor runs the grid in this process, one run after another. A run that raises is
reported and left unfinished (no ``DONE``), so the next sweep redoes it; the others go on.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.lab.store import RunStore, environment, make_run_id, write_json
from studies.lab.study import RunContext, Study

__all__ = ["SweepReport", "analyze_study", "plan_runs", "run_sweep"]


@dataclass
class SweepReport:
    """What one sweep did."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_runs(study: Study, config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(run_id, run_config)`` for every run of the grid; ids are unique and stable."""
    planned = []
    seen: dict[str, dict[str, Any]] = {}
    for run_config in study.grid(config):
        run_config = {"study": study.name, **run_config}
        run_id = make_run_id(run_config, study.run_id_keys)
        if run_id in seen:
            raise ValueError(f"study {study.name!r}: two runs of the grid share the config of {run_id}")
        seen[run_id] = run_config
        planned.append((run_id, run_config))
    return planned


def run_sweep(
    study: Study,
    config: Any,
    store: RunStore,
    *,
    ctx: RunContext | None = None,
    log: Callable[[str], None] = print,
) -> SweepReport:
    """Run every unfinished run of ``study`` at ``config`` into ``store``; finished runs are skipped."""
    ctx = ctx or RunContext()
    start = time.perf_counter()
    store.check_writable()
    report = SweepReport()
    planned = plan_runs(study, config)
    for i, (run_id, run_config) in enumerate(planned, start=1):
        if store.is_done(run_id):
            report.skipped.append(run_id)
            continue
        log(f"[{study.name} {i}/{len(planned)}] {run_id}")
        run_start = time.perf_counter()
        store.begin(run_id, run_config, environment(seed=run_config.get("seed"), device=ctx.device))
        try:
            rows = study.run(run_config, ctx)
        except Exception as err:  # a broken run must not take the sweep down; it stays unfinished
            report.failed[run_id] = f"{type(err).__name__}: {err}"
            log(f"  FAILED {run_id}: {type(err).__name__}: {err}")
            log(traceback.format_exc(limit=4))
            continue
        n = store.finish(run_id, run_config, rows)
        report.ran.append(run_id)
        log(f"  {n} records in {time.perf_counter() - run_start:.1f}s")
    write_json(
        store.base / "sweep.json", {"config": dataclasses.asdict(config), "runs": [r for r, _ in planned]}
    )
    report.seconds = time.perf_counter() - start
    return report


def analyze_study(study: Study, config: Any, store: RunStore) -> list[Path]:
    """Draw the study's figures and write claims.json from the finished runs in ``store``."""
    from analysis.claims import write_claims
    from analysis.load import load_runs

    df = load_runs(store.root, study.name, store.preset, config_columns=study.config_columns)
    if df.empty:
        raise FileNotFoundError(
            f"no finished runs of {study.name!r} under {store.runs_dir}; run `whybn run {study.name}` first"
        )
    store.figures_dir.mkdir(parents=True, exist_ok=True)
    claims = study.analyze(df, config, store.figures_dir)
    write_claims(store.figures_dir / "claims.json", claims)
    return sorted(store.figures_dir.iterdir())
