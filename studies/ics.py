"""Internal covariate shift as gradient change — Santurkar et al. 2018, Fig. 3 (VGG) and Fig. 5 (DLN).

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?" (NeurIPS 2018),
Definition 2.1: the ICS of layer i is the change of its gradient caused by the simultaneous update of
the layers before it,

    G  = ∇_{W_i} L(W_1, …, W_k; x, y),      G' = ∇_{W_i} L(W'_1, …, W'_{i−1}, W_i, …, W_k; x, y),

on the same minibatch, W'_j being the optimizer's step from the current gradient. They report
‖G − G'‖₂ ("ℓ2 difference", ideally 0) and cos(G, G') (ideally 1) per layer over training, and find
that networks with BN have similar or even *larger* ICS in this sense than without, while training
better — in a VGG on CIFAR-10 and, most markedly, in a 25-layer deep linear network (DLN), where
with BN G and G' become almost uncorrelated.

Setup. Two architectures, each trained with plain SGD (no momentum, no weight decay), batches of 128,
with and without batch normalization (``Linear/Conv → BN → act``), the same learning rate for both:

* (a) a VGG-style CNN (``make_net("vgg")``: 3-wide convolutions, 2 per stage, ReLU, max-pool between
  stages, global average pool, linear head) with He (Kaiming-normal) init and the paper's learning
  rate 0.1. Quick: the 1-D VGG (6 convolutions, widths 16-32-64) on MNIST-1D; paper: 8 convolutions,
  widths 64-128-256-512 on CIFAR-10.
* (b) a DLN (``make_net("dln")``: 25 blocks ``Linear → norm → identity``, width 50, and a linear head)
  on the synthetic Gaussian classes of ``load_dataset("gaussian")`` (10 classes in 40 dimensions,
  cross-entropy), learning rate 0.01. The init is orthogonal (Saxe et al. 2014): with PyTorch's
  default init the signal of a 25-layer linear net shrinks by ~(1/√3)²⁵ and the net without BN does
  not train at all (its loss stays at log 10, its gradients are ~0, hence G' = G and ICS ≈ 0, while
  BN's net trains: a paper-like picture that only says the plain net is stuck; ``--set
  dln_init=torch`` shows it).

Every ``probe_every`` steps (and at steps 0 and ``steps``) :func:`probes.ics.ics_gradient_change`
measures, on the minibatch the next update uses and with the run's own optimizer (simulated on a
copy), ``l2`` = ‖G − G'‖₂, ``relative_l2`` = ‖G − G'‖₂/‖G‖₂, ``cosine`` = cos(G, G') and
``grad_norm`` = ‖G‖₂ for every parameterized layer (weight and bias flattened together). "Preceding"
parameters include the BN affine parameters γ, β of earlier blocks. BN is measured with
``bn="batch"``: batch statistics, the loss the optimizer trains (``probe_bn`` in the config). The
first layer has nothing before it (G' = G by definition) and is not recorded; the head is layer k.

Claims tested (from the records; one value per seed, paired by seed; for each seed the statistic is
averaged over every recorded layer and probe step where both runs have a value):

1. *BN does not reduce ICS (ℓ2 difference), VGG.* Statistic = mean of log(‖G − G'‖ with BN /
   ‖G − G'‖ without); "BN reduces ICS" would make it < 0; holds if the 95% CI's upper end is ≥ 0.
2. *Same, DLN.*
3. *BN does not reduce ICS, relative ℓ2 difference, VGG.* As 1 with ‖G − G'‖/‖G‖: the ℓ2
   difference scales with the gradient, which BN changes, so this is the scale-free version.
4. *Same, DLN.*
5. *In the DLN, G and G' are far less correlated with BN.* Statistic = mean cos(G, G') with BN minus
   without; holds if the 95% CI's upper end is < 0.
6. *BN does not make G and G' more correlated, VGG.* Statistic = mean cos(G, G') without BN minus with;
   holds if the 95% CI's upper end is ≥ 0 (cosine with BN not significantly higher).
7. *BN networks perform better, VGG* (the figure's caption: similar or worse ICS "despite performing
   better in terms of accuracy and loss"). Statistic = final test accuracy with BN minus without;
   holds if the 95% CI is above 0.
8. *Same, DLN.*

Figures: ``ics`` (per architecture: training loss, then ℓ2 difference, relative ℓ2 difference and
cosine over training for an early, a middle and the last layer; mean over seeds) and
``ics_by_layer`` (each metric averaged over training, against layer depth; mean and range over seeds).

Reproduce::

    whybn run ics                    # quick preset, ~3 minutes on 2 CPU cores
    whybn run ics --preset paper --device cuda --set data_root=/path/to/cifar-10-batches-py
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.claims import Claim, test_claim
from analysis.style import labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.ics import ics_gradient_change
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

PROBE = "ics"
METRICS = ("l2", "relative_l2", "cosine", "grad_norm")
METRIC_LABELS = {
    "l2": "‖G − G'‖₂",
    "relative_l2": "‖G − G'‖₂ / ‖G‖₂",
    "cosine": "cos(G, G')",
    "grad_norm": "‖G‖₂",
}
ARCH_LABELS = {"vgg": "VGG", "dln": "deep linear net"}


@dataclass(frozen=True)
class Config:
    archs: tuple[str, ...] = ("vgg", "dln")
    norms: tuple[str, ...] = ("none", "bn")
    seeds: int = 3
    # (a) VGG
    vgg_dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    vgg_depth: int = 6
    vgg_width: int = 16
    vgg_init: str = "kaiming"
    vgg_lr: float = 0.1
    # (b) deep linear network on synthetic Gaussian classes
    dln_depth: int = 25
    dln_width: int = 50
    dln_init: str = "orthogonal"
    dln_lr: float = 0.01
    dln_n_train: int = 4000
    dln_n_test: int = 1000
    # shared
    momentum: float = 0.0
    batch_size: int = 128
    steps: int = 1000
    probe_every: int = 50
    eval_every: int = 100
    log_every: int = 10
    probe_bn: str = "batch"  # how BN normalizes during the probe: "batch" or "running" statistics


QUICK = Config()
PAPER = replace(
    QUICK,
    seeds=5,
    vgg_dataset="cifar10",
    vgg_depth=8,
    vgg_width=64,
    dln_n_train=20_000,
    dln_n_test=5000,
    steps=15_000,
    probe_every=500,
    eval_every=500,
    log_every=50,
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One flat config per (arch, norm, seed): the arch's own dataset, net and learning rate."""
    shared = {
        "momentum": config.momentum,
        "batch_size": config.batch_size,
        "steps": config.steps,
        "probe_every": config.probe_every,
        "eval_every": config.eval_every,
        "log_every": config.log_every,
        "probe_bn": config.probe_bn,
    }
    per_arch = {
        "vgg": {
            "dataset": config.vgg_dataset,
            "data_root": config.data_root,
            "n_train": config.n_train,
            "n_test": config.n_test,
            "depth": config.vgg_depth,
            "width": config.vgg_width,
            "init": config.vgg_init,
            "lr": config.vgg_lr,
        },
        "dln": {
            "dataset": "gaussian",
            "n_train": config.dln_n_train,
            "n_test": config.dln_n_test,
            "depth": config.dln_depth,
            "width": config.dln_width,
            "init": config.dln_init,
            "lr": config.dln_lr,
        },
    }
    unknown = sorted(set(config.archs) - set(per_arch))
    if unknown:
        raise ValueError(f"ics: archs must be among {', '.join(per_arch)}, got {', '.join(unknown)}")
    return [
        {"arch": arch, "norm": norm, "seed": seed, **per_arch[arch], **shared}
        for arch in config.archs
        for norm in config.norms
        for seed in range(config.seeds)
    ]


def ics_probe(bn: str = "batch") -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: Santurkar et al.'s ICS (Def. 2.1) of every layer that has parameters before it.

    Rows: metric ``l2``, ``relative_l2``, ``cosine``, ``grad_norm`` per layer, with ``layer_index``
    the layer's 1-based position among the parameterized layers in forward order (the paper's
    "layer #"). The first layer (nothing precedes it, so G' = G) is skipped.
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = ics_gradient_change(ctx.model, ctx.loss_fn, ctx.batch, ctx.optimizer, bn=bn)
        return [
            {
                "probe": PROBE,
                "layer": layer.layer,
                "layer_index": index,
                "metric": metric,
                "value": getattr(layer, metric),
            }
            for index, layer in enumerate(result.layers, start=1)
            if layer.preceding
            for metric in METRICS
        ]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    data = load_run_data(rc)
    model = make_run_net(rc, data.info)
    every = range(0, rc["steps"] + 1, rc["probe_every"])
    schedule = ProbeSchedule(
        ics_probe(rc["probe_bn"]), steps=[*every, rc["steps"]], name=PROBE
    )  # the last too
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd"),
        probes=[schedule],
        desc=f"ics {rc['arch']} {rc['norm']} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def _paired_ics(df: pd.DataFrame, arch: str, metric: str) -> pd.DataFrame:
    """ICS rows of ``arch`` and ``metric`` as columns ``none``, ``bn``, matched on (seed, layer, step)."""
    rows = df[(df["probe"] == PROBE) & (df["arch"] == arch) & (df["metric"] == metric)]
    wide = rows.pivot_table(index=["seed", "layer", "step"], columns="norm", values="value")
    if not {"none", "bn"} <= set(wide.columns):  # a sweep without this arch, or with one norm only
        keys = pd.MultiIndex.from_arrays([[], [], []], names=["seed", "layer", "step"])
        return pd.DataFrame(columns=["none", "bn"], index=keys, dtype=float)
    return wide[["none", "bn"]].dropna()


def mean_log_ratio(df: pd.DataFrame, arch: str, metric: str) -> np.ndarray:
    """Per seed: mean over (layer, step) of log(metric with BN / metric without BN)."""
    wide = _paired_ics(df, arch, metric)
    return np.log(wide["bn"] / wide["none"]).groupby(level="seed").mean().to_numpy()


def mean_difference(df: pd.DataFrame, arch: str, metric: str) -> np.ndarray:
    """Per seed: mean over (layer, step) of metric with BN minus metric without BN."""
    wide = _paired_ics(df, arch, metric)
    return (wide["bn"] - wide["none"]).groupby(level="seed").mean().to_numpy()


def final_accuracy_difference(df: pd.DataFrame, arch: str) -> np.ndarray:
    """Per seed: final test accuracy with BN minus without (runs of ``arch``)."""
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy") & (df["arch"] == arch)]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()]
    wide = last.pivot_table(index="seed", columns="norm", values="value")
    if not {"none", "bn"} <= set(wide.columns):
        return np.array([])
    return (wide["bn"] - wide["none"]).dropna().to_numpy()


def claims(df: pd.DataFrame) -> list[Claim]:
    sources = {"vgg": "Santurkar et al. 2018, Fig. 3", "dln": "Santurkar et al. 2018, Fig. 5"}
    found = []
    for metric, what in (("l2", "ℓ2 difference ‖G − G'‖"), ("relative_l2", "relative ℓ2 difference")):
        for arch in ("vgg", "dln"):
            found.append(
                test_claim(
                    f"BN does not reduce internal covariate shift (Def. 2.1, {what}) in the "
                    f"{ARCH_LABELS[arch]}",
                    sources[arch],
                    f"log({METRIC_LABELS[metric]} with BN / without BN), mean over layers 2..k and "
                    "probe steps",
                    mean_log_ratio(df, arch, metric),
                    threshold=0.0,
                    direction=">=",
                )
            )
    found.append(
        test_claim(
            "In the deep linear network, G and G' are far less correlated with BN than without",
            sources["dln"],
            "cos(G, G') with BN minus without, mean over layers 2..k and probe steps",
            mean_difference(df, "dln", "cosine"),
            threshold=0.0,
            direction="<",
        )
    )
    found.append(
        test_claim(
            "BN does not make G and G' more correlated in the VGG",
            sources["vgg"],
            "cos(G, G') without BN minus with BN, mean over layers 2..k and probe steps",
            -mean_difference(df, "vgg", "cosine"),
            threshold=0.0,
            direction=">=",
        )
    )
    for arch in ("vgg", "dln"):
        found.append(
            test_claim(
                f"The {ARCH_LABELS[arch]} with BN performs better than without",
                sources[arch],
                "final test accuracy with BN minus without",
                final_accuracy_difference(df, arch),
                threshold=0.0,
                direction=">",
            )
        )
    return found


def shown_layers(indices: list[int]) -> list[int]:
    """An early, a middle and the last of the recorded layer indices (fewer if fewer exist)."""
    ordered = sorted(set(indices))
    picks = [ordered[0], ordered[len(ordered) // 2], ordered[-1]]
    return sorted(set(picks))


def _draw_over_training(df: pd.DataFrame, archs: list[str], norms: list[str], out_dir: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = norm_palette(norms)
    metrics = ("l2", "relative_l2", "cosine")
    fig, axes = plt.subplots(
        len(archs), 1 + len(metrics), figsize=(3.3 * (1 + len(metrics)), 2.8 * len(archs)), squeeze=False
    )
    letters = iter("abcdefghijklmnop")
    for row, arch in zip(axes, archs, strict=True):
        name = ARCH_LABELS.get(arch, arch)
        loss = df[(df["arch"] == arch) & (df["probe"] == "train") & (df["metric"] == "loss")]
        sns.lineplot(
            loss, x="step", y="value", hue="norm", hue_order=norms, palette=palette, errorbar=None, ax=row[0]
        )
        row[0].set(title=f"({next(letters)}) {name}: training loss", xlabel="training step", ylabel="loss")
        row[0].set_yscale("log")
        labeled_legend(row[0], loc="upper right")
        ics = df[(df["arch"] == arch) & (df["probe"] == PROBE)].copy()
        ics = ics[ics["layer_index"].isin(shown_layers(ics["layer_index"].astype(int).tolist()))]
        ics["layer #"] = ics["layer_index"].astype(int)
        for ax, metric in zip(row[1:], metrics, strict=True):
            sns.lineplot(
                ics[ics["metric"] == metric],
                x="step",
                y="value",
                hue="norm",
                hue_order=norms,
                palette=palette,
                style="layer #",
                errorbar=None,
                ax=ax,
            )
            ax.set(
                title=f"({next(letters)}) {name}: {METRIC_LABELS[metric]}", xlabel="training step", ylabel=""
            )
            if metric == "cosine":
                ax.ticklabel_format(axis="y", useOffset=False)
            else:
                ax.set_yscale("log")
            if metric == "l2":
                labeled_legend(ax, loc="best", fontsize="x-small")
            else:
                ax.get_legend().remove()
    fig.tight_layout()
    save_figure(fig, out_dir, "ics")


def _draw_by_layer(df: pd.DataFrame, archs: list[str], norms: list[str], out_dir: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = norm_palette(norms)
    metrics = ("l2", "relative_l2", "cosine", "grad_norm")
    fig, axes = plt.subplots(
        len(archs), len(metrics), figsize=(3.3 * len(metrics), 2.8 * len(archs)), squeeze=False
    )
    letters = iter("abcdefghijklmnop")
    ics = df[df["probe"] == PROBE]
    per_run = ics.groupby(["arch", "norm", "seed", "layer_index", "metric"], as_index=False)["value"].mean()
    for row, arch in zip(axes, archs, strict=True):
        for ax, metric in zip(row, metrics, strict=True):
            part = per_run[(per_run["arch"] == arch) & (per_run["metric"] == metric)]
            sns.lineplot(
                part,
                x="layer_index",
                y="value",
                hue="norm",
                hue_order=norms,
                palette=palette,
                errorbar=("pi", 100),
                marker="o",
                ax=ax,
            )
            ax.set(
                title=f"({next(letters)}) {ARCH_LABELS.get(arch, arch)}: {METRIC_LABELS[metric]}",
                xlabel="layer #",
                ylabel="mean over training",
            )
            if metric == "cosine":
                ax.ticklabel_format(axis="y", useOffset=False)
            else:
                ax.set_yscale("log")
            if metric == "l2":
                labeled_legend(ax, loc="best")
            else:
                ax.get_legend().remove()
    fig.tight_layout()
    save_figure(fig, out_dir, "ics_by_layer")


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    use_style()
    norms = ordered_norms(df["norm"].unique())
    archs = [a for a in ("vgg", "dln") if a in set(df["arch"])]
    _draw_over_training(df, archs, norms, out_dir)
    _draw_by_layer(df, archs, norms, out_dir)
    return claims(df)


STUDY = Study(
    name="ics",
    title="Internal covariate shift as gradient change (Def. 2.1), with and without BN",
    reproduces="Santurkar et al. 2018, Figs. 3 and 5",
    figures=("ics", "ics_by_layer"),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
)
