"""Whitening vs standardization — LeCun et al. 1998; Huang, Yang, Lang & Deng 2018 (DBN); Huang et al. 2019
(IterNorm), 2020: conditioning, PCA vs ZCA whitening, and the stochasticity of batch whitening.

Four parts, each a kind of run of the grid (column ``part`` of the records):

(a) ``least_squares`` — the lecture's demonstration. For each seed, two random least-squares problems
    (``probes.conditioning.make_least_squares``, N = ``ls_samples``, d = ``ls_dim``, noise 0.1): Gaussian
    features with scales logspace(0, ``ls_scale_decades``, d) (badly scaled), either *independent* or
    *correlated* (equicorrelation ρ = ``ls_correlation``). The features are used raw, standardized (per
    feature zero mean and unit variance: what BN does), PCA-whitened and ZCA-whitened (what DBN does).
    Recorded per problem and transform: the condition number κ of the Hessian H = XᵀX/N
    (``least_squares_conditioning``) and the iterations of gradient descent with step 1/λ_max until the
    relative excess loss is ≤ ``ls_tol`` (``gd_iterations_to_tolerance``).
(b) ``training`` — layer-input conditioning during training. A ReLU MLP (``depth`` hidden layers of
    ``width``, Linear → norm → ReLU, He/Kaiming init with zero biases so that the no-norm reference
    trains too) on MNIST-1D, SGD with momentum, variants ``none``, ``bn``, ``dbn`` (ZCA whitening) and
    ``iternorm`` (Newton–Schulz, T = 5), whitening in groups of ``group_size`` channels (the DBN
    default 16). Every ``probe_every`` steps ``probes.conditioning.layer_input_conditioning`` runs on
    a fixed probe batch (the first ``probe_size`` training examples, ``bn="batch"``: the probe batch's
    own statistics, as in training, no running statistic updated) at two sites: the *norm output*
    (input of each hidden ReLU, after the norm's affine map; site ``norm_output``) and the *layer
    input* (input of every linear layer after the first, i.e. post-ReLU; site ``layer_input``).
    Recorded: condition number, effective rank and whiteness ‖C/mean(diag C) − I‖_F of the covariance.
    (On MNIST-1D the first layer's 64 pre-activations are linear in 40 inputs: their covariance is
    singular, κ = ∞, for every variant, so claim 2 effectively compares the deeper layers there.)
(c) PCA vs ZCA — the same runs include ``dbn_pca``: DBN with PCA whitening (W = Λ^{-1/2}Uᵀ), the
    variant Huang et al. 2018 show to suffer from *stochastic axis swapping*; compared with ``dbn``
    (ZCA) of the same seed on training loss and test accuracy (eval mode: running statistics).
(d) ``disturbance`` — stochastic normalization disturbance (SND, Huang et al. 2019 §3.2) of ZCA
    whitening, IterNorm (T = 5) and BN as a function of batch size (``snd_batch_sizes``) and group
    size (``snd_group_sizes``), by ``probes.conditioning.normalization_disturbance`` (``snd_rounds``
    random partitions into mini-batches) on real activations: the pre-activations of the second hidden
    layer (input of its norm) of the no-norm MLP at initialization, for ``snd_samples`` training
    examples chosen by the seed.

Setups. *Quick*: (a) d = 10, N = 1000, ρ = 0.95, 3 problems per kind; (b, c) MNIST-1D, MLP 4 × 64,
group size 16, SGD lr 0.05, momentum 0.9, batch 128, 1500 steps, probes every 100 steps on 1000
examples, 3 seeds; (d) width 64, batch sizes 64–512, group sizes 1–64, 2048 examples, 20 rounds, 3
seeds. *Paper*: Fashion-MNIST, MLP 6 × 256, 10 000 steps, probes every 500 steps on 2000 examples;
SND at width 256 with group sizes up to 256 and batch sizes up to 1024; 20-dimensional least-squares
problems; 5 seeds.

Claims tested (from the records; one value per seed, paired by seed where variants are compared; "≈ 1"
means κ < ``near_one`` = 2, which white data of N = 1000 samples in d = 10 dimensions meets from
sampling noise alone, κ ≈ ((1 + √(d/N))/(1 − √(d/N)))² ≈ 1.5):

1. *Standardization fixes scaling but not correlation; whitening fixes both* (LeCun et al. 1998 §4.3, §5.3;
   the lecture's demonstration):
   (a) κ(standardized, independent features); holds if the CI's upper end is < 2;
   (b) κ(standardized, correlated features); holds if the CI's lower end is > 2 (not ≈ 1);
   (c) the larger κ of PCA- and ZCA-whitened features over both kinds; holds if the CI's upper end < 2;
   (d) log(GD iterations standardized / ZCA-whitened), correlated features; holds if the CI is > 0;
   (e) log(GD iterations raw / standardized), independent features; holds if the CI is > 0.
2. *Whitened layers are better conditioned than BN layers* (Huang et al. 2018, 2019): statistic =
   log(κ with BN / κ with DBN), resp. IterNorm, averaged over the layers of a site and all probe steps
   (pairs where either κ is infinite — a singular covariance — are left out), (a, b) at the norm
   outputs, (c, d) at the post-ReLU layer inputs; holds if the CI is above 0.
3. *PCA whitening trains worse than ZCA* (Huang et al. 2018, stochastic axis swapping): (a) mean minibatch
   training loss over the last quarter of training, PCA minus ZCA; holds if the CI is above 0;
   (b) final test accuracy, ZCA minus PCA; holds if the CI is above 0. (A run that diverged has no
   late loss; such seeds drop out and n says how many remained.) The statistics say that PCA trains
   worse, not why: in the quick runs DBN-PCA does not train at all (its loss stays near log 10, its
   test accuracy 0.089 in every seed, a constant prediction), and at initialization its gradient is
   already ~25× ZCA's (norm 48 against 1.9 on the same batch), before any axis could swap: PCA's
   output depends on each eigenvector, whose derivative carries 1/(λᵢ − λⱼ) for nearby eigenvalues,
   where ZCA's Σ^{-1/2} has bounded divided differences (f(λᵢ) − f(λⱼ))/(λᵢ − λⱼ) instead.
4. *Whitening stochasticity grows with the group size and shrinks with the batch size* (Huang et al.
   2019 §3.2; 2020): per seed and method (ZCA, IterNorm), the least-squares fit
   log SND = a + b·log(group size) + c·log(batch size) over the grid; (a, b) slope b, holds if the CI
   is above 0; (c, d) slope c, holds if the CI is below 0.

Figure ``whitening``: (a) κ of the least-squares Hessian per transform, (a′) GD iterations, (b) κ of
the norm outputs over training (median of log κ over the hidden layers, a singular covariance
counted as κ = ∞ and drawn on the dotted "∞" line at the top; seeds' range shaded), (b′) the same
for the linear-layer inputs, (c) training loss of every variant (PCA vs ZCA), (d) SND vs group size per
batch size (solid ZCA, dashed IterNorm).

Reproduce::

    whybn run whitening                    # quick preset, ~2 minutes on 2 idle CPU cores
    whybn run whitening --preset paper --device cuda
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.claims import Claim, test_claim
from analysis.style import NORM_LABELS, labeled_legend, save_figure, use_style
from probes.conditioning import (
    gd_iterations_to_tolerance,
    layer_input_conditioning,
    least_squares_conditioning,
    make_least_squares,
    normalization_disturbance,
)
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

#: Network variants of parts (b, c): the norm ``make_net`` builds and its options (group size added).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "bn": ("bn", {}),
    "dbn": ("dbn", {"whitening": "zca"}),
    "dbn_pca": ("dbn", {"whitening": "pca"}),
    "iternorm": ("iternorm", {}),
}
VARIANT_ORDER = tuple(VARIANTS)
LABELS = {**NORM_LABELS, "dbn_pca": "DBN (PCA)"}
#: Okabe–Ito colours: the house palette gives ``dbn`` nearly the blue of ``bn`` (analysis/style.py).
VARIANT_COLORS = {
    "none": "#000000",
    "bn": "#0072B2",
    "dbn": "#009E73",
    "dbn_pca": "#D55E00",
    "iternorm": "#CC79A7",
}
TRANSFORMS = ("raw", "standardized", "pca", "zca")
FEATURE_KINDS = ("independent", "correlated")
SITES = {"norm_output": "norm output (ReLU input)", "layer_input": "linear-layer input (post-ReLU)"}
CONDITIONING_METRICS = ("condition_number", "effective_rank", "whiteness")
SND_METHODS = ("bn", "zca", "iternorm")
SOURCE_LECUN = "LeCun, Bottou, Orr & Müller 1998, Efficient BackProp, §4.3 and §5.3"
SOURCE_DBN = "Huang, Yang, Lang & Deng 2018, Decorrelated Batch Normalization"
SOURCE_ITN = "Huang, Zhou, Zhu, Liu & Shao 2019, Iterative Normalization, §3.2; Huang et al. 2020"


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    # (a) least squares
    ls_samples: int = 1000
    ls_dim: int = 10
    ls_correlation: float = 0.95
    ls_scale_decades: float = 1.0  # feature scales logspace(0, decades, d)
    ls_noise: float = 0.1
    ls_tol: float = 1e-6
    near_one: float = 2.0  # "κ ≈ 1" means κ < near_one
    # (b, c) training
    variants: tuple[str, ...] = VARIANT_ORDER
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 4
    width: int = 64
    group_size: int = 16  # channels per whitening group (dbn, iternorm)
    activation: str = "relu"
    init: str = "kaiming"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    steps: int = 1500
    log_every: int = 25
    probe_every: int = 100
    eval_every: int = 250
    probe_size: int = 1000
    probe_bn: str = "batch"  # how batch-dependent norms normalize the probe batch
    # (d) whitening stochasticity
    snd_batch_sizes: tuple[int, ...] = (64, 128, 256, 512)
    snd_group_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    snd_samples: int = 2048
    snd_rounds: int = 20
    iterations: int = 5  # Newton–Schulz iterations of IterNorm (training and SND)


QUICK = Config()
PAPER = replace(
    QUICK,
    seeds=5,
    ls_dim=20,
    ls_samples=4000,
    dataset="fashion_mnist",
    depth=6,
    width=256,
    steps=10_000,
    log_every=100,
    probe_every=500,
    eval_every=1000,
    probe_size=2000,
    snd_batch_sizes=(64, 128, 256, 512, 1024),
    snd_group_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    snd_samples=8192,
)

_LS_KEYS = ("ls_samples", "ls_dim", "ls_correlation", "ls_scale_decades", "ls_noise", "ls_tol")
_NET_KEYS = ("dataset", "data_root", "n_train", "n_test", "depth", "width", "activation", "init")
_TRAIN_KEYS = (
    *("group_size", "iterations", "lr", "momentum", "batch_size", "steps", "log_every"),
    *("probe_every", "eval_every", "probe_size", "probe_bn"),
)
_SND_KEYS = ("snd_batch_sizes", "snd_group_sizes", "snd_samples", "snd_rounds", "iterations")


def grid(config: Config) -> list[dict[str, Any]]:
    """Per seed: one least-squares run, one training run per variant, one disturbance run.

    Each run gets only the config fields its part uses, so changing one part reruns only that part.
    """
    unknown = sorted(set(config.variants) - set(VARIANTS))
    if unknown:
        raise KeyError(f"unknown variant(s) {unknown}; known variants: {', '.join(VARIANTS)}")
    fields = {
        "ls": {k: getattr(config, k) for k in _LS_KEYS},
        "net": {k: getattr(config, k) for k in _NET_KEYS},
        "train": {k: getattr(config, k) for k in _TRAIN_KEYS},
        "snd": {k: getattr(config, k) for k in _SND_KEYS},
    }
    runs: list[dict[str, Any]] = []
    for seed in range(config.seeds):
        runs.append(
            {
                "part": "least_squares",
                "arch": "linear",
                "norm": "none",
                "dataset": "least_squares",
                "seed": seed,
                **fields["ls"],
            }
        )
        for v in config.variants:
            runs.append(
                {
                    "part": "training",
                    "arch": "mlp",
                    "variant": v,
                    "norm": VARIANTS[v][0],
                    "seed": seed,
                    **fields["net"],
                    **fields["train"],
                }
            )
        runs.append(
            {
                "part": "disturbance",
                "arch": "mlp",
                "norm": "none",
                "seed": seed,
                **fields["net"],
                **fields["snd"],
            }
        )
    return runs


# ----------------------------------------------------------------------------------------------------
# (a) least squares


def feature_transforms(x: np.ndarray) -> dict[str, np.ndarray]:
    """The features ``x`` ``(N, d)`` raw, standardized ((x − μ)/σ per feature), PCA-whitened
    (Λ^{-1/2}Uᵀ(x − μ)) and ZCA-whitened (UΛ^{-1/2}Uᵀ(x − μ)), with UΛUᵀ the biased covariance —
    the variants of ``probes.conditioning.least_squares_conditioning``, whose features it does not return.
    """
    xc = x - x.mean(0)
    lam, u = np.linalg.eigh(xc.T @ xc / x.shape[0])
    pca = xc @ u / np.sqrt(lam)  # (N, d)
    return {"raw": x, "standardized": xc / x.std(0), "pca": pca, "zca": pca @ u.T}


def least_squares_rows(rc: dict[str, Any]) -> list[dict[str, Any]]:
    """κ of H = XᵀX/N and GD iterations to ``ls_tol`` for every feature kind and transform."""
    d = rc["ls_dim"]
    rows = []
    for kind in FEATURE_KINDS:
        x, y, _ = make_least_squares(
            rc["ls_samples"],
            d,
            correlated=kind == "correlated",
            scales=np.logspace(0.0, rc["ls_scale_decades"], d),
            correlation=rc["ls_correlation"],
            noise=rc["ls_noise"],
            seed=rc["seed"],
        )
        spectra = least_squares_conditioning(x)
        for name, features in feature_transforms(x).items():
            gd = gd_iterations_to_tolerance(features, y, tol=rc["ls_tol"])
            values = {
                "condition_number": spectra[name].condition_number,
                "effective_rank": spectra[name].effective_rank,
                "iterations": gd.iterations,
                "converged": float(gd.converged),
                "gd_condition_number": gd.condition_number,
            }
            rows += [
                {
                    "step": 0,
                    "probe": "least_squares",
                    "layer": name,
                    "features": kind,
                    "metric": m,
                    "value": v,
                }
                for m, v in values.items()
            ]
    return rows


# ----------------------------------------------------------------------------------------------------
# (b, c) training with conditioning probes


def conditioning_sites(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Module name → (site, module) whose input is measured: every hidden activation (its input is the
    norm's output, ``norm_output``) and every linear layer after the first (``layer_input``)."""
    sites = {name: ("norm_output", act) for name, act in model.named_activations()}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    sites.update({name: ("layer_input", m) for name, m in linears[1:]})
    return sites


def conditioning_probe(probe_batch: tuple[torch.Tensor, torch.Tensor], bn: str = "batch"):
    """A probe: condition number, effective rank and whiteness of every site's input covariance."""

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        sites = conditioning_sites(ctx.model)
        batch = tuple(t.to(ctx.device) for t in probe_batch)
        result = layer_input_conditioning(
            ctx.model, batch, layers={name: m for name, (_, m) in sites.items()}, bn=bn
        )
        return [
            {"layer": name, "site": site, "metric": m, "value": getattr(result[name], m)}
            for name, (site, _) in sites.items()
            for m in CONDITIONING_METRICS
        ]

    return probe


def training_rows(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    data = load_run_data(rc)
    norm, options = VARIANTS[rc["variant"]]
    if norm in ("dbn", "iternorm"):
        options = {**options, "group_size": rc["group_size"]}
    if norm == "iternorm":
        options = {**options, "iterations": rc["iterations"]}
    model = make_run_net(rc, data.info, norm=norm, norm_options=options)
    probe_batch = (data.train.tensors[0][: rc["probe_size"]], data.train.tensors[1][: rc["probe_size"]])
    schedule = ProbeSchedule(
        conditioning_probe(probe_batch, rc["probe_bn"]), every=rc["probe_every"], name="conditioning"
    )
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd"),
        probes=[schedule],
        desc=f"whitening {rc['variant']} s{rc['seed']}",
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# (d) whitening stochasticity


def disturbance_rows(rc: dict[str, Any]) -> list[dict[str, Any]]:
    """SND of BN, ZCA and IterNorm over batch and group sizes, on the second hidden layer's
    pre-activations of the no-norm MLP at initialization (``snd_samples`` examples chosen by the seed)."""
    data = load_run_data(rc)
    if rc["depth"] < 2:
        raise ValueError("disturbance: needs depth >= 2 (measured at the second hidden layer)")
    model = make_run_net(rc, data.info, norm="none", norm_options={})
    chosen = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(rc["seed"]))
    x = data.train.tensors[0][chosen[: rc["snd_samples"]]]
    with torch.no_grad():
        h = model.blocks[1].layer(model.blocks[0](x.flatten(1)))  # (snd_samples, width)
    rows = []
    for method in SND_METHODS:
        groups = (1,) if method == "bn" else rc["snd_group_sizes"]
        for batch_size in rc["snd_batch_sizes"]:
            for group_size in groups:
                result = normalization_disturbance(
                    h,
                    method=method,
                    batch_size=batch_size,
                    group_size=group_size,
                    n_batches=rc["snd_rounds"],
                    iterations=rc["iterations"],
                    seed=rc["seed"],
                )
                rows += [{"step": 0, **row} for row in result.to_records()]
    return rows


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    if rc["part"] == "least_squares":
        return least_squares_rows(rc)
    if rc["part"] == "training":
        return training_rows(rc, ctx)
    return disturbance_rows(rc)


# ----------------------------------------------------------------------------------------------------
# analysis


def least_squares_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (seed, features, transform) with columns condition_number, iterations, ..."""
    rows = df[df["probe"] == "least_squares"]
    table = rows.pivot_table(
        index=["seed", "features", "layer"], columns="metric", values="value", aggfunc="first"
    )
    return table.rename_axis(index={"layer": "transform"})


def conditioning_table(df: pd.DataFrame, metric: str = "condition_number") -> pd.DataFrame:
    """``metric`` of the conditioning probe, index (site, seed, step, layer), one column per variant."""
    rows = df[(df["probe"] == "conditioning") & (df["metric"] == metric)]
    return rows.pivot_table(
        index=["site", "seed", "step", "layer"], columns="variant", values="value", aggfunc="first"
    )


def conditioning_gain(df: pd.DataFrame, site: str, other: str) -> pd.Series:
    """Per seed: mean over (layer, step) of log(κ with BN / κ with ``other``) at ``site``; pairs with a
    non-finite κ are left out."""
    table = conditioning_table(df)
    if table.empty or site not in table.index.get_level_values("site") or not {"bn", other} <= set(table):
        return pd.Series(dtype=float)
    pair = table.xs(site, level="site")[["bn", other]]
    pair = pair[np.isfinite(pair).all(axis=1)]  # κ = ∞ (a singular covariance) on either side: no ratio
    return np.log(pair["bn"] / pair[other]).groupby(level="seed").mean()


def late_training_loss(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): mean minibatch training loss over the last quarter of the steps."""
    loss = df[(df["probe"] == "train") & (df["metric"] == "loss")]
    last = df[df["part"] == "training"]["step"].max()
    late = loss[loss["step"] >= 0.75 * last]
    return late.pivot_table(index="seed", columns="variant", values="value", aggfunc="mean")


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): test accuracy at the last evaluation."""
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()]
    return last.pivot_table(index="seed", columns="variant", values="value", aggfunc="first")


def disturbance_slopes(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, seed): least-squares fit log SND = a + b log g + c log m; columns ``group``, ``batch``."""
    rows = df[(df["probe"] == "normalization_disturbance") & (df["metric"] == "snd_mean")]
    out = []
    for (method, seed), part in rows.groupby(["layer", "seed"]):
        if part["group_size"].nunique() < 2 or part["batch_size"].nunique() < 2:
            continue
        design = np.column_stack([np.ones(len(part)), np.log(part["group_size"]), np.log(part["batch_size"])])
        coef = np.linalg.lstsq(design, np.log(part["value"].to_numpy()), rcond=None)[0]
        out.append({"method": method, "seed": seed, "group": coef[1], "batch": coef[2]})
    return pd.DataFrame(out, columns=["method", "seed", "group", "batch"])


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return table[name] if name in table else pd.Series(dtype=float)


def claims(df: pd.DataFrame, near_one: float = 2.0) -> list[Claim]:
    """The claims of the module docstring, in its order (1a–e, 2a–d, 3a–b, 4a–d)."""
    result = []
    ls = least_squares_table(df) if (df["probe"] == "least_squares").any() else pd.DataFrame()

    def ls_values(kind: str, transform: str, metric: str) -> pd.Series:
        if ls.empty:
            return pd.Series(dtype=float)
        return ls.xs((kind, transform), level=("features", "transform"))[metric]

    whitened = pd.concat([ls_values(k, t, "condition_number") for k in FEATURE_KINDS for t in ("pca", "zca")])
    result += [
        test_claim(
            "Standardizing independent, badly scaled features makes the least-squares Hessian "
            f"nearly perfectly conditioned (κ < {near_one:g})",
            SOURCE_LECUN,
            "κ(XᵀX/N) of standardized features, independent features",
            ls_values("independent", "standardized", "condition_number").to_numpy(),
            threshold=near_one,
            direction="<",
        ),
        test_claim(
            f"Standardizing correlated features leaves the Hessian ill conditioned (κ > {near_one:g})",
            SOURCE_LECUN,
            "κ(XᵀX/N) of standardized features, correlated features",
            ls_values("correlated", "standardized", "condition_number").to_numpy(),
            threshold=near_one,
            direction=">",
        ),
        test_claim(
            f"Whitening (PCA or ZCA) makes the Hessian perfectly conditioned (κ < {near_one:g}) for "
            "independent and correlated features",
            SOURCE_LECUN,
            "max over {PCA, ZCA} × {independent, correlated} of κ(XᵀX/N) of the whitened features",
            whitened.groupby(level="seed").max().to_numpy() if len(whitened) else [],
            threshold=near_one,
            direction="<",
        ),
        test_claim(
            "With correlated features, gradient descent converges in fewer iterations on whitened "
            "than on standardized features",
            SOURCE_LECUN,
            "log(GD iterations standardized / ZCA-whitened), correlated features",
            np.log(
                ls_values("correlated", "standardized", "iterations")
                / ls_values("correlated", "zca", "iterations")
            ).to_numpy(),
        ),
        test_claim(
            "With independent, badly scaled features, gradient descent converges in fewer iterations "
            "on standardized than on raw features",
            SOURCE_LECUN,
            "log(GD iterations raw / standardized), independent features",
            np.log(
                ls_values("independent", "raw", "iterations")
                / ls_values("independent", "standardized", "iterations")
            ).to_numpy(),
        ),
    ]
    for site, site_label in SITES.items():
        for other in ("dbn", "iternorm"):
            result.append(
                test_claim(
                    f"{LABELS[other]} layers are better conditioned than BN layers ({site_label})",
                    SOURCE_DBN if other == "dbn" else SOURCE_ITN,
                    f"log(κ with BN / κ with {LABELS[other]}) of the {site_label} covariance, mean over "
                    "layers and probe steps (probe batch, batch statistics)",
                    conditioning_gain(df, site, other).to_numpy(),
                )
            )
    late = late_training_loss(df)
    acc = final_accuracy(df)
    result += [
        test_claim(
            "PCA whitening trains worse than ZCA whitening (higher training loss)",
            SOURCE_DBN + ", PCA vs ZCA whitening",
            "mean minibatch training loss over the last quarter of training, DBN-PCA minus DBN-ZCA",
            (_column(late, "dbn_pca") - _column(late, "dbn")).dropna().to_numpy(),
        ),
        test_claim(
            "PCA whitening reaches a lower test accuracy than ZCA whitening",
            SOURCE_DBN + ", PCA vs ZCA whitening",
            "final test accuracy, DBN-ZCA minus DBN-PCA",
            (_column(acc, "dbn") - _column(acc, "dbn_pca")).dropna().to_numpy(),
        ),
    ]
    slopes = disturbance_slopes(df)
    trends = (("group", "grows with the group size", ">"), ("batch", "shrinks with the batch size", "<"))
    for key, word, direction in trends:
        for method in ("zca", "iternorm"):
            values = slopes[slopes["method"] == method][key].to_numpy()
            result.append(
                test_claim(
                    f"The stochastic normalization disturbance of {'ZCA' if method == 'zca' else 'IterNorm'}"
                    f" whitening {word}",
                    SOURCE_ITN,
                    f"slope of log SND vs log {key} size (joint least-squares fit with log "
                    f"{'batch' if key == 'group' else 'group'} size)",
                    values,
                    direction=direction,
                )
            )
    return result


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 6.8))
    ax_k, ax_it, ax_no, ax_li, ax_loss, ax_snd = axes.flat
    kind_palette = dict(zip(FEATURE_KINDS, sns.color_palette("colorblind", 2).as_hex(), strict=True))

    ls = df[df["probe"] == "least_squares"]
    for ax, metric, title in (
        (ax_k, "condition_number", "(a) least squares: κ of the Hessian"),
        (ax_it, "iterations", "(a′) GD iterations to tolerance"),
    ):
        part = ls[ls["metric"] == metric]
        sns.stripplot(
            part,
            x="layer",
            y="value",
            hue="features",
            order=TRANSFORMS,
            hue_order=FEATURE_KINDS,
            palette=kind_palette,
            dodge=True,
            jitter=0.15,
            size=4,
            ax=ax,
            log_scale=True,
        )
        ax.set(title=title, xlabel="features", ylabel=metric.replace("_", " "))
    ax_k.axhline(config.near_one, color="0.5", ls=":", lw=1)
    ax_it.legend().remove()

    variants = [v for v in VARIANT_ORDER if v in set(df["variant"].dropna())]
    palette = {v: VARIANT_COLORS[v] for v in variants}
    kappa = df[(df["probe"] == "conditioning") & (df["metric"] == "condition_number")].copy()
    kappa["log10_kappa"] = np.log10(kappa["value"])  # a singular covariance: κ = ∞, log κ = ∞
    for ax, (site, label), letter in zip((ax_no, ax_li), SITES.items(), ("b", "b′"), strict=True):
        part = kappa[kappa["site"] == site]
        # median over layers, ∞ included (a mean of the finite ones made DBN-PCA, singular at 2 of 4
        # layers, look as well conditioned as the others), then the spread over seeds
        per_run = part.groupby(["variant", "seed", "step"], as_index=False)["log10_kappa"].median()
        finite = per_run["log10_kappa"][np.isfinite(per_run["log10_kappa"])]
        if len(finite) < len(per_run):
            ceiling = (finite.max() if len(finite) else 0.0) + 1.0
            per_run["log10_kappa"] = per_run["log10_kappa"].clip(upper=ceiling)
            ax.axhline(ceiling, color="0.5", ls=":", lw=1)
            ax.annotate("∞ (singular)", (0.01, ceiling), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize="x-small", color="0.3")  # fmt: skip
        sns.lineplot(
            per_run,
            x="step",
            y="log10_kappa",
            hue="variant",
            hue_order=variants,
            palette=palette,
            errorbar=("pi", 100),
            ax=ax,
        )
        ax.set(
            title=f"({letter}) κ of the {label}",
            xlabel="training step",
            ylabel="log₁₀ κ (median over layers)",
        )
        ax.legend().remove()

    loss = df[(df["probe"] == "train") & (df["metric"] == "loss")]
    sns.lineplot(
        loss,
        x="step",
        y="value",
        hue="variant",
        hue_order=variants,
        palette=palette,
        errorbar=("pi", 100),
        ax=ax_loss,
    )
    ax_loss.set(
        title="(c) training loss: PCA vs ZCA whitening", xlabel="training step", ylabel="minibatch loss"
    )
    labeled_legend(ax_loss, LABELS, loc="upper right", fontsize="small")

    snd = df[(df["probe"] == "normalization_disturbance") & (df["metric"] == "snd_mean")]
    whitening = snd[snd["layer"] != "bn"].copy()
    whitening["method"] = whitening["layer"].map({"zca": "ZCA", "iternorm": "IterNorm"})
    whitening["batch size"] = whitening["batch_size"].astype(int)
    sns.lineplot(
        whitening,
        x="group_size",
        y="value",
        hue="batch size",
        style="method",
        palette="viridis",
        errorbar=("pi", 100),
        marker="o",
        markersize=3,
        ax=ax_snd,
    )
    ax_snd.set(
        xscale="log",
        yscale="log",
        title="(d) SND vs group size",
        xlabel="group size",
        ylabel="stochastic normalization disturbance",
    )
    ax_snd.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    save_figure(fig, out_dir, "whitening")
    return claims(df, config.near_one)


STUDY = Study(
    name="whitening",
    title="Standardization vs whitening: conditioning, PCA vs ZCA, and the stochasticity of batch whitening",
    reproduces="LeCun et al. 1998 §4.3, §5.3; Huang et al. 2018 (DBN); Huang et al. 2019 (IterNorm) §3.2",
    figures=("whitening",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("part", "variant", "seed"),
    config_columns=("part", "variant"),
)
