"""Scale invariance — Arora, Li & Lyu 2019; Kohler et al. 2019: BN makes ‖W‖ grow and tunes the step size.

A weight W followed by batch normalization is scale-invariant, L(cW) = L(W) for c > 0, so its
gradient is orthogonal to it, ⟨∇_W L, W⟩ = 0 (Euler). Plain SGD, W ← W − η∇L, then grows the weight
exactly by Pythagoras: ‖W_{t+1}‖² = ‖W_t‖² + η²‖∇_W L‖², and since only the direction W/‖W‖ matters
and moves as SGD with the *effective learning rate* η/‖W‖², the effective rate decays on its own
("auto rate-tuning", Arora, Li & Lyu 2019, "Theoretical analysis of auto rate-tuning by batch
normalization"; van Laarhoven 2017). With weight decay λ the update shrinks the norm too,
‖W_{t+1}‖² = (1 − ηλ)²‖W_t‖² + η²‖∇L‖², and ‖W‖ (hence η/‖W‖²) settles at an equilibrium. Weight
normalization (Salimans & Kingma 2016; W = g·V/‖V‖) decouples length and direction explicitly, which
Kohler et al. 2019 ("Exponential convergence rates for batch normalization: the power of
length-direction decoupling") use to analyse BN; its direction parameter V is scale-invariant by
construction and obeys the same identities.

Setup. A ReLU MLP (3 hidden layers of 100 units, PyTorch's default init) with BN before each ReLU
(``bn``) or with weight-normalized hidden layers (``wn``; V is measured) on MNIST-1D (4000 training
examples), trained with plain SGD (no momentum, the identity needs it; lr 0.1, batch 128, 2000
updates ≈ 64 epochs), without weight decay and with λ = 10⁻² (applied to every parameter, PyTorch's
default). The weight-decay time scale is 1/(2ηλ) = 500 updates, chosen so that an equilibrium has
time to form within the quick preset; the usual λ = 5·10⁻⁴ at η = 0.1 (the paper preset, 30 000
updates) has a time scale of 10⁴ updates. The hidden linear layers (``blocks.i.layer``) are the
scale-invariant ones; the output layer ``head`` is not (it is the control). Measured:

* every update (``on_step``, the gradient the update used): per hidden layer, in float64, the
  cumulative gradient term Σ_t η²‖∇_W L_t‖², the cumulative decay term Σ_t ((1 − ηλ)² − 1)‖W_t‖² and
  the number of updates that decreased ‖W‖ (probe ``norm_growth``; rows at every probe step, with
  ``measured`` = ‖W_t‖² − ‖W_0‖²);
* every ``probe_every`` updates: ``probes.gradients.effective_learning_rates`` (η, ‖W‖, η/‖W‖² per
  layer) and ``probes.gradients.scale_invariance`` for every layer including the head, on the
  minibatch of the next update with BN in ``bn="batch"`` mode (the training loss): |L(cW) − L(W)| for
  c ∈ {0.5, 2} and cos∠(∇_W L, W).

Claims tested (from the records; one value per seed, separately for BN and WN; "hidden layers" = the
scale-invariant ones; T = the last step):

1. *Without WD the effective learning rate decays*: statistic = mean over hidden layers of
   log(η_eff(T)/η_eff(0)) (= −log(‖W_T‖²/‖W_0‖²) at a constant η); holds if the 95% CI is below 0.
2. *‖W‖ grows monotonically without WD*: statistic = min over hidden layers of the fraction of updates
   that did not decrease ‖W‖ (float64 norms of the float32 weights); holds if the CI is above 0.99.
3. *The growth is exactly η²‖∇L‖² per update*: statistic = max over hidden layers of
   |measured − predicted| / predicted for the cumulative growth ‖W_T‖² − ‖W_0‖² against
   Σ_t η²‖∇L_t‖², runs without WD; holds if the CI is below 0.01.
4. *With WD the effective learning rate levels off*: statistic = mean over hidden layers of
   |log(η_eff(T)/η_eff(T/2))|; holds if the CI is below 0.1 (changes by less than ~10% over the
   second half of training).
5. *… unlike without WD*: statistic = the statistic of claim 4 without WD minus with WD, paired by
   seed; holds if the CI is above 0.
6. *The gradient is orthogonal to the weight*: statistic = max over probe steps, hidden layers and
   both WD settings of |cos∠(∇_W L, W)|; holds if the CI is below 10⁻³.
7. *The loss is invariant to the weight's scale*: statistic = max over the same and c ∈ {0.5, 2} of
   |L(cW) − L(W)| / max(1, |L(W)|); holds if the CI is below 10⁻³.

   Claims 6–7 pool both WD settings, and BN fails them through the runs with WD: BN's ε breaks the
   invariance once WD has shrunk ‖W‖ (in the committed quick runs max |cos| 6e-6 and relative loss
   change 3e-5 without WD, 3e-3 and 9e-3 with λ = 10⁻²). For WN the power-of-two scales give
   cV/‖cV‖ = V/‖V‖ bit for bit, so its claim-7 statistic is exactly 0: the check rules out a gross
   failure, it does not measure rounding.

A run that diverged (the train loop's ``diverged`` row) has no step T: it leaves claims 1–5. Claims 6–7
test a property of every probe point and keep its probe points from before the divergence.

Figure ``scale_invariance``: (a) ‖W‖² of the hidden layers (mean over layers) over training, (b) the
effective learning rate, (c) measured against predicted cumulative growth (runs without WD, each
hidden layer and probe step a point, the diagonal for reference), (d) |cos∠(∇W, W)| per layer kind
(hidden vs head) over training, log scale.

Reproduce::

    whybn run scale_invariance                    # quick preset, ~1.5 minutes on 2 idle CPU cores
    whybn run scale_invariance --preset paper --device cuda
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.claims import Claim, test_claim
from analysis.load import finished
from analysis.style import NORM_LABELS, norm_palette, ordered_norms, save_figure, use_style
from probes.gradients import effective_learning_rates, scale_invariance
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study, check_two_probe_points
from studies.lab.train import ProbeContext, ProbeSchedule, lr_at

SOURCE_A = "Arora, Li & Lyu 2019 (auto rate-tuning by batch normalization)"
SOURCE_K = "Kohler et al. 2019 (length-direction decoupling); Arora, Li & Lyu 2019"
MONOTONE_THRESHOLD = 0.99  # claim 2
IDENTITY_TOLERANCE = 0.01  # claim 3
LEVEL_TOLERANCE = 0.1  # claim 4
ORTHOGONALITY_TOLERANCE = 1e-3  # claims 6, 7


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("bn", "wn")
    weight_decays: tuple[float, ...] = (0.0, 1e-2)
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 3
    width: int = 100
    activation: str = "relu"
    init: str = "torch"
    lr: float = 0.1
    batch_size: int = 128
    steps: int = 2000
    probe_every: int = 100
    eval_every: int = 500
    scales: tuple[float, ...] = (0.5, 2.0)


QUICK = Config()
PAPER = replace(
    QUICK,
    weight_decays=(0.0, 5e-4),
    seeds=5,
    dataset="fashion_mnist",
    depth=4,
    width=256,
    steps=30_000,
    probe_every=500,
    eval_every=2000,
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per norm, weight decay and seed."""
    check_two_probe_points(
        "scale_invariance",
        config.steps,
        config.probe_every,
        "the weight norm's growth needs two probe points",
    )
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "weight_decays", "seeds")}
    return [
        {"arch": "mlp", "norm": norm, "weight_decay": wd, "seed": seed, **base}
        for norm in config.norms
        for wd in config.weight_decays
        for seed in range(config.seeds)
    ]


def _weight(module: torch.nn.Module) -> torch.nn.Parameter:
    """The scale-invariant parameter of a hidden layer: V of a weight-normalized layer, else W."""
    return module.weight_v if hasattr(module, "weight_v") else module.weight


def _sq_norm(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).sum())


class NormGrowth:
    """Per-update bookkeeping of ‖W‖² for the given layers: ``on_step`` after each update, ``probe`` rows.

    After update t (weights W_{t+1}, ``.grad`` = ∇L_t of that update, not including weight decay) it
    adds η_t²‖∇L_t‖² to the gradient term, ((1 − η_tλ)² − 1)‖W_t‖² to the decay term, and counts the
    update if ‖W_{t+1}‖² < ‖W_t‖². Norms in float64.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], weight_decay: float) -> None:
        self.layers, self.weight_decay = layers, weight_decay
        self.initial = {n: _sq_norm(_weight(m)) for n, m in layers.items()}
        self.previous = dict(self.initial)
        self.gradient_term = dict.fromkeys(layers, 0.0)
        self.decay_term = dict.fromkeys(layers, 0.0)
        self.decreases = dict.fromkeys(layers, 0)
        self.updates = 0

    def on_step(self, ctx: ProbeContext, loss: float) -> None:
        lr = lr_at(ctx.step, ctx.config)
        for name, module in self.layers.items():
            w = _weight(module)
            now = _sq_norm(w)
            self.gradient_term[name] += lr**2 * _sq_norm(w.grad)
            self.decay_term[name] += ((1 - lr * self.weight_decay) ** 2 - 1) * self.previous[name]
            self.decreases[name] += int(now < self.previous[name])
            self.previous[name] = now
        self.updates += 1

    def probe(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        rows = []
        for name, module in self.layers.items():
            values = {
                "measured": _sq_norm(_weight(module)) - self.initial[name],
                "gradient_term": self.gradient_term[name],
                "decay_term": self.decay_term[name],
                "decreases": self.decreases[name],
                "updates": self.updates,
            }
            rows += [{"layer": name, "metric": k, "value": v} for k, v in values.items()]
        return rows


def invariance_probe(
    hidden: list[str], layers: list[str], scales: tuple[float, ...]
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: effective learning rates of every layer, and the scale invariance of each on ctx.batch."""

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        rows = effective_learning_rates(ctx.model, ctx.optimizer, layers=layers).to_records()
        for name in layers:
            result = scale_invariance(
                ctx.model, ctx.loss_fn, ctx.batch, layer=name, scales=scales, bn="batch"
            )
            loss = {"probe": "scale_invariance", "layer": name, "metric": "loss", "value": result.loss}
            rows += [*result.to_records(), loss]
        return [{**row, "hidden": row["layer"] in hidden} for row in rows]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train with plain SGD; track ‖W‖² every update and probe invariance every ``probe_every``."""
    data = load_run_data(rc)
    model = make_run_net(rc, data.info)
    hidden = [f"blocks.{i}.layer" for i in range(rc["depth"])]
    modules = dict(model.named_modules())
    growth = NormGrowth({n: modules[n] for n in hidden}, rc["weight_decay"])
    schedules = [
        ProbeSchedule(growth.probe, every=rc["probe_every"], name="norm_growth"),
        ProbeSchedule(
            invariance_probe(hidden, [*hidden, "head"], tuple(rc["scales"])),
            every=rc["probe_every"],
            name="invariance",
        ),
    ]
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd", log_every=rc["probe_every"]),
        probes=schedules,
        desc=f"scale_invariance {rc['norm']} wd{rc['weight_decay']:g} s{rc['seed']}",
        on_step=growth.on_step,
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def _hidden(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["hidden"].astype(bool)]


def effective_lr_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm, weight_decay, seed, step, layer): ``weight_norm``, ``effective_lr``, ``hidden``."""
    rows = df[df["probe"] == "effective_lr"]
    wide = rows.pivot_table(
        index=["norm", "weight_decay", "seed", "step", "layer", "hidden"],
        columns="metric",
        values="value",
        aggfunc="first",
    )
    return wide.reset_index()


def _at(table: pd.DataFrame, step: int) -> pd.DataFrame:
    """Per (norm, weight_decay, seed, layer): the row at the first probe step ≥ ``step``."""
    later = table[table["step"] >= step].sort_values("step")
    return later.groupby(["norm", "weight_decay", "seed", "layer"]).first()


def decay_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """Per run (norm, weight_decay, seed), over hidden layers: ``total`` = mean log(η_eff(T)/η_eff(0))
    and ``second_half`` = mean |log(η_eff(T)/η_eff(T/2))|, T the last probe step; runs that diverged
    are left out."""
    table = _hidden(effective_lr_table(df[finished(df)]))
    last = int(table["step"].max())
    log_eff = {s: np.log(_at(table, s)["effective_lr"]) for s in (0, last // 2, last)}
    per_layer = pd.DataFrame(
        {"total": log_eff[last] - log_eff[0], "second_half": (log_eff[last] - log_eff[last // 2]).abs()}
    )
    return per_layer.groupby(level=["norm", "weight_decay", "seed"]).mean().reset_index()


def growth_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """Per run, at the last probe step: ``monotone`` = min over hidden layers of the fraction of updates
    that did not decrease ‖W‖², and ``identity_error`` = max over them of |measured − predicted| /
    |predicted|, predicted = gradient term + decay term (the decay term is 0 without WD); runs that
    diverged are left out."""
    rows = df[(df["probe"] == "norm_growth") & finished(df)]
    wide = rows.pivot_table(
        index=["norm", "weight_decay", "seed", "step", "layer"], columns="metric", values="value"
    ).reset_index()
    final = wide[wide["step"] == wide.groupby(["norm", "weight_decay", "seed"])["step"].transform("max")]
    predicted = final["gradient_term"] + final["decay_term"]
    final = final.assign(
        monotone=1 - final["decreases"] / final["updates"],
        identity_error=(final["measured"] - predicted).abs() / predicted.abs(),
    )
    return (
        final.groupby(["norm", "weight_decay", "seed"])
        .agg(monotone=("monotone", "min"), identity_error=("identity_error", "max"))
        .reset_index()
    )


def invariance_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """Per (norm, seed), over probe steps, hidden layers and weight decays: ``cosine`` = max |cos∠(∇W, W)|,
    ``loss_change`` = max |L(cW) − L(W)| / max(1, |L(W)|)."""
    rows = _hidden(df[df["probe"] == "scale_invariance"])
    keys = ["norm", "weight_decay", "seed", "step", "layer"]
    loss = rows[rows["metric"] == "loss"].set_index(keys)["value"]
    change = rows[rows["metric"] == "loss_change"].set_index(keys)["value"]
    relative = change / np.maximum(1.0, loss.reindex(change.index).abs())
    cosine = rows[rows["metric"] == "grad_weight_cosine"].set_index(keys)["value"].abs()
    return pd.DataFrame(
        {
            "cosine": cosine.groupby(level=["norm", "seed"]).max(),
            "loss_change": relative.groupby(level=["norm", "seed"]).max(),
        }
    ).reset_index()


def _by_seed(stats: pd.DataFrame, norm: str, wd: float, column: str) -> pd.Series:
    part = stats[(stats["norm"] == norm) & (stats["weight_decay"] == wd)]
    return part.set_index("seed")[column].sort_index()


def claims(df: pd.DataFrame) -> list[Claim]:
    """Claims 1–7 of the module docstring for each norm present (claims 4–5 for each λ > 0 present)."""
    decay, growth, invariance = decay_statistics(df), growth_statistics(df), invariance_statistics(df)
    decays = sorted(decay["weight_decay"].unique())
    out = []
    for norm in ordered_norms(decay["norm"].unique()):
        label = NORM_LABELS.get(norm, norm)
        source = SOURCE_A if norm != "wn" else SOURCE_K
        layers = "hidden layers (weights followed by BN)" if norm == "bn" else "hidden layers (direction V)"
        if 0.0 in decays:
            out += [
                test_claim(
                    f"Without weight decay the effective learning rate η/‖W‖² decays ({label})",
                    source,
                    f"mean over {layers} of log(η_eff(T)/η_eff(0)), SGD without WD",
                    _by_seed(decay, norm, 0.0, "total").to_numpy(),
                    threshold=0.0,
                    direction="<",
                ),
                test_claim(
                    f"Without weight decay ‖W‖ grows monotonically ({label})",
                    source,
                    f"min over {layers} of the fraction of updates that did not decrease ‖W‖",
                    _by_seed(growth, norm, 0.0, "monotone").to_numpy(),
                    threshold=MONOTONE_THRESHOLD,
                    direction=">",
                ),
                test_claim(
                    f"‖W_(t+1)‖² − ‖W_t‖² = η²‖∇_W L‖² for plain SGD ({label})",
                    source,
                    f"max over {layers} of |(‖W_T‖² − ‖W_0‖²) − Σ_t η²‖∇L_t‖²| / Σ_t η²‖∇L_t‖²",
                    _by_seed(growth, norm, 0.0, "identity_error").to_numpy(),
                    threshold=IDENTITY_TOLERANCE,
                    direction="<",
                ),
            ]
        for wd in (w for w in decays if w > 0):
            with_wd = _by_seed(decay, norm, wd, "second_half")
            out.append(
                test_claim(
                    f"With weight decay λ = {wd:g} the effective learning rate levels off ({label})",
                    source,
                    f"mean over {layers} of |log(η_eff(T)/η_eff(T/2))|",
                    with_wd.to_numpy(),
                    threshold=LEVEL_TOLERANCE,
                    direction="<",
                )
            )
            if 0.0 in decays:
                without = _by_seed(decay, norm, 0.0, "second_half")
                out.append(
                    test_claim(
                        f"… while without weight decay it keeps changing (λ = {wd:g} vs 0, {label})",
                        source,
                        "mean |log(η_eff(T)/η_eff(T/2))| without WD minus with WD, paired by seed",
                        (without - with_wd).dropna().to_numpy(),
                        threshold=0.0,
                        direction=">",
                    )
                )
        part = invariance[invariance["norm"] == norm].sort_values("seed")
        out += [
            test_claim(
                f"The gradient is orthogonal to a scale-invariant weight ({label}; with and without WD)",
                source,
                f"max over probe steps, {layers} and WD settings of |cos∠(∇_W L, W)|",
                part["cosine"].to_numpy(),
                threshold=ORTHOGONALITY_TOLERANCE,
                direction="<",
            ),
            test_claim(
                f"The loss is invariant to the scale of the weight, L(cW) = L(W) ({label}; "
                "with and without WD)",
                source,
                f"max over probe steps, {layers}, WD settings and c ∈ {{0.5, 2}} of "
                "|L(cW) − L(W)| / max(1, |L(W)|)",
                part["loss_change"].to_numpy(),
                threshold=ORTHOGONALITY_TOLERANCE,
                direction="<",
            ),
        ]
    return out


def _curve(norm: str, wd: float) -> str:
    return f"{NORM_LABELS.get(norm, norm)}, " + ("no WD" if wd == 0 else f"WD {wd:g}")


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    table = _hidden(effective_lr_table(df))
    table = table.assign(weight_sq=table["weight_norm"] ** 2)
    mean = table.groupby(["norm", "weight_decay", "seed", "step"])[["weight_sq", "effective_lr"]].mean()
    mean = mean.reset_index()
    mean["curve"] = [_curve(n, w) for n, w in zip(mean["norm"], mean["weight_decay"], strict=True)]
    order = [_curve(n, w) for n in norms for w in sorted(mean["weight_decay"].unique())]
    colors = {_curve(n, w): palette[n] for n in norms for w in mean["weight_decay"].unique()}
    dashes = {c: "" if c.endswith("no WD") else (4, 2) for c in order}
    fig, axes = plt.subplots(1, 4, figsize=(13.2, 3.0))
    for ax, column, title, ylabel in (
        (axes[0], "weight_sq", "(a) weight norm", "‖W‖² (mean over hidden layers)"),
        (axes[1], "effective_lr", "(b) effective learning rate", "η/‖W‖² (mean over hidden layers)"),
    ):
        sns.lineplot(mean, x="step", y=column, hue="curve", hue_order=order, palette=colors, style="curve",
                     style_order=order, dashes=dashes, errorbar=("pi", 100), ax=ax,
                     legend=ax is axes[0])  # fmt: skip
        ax.set(title=title, xlabel="training step", ylabel=ylabel, yscale="log")
    axes[0].legend(loc="best", fontsize="x-small")

    growth = df[(df["probe"] == "norm_growth") & (df["weight_decay"] == 0) & (df["step"] > 0)]
    wide = growth.pivot_table(index=["norm", "seed", "step", "layer"], columns="metric", values="value")
    wide = wide.reset_index()
    for norm in norms:
        part = wide[wide["norm"] == norm]
        axes[2].scatter(part["gradient_term"], part["measured"], s=6, color=palette[norm],
                        label=NORM_LABELS.get(norm, norm))  # fmt: skip
    if len(wide):
        lo, hi = wide["gradient_term"].min(), wide["gradient_term"].max()
        axes[2].plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", label="identity")
    axes[2].set(title="(c) growth of ‖W‖², no WD", xlabel="Σ_t η²‖∇L_t‖²", ylabel="‖W_t‖² − ‖W_0‖²",
                xscale="log", yscale="log")  # fmt: skip
    axes[2].legend(loc="best", fontsize="x-small")

    cos = df[(df["probe"] == "scale_invariance") & (df["metric"] == "grad_weight_cosine")].copy()
    cos["abs_cosine"] = cos["value"].abs().clip(lower=1e-12)
    cos["curve"] = [
        f"{NORM_LABELS.get(n, n)}, {'hidden' if h else 'head'}"
        for n, h in zip(cos["norm"], cos["hidden"].astype(bool), strict=True)
    ]
    cos_order = [f"{NORM_LABELS.get(n, n)}, {k}" for n in norms for k in ("hidden", "head")]
    cos_colors = {c: palette[n] for n in norms for c in cos_order if c.startswith(NORM_LABELS.get(n, n))}
    cos_dashes = {c: "" if c.endswith("hidden") else (4, 2) for c in cos_order}
    sns.lineplot(cos, x="step", y="abs_cosine", hue="curve", hue_order=cos_order, palette=cos_colors,
                 style="curve", style_order=cos_order, dashes=cos_dashes, estimator="max",
                 errorbar=None, ax=axes[3])  # fmt: skip
    axes[3].axhline(ORTHOGONALITY_TOLERANCE, color="0.4", lw=0.8, ls=":")
    axes[3].set(title="(d) max |cos∠(∇W, W)|", xlabel="training step", ylabel="|cosine|", yscale="log")
    axes[3].legend(loc="best", fontsize="x-small")
    fig.tight_layout()
    save_figure(fig, out_dir, "scale_invariance")
    return claims(df)


STUDY = Study(
    name="scale_invariance",
    title="Weight-norm growth and effective learning rate of scale-invariant weights under SGD",
    reproduces="Arora, Li & Lyu 2019; Kohler et al. 2019",
    figures=("scale_invariance",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "norm", "weight_decay", "seed"),
    config_columns=("weight_decay",),
)
