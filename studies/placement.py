"""Placement — batch norm before or after the nonlinearity? (Ioffe & Szegedy 2015, §3.2, an open question)

Ioffe & Szegedy 2015 (§3.2) put BN between the affine layer and the nonlinearity, x = W u + b →
BN(x) → g(·), arguing that W u + b is "more likely to have a symmetric, non-sparse distribution"
than the layer input u (their saturation argument, §1 and §4.2, is for BN against no BN); many
later practitioners put BN after the activation instead, and the literature has no settled answer.
We compare the two placements (``make_net(..., placement="before" | "after")``; "after" is
layer → act → BN) for three activations — ReLU, tanh and sigmoid — with a no-norm baseline.

Setup. The quick preset trains the MLP of Ioffe & Szegedy's Fig. 1 (3 hidden layers of 100 units,
PyTorch's default init) on MNIST-1D (4000 training, 1000 test examples) with SGD (momentum 0.9,
lr 0.1, batch 60, 2000 updates = 30 epochs, constant rate), 5 seeds; runs of one seed share the
initial weights of the affine layers and the order of the minibatches. Variants (key ``variant``):
``bn_before`` (layer → BN → act), ``bn_after`` (layer → act → BN), ``none`` (layer → act). Recorded:

* the training loop's rows (minibatch loss and accuracy every 100 updates, test loss and accuracy
  every 250);
* every ``probe_every`` = 200 updates, on a fixed probe batch (the first 500 test examples; BN with the
  probe batch's statistics, ``bn="batch"``, as in training, no running statistic updated), for each
  hidden layer the input z of the activation (probe ``saturation``): ``saturated_fraction`` = the
  fraction of (example, unit) pairs where the activation's derivative is below 10% of its maximum,
  g'(z) < 0.1 · max g' (sigmoid: σ(z)(1 − σ(z)) < 0.025, i.e. |z| > 3.64; tanh: 1 − tanh² z < 0.1,
  |z| > 1.82; ReLU: z ≤ 0, an inactive unit), ``dead_fraction`` = the fraction of units saturated on
  every probe example, and ``mean_abs_input`` = mean |z|; layer ``"all"`` is the mean over the layers;
* at ``landscape_steps`` (0, 500, 1000, 2000) the loss landscape along the gradient of the update's
  minibatch (probe ``landscape``, ``probes.smoothness.landscape_along_gradient``, ``bn="batch"``), at
  step sizes η = lr × (0.5, 1, 2): the summaries ``beta_eff``, ``loss_range``, ``max_grad_distance``,
  ``grad_norm``, ``loss_at_w`` (Santurkar et al. 2018's effective β-smoothness, a candidate explanation
  of differences in speed).

The paper preset adds the 1-D/2-D VGG (6 conv layers), Fashion-MNIST, three learning rates (0.02, 0.1,
0.5) and 10k updates.

Claims tested (from the records; one value per seed, paired by seed; per activation and learning rate):

1. *BN before the nonlinearity (Ioffe & Szegedy's choice) is not worse than after.* Statistic = final
   test accuracy with ``bn_before`` minus with ``bn_after``; a non-inferiority test with margin 0.01
   (one percentage point): holds if the 95% CI's lower end is above −0.01.
2. *For saturating activations (sigmoid, tanh), BN before the activation keeps fewer units saturated
   than BN after it* (our extrapolation of Ioffe & Szegedy: their saturation argument, §1 and §4.2,
   compares BN with no BN; §3.2 argues for the placement from the pre-activation's more Gaussian
   distribution; the paper compares no saturation between placements). Statistic =
   ``saturated_fraction`` (mean over hidden layers) with ``bn_after`` minus with ``bn_before``,
   averaged over the probe steps t > 0; holds if the 95% CI's lower end is above 0.

A run that diverged (the train loop's ``diverged`` row) has no final accuracy and no saturation over
training: its last records are from before it blew up, often its untrained initial net. It leaves its
pair out; a case whose pairs all left has ``n`` = 0 and does not hold.

Figure ``placement``: one row per activation (and learning rate): (a) test accuracy over training,
(b) the saturated fraction over training (ReLU: inactive fraction), (c) β_eff at the landscape steps.
Figure ``placement_accuracy``: final test accuracy per seed and variant.

Reproduce::

    whybn run placement                    # quick preset, ~3 minutes on 2 idle CPU cores
    whybn run placement --preset paper --device cuda
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.claims import Claim, test_claim
from analysis.load import diverged_runs, finished
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, save_figure, use_style
from probes.activations import capture_layer_inputs
from probes.functional import norm_mode
from probes.smoothness import landscape_along_gradient
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

#: Network variants: name → (norm, placement). Without a norm the placement is moot ("before").
VARIANTS: dict[str, tuple[str, str]] = {
    "none": ("none", "before"),
    "bn_before": ("bn", "before"),
    "bn_after": ("bn", "after"),
}
VARIANT_LABELS = {
    "none": NORM_LABELS["none"],
    "bn_before": "BN before act.",
    "bn_after": "BN after act.",
}
SATURATING = ("sigmoid", "tanh")
#: A unit is saturated on an example when g'(z) < SATURATION_LEVEL · max g'.
SATURATION_LEVEL = 0.1
NONINFERIORITY_MARGIN = 0.01
LANDSCAPE_SUMMARIES = ("beta_eff", "loss_range", "max_grad_distance", "grad_norm", "loss_at_w")
SOURCE = "Ioffe & Szegedy 2015, §3.2"
SOURCE_SATURATION = "Ioffe & Szegedy 2015, §1 and §4.2 (saturation with vs without BN), extrapolated"


@dataclass(frozen=True)
class Config:
    archs: tuple[str, ...] = ("mlp",)
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid")
    variants: tuple[str, ...] = ("none", "bn_before", "bn_after")  # names of VARIANTS
    lrs: tuple[float, ...] = (0.1,)
    seeds: int = 5
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    mlp_depth: int = 3
    mlp_width: int = 100
    vgg_depth: int = 6
    vgg_width: int = 16
    init: str = "torch"
    momentum: float = 0.9
    batch_size: int = 60
    steps: int = 2000
    log_every: int = 100
    eval_every: int = 250
    probe_every: int = 200
    probe_size: int = 500  # the first probe_size test examples
    probe_bn: str = "batch"  # how BN normalizes in the probes: "batch" (training loss) or "running"
    landscape_steps: tuple[int, ...] = (0, 500, 1000, 2000)
    step_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)  # η = lr × each


QUICK = Config()
PAPER = replace(
    QUICK,
    archs=("mlp", "vgg"),
    lrs=(0.02, 0.1, 0.5),
    seeds=5,
    dataset="fashion_mnist",
    steps=10_000,
    eval_every=500,
    probe_every=500,
    probe_size=1000,
    landscape_steps=(0, 1000, 2500, 5000, 10_000),
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per arch, activation, variant, learning rate and seed."""
    per_run = ("archs", "activations", "variants", "lrs", "seeds")
    skip = {*per_run, "mlp_depth", "mlp_width", "vgg_depth", "vgg_width"}
    base = {k: v for k, v in asdict(config).items() if k not in skip}
    sizes = {"mlp": (config.mlp_depth, config.mlp_width), "vgg": (config.vgg_depth, config.vgg_width)}
    unknown = [a for a in config.archs if a not in sizes]
    if unknown:
        raise ValueError(f"placement: archs must be among {', '.join(sizes)}, got {', '.join(unknown)}")
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"placement: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    runs = []
    for arch in config.archs:
        depth, width = sizes[arch]
        for activation in config.activations:
            for name in config.variants:
                norm, placement = VARIANTS[name]
                case = {"arch": arch, "depth": depth, "width": width, "activation": activation}
                case |= {"variant": name, "norm": norm, "placement": placement}
                runs += [
                    {**case, "lr": lr, "seed": seed, **base}
                    for lr in config.lrs
                    for seed in range(config.seeds)
                ]
    return runs


def relative_derivative(activation: str, z: Tensor) -> Tensor:
    """g'(z) / max g' for the activation g: sigmoid σ(1 − σ)/¼, tanh 1 − tanh², ReLU 1[z > 0]."""
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return 4 * s * (1 - s)
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    if activation == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"no saturation rule for activation {activation!r}; known: sigmoid, tanh, relu")


def saturation_probe(
    probe_x: Tensor, activation: str, bn: str = "batch"
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: per hidden layer, how saturated the activation's inputs z are on a fixed batch.

    Rows (probe ``saturation``, layer = the activation module's name, and ``"all"`` = mean over
    layers): ``saturated_fraction`` (fraction of (example, unit) pairs with g'(z) < 0.1 · max g'),
    ``dead_fraction`` (fraction of units saturated on every example; channels × positions count as
    units in a conv net) and ``mean_abs_input`` (mean |z|).
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        acts = dict(ctx.model.named_activations())
        with torch.no_grad(), norm_mode(ctx.model, bn), capture_layer_inputs(ctx.model, acts) as inputs:
            ctx.model(probe_x.to(ctx.device))
        rows = []
        for name in acts:
            z = inputs[name].double().flatten(1)  # (probe_size, units)
            saturated = relative_derivative(activation, z) < SATURATION_LEVEL
            values = {
                "saturated_fraction": float(saturated.double().mean()),
                "dead_fraction": float(saturated.all(dim=0).double().mean()),
                "mean_abs_input": float(z.abs().mean()),
            }
            rows += [{"layer": name, "metric": m, "value": v} for m, v in values.items()]
        for metric in ("saturated_fraction", "dead_fraction", "mean_abs_input"):
            mean = np.mean([r["value"] for r in rows if r["metric"] == metric])
            rows.append({"layer": "all", "metric": metric, "value": float(mean)})
        return rows

    return probe


def landscape_probe(
    step_sizes: Sequence[float], bn: str = "batch"
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: the summaries of ``landscape_along_gradient`` on the update's minibatch."""

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = landscape_along_gradient(ctx.model, ctx.loss_fn, ctx.batch, step_sizes=step_sizes, bn=bn)
        return [r for r in result.to_records() if r["metric"] in LANDSCAPE_SUMMARIES]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train one (arch, activation, variant, lr, seed) with the saturation and landscape probes."""
    data = load_run_data(rc)
    model = make_run_net(rc, data.info)
    probe_x = data.test.tensors[0][: rc["probe_size"]]
    schedules = [
        ProbeSchedule(
            saturation_probe(probe_x, rc["activation"], rc["probe_bn"]),
            every=rc["probe_every"],
            name="saturation",
        ),
        ProbeSchedule(
            landscape_probe([rc["lr"] * m for m in rc["step_multipliers"]], rc["probe_bn"]),
            steps=[s for s in rc["landscape_steps"] if s <= rc["steps"]],
            name="landscape",
        ),
    ]
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd"),
        probes=schedules,
        desc=f"placement {rc['arch']} {rc['activation']} {rc['variant']} lr{rc['lr']:g} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis

KEYS = ["arch", "activation", "lr", "seed"]


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: the test accuracy of the last evaluation (columns KEYS, variant, test_accuracy); NaN for
    a run that diverged (its last evaluation is from before, not the end of training)."""
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()]
    last = last.assign(value=last["value"].where(~last["run_id"].isin(diverged_runs(df))))
    return last[[*KEYS, "variant", "value"]].rename(columns={"value": "test_accuracy"})


def mean_saturation(df: pd.DataFrame) -> pd.DataFrame:
    """Per run that did not diverge: ``saturated_fraction`` of layer "all" averaged over the probe
    steps t > 0."""
    rows = df[
        (df["probe"] == "saturation")
        & (df["metric"] == "saturated_fraction")
        & (df["layer"] == "all")
        & (df["step"] > 0)
        & finished(df)
    ]
    return rows.groupby([*KEYS, "variant"], as_index=False)["value"].mean()


def paired_difference(per_run: pd.DataFrame, column: str, a: str, b: str) -> pd.Series:
    """``column`` of variant a minus variant b, indexed by (arch, activation, lr, seed); paired runs only."""
    wide = per_run.pivot_table(index=KEYS, columns="variant", values=column)
    if not {a, b} <= set(wide.columns):
        return pd.Series(dtype=float)
    return (wide[a] - wide[b]).dropna()


def _cases(
    df: pd.DataFrame, diff: pd.Series, a: str, b: str
) -> list[tuple[tuple[str, str, float], np.ndarray]]:
    """((arch, activation, lr), per-seed values of ``diff``) for every case where both variants ``a``
    and ``b`` were run: a case whose pairs all left (diverged runs) gets no values, so that its claim
    says n = 0 instead of vanishing."""
    runs = df[df["variant"].isin([a, b])][[*KEYS[:3], "variant"]].drop_duplicates()
    both = runs.groupby(KEYS[:3])["variant"].nunique() == 2
    parts = {} if diff.empty else dict(list(diff.groupby(level=KEYS[:3])))
    return [(case, parts[case].to_numpy() if case in parts else np.array([])) for case in both[both].index]


def claims(df: pd.DataFrame) -> list[Claim]:
    """Claim 1 per (arch, activation, lr), then claim 2 per (arch, saturating activation, lr)."""
    result = []
    accuracy = paired_difference(final_accuracy(df), "test_accuracy", "bn_before", "bn_after")
    for (arch, activation, lr), values in _cases(df, accuracy, "bn_before", "bn_after"):
        result.append(
            test_claim(
                f"BN before the {activation} is not worse than after it ({arch}, lr {lr:g}): "
                f"final test accuracy within {NONINFERIORITY_MARGIN:g}",
                SOURCE,
                "final test accuracy with BN before the activation minus with BN after it",
                values,
                threshold=-NONINFERIORITY_MARGIN,
                direction=">",
            )
        )
    saturation = paired_difference(mean_saturation(df), "value", "bn_after", "bn_before")
    for (arch, activation, lr), values in _cases(df, saturation, "bn_after", "bn_before"):
        if activation not in SATURATING:
            continue
        result.append(
            test_claim(
                f"BN before the {activation} keeps fewer units saturated than after it ({arch}, lr {lr:g})",
                SOURCE_SATURATION,
                f"fraction of (example, unit) pairs with g'(z) < {SATURATION_LEVEL:g} max g' on the probe "
                "batch, mean over hidden layers and probe steps t > 0, BN after minus BN before",
                values,
                threshold=0.0,
                direction=">",
            )
        )
    return result


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    variants = [v for v in VARIANTS if v in set(df["variant"])]
    palette = norm_palette(variants)
    labels = [VARIANT_LABELS[v] for v in variants]
    cases = df[KEYS[:3]].drop_duplicates().sort_values(KEYS[:3]).itertuples(index=False)
    cases = list(cases)
    fig, axes = plt.subplots(len(cases), 3, figsize=(10, 2.6 * len(cases)), squeeze=False)
    for row, (arch, activation, lr) in zip(axes, cases, strict=True):
        part = df[(df["arch"] == arch) & (df["activation"] == activation) & (df["lr"] == lr)]
        where = f"{arch}, {activation}, lr {lr:g}"
        acc = part[(part["probe"] == "eval") & (part["metric"] == "test_accuracy")]
        sat = part[
            (part["probe"] == "saturation")
            & (part["metric"] == "saturated_fraction")
            & (part["layer"] == "all")
        ]
        beta = part[(part["probe"] == "landscape") & (part["metric"] == "beta_eff")]
        for ax, data in zip(row, (acc, sat, beta), strict=True):
            sns.lineplot(
                data,
                x="step",
                y="value",
                hue="variant",
                hue_order=variants,
                palette=palette,
                errorbar=("pi", 100),
                marker="o" if data is beta else None,
                ax=ax,
                legend=False,
            )
        saturated = (
            "inactive (z ≤ 0)" if activation == "relu" else f"saturated (g' < {SATURATION_LEVEL:g} max)"
        )
        row[0].set(title=f"(a) test accuracy, {where}", xlabel="training step", ylabel="accuracy")
        row[1].set(title=f"(b) {saturated}", xlabel="training step", ylabel="fraction of unit inputs")
        row[2].set(title="(c) effective β-smoothness", xlabel="training step", ylabel="β_eff", yscale="log")
    handles = [plt.Line2D([], [], color=palette[v]) for v in variants]
    axes[0][0].legend(handles, labels, loc="lower right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "placement")

    final = final_accuracy(df)
    final["case"] = [
        f"{a}, {act}, lr {lr:g}" for a, act, lr in final[["arch", "activation", "lr"]].itertuples(index=False)
    ]
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * final["case"].nunique(), 3))
    style = {"x": "case", "y": "test_accuracy", "hue": "variant", "hue_order": variants, "palette": palette}
    sns.stripplot(final, **style, dodge=True, ax=ax)
    sns.pointplot(
        final, **style, dodge=0.53, errorbar=None, markers="_", linestyles="none", ax=ax, legend=False
    )
    labeled_legend(ax, VARIANT_LABELS, loc="best", fontsize="small")
    ax.set(title="final test accuracy (dots: seeds, bars: means)", xlabel="", ylabel="test accuracy")
    fig.tight_layout()
    save_figure(fig, out_dir, "placement_accuracy")
    return claims(df)


STUDY = Study(
    name="placement",
    title="Batch norm before or after the nonlinearity: accuracy, saturation, smoothness",
    reproduces="Ioffe & Szegedy 2015, §3.2 (BN before the nonlinearity), tested against BN after it",
    figures=("placement", "placement_accuracy"),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "activation", "variant", "lr", "seed"),
    config_columns=("activation", "variant", "placement", "lr"),
)
