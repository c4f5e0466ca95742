"""Noisy BN — Santurkar et al. 2018, Fig. 2 (and Fig. 7): does BN help by stabilizing layer inputs?

Santurkar, Tsipras, Ilyas & Madry ("How does batch normalization help optimization?", NeurIPS 2018,
§2.1) train a standard network, the same network with BN, and a "noisy BN" network in which
time-varying noise of non-zero mean and non-unit variance is injected after every BN layer, so that
each layer's input distribution is *less* stable than without BN. Noisy BN still trains about as well
as BN: BN's benefit cannot come from stabilizing the layer-input distributions. We add the control
the argument needs: the same noise without BN.

Setup. Norms ``none`` (standard), ``bn``, ``noisy_bn`` (BN, then the noise) and ``noise`` (the noise
alone), from the shared zoo (``studies.lab.norms``: ``TimeVaryingNoise``, ``NoisyBatchNorm``,
``Noise``). The noise is *our reading* of the paper's appendix, with the zoo's defaults: at every
training forward, per channel c, μ_c ~ U(−1, 1) and σ_c ~ U(1, 2), then per element
y = s·x + b with s ~ N(σ_c, 0.1²), b ~ N(μ_c, 0.1²); it is off in inference mode. Santurkar et al. used
a VGG on CIFAR-10; the quick preset uses an MLP (4 hidden ReLU layers of 100 units,
Linear → norm → ReLU, PyTorch's default init) on MNIST-1D, plain SGD, learning rate 0.1 (the same for
every norm), batches of 64, 2000 updates, 5 seeds; the paper preset a VGG (8 conv layers, 64–512
channels) on CIFAR-10, batches of 128, 15 000 updates.

Records. The train loop's rows: minibatch training loss and accuracy every 10 updates (the network
as the optimizer sees it: batch statistics, noise on) and the test loss/accuracy every ``eval_every``
updates in inference mode (running statistics, noise off). Inference mode is not the network that
was trained when there is noise: a BN layer's running statistics were gathered with the noise of the
layers below on, and no longer match once it is off, so noisy BN's test accuracy in inference mode
can collapse (to near chance on MNIST-1D: 0.10–0.22 in the quick runs); the figure shows it, the
claims do not use it.

Probe. Every ``probe_every`` updates, a fixed probe batch (the first ``probe_size`` test examples)
goes through the network *as training runs it*: BN normalizes with the probe batch's own statistics
and updates no running statistic (``bn="batch"``), and the noise is on — Santurkar's point is that the
noisy network's layer inputs ARE unstable, so the measurement must include the noise as training
sees it. The noise is freshly drawn at each probe
point (as it is at each training step) from the global RNG seeded with ``SeedSequence([seed, step])``
and the RNG, parameters, buffers and flags are restored afterwards (``probe_guard``), so the probe is
reproducible and changes nothing. Measured: the input of each hidden activation (the output of
norm-and-noise, the "activations" of the paper's figure), per unit over the probe batch:

* ``layer_input_statistics`` rows (``probes.ics.layer_input_statistics`` layout): mean, var and the
  5/15/50/85/95th percentiles, as the mean over units (no ``unit`` key) and for the first ``units``
  units (key ``unit``);
* ``distribution_shift`` rows (``probes.ics.distribution_shift``): between the previous probe point
  and this one, mean over units of |Δmean|, |Δvar| and the 1-Wasserstein distance W1 between each
  unit's empirical input distributions (recorded at the later step).

Claims tested (from the records; one value per seed, paired by seed). *Training accuracy* of a run =
the mean of the logged minibatch training accuracies (every ``log_every`` updates, and the last)
over the last 10% of its updates (the paper's Fig. 2 plots
training accuracy; the noisy network's inference mode is not the network that was trained). A run that
diverged has no final value and no instability over training, and leaves its pair out (``n`` counts
the pairs).

1. *Noisy BN trains about as well as BN.* Statistic = training accuracy noisy BN − BN; holds if the 95%
   CI's lower end is above −0.02 (not more than 2 points worse).
2. *Noisy BN trains better than the standard network.* Statistic = training accuracy noisy BN − none;
   holds if the 95% CI's lower end is above 0.
3. *Noisy BN's layer inputs are less stable than the standard network's.* Instability of a run = mean
   over layers and over consecutive probe points of the W1 shift; statistic = log(instability noisy BN /
   instability none); holds if the 95% CI's lower end is above 0.
4. *The same noise without BN stalls training.* Statistic = training accuracy noise − none; holds if
   the 95% CI's upper end is below 0.

Reproduce::

    whybn run noisy_bn                    # quick preset, ~2 minutes on 2 idle CPU cores
    whybn run noisy_bn --preset paper --device cuda --set data_root=DIR   # CIFAR-10 python batches
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.claims import Claim, test_claim
from analysis.load import diverged_runs
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.activations import capture_layer_inputs
from probes.functional import norm_mode, probe_guard
from probes.ics import InputStatistics, distribution_shift, unit_statistics
from studies.lab.norms import TimeVaryingNoise
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study, check_two_probe_points
from studies.lab.train import ProbeContext, ProbeSchedule

SOURCE = "Santurkar et al. 2018, Fig. 2"
NOISY = ("noisy_bn", "noise")  # the norms that take the noise options
FINAL_FRACTION = 0.1  # training accuracy = mean minibatch accuracy over this last fraction of updates
MARGIN = 0.02  # claim 1: noisy BN at most this much (accuracy) worse than BN


@dataclass(frozen=True)
class Config:
    """The study's settings; every field but ``norms`` and ``seeds`` goes into each run's config."""

    arch: str = "mlp"
    norms: tuple[str, ...] = ("none", "bn", "noisy_bn", "noise")
    seeds: int = 5
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 4
    width: int = 100
    activation: str = "relu"
    init: str = "torch"
    noise_mean: float = 1.0  # n_μ: per-channel noise mean μ_c ~ U(−n_μ, n_μ)
    noise_scale: float = 2.0  # n_σ: per-channel noise scale σ_c ~ U(1, n_σ)
    noise_std: float = 0.1  # per-element spread of the multiplicative and additive noise
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    batch_size: int = 64
    steps: int = 2000
    log_every: int = 10
    eval_every: int = 250
    probe_every: int = 100
    probe_size: int = 1000
    units: int = 4  # units of each layer recorded one by one (statistics over all units regardless)
    percentiles: tuple[float, ...] = (5, 15, 50, 85, 95)


QUICK = Config()
PAPER = replace(
    QUICK,
    arch="vgg",
    dataset="cifar10",
    depth=8,
    width=64,
    batch_size=128,
    steps=15_000,
    eval_every=500,
    probe_every=250,
    probe_size=500,
)


def grid(config: Config) -> list[dict[str, Any]]:
    check_two_probe_points(
        "noisy_bn", config.steps, config.probe_every, "a distribution shift needs two probe points"
    )
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "seeds")}
    return [{"norm": norm, "seed": seed, **base} for norm in config.norms for seed in range(config.seeds)]


# ----------------------------------------------------------------------------------------------------
# the probe: layer-input distributions of the network as training runs it (noise on)


def noise_seed(seed: int, step: int) -> int:
    """The seed of the probe's noise draw at ``step`` of run ``seed`` (fixed, distinct per step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def input_statistics_as_trained(
    model: nn.Module,
    x: Tensor,
    layers: list[str],
    *,
    seed: int,
    percentiles: tuple[float, ...] = (5, 15, 50, 85, 95),
) -> InputStatistics:
    """Per-unit input statistics of ``layers`` on batch ``x``, the network run as in training.

    Like :func:`probes.ics.layer_input_statistics` with ``bn="batch"`` (batch-dependent norms use the
    batch's statistics and update nothing), except that the zoo's :class:`TimeVaryingNoise` layers are
    *on*, drawing from the global RNG seeded with ``seed``. Parameters, buffers, flags and the RNG
    state are restored afterwards.
    """
    levels = tuple(float(p) for p in percentiles)
    with probe_guard(model), norm_mode(model, "batch"), torch.no_grad():
        for module in model.modules():
            if isinstance(module, TimeVaryingNoise):
                module.training = True  # norm_mode switched every random layer off
        torch.manual_seed(seed)
        with capture_layer_inputs(model, layers) as inputs:
            model(x)
    per_unit = {name: x.transpose(0, 1).reshape(x.shape[1], -1) for name, x in inputs.items()}  # (C, N·S)
    return InputStatistics(tuple(unit_statistics(name, per_unit[name], levels) for name in layers))


def activation_probe(
    probe_x: Tensor, layers: list[str], *, seed: int, units: int, percentiles: tuple[float, ...]
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: ``layer_input_statistics`` rows, and ``distribution_shift`` rows since its last call."""
    previous: list[InputStatistics] = []  # the statistics of the last probe point

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        stats = input_statistics_as_trained(
            ctx.model,
            probe_x.to(ctx.device),
            layers,
            seed=noise_seed(seed, ctx.step),
            percentiles=percentiles,
        )
        rows = stats.to_records(units)
        if previous:
            rows += distribution_shift(previous[0], stats).to_records()
        previous[:] = [stats]
        return rows

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    data = load_run_data(rc)
    noise = {k: rc[k] for k in ("noise_mean", "noise_scale", "noise_std")} if rc["norm"] in NOISY else {}
    model = make_run_net(rc, data.info, norm_options=noise)
    layers = [name for name, _ in model.named_activations()]
    schedule = ProbeSchedule(
        activation_probe(
            data.test.tensors[0][: rc["probe_size"]],
            layers,
            seed=rc["seed"],
            units=rc["units"],
            percentiles=tuple(rc["percentiles"]),
        ),
        steps=range(0, rc["steps"] + 1, rc["probe_every"]),
        name="activations",
    )
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc),
        probes=[schedule],
        desc=f"noisy_bn {rc['norm']} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def final_train_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: mean of the logged minibatch training accuracies over the last ``FINAL_FRACTION`` of its
    updates (the train loop logs every ``log_every`` updates and the last).

    A run that diverged gets NaN (it did not finish training).
    """
    train_rows = df[df["probe"] == "train"]
    diverged = diverged_runs(df)
    acc = train_rows[train_rows["metric"] == "accuracy"]
    updates = acc.groupby("run_id")["step"].transform("max") + 1
    last = acc[acc["step"] >= (1 - FINAL_FRACTION) * updates]
    out = last.groupby(["run_id", "norm", "seed"])["value"].mean().rename("train_accuracy").reset_index()
    out.loc[out["run_id"].isin(diverged), "train_accuracy"] = np.nan
    return out


def instability(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: mean over layers of the mean W1 shift of layer inputs between consecutive probe points;
    NaN for a run that diverged (its shifts stop before the end of training)."""
    w1 = df[(df["probe"] == "distribution_shift") & (df["metric"] == "wasserstein")]
    per_layer = w1.groupby(["run_id", "norm", "seed", "layer"])["value"].mean()
    out = per_layer.groupby(level=["run_id", "norm", "seed"]).mean().rename("instability").reset_index()
    out.loc[out["run_id"].isin(diverged_runs(df)), "instability"] = np.nan
    return out


def _paired(per_run: pd.DataFrame, column: str, a: str, b: str) -> pd.DataFrame:
    wide = per_run.pivot_table(index="seed", columns="norm", values=column, dropna=False)
    return wide[[a, b]].dropna() if {a, b} <= set(wide.columns) else pd.DataFrame(columns=[a, b])


def claims(df: pd.DataFrame) -> list[Claim]:
    acc = final_train_accuracy(df)
    noisy_bn = _paired(acc, "train_accuracy", "noisy_bn", "bn")
    noisy_none = _paired(acc, "train_accuracy", "noisy_bn", "none")
    noise_none = _paired(acc, "train_accuracy", "noise", "none")
    shift = _paired(instability(df), "instability", "noisy_bn", "none")
    window = f"mean logged minibatch training accuracy over the last {FINAL_FRACTION:.0%} of updates"
    return [
        test_claim(
            "Noisy BN trains about as well as BN",
            SOURCE,
            f"training accuracy noisy BN minus BN ({window}); margin {MARGIN:g}",
            (noisy_bn["noisy_bn"] - noisy_bn["bn"]).to_numpy(),
            threshold=-MARGIN,
            direction=">",
        ),
        test_claim(
            "Noisy BN trains better than the standard network",
            SOURCE,
            f"training accuracy noisy BN minus no norm ({window})",
            (noisy_none["noisy_bn"] - noisy_none["none"]).to_numpy(),
            threshold=0.0,
            direction=">",
        ),
        test_claim(
            "Noisy BN's layer-input distributions are less stable than the standard network's",
            SOURCE,
            "log(instability noisy BN / instability no norm), instability = mean over layers and over "
            "consecutive probe points of the mean-over-units W1 shift of the activation inputs (noise on)",
            np.log(shift["noisy_bn"] / shift["none"]).to_numpy(),
            threshold=0.0,
            direction=">",
        ),
        test_claim(
            "The same noise without BN stalls training",
            SOURCE,
            f"training accuracy noise only minus no norm ({window})",
            (noise_none["noise"] - noise_none["none"]).to_numpy(),
            threshold=0.0,
            direction="<",
        ),
    ]


def _training_figure(df: pd.DataFrame, norms: list[str], palette: dict[str, str], out_dir: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 4, figsize=(13.2, 2.9))
    train_rows = df[(df["probe"] == "train") & df["metric"].isin(["loss", "accuracy"])].copy()
    width = max(1, int(train_rows["step"].max() + 1) // 40)  # ~40 points per curve: mean per bin of steps
    train_rows["step"] = (train_rows["step"] // width) * width
    binned = train_rows.groupby(["run_id", "norm", "metric", "step"], as_index=False)["value"].mean()
    test_acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    shift = df[(df["probe"] == "distribution_shift") & (df["metric"] == "wasserstein")]
    shift = shift.groupby(["run_id", "norm", "step"], as_index=False)["value"].mean()
    panels = [
        (binned[binned["metric"] == "loss"], "(a) training loss (minibatch)", "loss"),
        (binned[binned["metric"] == "accuracy"], "(b) training accuracy (minibatch)", "accuracy"),
        (test_acc, "(c) test accuracy (inference mode)", "accuracy"),
        (shift, "(d) layer-input shift (noise on)", "W1 between probe points"),
    ]
    for ax, (data, title, ylabel) in zip(axes, panels, strict=True):
        sns.lineplot(
            data,
            x="step",
            y="value",
            hue="norm",
            hue_order=norms,
            palette=palette,
            errorbar=("pi", 100),
            ax=ax,
            legend=ax is axes[0],
        )
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
    axes[3].set_yscale("log")
    labeled_legend(axes[0], loc="upper right")
    fig.tight_layout()
    save_figure(fig, out_dir, "noisy_bn_training")


def _activations_figure(df: pd.DataFrame, norms: list[str], palette: dict[str, str], out_dir: Path) -> None:
    """Percentile bands of unit 0's input over training, first and last hidden layer × norm (seed 0)."""
    import matplotlib.pyplot as plt

    rows = df[
        (df["probe"] == "layer_input_statistics") & (df["unit"] == 0) & (df["seed"] == df["seed"].min())
    ]
    layers = list(rows["layer"].unique())  # forward order, as the probe records them
    shown = sorted({0, len(layers) - 1})
    fig, axes = plt.subplots(
        len(shown), len(norms), figsize=(3.3 * len(norms), 2.5 * len(shown)), squeeze=False, sharey="row"
    )
    for i, k in enumerate(shown):
        for j, norm in enumerate(norms):
            ax = axes[i, j]
            part = rows[(rows["layer"] == layers[k]) & (rows["norm"] == norm)]
            part = part.pivot_table(index="step", columns="metric", values="value")
            color = palette[norm]
            ax.fill_between(
                part.index, part["p5"], part["p95"], color=color, alpha=0.15, lw=0, label="5–95th"
            )
            ax.fill_between(
                part.index, part["p15"], part["p85"], color=color, alpha=0.3, lw=0, label="15–85th"
            )
            ax.plot(part.index, part["p50"], "-", color=color, label="median")
            ax.set(title=f"{NORM_LABELS.get(norm, norm)}, hidden layer {k + 1}", xlabel="training step")
        axes[i, 0].set_ylabel("activation input (unit 0)")
    axes[0, 0].legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "noisy_bn_activations")


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    _training_figure(df, norms, palette, out_dir)
    _activations_figure(df, norms, palette, out_dir)
    return claims(df)


STUDY = Study(
    name="noisy_bn",
    title="Noisy BN: distributional stability of layer inputs vs training performance",
    reproduces="Santurkar et al. 2018, Fig. 2 and Fig. 7",
    figures=("noisy_bn_training", "noisy_bn_activations"),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
)
