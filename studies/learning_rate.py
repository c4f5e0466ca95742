"""Learning rate — Bjorck, Gomes, Selman & Weinberger 2018: BN lets a network train at much larger rates.

Bjorck et al. ("Understanding Batch Normalization", NeurIPS 2018, §2–3, Fig. 1 and 3) train ResNet-110
on CIFAR-10 with and without BN over a range of learning rates: without BN training diverges beyond
a small rate, with BN it succeeds at rates 10–30× larger; and at initialization the relative loss
L(w − ηg)/L(w) after one gradient step of size η explodes without BN at step sizes where it stays
moderate with BN (the gradients of the unnormalized network are much larger and dominated by a few
directions).

Setup. The quick preset trains an MLP (6 hidden ReLU layers of 128 units, Linear → norm → ReLU,
Kaiming-normal init with zero biases) on MNIST-1D (4000 training examples) with SGD (momentum 0.9, no
weight decay, constant rate), batches of 128, 300 updates, at learning rates 10^(k/2) for k = −6 … 2
(0.001, 0.00316, …, 3.16, 10: factors of √10), for norms ``none``, ``bn``, ``ln``, ``gn`` (8 groups of
16 units) and ``wn`` (weight normalization), 3 seeds. A run that produces a non-finite loss or
non-finite parameters is stopped by the train loop and recorded as diverged (a ``diverged`` row), never
raised. The paper preset is the ResNet-20 of ``studies.lab.nets`` on CIFAR-10, 3000 updates, rates
up to 31.6, 5 seeds (not checked here: no GPU).

Records. The train loop's rows (minibatch loss and accuracy every 10 updates; test loss and accuracy at
step 0 and after the last update, in inference mode: BN with its running statistics). In the run with
the smallest learning rate of each (norm, seed) (the initialization and first minibatch do not depend
on the rate), the probe ``probes.smoothness.landscape_along_gradient`` runs once at step 0 on the first
minibatch, with BN in ``bn="batch"`` mode (the training loss; no running statistic updated), at step
sizes η equal to the learning-rate grid: rows ``landscape`` / ``relative_loss`` (key ``eta``) =
L(w − ηg)/L(w) with g = ∇L(w), a plain gradient step.

Definitions. A run *trains* if it did not diverge and its final test accuracy is at least twice chance
(2/10 on MNIST-1D). The *largest trainable rate* of a (norm, seed) is the largest rate of the grid at
which its run trains (a (norm, seed) where no run trains is left out). The *blow-up step size* of a
(norm, seed) is the smallest η of the grid with L(w − ηg)/L(w) ≥ 2 (or not finite); when no η of the
grid reaches it, the next grid value beyond the largest (η_max · √10) is used — a lower bound, so the
statistic of claim 3 is then conservative if BN never blows up.

Claims tested (one value per seed, paired by seed):

1. *BN allows much larger learning rates (≥ 10×).* Statistic = log10(largest trainable rate with BN /
   without norm); holds if the 95% CI's lower end is ≥ 1.
2. *BN allows larger learning rates.* The same statistic; holds if the CI's lower end is above 0.
3. *At initialization the relative loss blows up at smaller step sizes without BN.* Statistic =
   log10(blow-up step size with BN / without norm); holds if the CI's lower end is above 0.

The rate grid has steps of √10, so the statistics of claims 1–3 move in steps of 0.5; a rate at the
grid's top that still trains bounds the largest trainable rate from below only.

Reproduce::

    whybn run learning_rate                    # quick preset, ~2 minutes on 2 idle CPU cores
    whybn run learning_rate --preset paper --device cuda --set data_root=DIR   # CIFAR-10 python batches
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.claims import Claim, test_claim
from analysis.load import diverged_runs
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.smoothness import landscape_along_gradient
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

SOURCE = "Bjorck et al. 2018, Fig. 1 and §3"
SOURCE_LANDSCAPE = "Bjorck et al. 2018, Fig. 3 (relative loss along the gradient at initialization)"
TENFOLD = 1.0  # claim 1: log10 of the rate ratio at least this (10×)
NUM_CLASSES = 10  # chance = 1/10 on every dataset of the presets (MNIST-1D, CIFAR-10)


@dataclass(frozen=True)
class Config:
    """The study's settings; every field but ``norms``, ``lrs`` and ``seeds`` goes into each run."""

    arch: str = "mlp"
    norms: tuple[str, ...] = ("none", "bn", "ln", "gn", "wn")
    lrs: tuple[float, ...] = (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0)
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 6
    width: int = 128
    groups: int = 8  # GN's groups
    activation: str = "relu"
    init: str = "kaiming"
    momentum: float = 0.9
    batch_size: int = 128
    steps: int = 300
    log_every: int = 10
    probe_bn: str = "batch"  # how BN normalizes in the landscape probe: "batch" or "running" statistics
    chance_multiple: float = 2.0  # a run trains if its final test accuracy >= this / num_classes
    blowup: float = 2.0  # the relative loss L(w - eta g)/L(w) at which the step "blows up"


QUICK = Config()
PAPER = replace(
    QUICK,
    arch="resnet",
    dataset="cifar10",
    depth=20,
    width=16,
    lrs=(*QUICK.lrs, 31.6),
    steps=3000,
    seeds=5,
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per (norm, learning rate, seed); the smallest rate's run also probes the initialization."""
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "lrs", "seeds")}
    return [
        {
            "norm": norm,
            "lr": lr,
            "seed": seed,
            "landscape": lr == min(config.lrs),
            "step_sizes": sorted(config.lrs),
            **base,
        }
        for norm in config.norms
        for lr in config.lrs
        for seed in range(config.seeds)
    ]


def init_landscape_probe(step_sizes: Sequence[float], bn: str) -> Callable[[ProbeContext], list[dict]]:
    """A probe: ``landscape_along_gradient`` on the minibatch of the coming update, at ``step_sizes``."""

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = landscape_along_gradient(ctx.model, ctx.loss_fn, ctx.batch, step_sizes=step_sizes, bn=bn)
        return result.to_records()

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train one (norm, learning rate, seed); evaluate at the start and the end."""
    data = load_run_data(rc)
    model = make_run_net(rc, data.info, norm_options={"groups": rc["groups"]} if rc["norm"] == "gn" else None)
    probes = (
        [ProbeSchedule(init_landscape_probe(rc["step_sizes"], rc["probe_bn"]), steps=[0], name="landscape")]
        if rc["landscape"]
        else []
    )
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd", eval_every=max(1, rc["steps"])),
        probes=probes,
        desc=f"learning_rate {rc['norm']} lr{rc['lr']:g} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def run_outcomes(df: pd.DataFrame, chance_multiple: float, num_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """Per run (norm, lr, seed): ``diverged``, final test accuracy (nan if diverged) and ``trains``.

    trains = not diverged and final test accuracy >= chance_multiple / num_classes.
    """
    keys = ["run_id", "norm", "lr", "seed"]
    runs = df[keys].drop_duplicates().set_index("run_id")
    diverged = diverged_runs(df)
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()].set_index("run_id")["value"]
    runs["diverged"] = runs.index.isin(diverged)
    runs["test_accuracy"] = last.where(~last.index.isin(diverged)).reindex(runs.index)
    runs["trains"] = ~runs["diverged"] & (runs["test_accuracy"] >= chance_multiple / num_classes)
    return runs.reset_index()


def max_trainable_lr(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Largest learning rate at which the run trains, per (norm, seed): index seed, one column per norm."""
    trains = outcomes[outcomes["trains"]]
    return trains.groupby(["seed", "norm"])["lr"].max().unstack("norm")


def relative_losses(df: pd.DataFrame) -> pd.DataFrame:
    """L(w − ηg)/L(w) at initialization: rows norm, seed, eta, value."""
    rows = df[(df["probe"] == "landscape") & (df["metric"] == "relative_loss")]
    return rows[["norm", "seed", "eta", "value"]].reset_index(drop=True)


def blowup_step(relative: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Smallest η with relative loss ≥ ``threshold`` (or not finite), per (norm, seed).

    When no η of the grid blows up, the next grid value η_max² / η_prev (a lower bound). Index seed,
    one column per norm.
    """
    out = {}
    for (norm, seed), part in relative.groupby(["norm", "seed"]):
        part = part.sort_values("eta")
        etas, values = part["eta"].to_numpy(), part["value"].to_numpy()
        blown = ~np.isfinite(values) | (values >= threshold)
        if blown.any():
            out[norm, seed] = etas[np.argmax(blown)]
        else:
            out[norm, seed] = etas[-1] ** 2 / etas[-2] if len(etas) > 1 else np.inf
    series = pd.Series(out, dtype=float)
    series.index.names = ["norm", "seed"]
    return series.unstack("norm")


def _log10_ratio(wide: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Per seed log10(wide[a] / wide[b]) where both exist."""
    if not {a, b} <= set(wide.columns):
        return np.array([])
    return np.log10(wide[a] / wide[b]).dropna().to_numpy()


def claims(df: pd.DataFrame, config: Config) -> list[Claim]:
    """The claims of the module docstring, in its order."""
    ratio = _log10_ratio(max_trainable_lr(run_outcomes(df, config.chance_multiple)), "bn", "none")
    statistic = "log10(largest trainable learning rate with BN / without norm), per seed"
    tenfold = test_claim(
        "BN allows learning rates at least 10x larger than without normalization",
        SOURCE,
        statistic,
        ratio,
        threshold=TENFOLD,
        direction=">",
    )
    tenfold = replace(
        tenfold,
        holds=bool(tenfold.n > 0 and tenfold.ci_low >= TENFOLD),
        criterion=f"95% CI lower bound >= {TENFOLD:g}",
    )
    blowup = blowup_step(relative_losses(df), config.blowup)
    return [
        tenfold,
        test_claim("BN allows larger learning rates than without normalization", SOURCE, statistic, ratio),
        test_claim(
            "At initialization the relative loss L(w - eta g)/L(w) blows up at smaller step sizes without BN",
            SOURCE_LANDSCAPE,
            f"log10(smallest eta with L(w - eta g)/L(w) >= {config.blowup:g}, BN / no norm), per seed",
            _log10_ratio(blowup, "bn", "none"),
        ),
    ]


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    labels = [NORM_LABELS.get(n, n) for n in norms]
    outcomes = run_outcomes(df, config.chance_multiple)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))

    # (a) Fig. 1: final test accuracy against the learning rate; an x where some seed diverged
    sns.lineplot(
        outcomes,
        x="lr",
        y="test_accuracy",
        hue="norm",
        hue_order=norms,
        palette=palette,
        marker="o",
        errorbar=("pi", 100),
        ax=axes[0],
        legend=False,
    )
    diverged = outcomes[outcomes["diverged"]].drop_duplicates(["norm", "lr"])
    for row, norm in enumerate(norms):  # a row of x's per norm: at one height they covered each other
        part = diverged[diverged["norm"] == norm]
        height = -0.015 - 0.03 * row
        axes[0].scatter(
            part["lr"], np.full(len(part), height), marker="x", s=14, color=palette[norm], zorder=3
        )
    axes[0].axhline(config.chance_multiple / NUM_CLASSES, color="0.5", lw=0.8, ls="--")
    axes[0].set(
        xscale="log",
        title="(a) test accuracy after training",
        xlabel="learning rate",
        ylabel="accuracy (x: diverged)",
        ylim=(-0.03 * len(norms), 1.0),
    )

    # (b) Fig. 3: relative loss after one gradient step at initialization
    relative = relative_losses(df)
    relative["value"] = relative["value"].where(np.isfinite(relative["value"]), np.nan)
    sns.lineplot(
        relative,
        x="eta",
        y="value",
        hue="norm",
        hue_order=norms,
        palette=palette,
        marker="o",
        errorbar=("pi", 100),
        ax=axes[1],
    )
    labeled_legend(axes[1], loc="upper left", fontsize="small")
    axes[1].axhline(config.blowup, color="0.5", lw=0.8, ls="--")
    axes[1].set(
        xscale="log",
        yscale="log",
        title="(b) relative loss at initialization",
        xlabel="step size η",
        ylabel="L(w − ηg) / L(w)",
    )

    # (c) the largest trainable learning rate per seed
    best = max_trainable_lr(outcomes).reset_index().melt(id_vars="seed", value_name="lr").dropna()
    # the grid's span, fixed before plotting: one rate for every point must not collapse the axis
    axes[2].set_ylim(min(config.lrs) / 2, max(config.lrs) * 2)
    sns.stripplot(
        best,
        x="norm",
        y="lr",
        hue="norm",
        order=norms,
        hue_order=norms,
        palette=palette,
        log_scale=True,
        jitter=0.15,
        size=6,
        ax=axes[2],
        legend=False,
    )
    axes[2].set_xticks(range(len(norms)), labels, rotation=30)
    axes[2].set(
        title="(c) largest trainable learning rate",
        xlabel="",
        ylabel="learning rate",
    )
    fig.tight_layout()
    save_figure(fig, out_dir, "learning_rate")
    return claims(df, config)


STUDY = Study(
    name="learning_rate",
    title="Largest trainable learning rate per norm, and the relative loss along the gradient at init",
    reproduces="Bjorck et al. 2018, Fig. 1 and 3",
    figures=("learning_rate",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "norm", "lr", "seed"),
    config_columns=("lr",),
)
