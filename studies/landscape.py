"""Loss landscape along the gradient — Santurkar et al. 2018, Fig. 4 and Fig. 9: does BN make it smoother?

Santurkar, Tsipras, Ilyas & Madry 2018 ("How does batch normalization help optimization?", §3.1) train
VGG on CIFAR-10 with and without batch normalization and, at points during training, step from the
weights w along the negative gradient g = ∇L(w) of the training minibatch loss, for step sizes η in a
grid, recording (a) the *loss variation*: the range of L(w − ηg) over η; (b) the *gradient
predictiveness*: max_η ‖∇L(w) − ∇L(w − ηg)‖; (c) the *effective β-smoothness*:
max_η ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖. All three are smaller with BN in their Fig. 4, and Fig. 9 (appendix)
finds the same for BN with an ℓ1, ℓ2 or ℓ∞ scale instead of the standard deviation (§3.3).

Setup. The quick preset trains a ReLU MLP (4 hidden layers of 100 units, He/Kaiming-normal init with
zero biases — with PyTorch's default init a deep no-norm ReLU MLP barely moves at lr 0.05 on
MNIST-1D, see DESIGN.md) on MNIST-1D (4000 training examples) with plain SGD (no momentum, batch 128,
1500 steps) at two learning rates, 0.05 and 0.2; both train the no-norm net (its minibatch loss falls
from ~3.2 to below 0.5 within the run). Variants: no norm (``none``), BN before each ReLU (``bn``), and
ℓp BN (``lp_bn`` with option ``p`` = 1 or ∞: y = γ(x − μ_B)/s_p + β with s_1 the mean, s_∞ the max of
|x − μ_B| over the batch). ℓ2 BN is left out of the quick preset because in this codebase it *is*
``bn`` (same formula, checked by the test); the paper preset includes it. Every 50 steps (steps 0,
50, …, 1500) the probe ``probes.smoothness.landscape_along_gradient`` is run on the minibatch that
the next update uses, with batch-dependent norms in ``bn="batch"`` mode (the training loss, as
Santurkar et al. measured it; no running statistic is updated), at step sizes η = lr × (0.5, 1, 2, 3,
4) — Santurkar et al. used η ∈ [0.05, 0.4] at their learning rate 0.1, i.e. the same multiples.
``loss_range`` is max − min of L over {w} ∪ {w − ηg}. To compare at matched training progress as
well as at matched step, each probe also records the mean loss over the first 2000 training examples
cut into minibatches of 128 (15 batches, 1920 examples; ``train_subset``, same ``bn`` mode, each batch
normalized with its own statistics as in training). The paper preset is a VGG (8 conv layers, widths
32 → 256) on CIFAR-10, 10k steps, 8 seeds, with ℓ1, ℓ2 and ℓ∞ BN, at the same learning rates and init
(not checked here for trainability: no GPU).

Claims tested (from the records; one value per seed, paired by seed, separately per learning rate;
r(t) = log(metric without norm / metric with norm) at probe step t, for metric ∈ {loss range, max
gradient distance, β_eff}):

1–3. *Loss range, gradient predictiveness and β-smoothness are smaller with BN.* Statistic = mean of
     r(t) over all probe steps both runs reached; holds if the 95% CI is above 0 (one claim per metric
     and learning rate).
4.   *The gain is largest early in training.* Statistic = mean r(t) over the early steps
     t ≤ T/4 minus mean r(t) over the late steps t ≥ 3T/4, T the last probe step (quick: steps 0–350
     vs 1150–1500); holds if the CI is above 0 (per metric and learning rate).
5.   *ℓp normalizations smooth the landscape too.* For each p: the statistic of claim 3 with ℓp BN in
     place of BN (mean over probe steps of log(β_eff without norm / β_eff with ℓp BN)); holds if the CI
     is above 0 (per p and learning rate).
6.   *Claims 1–3 at matched training loss.* A run's progress c(t) is the running minimum over probe
     steps of its ``train_subset`` loss; for 8 loss levels spaced geometrically strictly between the
     higher of the two runs' final c and the lower of their initial c, each run's metric is read at the
     first probe step where c ≤ level; statistic = mean over levels of log(metric without / with BN);
     holds if the CI is above 0 (per metric and learning rate). A seed whose two runs share no loss
     range drops out (n counts the rest).

A probe point where a step diverged has an infinite summary; a seed whose statistic is not finite is
left out of the bootstrap (n says how many remained).

Reproduce::

    whybn run landscape                    # quick preset, ~3 minutes on 2 idle CPU cores
    whybn run landscape --preset paper --device cuda
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.claims import Claim, test_claim
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.functional import norm_mode
from probes.smoothness import landscape_along_gradient
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

#: The landscape summaries compared between norms, with the name Santurkar et al. give each.
METRICS = {
    "loss_range": "loss range along the gradient",
    "max_grad_distance": "gradient predictiveness (max gradient distance)",
    "beta_eff": "effective β-smoothness",
}
AXIS_LABELS = {
    "loss_range": "loss range",
    "max_grad_distance": "max ‖∇L(w) − ∇L(w − ηg)‖",
    "beta_eff": "β_eff",
}
EARLY_FRACTION = 0.25  # claim 4: steps t ≤ T/4 are early, t ≥ 3T/4 late
MATCH_LEVELS = 8  # loss levels of the matched-loss comparison
LP_LABELS = {"lp1": "ℓ1 BN", "lp2": "ℓ2 BN", "lpinf": "ℓ∞ BN"}
SOURCE = "Santurkar et al. 2018, Fig. 4"
SOURCE_LP = "Santurkar et al. 2018, Fig. 9 (§3.3)"


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("none", "bn")
    lp_ps: tuple[str, ...] = ("1", "inf")  # ℓp BN variants (norm "lp_bn", option p in 1, 2, inf)
    lrs: tuple[float, ...] = (0.05, 0.2)
    seeds: int = 5
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    arch: str = "mlp"
    depth: int = 4
    width: int = 100
    activation: str = "relu"
    init: str = "kaiming"
    batch_size: int = 128
    steps: int = 1500
    probe_every: int = 50
    eval_every: int = 250
    step_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)  # η = lr × each
    probe_bn: str = "batch"  # how BN normalizes in the probe: "batch" (training loss) or "running"
    match_size: int = 2000  # first training examples whose loss tracks training progress


QUICK = Config()
PAPER = replace(
    QUICK,
    lp_ps=("1", "2", "inf"),
    seeds=8,
    dataset="cifar10",
    arch="vgg",
    depth=8,
    width=32,
    steps=10_000,
    probe_every=250,
    eval_every=1000,
)


def variant(norm: str, p: str | None) -> str:
    """The name of a network variant: the norm, or ``lp<p>`` for ℓp batch norm."""
    return norm if p is None else f"lp{p}"


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per variant (norms, then ℓp BN per p), learning rate and seed."""
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "lp_ps", "lrs", "seeds")}
    kinds = [(norm, None) for norm in config.norms] + [("lp_bn", p) for p in config.lp_ps]
    return [
        {"norm": norm, "p": p, "variant": variant(norm, p), "lr": lr, "seed": seed, **base}
        for norm, p in kinds
        for lr in config.lrs
        for seed in range(config.seeds)
    ]


def landscape_probe(
    step_sizes: Sequence[float], subset: tuple[torch.Tensor, torch.Tensor], batch_size: int, bn: str = "batch"
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: the landscape along −∇L on the update's minibatch, and the loss on a fixed subset.

    Rows: ``landscape_along_gradient(...).to_records()`` (probe ``landscape``: per step size ``loss``,
    ``relative_loss``, ``grad_distance``, ``beta`` with an ``eta`` key; then ``loss_range``,
    ``max_grad_distance``, ``beta_eff``, ``loss_at_w``, ``grad_norm``, ...), and probe ``train_subset``
    metric ``loss``: the mean loss over the fixed ``subset`` cut into consecutive minibatches of
    ``batch_size`` (a remainder is dropped), each in the same ``bn`` mode — for ``"batch"`` each
    normalized with its own statistics, as in training (one batch of the whole subset would give ℓ∞ BN,
    whose scale is a maximum, a different network) — a smooth measure of training progress.
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = landscape_along_gradient(ctx.model, ctx.loss_fn, ctx.batch, step_sizes=step_sizes, bn=bn)
        n = len(subset[0]) // batch_size * batch_size
        x, y = (t[:n].to(ctx.device) for t in subset)
        with torch.no_grad(), norm_mode(ctx.model, bn):
            batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
            losses = [ctx.loss_fn(ctx.model(xb), yb) for xb, yb in batches]
        loss = float(torch.stack(losses).mean())
        return [*result.to_records(), {"probe": "train_subset", "metric": "loss", "value": loss}]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train one variant with the landscape probe; every row is stamped with ``variant`` and ``lr``."""
    data = load_run_data(rc)
    options = {} if rc["p"] is None else {"norm_options": {"p": "inf" if rc["p"] == "inf" else int(rc["p"])}}
    model = make_run_net(rc, data.info, **options)
    if rc["match_size"] < rc["batch_size"]:
        raise ValueError(f"match_size {rc['match_size']} must be at least batch_size {rc['batch_size']}")
    subset = (data.train.tensors[0][: rc["match_size"]], data.train.tensors[1][: rc["match_size"]])
    schedule = ProbeSchedule(
        landscape_probe(
            [rc["lr"] * m for m in rc["step_multipliers"]], subset, rc["batch_size"], rc["probe_bn"]
        ),
        every=rc["probe_every"],
        name="landscape",
    )
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd", log_every=rc["probe_every"]),
        probes=[schedule],
        desc=f"landscape {rc['variant']} lr{rc['lr']:g} s{rc['seed']}",
    )
    return [{**row, "variant": rc["variant"], "lr": rc["lr"]} for row in result.records]


# ----------------------------------------------------------------------------------------------------
# analysis


def summaries(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, lr, seed, step): the landscape summaries and the ``train_subset`` loss."""
    rows = df[(df["probe"] == "landscape") & df["metric"].isin([*METRICS, "loss_at_w"])]
    wide = rows.pivot_table(
        index=["variant", "lr", "seed", "step"], columns="metric", values="value", aggfunc="first"
    )
    subset = df[(df["probe"] == "train_subset") & (df["metric"] == "loss")]
    wide["subset_loss"] = subset.set_index(["variant", "lr", "seed", "step"])["value"]
    return wide


def log_ratios(df: pd.DataFrame, metric: str, other: str = "bn") -> pd.Series:
    """r(t) = log(metric of ``none`` / metric of ``other``), indexed by (lr, seed, step), paired runs only."""
    wide = summaries(df)[metric].unstack("variant")
    if not {"none", other} <= set(wide.columns):
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=["lr", "seed", "step"]))
    return np.log(wide["none"] / wide[other]).dropna()


def _at_lr(ratios: pd.Series, lr: float) -> pd.Series:
    return ratios[ratios.index.get_level_values("lr") == lr]


def per_seed(ratios: pd.Series, lr: float) -> pd.Series:
    """Mean of r(t) over probe steps, per seed, at learning rate ``lr``."""
    return _at_lr(ratios, lr).groupby(level="seed").mean()


def early_minus_late(ratios: pd.Series, lr: float) -> pd.Series:
    """Per seed: mean r(t) over t ≤ T/4 minus mean r(t) over t ≥ 3T/4 (T the last probe step at ``lr``)."""
    at_lr = _at_lr(ratios, lr)
    steps = at_lr.index.get_level_values("step")
    last = steps.max()
    early = at_lr[steps <= EARLY_FRACTION * last].groupby(level="seed").mean()
    late = at_lr[steps >= (1 - EARLY_FRACTION) * last].groupby(level="seed").mean()
    return (early - late).dropna()


def matched_loss_ratios(df: pd.DataFrame, metric: str, other: str = "bn") -> pd.DataFrame:
    """log(metric of ``none`` / of ``other``) at matched training progress: rows (lr, seed, level, value).

    Progress c(t) of a run = running minimum over probe steps of its ``train_subset`` loss. For
    ``MATCH_LEVELS`` levels geometric strictly between max of the two runs' final c and min of their
    initial c, each run's metric is read at the first probe step where c ≤ level.
    """
    table = summaries(df)
    out = []
    for (lr, seed), pair in table.groupby(level=["lr", "seed"]):
        runs = {
            v: pair.xs(v, level="variant").droplevel(["lr", "seed"])
            for v in ("none", other)
            if v in pair.index.get_level_values("variant")
        }
        if len(runs) < 2:
            continue
        progress = {v: run["subset_loss"].cummin() for v, run in runs.items()}
        high = min(c.iloc[0] for c in progress.values())
        low = max(c.iloc[-1] for c in progress.values())
        if not low < high:
            continue
        for level in np.geomspace(high, low, MATCH_LEVELS + 2)[1:-1]:
            value = {
                v: runs[v][metric][c.index[np.argmax(c.to_numpy() <= level)]] for v, c in progress.items()
            }
            out.append(
                {"lr": lr, "seed": seed, "level": level, "value": np.log(value["none"] / value[other])}
            )
    return pd.DataFrame(out, columns=["lr", "seed", "level", "value"])


def claims(df: pd.DataFrame) -> list[Claim]:
    """The claims of the module docstring in its order (1–3, 4, 5, 6), each per learning rate."""
    lrs = sorted(df["lr"].dropna().unique())
    result = []
    for metric, name in METRICS.items():
        ratios = log_ratios(df, metric)
        for lr in lrs:
            result.append(
                test_claim(
                    f"The {name} is smaller with BN than without (lr {lr:g}, matched step)",
                    SOURCE,
                    f"log({metric} without norm / with BN), mean over probe steps",
                    per_seed(ratios, lr).to_numpy(),
                )
            )
    for metric, name in METRICS.items():
        ratios = log_ratios(df, metric)
        for lr in lrs:
            result.append(
                test_claim(
                    f"BN's reduction of the {name} is largest early in training (lr {lr:g})",
                    SOURCE,
                    f"mean log({metric} without / with BN) over steps t <= T/4 minus over t >= 3T/4, "
                    "T the last probe step",
                    early_minus_late(ratios, lr).to_numpy(),
                )
            )
    for lp in [v for v in LP_LABELS if v in set(df["variant"])]:
        ratios = log_ratios(df, "beta_eff", other=lp)
        for lr in lrs:
            result.append(
                test_claim(
                    f"{LP_LABELS[lp]} also reduces the effective β-smoothness (lr {lr:g}, matched step)",
                    SOURCE_LP,
                    f"log(beta_eff without norm / with {LP_LABELS[lp]}), mean over probe steps",
                    per_seed(ratios, lr).to_numpy(),
                )
            )
    for metric, name in METRICS.items():
        matched = matched_loss_ratios(df, metric)
        for lr in lrs:
            values = matched[matched["lr"] == lr].groupby("seed")["value"].mean()
            result.append(
                test_claim(
                    f"The {name} is smaller with BN than without at matched training loss (lr {lr:g})",
                    SOURCE,
                    f"log({metric} without norm / with BN) at the first probe step each run's running-min "
                    f"train-subset loss reaches each of {MATCH_LEVELS} common levels, mean over levels",
                    values.to_numpy(),
                )
            )
    return result


def _variants(present: Sequence[str]) -> list[str]:
    """Variants in house order: the norms, then ℓp BN by p."""
    return ordered_norms(set(present) - set(LP_LABELS)) + [v for v in LP_LABELS if v in set(present)]


#: Legend labels of the variants: the norms' labels and ℓp BN's.
VARIANT_LABELS = {**NORM_LABELS, **LP_LABELS}


def _label(variant_name: str) -> str:
    return VARIANT_LABELS.get(variant_name, variant_name)


def _bands(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (variant, lr, step): mean over seeds of the min and max over η of ``metric`` (and w's loss)."""
    rows = df[(df["probe"] == "landscape") & (df["metric"] == metric)]
    if metric == "loss":  # the band of L over {w} ∪ {w − ηg}, as loss_range measures it
        rows = pd.concat([rows, df[(df["probe"] == "landscape") & (df["metric"] == "loss_at_w")]])
    per_seed_band = rows.groupby(["variant", "lr", "seed", "step"])["value"].agg(["min", "max"])
    return per_seed_band.groupby(level=["variant", "lr", "step"]).mean().reset_index()


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import NullFormatter

    use_style()
    variants = _variants(df["variant"].dropna().unique())
    palette = norm_palette(variants)
    lrs = sorted(df["lr"].dropna().unique())
    table = summaries(df).reset_index()
    log_axes = ("max_grad_distance", "beta_eff")

    # Fig. 4: per learning rate, (a) the band of L(w − ηg), (b) the band of the gradient distance,
    # (c) β_eff, without and with BN
    fig, axes = plt.subplots(len(lrs), 3, figsize=(10, 2.8 * len(lrs)), squeeze=False)
    standard = [v for v in variants if v in ("none", "bn")]
    bands = {m: _bands(df, m) for m in ("loss", "grad_distance")}
    for row, lr in zip(axes, lrs, strict=True):
        for ax, metric, title in zip(
            row[:2], bands, ("loss landscape", "gradient predictiveness"), strict=True
        ):
            for v in standard:
                band = bands[metric][(bands[metric]["variant"] == v) & (bands[metric]["lr"] == lr)]
                ax.fill_between(band["step"], band["min"], band["max"], color=palette[v], alpha=0.3, lw=0)
                ax.plot(band["step"], band["max"], color=palette[v], lw=0.8, label=_label(v))
            ax.set(title=f"{title}, lr {lr:g}", xlabel="training step")
        row[0].set_ylabel("loss L(w − ηg)")
        row[1].set(ylabel="‖∇L(w) − ∇L(w − ηg)‖", yscale="log")
        part = table[(table["lr"] == lr) & table["variant"].isin(standard)]
        sns.lineplot(
            part,
            x="step",
            y="beta_eff",
            hue="variant",
            hue_order=standard,
            palette=palette,
            errorbar=("pi", 100),
            ax=row[2],
            legend=False,
        )
        row[2].set(
            title=f"effective β-smoothness, lr {lr:g}", xlabel="training step", ylabel="β_eff", yscale="log"
        )
        row[0].legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, out_dir, "landscape")

    # Fig. 9: the three summaries for every variant, ℓp BN included
    fig, axes = plt.subplots(len(lrs), 3, figsize=(10, 2.8 * len(lrs)), squeeze=False)
    for row, lr in zip(axes, lrs, strict=True):
        part = table[table["lr"] == lr]
        for ax, (metric, name) in zip(row, METRICS.items(), strict=True):
            sns.lineplot(
                part,
                x="step",
                y=metric,
                hue="variant",
                hue_order=variants,
                palette=palette,
                errorbar=None,
                ax=ax,
                legend=ax is row[0],
            )
            ax.set(
                title=f"{name.split(' (')[0]}, lr {lr:g}",
                xlabel="training step",
                ylabel=AXIS_LABELS[metric],
                yscale="log" if metric in log_axes else "linear",
            )
        labeled_legend(row[0], VARIANT_LABELS, loc="upper right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "landscape_lp")

    # matched training loss: each summary against the progress measure, every probe point of every run
    fig, axes = plt.subplots(len(lrs), 3, figsize=(10, 2.8 * len(lrs)), squeeze=False)
    for row, lr in zip(axes, lrs, strict=True):
        part = table[table["lr"] == lr]
        for ax, (metric, name) in zip(row, METRICS.items(), strict=True):
            sns.scatterplot(
                part,
                x="subset_loss",
                y=metric,
                hue="variant",
                hue_order=variants,
                palette=palette,
                s=8,
                alpha=0.6,
                lw=0,
                ax=ax,
                legend=ax is row[0],
            )
            ax.set(
                title=f"{name.split(' (')[0]}, lr {lr:g}",
                xlabel="training-subset loss",
                ylabel=AXIS_LABELS[metric],
                xscale="log",
                yscale="log",
            )
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log range
            ax.invert_xaxis()  # training progresses to the right
        labeled_legend(row[0], VARIANT_LABELS, loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "landscape_matched_loss")
    return claims(df)


STUDY = Study(
    name="landscape",
    title="Loss landscape along the gradient: loss range, gradient predictiveness, β-smoothness",
    reproduces="Santurkar et al. 2018, Fig. 4 and Fig. 9",
    figures=("landscape", "landscape_lp", "landscape_matched_loss"),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "variant", "lr", "seed"),
)
