"""Activation drift — Ioffe & Szegedy 2015, Fig. 1: does a sigmoid's input distribution drift less with BN?

An MLP with three hidden layers of 100 sigmoid units, trained with SGD on batches of 60, with and
without batch normalization (before the sigmoid, as in the paper), from PyTorch's default init
(``init="torch"``; Ioffe & Szegedy initialize with small random Gaussian weights). At regular steps we
feed a fixed probe batch (the first ``probe_size`` test examples) through the network — BN with the
probe batch's statistics, as in training, without updating its running statistics — and record
the 15th, 50th and 85th percentiles of the input to the last hidden layer's sigmoids, for the first
``units`` units. Ioffe & Szegedy trained on MNIST for 50k steps; the quick preset uses MNIST-1D (the
project's offline default) for a few thousand steps, the paper preset Fashion-MNIST.

Claims tested (from the records; one value per seed, paired by seed):

1. *Distribution drift is larger without BN.* Drift of a unit = the range over training of its median
   input plus the range of its 15–85 spread (``max_t − min_t``); statistic = log(drift without BN /
   drift with BN), averaged over the recorded units; holds if the 95% CI is above 0.
2. *Test accuracy with BN is at least as high.* Statistic = final test accuracy with BN minus without;
   holds if the 95% CI's upper end is ≥ 0 (BN not significantly worse).

A run that diverged (the train loop's ``diverged`` row) has neither a drift over training nor a final
accuracy (its records stop before it blew up) and leaves its pair out of both claims.

Reproduce::

    whybn run activation_drift                    # quick preset, ~1 minute on 2 CPU cores
    whybn run activation_drift --preset paper --device cuda
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.claims import Claim, test_claim
from analysis.load import finished
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.activations import capture_layer_inputs
from probes.functional import norm_mode
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

PERCENTILES = (15, 50, 85)


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("none", "bn")
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    placement: str = "before"
    init: str = "torch"
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    batch_size: int = 60
    steps: int = 4000
    probe_every: int = 100
    eval_every: int = 250
    probe_size: int = 1000
    probe_bn: str = "batch"  # how BN normalizes the probe batch: "batch" or "running" statistics
    units: int = 16


QUICK = Config()
PAPER = replace(
    QUICK, dataset="fashion_mnist", seeds=5, steps=50_000, probe_every=500, eval_every=1000, units=100
)


def grid(config: Config) -> list[dict[str, Any]]:
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "seeds")}
    return [
        {"arch": "mlp", "norm": norm, "seed": seed, **base}
        for norm in config.norms
        for seed in range(config.seeds)
    ]


def sigmoid_input_probe(probe_x: torch.Tensor, units: int, bn: str = "batch"):
    """A probe: percentiles of the last hidden activation's input on a fixed batch.

    ``bn="batch"`` normalizes with the probe batch's own statistics (the network the optimizer trains,
    no running statistic updated); ``"running"`` measures the inference network.
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        target = ctx.model.activations()[-1]
        with torch.no_grad(), norm_mode(ctx.model, bn), capture_layer_inputs(ctx.model, [target]) as inputs:
            ctx.model(probe_x.to(ctx.device))
        x = next(iter(inputs.values()))[:, :units].double()  # (probe_size, units)
        q = torch.tensor([p / 100 for p in PERCENTILES], dtype=x.dtype, device=x.device)
        values = torch.quantile(x, q, dim=0).cpu().numpy()  # (len(PERCENTILES), units)
        return [
            {"probe": "sigmoid_input", "layer": f"unit{u}", "metric": f"p{p}", "value": float(values[i, u])}
            for i, p in enumerate(PERCENTILES)
            for u in range(values.shape[1])
        ]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    data = load_run_data(rc)
    model = make_run_net(rc, data.info)
    probe_x = data.test.tensors[0][: rc["probe_size"]]
    schedule = ProbeSchedule(
        sigmoid_input_probe(probe_x, rc["units"], rc["probe_bn"]),
        steps=range(0, rc["steps"] + 1, rc["probe_every"]),
        name="sigmoid_input",
    )
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, log_every=rc["probe_every"]),
        probes=[schedule],
        desc=f"activation_drift {rc['norm']} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def drift_per_run(df: pd.DataFrame) -> pd.DataFrame:
    """Per run that did not diverge: mean over units of range_t(p50) + range_t(p85 − p15) of the
    sigmoid's input."""
    rows = df[(df["probe"] == "sigmoid_input") & finished(df)]
    wide = rows.pivot_table(
        index=["run_id", "norm", "seed", "layer", "step"], columns="metric", values="value"
    )
    wide["spread"] = wide["p85"] - wide["p15"]
    per_unit = wide.groupby(level=["run_id", "norm", "seed", "layer"]).agg(
        median_range=("p50", lambda s: s.max() - s.min()),
        spread_range=("spread", lambda s: s.max() - s.min()),
    )
    per_unit["drift"] = per_unit["median_range"] + per_unit["spread_range"]
    return per_unit.groupby(level=["run_id", "norm", "seed"])["drift"].mean().reset_index()


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per run that did not diverge: the test accuracy of its last evaluation."""
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy") & finished(df)]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()]
    return last[["run_id", "norm", "seed", "value"]].rename(columns={"value": "test_accuracy"})


def _paired(per_run: pd.DataFrame, column: str, a: str, b: str) -> pd.DataFrame:
    wide = per_run.pivot_table(index="seed", columns="norm", values=column)
    return wide[[a, b]].dropna() if {a, b} <= set(wide.columns) else pd.DataFrame(columns=[a, b])


def claims(df: pd.DataFrame) -> list[Claim]:
    source = "Ioffe & Szegedy 2015, Fig. 1"
    drift = _paired(drift_per_run(df), "drift", "none", "bn")
    acc = _paired(final_accuracy(df), "test_accuracy", "none", "bn")
    return [
        test_claim(
            "The input distribution of a sigmoid drifts more over training without BN than with BN",
            source,
            "log(drift without BN / drift with BN), drift = range over training of the unit's median "
            "plus range of its 15-85 spread, mean over units",
            np.log(drift["none"] / drift["bn"]).to_numpy(),
            threshold=0.0,
            direction=">",
        ),
        test_claim(
            "Test accuracy with BN is at least as high as without",
            source,
            "final test accuracy with BN minus without",
            (acc["bn"] - acc["none"]).to_numpy(),
            threshold=0.0,
            direction=">=",
        ),
    ]


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    fig, axes = plt.subplots(1, 1 + len(norms), figsize=(3.3 * (1 + len(norms)), 2.8))

    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    sns.lineplot(
        acc,
        x="step",
        y="value",
        hue="norm",
        hue_order=norms,
        palette=palette,
        errorbar=("pi", 100),
        ax=axes[0],
    )
    axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
    labeled_legend(axes[0], loc="lower right")

    # (b, c): the typical unit (unit 0) of seed 0, its 15/50/85th percentiles over training
    unit = df[(df["probe"] == "sigmoid_input") & (df["layer"] == "unit0") & (df["seed"] == df["seed"].min())]
    lims = (unit["value"].min(), unit["value"].max())
    for ax, norm, letter in zip(axes[1:], norms, "bcdefg", strict=False):
        part = unit[unit["norm"] == norm].pivot_table(index="step", columns="metric", values="value")
        color = palette[norm]
        ax.fill_between(part.index, part["p15"], part["p85"], color=color, alpha=0.2, lw=0)
        for p, style in zip(PERCENTILES, (":", "-", "--"), strict=True):
            ax.plot(part.index, part[f"p{p}"], style, color=color, label=f"{p}th pct.")
        ax.set(
            title=f"({letter}) sigmoid input, {NORM_LABELS.get(norm, norm)}",
            xlabel="training step",
            ylim=(lims[0] - 0.05 * (lims[1] - lims[0]), lims[1] + 0.05 * (lims[1] - lims[0])),
        )
    axes[1].set_ylabel("input to last-layer sigmoid")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "activation_drift")
    return claims(df)


STUDY = Study(
    name="activation_drift",
    title="Distribution of a sigmoid's input over training, with and without BN",
    reproduces="Ioffe & Szegedy 2015, Fig. 1",
    figures=("activation_drift",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
)
