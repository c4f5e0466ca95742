"""Records as the train loop leaves them, for tests of the studies' analyses."""

from __future__ import annotations

import pandas as pd


def diverged_at(df: pd.DataFrame, run_id: str, step: int) -> pd.DataFrame:
    """``df`` with run ``run_id`` cut at ``step`` as the train loop leaves a run whose loss stopped being
    finite there: its records from ``step`` on are gone, and a ``train``/``diverged`` row marks ``step``
    (it keeps the run's config columns)."""
    run = df["run_id"] == run_id
    if not run.any():
        raise ValueError(f"run_id {run_id!r} is not in the records")
    marker = df[run].iloc[[0]].assign(step=step, probe="train", metric="diverged", value=1.0)
    return pd.concat([df[~run | (df["step"] < step)], marker], ignore_index=True)
