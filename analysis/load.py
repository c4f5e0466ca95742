"""Load runs from ``results/`` into one tidy DataFrame, selected by config fields, never by path."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from studies.lab.store import CONFIG, DONE, FAILED, RECORD_FIELDS, RECORDS, read_records

__all__ = ["diverged_runs", "find_runs", "load_runs"]


def find_runs(results: Path, study: str | None = None, preset: str | None = None) -> list[Path]:
    """Run directories under ``results/<study>/<preset>/runs/`` (any study/preset when None)."""
    results = Path(results)
    pattern = f"{study or '*'}/{preset or '*'}/runs/*"
    return sorted(p for p in results.glob(pattern) if p.is_dir() and not p.name.startswith("."))


def _matches(config: dict[str, Any], select: dict[str, Any]) -> bool:
    for key, wanted in select.items():
        value = config.get(key)
        if isinstance(wanted, (list, tuple, set, frozenset)):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def load_runs(
    results: Path,
    study: str | None = None,
    preset: str | None = None,
    *,
    config_columns: Iterable[str] = (),
    run_ids: Iterable[str] | None = None,
    **select: Any,
) -> pd.DataFrame:
    """All records of the finished runs whose config matches ``select``, as one tidy DataFrame.

    ``select`` compares config fields (``norm="bn"``, ``arch=("mlp", "vgg")``). ``config_columns``
    adds config fields as columns (e.g. ``lr``) next to the record fields. ``run_ids``, if given, keeps
    only those runs: the ones a sweep planned (``sweep.json``), so that runs of an earlier config left
    in the same directory (other steps, another grid) never mix into its figures. Runs without ``DONE``
    (unfinished or failed) and planned runs that are not on disk are skipped with a warning; a finished
    run without records adds no rows; a corrupt record raises ``ValueError`` naming the file and line.
    """
    frames = []
    skipped, failed = [], []
    keep = None if run_ids is None else set(run_ids)
    found = set()
    for run_dir in find_runs(results, study, preset):
        if keep is not None and run_dir.name not in keep:
            continue
        found.add(run_dir.name)
        if not (run_dir / DONE).is_file():
            (failed if (run_dir / FAILED).is_file() else skipped).append(run_dir.name)
            continue
        config = json.loads((run_dir / CONFIG).read_text())
        if not _matches(config, select):
            continue
        rows = read_records(run_dir / RECORDS)
        if not rows:  # an empty frame would make pd.concat upcast the int columns (seed, step) to float
            continue
        frame = pd.DataFrame.from_records(rows)
        for key in config_columns:
            value = config.get(key)
            frame[key] = [value] * len(frame) if isinstance(value, (list, tuple)) else value
        frames.append(frame)
    missing = sorted(keep - found) if keep is not None else []
    for runs, what in (
        (skipped, f"unfinished run(s) without {DONE}"),
        (failed, f"failed run(s) ({FAILED}, no {DONE})"),
        (missing, "planned run(s) not on disk"),
    ):
        if runs:
            warnings.warn(
                f"skipped {len(runs)} {what}: {', '.join(runs[:5])}" + (" ..." if len(runs) > 5 else ""),
                stacklevel=2,
            )
    if not frames:
        return pd.DataFrame(columns=[*RECORD_FIELDS, *config_columns])
    return pd.concat(frames, ignore_index=True)


def finished(df: pd.DataFrame) -> pd.Series:
    """A mask of ``df``'s rows: those of runs that did not diverge (:func:`diverged_runs`), whose last
    records are the end of training."""
    return ~df["run_id"].isin(diverged_runs(df))


def diverged_runs(df: pd.DataFrame) -> set[str]:
    """The runs of ``df`` that diverged: those with a ``train``/``diverged`` record (written at the step
    where the loss, the evaluation, a parameter or a buffer stopped being finite). Their last records
    are from before that step, not the end of training."""
    if not {"probe", "metric", "run_id"} <= set(df.columns):
        return set()
    return set(df.loc[(df["probe"] == "train") & (df["metric"] == "diverged"), "run_id"])
