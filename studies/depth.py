"""Depth at initialization — BN's gradient explosion (Yang et al. 2019) and its avoidance of rank
collapse (Daneshmand et al. 2020).

No training: deep fully connected networks are built at random initializations of several depths and
measured on one minibatch of MNIST-1D, batch-dependent norms normalizing with that batch's statistics
(``bn="batch"``, the training network; no running statistic is updated).

(a) *Gradient explosion.* Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019 ("A mean field
theory of batch normalization", Thm. 3.10 and §3.3) show that in a wide BN–ReLU MLP at initialization
the gradient norm grows backwards (towards the input) geometrically, by √(π/(π−1)) ≈ 1.2112 per layer
in the large width and batch limit, while a ReLU MLP without BN and with He init keeps it constant.
Experiment ``gradient``: ReLU MLPs (placement layer → BN → ReLU), He/Kaiming-normal init with zero
biases, width 256, cross-entropy on a batch of 256 training examples (a seeded random draw), depths
5, 10, 20, 30, 50 hidden layers, norms none and BN, 8 seeds. ``probes.gradients.layer_gradient_norms``
gives ‖∇W_l‖_F for the hidden-to-hidden layers ``blocks.1 … blocks.{L−1}`` (the input layer, fan-in
40, and the head are left out, as its docstring advises) and the growth rate r fitted by least squares,
log‖∇W_l‖ = a + l·log r with l counted from the output.

(b) *Rank collapse.* Daneshmand, Kohler, Bach, Hofmann & Lucchi 2020 ("Batch normalization provably
avoids rank collapse for randomly initialised deep networks") show that without normalization the
representation of a batch in a deep random network collapses towards rank one with depth (all
examples map to nearly one direction), while with BN its rank stays Ω(√d) at any depth (their theorem
is for linear networks; their experiments include ReLU ones). Experiment ``rank``: a deep *linear*
network (``dln``, Gaussian weights of variance 2/(fan_in + fan_out) = 1/d between hidden layers,
Xavier-normal) and a ReLU MLP (He init), width d = 32, a batch of N = 32 examples, depths 2, 5, 10,
20, 50, 100, norms none, BN, LayerNorm and GroupNorm (8 groups), 8 seeds.
``probes.conditioning.rank_collapse`` measures the representation H (N × d) fed to the head: the soft
rank r(H) = tr(HHᵀ)²/‖HHᵀ‖²_F (``effective_rank``, uncentered as in the paper), the stable rank, the
mean pairwise cosine and the singular values.

Claims tested (from the records; one value per seed; "deepest" = the largest depth of the experiment):

1. *With BN, gradients grow backwards by √(π/(π−1)) per layer* (Yang et al.). Statistic =
   |log(r_BN / √(π/(π−1)))| at the deepest depth; holds if the 95% CI's upper end is below log 1.05
   (within 5% of the theory).
2. *…and they explode (r > 1).* Statistic = r_BN − 1 at the deepest depth; holds if the CI's lower
   end is above 0.
3. *Without BN (He init) gradients neither grow nor vanish geometrically (r ≈ 1).* Statistic =
   |log r_none| at the deepest depth; holds if the CI's upper end is below log 1.05. A per-layer
   rate, not a constant norm: the gradient nearest the input is about 0.36× the one nearest the
   output at every depth (the input and output layers' other fan-in and fan-out), a fixed drop the
   fit spreads over the depth (|log r| = 0.17 at 5 layers, 0.013 at 50), so the claim is about the
   deep end of the grid.
4. *Without normalization the rank collapses with depth* (Daneshmand et al.), per net. Statistic =
   log(r(H) at the deepest depth / r(H) at the shallowest), no norm; holds if the CI's upper end is
   below 0.
5. *With BN the rank stays bounded away from 1*, per net. Statistic = r(H) with BN at the deepest
   depth; holds if the CI's lower end is above 2 (the theorem's Ω(√d) has unstated constants; twice
   the collapsed value 1 is our rule, √d ≈ 5.7 is shown in the figure for reference).
6. *BN keeps the rank higher than no normalization*, per net. Statistic = log(r(H) with BN / without)
   at the deepest depth, paired by seed; holds if the CI's lower end is above 0.

Figure ``depth``: (a) ‖∇W_l‖ against the layer's distance from the output at the deepest depth (median
over seeds, band: min–max), with the slope √(π/(π−1)); (b) the fitted growth rate against depth;
(c, d) the soft rank r(H) against depth for the linear and the ReLU net, one line per norm.

Reproduce::

    whybn run depth                    # quick preset, ~20 seconds on 2 idle CPU cores
    whybn run depth --preset paper --device cuda
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analysis.claims import Claim, test_claim
from analysis.style import labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.conditioning import rank_collapse
from probes.gradients import BN_RELU_GRADIENT_GROWTH, layer_gradient_norms
from studies.lab.data import dataset_info, load_dataset, run_data_options
from studies.lab.nets import make_net
from studies.lab.study import RunContext, Study

#: Net names of the grid: (arch, activation, init).
NETS: dict[str, tuple[str, str, str]] = {
    "linear": ("dln", "identity", "xavier"),
    "relu": ("mlp", "relu", "kaiming"),
}
NET_LABELS = {"linear": "linear net", "relu": "ReLU net"}
#: The rows kept of each probe (the per-layer weight norms and the singular values are left out).
GRADIENT_METRICS = ("grad_norm", "growth_rate", "loss")
RANK_METRICS = ("effective_rank", "stable_rank", "mean_cosine", "centered_effective_rank", "numerical_rank")
#: Claims 1 and 3: "within 5%" of the predicted growth rate.
GROWTH_TOLERANCE = math.log(1.05)
#: Claim 5: the soft rank with BN must stay above this (1 = complete collapse).
RANK_FLOOR = 2.0
SOURCE_YANG = "Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, Thm. 3.10"
SOURCE_DANESHMAND = "Daneshmand, Kohler, Bach, Hofmann & Lucchi 2020"


@dataclass(frozen=True)
class Config:
    seeds: int = 8
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset size for fashion_mnist, gaussian, cifar10 (None: all)
    probe_bn: str = "batch"  # how BN normalizes: "batch" (the training network) or "running"
    grad_norms: tuple[str, ...] = ("none", "bn")
    grad_depths: tuple[int, ...] = (5, 10, 20, 30, 50)  # hidden layers
    grad_width: int = 256
    grad_batch: int = 256
    rank_nets: tuple[str, ...] = ("linear", "relu")  # names of NETS
    rank_norms: tuple[str, ...] = ("none", "bn", "ln", "gn")
    rank_depths: tuple[int, ...] = (2, 5, 10, 20, 50, 100)
    rank_width: int = 32
    rank_batch: int = 32


QUICK = Config()
PAPER = replace(
    QUICK,
    seeds=20,
    dataset="fashion_mnist",
    grad_norms=("none", "bn", "ln"),
    grad_depths=(5, 10, 20, 50, 100),
    grad_width=1024,
    grad_batch=1024,
    rank_norms=("none", "bn", "ln", "gn", "dbn", "iternorm"),
    rank_depths=(2, 5, 10, 20, 50, 100, 200),
    rank_width=64,
    rank_batch=64,
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per experiment, net, norm and seed; a run measures every depth of its experiment."""
    base = {"dataset": config.dataset, "data_root": config.data_root, "n_train": config.n_train}
    base["probe_bn"] = config.probe_bn
    experiments = [
        ("gradient", "relu", config.grad_norms, config.grad_depths, config.grad_width, config.grad_batch)
    ]
    experiments += [
        ("rank", net, config.rank_norms, config.rank_depths, config.rank_width, config.rank_batch)
        for net in config.rank_nets
    ]
    unknown = [n for n in config.rank_nets if n not in NETS]
    if unknown:
        raise ValueError(f"depth: unknown net(s) {', '.join(unknown)} in rank_nets; known: {', '.join(NETS)}")
    runs = []
    for experiment, net, norms, depths, width, batch in experiments:
        arch, activation, init = NETS[net]
        case = {"experiment": experiment, "net": net, "arch": arch, "activation": activation, "init": init}
        case |= {"depths": depths, "width": width, "batch_size": batch}
        runs += [
            {**case, "norm": norm, "seed": seed, **base} for norm in norms for seed in range(config.seeds)
        ]
    return runs


def _batch(rc: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """A seeded random batch of ``batch_size`` training examples, the input shape and class count."""
    train_set, _ = load_dataset(rc["dataset"], **run_data_options(rc))  # as every other study
    info = dataset_info(train_set)
    generator = torch.Generator().manual_seed(rc["seed"])
    index = torch.randperm(len(train_set), generator=generator)[: rc["batch_size"]]
    x, y = train_set.tensors
    return x[index], y[index], info.in_shape, info.num_classes


def _renamed(row: dict[str, Any]) -> dict[str, Any]:
    """A gradient-norm row with the probe's ``depth`` (the layer's position among those measured)
    renamed ``layer_index``, so that it is not confused with the network's depth ``net_depth``."""
    row = dict(row)
    if "depth" in row:
        row["layer_index"] = row.pop("depth")
    return row


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Measure the net at every depth at initialization; rows carry ``net_depth`` (hidden layers)."""
    x, y, in_shape, num_classes = _batch(rc)
    x, y = x.to(ctx.device), y.to(ctx.device)
    rows = []
    for depth in rc["depths"]:
        torch.manual_seed(rc["seed"])
        model = make_net(
            rc["arch"],
            norm=rc["norm"],
            in_shape=in_shape,
            num_classes=num_classes,
            depth=depth,
            width=rc["width"],
            activation=rc["activation"],
            init=rc["init"],
        ).to(ctx.device)
        if rc["experiment"] == "gradient":
            hidden = [f"blocks.{i}.layer" for i in range(1, depth)]
            result = layer_gradient_norms(model, F.cross_entropy, (x, y), bn=rc["probe_bn"], layers=hidden)
            records = [_renamed(row) for row in result.to_records() if row["metric"] in GRADIENT_METRICS]
        else:
            result = rank_collapse(model, x, bn=rc["probe_bn"])
            records = [row for row in result.to_records() if row["metric"] in RANK_METRICS]
        rows += [{"step": 0, **row, "net_depth": depth} for row in records]
    return rows


# ----------------------------------------------------------------------------------------------------
# analysis


def growth_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Per (norm, seed, net_depth): the fitted gradient growth rate r (column ``value``)."""
    rows = df[(df["experiment"] == "gradient") & (df["metric"] == "growth_rate")]
    return rows[["norm", "seed", "net_depth", "value"]].reset_index(drop=True)


def soft_ranks(df: pd.DataFrame) -> pd.DataFrame:
    """Per (net, norm, seed, net_depth): r(H) = tr(HHᵀ)²/‖HHᵀ‖²_F of the head's input (``value``)."""
    rows = df[(df["experiment"] == "rank") & (df["metric"] == "effective_rank")]
    return rows[["net", "norm", "seed", "net_depth", "value"]].reset_index(drop=True)


def _at_depth(table: pd.DataFrame, depth: int, **where: str) -> pd.Series:
    """``value`` by seed at ``net_depth == depth`` for the rows matching ``where``."""
    mask = table["net_depth"] == depth
    for key, value in where.items():
        mask &= table[key] == value
    return table[mask].set_index("seed")["value"].sort_index()


def claims(df: pd.DataFrame) -> list[Claim]:
    """The claims of the module docstring in its order (1–3, then 4–6 per net)."""
    result = []
    rates = growth_rates(df)
    if not rates.empty:
        deepest = int(rates["net_depth"].max())
        bn = _at_depth(rates, deepest, norm="bn")
        none = _at_depth(rates, deepest, norm="none")
        theory = BN_RELU_GRADIENT_GROWTH
        result += [
            test_claim(
                f"With BN, the gradient norm grows backwards by √(π/(π−1)) = {theory:.4f} per layer "
                f"(ReLU MLP, {deepest} hidden layers, within 5%)",
                SOURCE_YANG,
                "|log(fitted per-layer growth rate with BN / √(π/(π−1)))|",
                np.abs(np.log(bn.to_numpy() / theory)),
                threshold=GROWTH_TOLERANCE,
                direction="<",
            ),
            test_claim(
                f"With BN, gradients explode backwards at initialization (ReLU MLP, {deepest} hidden layers)",
                SOURCE_YANG,
                "fitted per-layer growth rate with BN minus 1",
                bn.to_numpy() - 1,
                threshold=0.0,
                direction=">",
            ),
            test_claim(
                f"Without BN (He init) the gradient norm does not grow geometrically with depth (ReLU MLP, "
                f"{deepest} hidden layers, fitted per-layer rate within 5% of 1)",
                SOURCE_YANG,
                "|log(fitted per-layer growth rate without norm)|",
                np.abs(np.log(none.to_numpy())),
                threshold=GROWTH_TOLERANCE,
                direction="<",
            ),
        ]
    ranks = soft_ranks(df)
    for net in [n for n in NETS if n in set(ranks["net"])]:
        part = ranks[ranks["net"] == net]
        shallow, deep = int(part["net_depth"].min()), int(part["net_depth"].max())
        none_deep = _at_depth(part, deep, norm="none")
        bn_deep = _at_depth(part, deep, norm="bn")
        paired = pd.concat({"none": none_deep, "bn": bn_deep}, axis=1).dropna()
        result += [
            test_claim(
                f"Without normalization the rank of the last representation collapses with depth "
                f"({NET_LABELS[net]}, depth {shallow} → {deep})",
                SOURCE_DANESHMAND,
                f"log(soft rank r(H) at depth {deep} / at depth {shallow}), no norm",
                np.log(none_deep / _at_depth(part, shallow, norm="none")).dropna().to_numpy(),
                threshold=0.0,
                direction="<",
            ),
            test_claim(
                f"With BN the rank of the last representation stays bounded away from 1 "
                f"({NET_LABELS[net]}, depth {deep})",
                SOURCE_DANESHMAND,
                f"soft rank r(H) = tr(HHᵀ)²/‖HHᵀ‖²_F with BN at depth {deep} (must exceed {RANK_FLOOR:g})",
                bn_deep.to_numpy(),
                threshold=RANK_FLOOR,
                direction=">",
            ),
            test_claim(
                f"BN keeps the rank of the last representation higher than no normalization "
                f"({NET_LABELS[net]}, depth {deep})",
                SOURCE_DANESHMAND,
                f"log(soft rank with BN / without norm) at depth {deep}",
                np.log(paired["bn"] / paired["none"]).to_numpy(),
                threshold=0.0,
                direction=">",
            ),
        ]
    return result


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    nets = [n for n in NETS if n in set(df[df["experiment"] == "rank"]["net"])]
    fig, axes = plt.subplots(1, 2 + len(nets), figsize=(3.4 * (2 + len(nets)), 3.0), squeeze=False)
    axes = axes[0]
    theory = BN_RELU_GRADIENT_GROWTH

    grads = df[(df["experiment"] == "gradient") & (df["metric"] == "grad_norm")].copy()
    if not grads.empty:
        deepest = int(grads["net_depth"].max())
        grads = grads[grads["net_depth"] == deepest]
        grads["from_output"] = grads["net_depth"] - 2 - grads["layer_index"]  # 0: the last hidden layer
        last = grads[grads["from_output"] == 0].set_index("run_id")["value"]
        grads["relative"] = grads["value"] / grads["run_id"].map(last)
        grad_norms = ordered_norms(grads["norm"].unique())
        sns.lineplot(
            grads,
            x="from_output",
            y="relative",
            hue="norm",
            hue_order=grad_norms,
            palette=palette,
            estimator="median",
            errorbar=("pi", 100),
            ax=axes[0],
        )
        ls = np.arange(grads["from_output"].max() + 1)
        axes[0].plot(ls, theory**ls, ":", color="grey", label=f"{theory:.4f}^l")
        axes[0].set(
            title=f"(a) gradient norms, {deepest} hidden layers",
            yscale="log",
            xlabel="layer l, counted from the output",
            ylabel="‖∇W_l‖ / ‖∇W_0‖",
        )
        labeled_legend(axes[0], loc="best", fontsize="small")

        rates = growth_rates(df)
        sns.lineplot(
            rates,
            x="net_depth",
            y="value",
            hue="norm",
            hue_order=grad_norms,
            palette=palette,
            errorbar=("pi", 100),
            marker="o",
            ax=axes[1],
            legend=False,
        )
        for level, text in ((theory, "√(π/(π−1))"), (1.0, "1")):
            axes[1].axhline(level, ls=":", color="grey", lw=0.8)
            axes[1].annotate(
                text, (rates["net_depth"].max(), level), fontsize="small", va="bottom", ha="right"
            )
        axes[1].set(title="(b) fitted per-layer growth rate", xlabel="hidden layers", ylabel="r")

    ranks = soft_ranks(df)
    for ax, net, letter in zip(axes[2:], nets, "cdefg", strict=False):
        part = ranks[ranks["net"] == net]
        rank_norms = ordered_norms(part["norm"].unique())
        sns.lineplot(
            part,
            x="net_depth",
            y="value",
            hue="norm",
            hue_order=rank_norms,
            palette=palette,
            errorbar=("pi", 100),
            marker="o",
            ax=ax,
        )
        width = int(df[(df["experiment"] == "rank") & (df["net"] == net)]["width"].iloc[0])
        ax.axhline(math.sqrt(width), ls=":", color="grey", lw=0.8)
        ax.annotate(
            f"√d = {math.sqrt(width):.1f}",
            (part["net_depth"].min(), math.sqrt(width)),
            fontsize="small",
            va="bottom",
        )
        ax.axhline(1.0, ls="-", color="grey", lw=0.5)
        ax.set(
            title=f"({letter}) rank of the last representation, {NET_LABELS[net]}",
            xscale="log",
            xlabel="hidden layers",
            ylabel="soft rank r(H)",
            ylim=(0, None),
        )
        labeled_legend(ax, loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "depth")
    return claims(df)


STUDY = Study(
    name="depth",
    title="Depth at initialization: BN's gradient explosion and its avoidance of rank collapse",
    reproduces="Yang et al. 2019, Thm. 3.10; Daneshmand et al. 2020",
    figures=("depth",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("experiment", "net", "norm", "seed"),
    config_columns=("experiment", "net", "width"),
)
