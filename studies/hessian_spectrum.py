"""Hessian spectrum — Ghorbani, Krishnan & Xiao 2019 (§4); Yao, Gholami, Keutzer & Mahoney 2020 (PyHessian).

Does normalization change the curvature of the training loss? Networks without normalization and with
batch norm (BN), layer norm (LN), group norm (GN, 8 groups) and *population-statistics BN* are trained
with SGD (momentum 0.9, He/Kaiming init, the same learning rate for every norm), and at a few steps
over training (``probe_steps``) we measure the Hessian of the loss on a fixed probe batch (the first
``probe_size`` training examples):

* the top-K eigenvalues λ1 ≥ … ≥ λK by Lanczos (K = number of classes = 10), hence λmax = λ1 and the
  outlier ratio λ1/λK (undefined, recorded as NaN, when λK ≤ 0);
* the fraction of the gradient's squared norm in the top-K eigenspace, ‖Vᵀg‖²/‖g‖² (the Ritz vectors
  are re-orthonormalized in float64 first);
* the trace by Hutch++ (Meyer et al. 2021, Hutchinson's estimator deflated by a sketched top subspace;
  ``trace_method="hutchinson"`` for the plain one) with ``trace_probes`` Hessian-vector products;
* at ``density_steps`` (by default the end of training) the spectral density by stochastic Lanczos
  quadrature (``density_runs`` runs of ``density_iter`` steps; the nodes and weights are recorded and
  the figure smooths them with a Gaussian).

How BN is measured (column ``bn`` of the records; column ``view``): BN networks are measured on the
loss the optimizer trains, with the probe batch's statistics (``bn="batch"``, ``view="train"``), and
also as the inference network, with their running statistics (``bn="running"``, ``view="inference"``:
PyHessian's eval-mode view). Networks without batch-dependent layers are measured once
(``bn="batch"``, ``view="train"``).

Population-statistics BN (``norm="popbn"``; Ghorbani et al. §4.1): the network is the BN network of
the same seed, but the BN layers normalize with statistics of a large "population" batch instead of
the mini-batch's, and the statistics are not differentiated through. Implementation: before training
and then after every ``pop_every`` updates, ``pop_size`` training examples (a fresh random draw) go
through the network in one forward pass without gradient in which every BN layer normalizes with that
batch's statistics and writes them into its running buffers (momentum set to 1 for the pass; mean and
biased variance; every layer therefore sees the population-normalized outputs of the layers below);
between refreshes the BN layers stay in running-statistics (eval) mode, so the training loss
normalizes with these fixed buffers. Its training loss is therefore measured with ``bn="running"``
(``view="train"``).

Setups. *Quick*: MNIST-1D (4000 training examples), ReLU MLPs of width 64 with 2 and 8 hidden layers,
norms none/bn/ln/gn/popbn, 3 seeds, SGD lr 0.05, momentum 0.9, batch 128, 500 updates (16 epochs),
probes at steps 0, 25, 50, 100, 200, 350, 500 on 256 examples, density at step 500. The convolutional
comparisons (VGG, ResNet with and without residual connections) do not fit the quick preset's time
budget on 2 CPU cores; they are in the *paper* preset: Fashion-MNIST (``dataset=cifar10`` with
``data_root`` for CIFAR-10), MLP (3/12 hidden layers of 256), VGG (4/8 conv layers), ResNet-8/20 and
the same without residual connections, 5 seeds, 5000 updates, probes on 1000 examples. With He init
the deep no-norm MLP trains here (DESIGN.md's warning concerns PyTorch's default init); matched-loss
comparisons are reported as well as matched-step ones.

Claims tested (from the records; one value per seed, paired by seed; BN measured on the training loss,
popbn with its population statistics; "early" = ``early_step``, step 50 of 500 in the quick preset):

1. *Without BN, large outlier eigenvalues appear early* (Ghorbani §4): statistic = log(λ1/λK without
   norm) − log(λ1/λK with BN) at the early step, for each net and depth; holds if the 95% CI is above 0.
   λ1/λK is Ghorbani et al.'s outlier measure: how far the top eigenvalue stands from the K-th, not
   from the bulk (the density in the figure shows that).
2. *Without BN the gradient concentrates in the top-K eigenspace* (Ghorbani §4): statistic = gradient
   fraction without norm − with BN at the early step, each net and depth; holds if the CI is above 0.
3. *Population-statistics BN brings the outliers back* (Ghorbani §4.1): statistic = log(λ1/λK popbn) −
   log(λ1/λK BN) at the early step, each net and depth; holds if the CI is above 0: the ratio rises,
   not necessarily to the no-norm net's (at depth 2 in the quick runs +0.16 against +0.74).
4. *BN's smoothing of the top eigenvalue is stronger in deep than in shallow networks* (PyHessian §4):
   statistic = log(λmax none / λmax BN) at the deepest depth minus at the shallowest, for each net,
   (a) at the final step (matched step) and (b) at matched loss: for each seed and depth, L* = the
   larger of the two runs' lowest probe-batch losses, and each run's λmax is read where its loss
   first reaches L*, interpolated linearly in the loss between the two probe steps around that
   point (read at the probe step itself where the loss there is L*: the run whose lowest loss it
   is). Without the interpolation the quick preset's 7 probe steps read 5 of 6 pairs both at step
   500, at losses up to a third apart (0.79 against 0.59): a matched-step comparison in all but
   name. Holds if the CI is above 0.
5. (Paper preset, when ResNets with and without residual connections are both run) *Residual
   connections smooth the loss landscape* (PyHessian §4): statistic = log(λmax without / with residual
   connections), BN ResNets at the deepest depth, final step; holds if the CI is above 0.

Figure ``hessian_spectrum``: one row per net and depth; (a) λmax over training per norm (dashed: BN's
inference view), (b) the trace, (c) the spectral density at the end for none, BN and popbn (log
density, seed 0), (d) the outlier ratio λ1/λK, (e) the gradient fraction in the top-K eigenspace,
(f) the probe-batch loss (for reading curvature at matched loss).

Reproduce::

    whybn run hessian_spectrum                    # quick preset, ~2 minutes on 2 idle CPU cores
    whybn run hessian_spectrum --preset paper --device cuda
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
from analysis.style import NORM_LABELS, norm_palette, ordered_norms, save_figure, use_style
from probes import spectral
from probes.functional import is_batch_dependent
from probes.hvp import hessian_operator
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule

#: Net names of the grid: the arch ``make_net`` builds and its options.
NETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {}),
    "vgg": ("vgg", {}),
    "resnet": ("resnet", {"residual": True}),
    "plain_resnet": ("resnet", {"residual": False}),
}
NET_LABELS = {"mlp": "MLP", "vgg": "VGG", "resnet": "ResNet", "plain_resnet": "ResNet w/o residual"}
LABELS = {**NORM_LABELS, "popbn": "BN, population stats"}
SOURCE_G = "Ghorbani, Krishnan & Xiao 2019, §4"
SOURCE_Y = "Yao, Gholami, Keutzer & Mahoney 2020 (PyHessian), §4"


@dataclass(frozen=True)
class Config:
    nets: tuple[str, ...] = ("mlp",)  # names of NETS
    mlp_depths: tuple[int, ...] = (2, 8)  # hidden layers
    vgg_depths: tuple[int, ...] = (4, 8)  # conv layers
    resnet_depths: tuple[int, ...] = (8, 20)  # 6n + 2
    mlp_width: int = 64
    conv_width: int = 16  # base channels of vgg and resnet
    norms: tuple[str, ...] = ("none", "bn", "ln", "gn", "popbn")
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    activation: str = "relu"
    init: str = "kaiming"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    steps: int = 500
    eval_every: int = 100
    probe_steps: tuple[int, ...] = (0, 25, 50, 100, 200, 350, 500)
    early_step: int = 50  # claims 1-3 are read here
    probe_size: int = 256  # the first probe_size training examples
    eig_tol: float = 1e-3
    trace_probes: int = 20
    trace_method: str = "hutchpp"
    density_steps: tuple[int, ...] = (500,)
    density_iter: int = 30
    density_runs: int = 3
    pop_size: int = 2000  # population batch of popbn
    pop_every: int = 50  # popbn refreshes its statistics every pop_every updates


QUICK = Config()
PAPER = replace(
    QUICK,
    nets=("mlp", "vgg", "resnet", "plain_resnet"),
    mlp_depths=(3, 12),
    mlp_width=256,
    seeds=5,
    dataset="fashion_mnist",
    steps=5000,
    eval_every=500,
    probe_steps=(0, 100, 250, 500, 1000, 2000, 3500, 5000),
    early_step=500,
    probe_size=1000,
    trace_probes=60,
    density_steps=(0, 5000),
    density_iter=80,
    density_runs=5,
    pop_size=5000,
    pop_every=100,
)


def _depths(config: Config, net: str) -> tuple[int, ...]:
    arch = NETS[net][0]
    return {"mlp": config.mlp_depths, "vgg": config.vgg_depths, "resnet": config.resnet_depths}[arch]


def grid(config: Config) -> list[dict[str, Any]]:
    unknown = sorted(set(config.nets) - set(NETS))
    if unknown:
        raise KeyError(f"unknown net(s) {unknown}; known nets: {', '.join(NETS)}")
    if not {config.early_step, *config.density_steps} <= set(config.probe_steps):
        raise ValueError("early_step and density_steps must be among probe_steps")
    base = {k: v for k, v in asdict(config).items() if k not in ("nets", "norms", "seeds")}
    base = {k: v for k, v in base.items() if not k.endswith("_depths")}
    return [
        {"arch": NETS[net][0], "net": net, "depth": depth, "norm": norm, "seed": seed, **base}
        for net in config.nets
        for depth in _depths(config, net)
        for norm in config.norms
        for seed in range(config.seeds)
    ]


# ----------------------------------------------------------------------------------------------------
# population-statistics batch norm (Ghorbani et al. 2019, §4.1)


def refresh_population_statistics(model: nn.Module, x: Tensor) -> None:
    """Write the statistics of the population batch ``x`` into every BN layer; leave BN in running mode.

    One forward pass without gradient with every BN layer normalizing with ``x``'s statistics and its
    momentum set to 1, so each running buffer becomes the mean / variance (biased: the one the pass
    normalized with) of its input, and each layer's input is the population-normalized output of the
    layers below; in eval mode the network then reproduces that pass exactly. Afterwards the BN layers
    are in eval mode (they normalize with these fixed buffers, which receive no gradient); every other
    module keeps its ``training`` flag.
    """
    norms = [m for m in model.modules() if is_batch_dependent(m)]
    flags = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        counts[module] = args[0].numel() // args[0].shape[1]  # values per channel

    hooks = [m.register_forward_pre_hook(count) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.train()
            m.momentum = 1.0
        with torch.no_grad():
            model(x)
            for m, n in counts.items():
                m.running_var.mul_((n - 1) / n)  # unbiased → the variance the pass normalized with
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    for m in norms:
        m.eval()


def population_refresher(
    model: nn.Module, x: Tensor, pop_size: int, every: int, seed: int
) -> Callable[[ProbeContext, float], None]:
    """Refresh ``model``'s population statistics now and return the ``on_step`` hook that refreshes them
    after every ``every`` updates, each time from ``pop_size`` fresh random rows of ``x`` (own RNG)."""
    generator = torch.Generator().manual_seed(seed)

    def refresh() -> None:
        index = torch.randperm(len(x), generator=generator)[:pop_size]
        refresh_population_statistics(model, x[index.to(x.device)])

    refresh()

    def on_step(ctx: ProbeContext, loss: float) -> None:
        if (ctx.step + 1) % every == 0:  # ctx.step is the update just made: the state is step + 1
            refresh()

    return on_step


# ----------------------------------------------------------------------------------------------------
# the Hessian probe


def measurement_modes(norm: str) -> list[tuple[str, str]]:
    """``(bn, view)`` pairs a run of ``norm`` is measured in; ``view="train"`` is the loss trained."""
    if norm == "bn":
        return [("batch", "train"), ("running", "inference")]
    if norm == "popbn":
        return [("running", "train")]
    return [("batch", "train")]


def hessian_probe(
    batch: tuple[Tensor, Tensor], *, bn: str, view: str, num_classes: int, rc: dict[str, Any]
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: top-K eigenvalues, outlier ratio, gradient fraction, trace, loss (and at
    ``density_steps`` the SLQ density) of the Hessian of the loss on ``batch``, with norms in mode ``bn``.

    One Hessian operator serves every estimate of a step (its gradient graph is built once). If the
    torch Lanczos returns fewer than K values or does not converge, ARPACK redoes the eigenvalues
    (row ``arpack_fallback`` = 1). ``n_matvecs`` counts every eigenvalue and trace product.
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        xb, yb = batch[0].to(ctx.device), batch[1].to(ctx.device)
        seed = rc["seed"]
        with hessian_operator(ctx.model, ctx.loss_fn, (xb, yb), bn=bn) as op:
            eig = spectral.eigenvalues(
                op, k=num_classes, which="LA", tol=rc["eig_tol"], seed=seed, return_vectors=True
            )
            fallback = len(eig.values) < num_classes or not eig.converged
            if fallback:  # torch Lanczos can stop early on a huge spectral range (float32); ARPACK does not
                eig = spectral.eigenvalues(
                    op, k=num_classes, which="LA", tol=rc["eig_tol"], seed=seed, method="scipy",
                    return_vectors=True,
                )  # fmt: skip
            gradient = op.gradient()
            loss = op.loss()
            trace = spectral.trace(op, n_probes=rc["trace_probes"], method=rc["trace_method"], seed=seed)
            n_matvecs = op.n_matvecs  # eigenvalues (both tries) and trace
            density = (
                spectral.density(op, n_iter=rc["density_iter"], n_runs=rc["density_runs"], seed=seed)
                if ctx.step in rc["density_steps"]
                else None
            )
        values = np.asarray(eig.values, dtype=np.float64)
        basis, _ = np.linalg.qr(np.asarray(eig.vectors, dtype=np.float64))  # float32 Ritz vectors → exact
        fraction = spectral.gradient_fraction_in_top_subspace(gradient, basis)
        defined = len(values) == num_classes
        ratio = spectral.outlier_ratio(values, num_classes, dtype=op.dtype) if defined else float("nan")
        tag = {"bn": bn, "view": view}
        rows = [
            {"probe": "hessian", "metric": "eigenvalue", "index": i, "value": float(v), **tag}
            for i, v in enumerate(values)
        ]
        scalars = {
            "outlier_ratio": ratio,
            "gradient_fraction": fraction,
            "trace": trace.value,
            "trace_stderr": trace.stderr,
            "loss": loss,
            "grad_norm": float(torch.linalg.vector_norm(gradient)),
            "n_matvecs": n_matvecs,
            "converged": float(eig.converged),
            "arpack_fallback": float(fallback),
        }
        rows += [{"probe": "hessian", "metric": k, "value": float(v), **tag} for k, v in scalars.items()]
        if density is not None:
            rows += [
                {"probe": "hessian_density", "metric": "slq_weight", "run": r, "index": i,
                 "node": float(density.nodes[r, i]), "value": float(density.weights[r, i]), **tag}
                for r in range(density.nodes.shape[0])
                for i in range(density.nodes.shape[1])
            ]  # fmt: skip
        return rows

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    data = load_run_data(rc)
    arch, options = NETS[rc["net"]]
    width = rc["mlp_width"] if arch == "mlp" else rc["conv_width"]
    model = make_run_net(
        rc, data.info, arch=arch, norm="bn" if rc["norm"] == "popbn" else rc["norm"], width=width, **options
    )
    x, y = data.train.tensors
    probe_batch = (x[: rc["probe_size"]], y[: rc["probe_size"]])
    on_step = None
    if rc["norm"] == "popbn":
        model.to(ctx.device)
        on_step = population_refresher(model, x.to(ctx.device), rc["pop_size"], rc["pop_every"], rc["seed"])
    schedules = [
        ProbeSchedule(
            hessian_probe(probe_batch, bn=bn, view=view, num_classes=data.info.num_classes, rc=rc),
            steps=[s for s in rc["probe_steps"] if s <= rc["steps"]],
            name=f"hessian_{bn}",
        )
        for bn, view in measurement_modes(rc["norm"])
    ]
    result = train_run(
        model,
        data,
        rc,
        ctx,
        config=run_train_config(rc, log_every=min(rc["eval_every"], 25)),
        probes=schedules,
        desc=f"hessian_spectrum {rc['net']}{rc['depth']} {rc['norm']} s{rc['seed']}",
        on_step=on_step,
    )
    return [{**row, "net": rc["net"], "depth": rc["depth"]} for row in result.records]


# ----------------------------------------------------------------------------------------------------
# analysis


def hessian_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run, step and view: lambda_max (λ1), lambda_k (λK), outlier_ratio, gradient_fraction,
    trace, loss — read from the raw ``hessian`` rows."""
    rows = df[df["probe"] == "hessian"]
    keys = ["run_id", "net", "depth", "norm", "seed", "step", "view"]
    eig = rows[rows["metric"] == "eigenvalue"]
    lam = eig.pivot_table(index=keys, columns="index", values="value")
    wide = rows[rows["metric"] != "eigenvalue"].pivot_table(index=keys, columns="metric", values="value")
    wide["lambda_max"] = lam[lam.columns.min()]
    wide["lambda_k"] = lam[lam.columns.max()]
    return wide.reset_index()


def _trained(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["view"] == "train"]


def _groups(table: pd.DataFrame) -> list[tuple[str, int]]:
    """(net, depth) pairs present, in NETS order then by depth."""
    pairs = {(n, int(d)) for n, d in zip(table["net"], table["depth"], strict=True)}
    return sorted(pairs, key=lambda p: (list(NETS).index(p[0]) if p[0] in NETS else len(NETS), p[1]))


def _by_seed(part: pd.DataFrame, column: str, norms: tuple[str, ...]) -> pd.DataFrame:
    """seed × norm table of ``column``, seeds where every norm of ``norms`` has a value."""
    wide = part.pivot_table(index="seed", columns="norm", values=column)
    return wide[list(norms)].dropna() if set(norms) <= set(wide.columns) else pd.DataFrame(columns=norms)


def _at_step(table: pd.DataFrame, net: str, depth: int, step: int) -> pd.DataFrame:
    t = _trained(table)
    return t[(t["net"] == net) & (t["depth"] == depth) & (t["step"] == step)]


def lambda_max_at_matched_loss(table: pd.DataFrame, net: str, depth: int, a: str, b: str) -> pd.DataFrame:
    """Per seed, λmax of norms ``a`` and ``b`` at matched probe-batch loss (training view).

    L* = the larger of the two runs' lowest loss over the probe steps; each run's λmax is read where its
    loss first reaches L*: at probe step k, the first with loss ≤ L*, if its loss is L* or k is the
    first probe, else interpolated linearly in the loss between steps k − 1 and k. Columns ``a``,
    ``b`` (λmax) and ``a_step``, ``b_step`` (the step, interpolated alike).
    """
    t = _trained(table)
    t = t[(t["net"] == net) & (t["depth"] == depth) & t["norm"].isin([a, b])].sort_values("step")
    rows = []
    for seed, part in t.groupby("seed"):
        runs = {norm: run for norm, run in part.groupby("norm")}
        if set(runs) != {a, b}:
            continue
        target = max(runs[a]["loss"].min(), runs[b]["loss"].min())
        row: dict[str, Any] = {"seed": seed}
        for norm in (a, b):
            loss, lam, step = (runs[norm][c].to_numpy(dtype=float) for c in ("loss", "lambda_max", "step"))
            k = int(np.argmax(loss <= target))  # the first probe step at or below L*
            w = 1.0 if k == 0 or loss[k] == target else (loss[k - 1] - target) / (loss[k - 1] - loss[k])
            j = max(k - 1, 0)  # w = 1: at step k itself
            row[norm] = lam[j] + w * (lam[k] - lam[j])
            row[f"{norm}_step"] = step[j] + w * (step[k] - step[j])
        rows.append(row)
    return pd.DataFrame(rows, columns=["seed", a, b, f"{a}_step", f"{b}_step"]).set_index("seed")


def _depth_contrast(lam: dict[int, pd.DataFrame]) -> np.ndarray:
    """Per seed, log(λmax none / λmax BN) at the deepest depth of ``lam`` minus at the shallowest."""
    gap = {d: np.log(part["none"] / part["bn"]) for d, part in lam.items()}
    return (gap[max(gap)] - gap[min(gap)]).dropna().to_numpy(dtype=float)


def _final_step(table: pd.DataFrame) -> int:
    return int(table["step"].max())


def claims(df: pd.DataFrame, config: Config) -> list[Claim]:
    """The claims of the module docstring, from the raw records; a claim whose norms (or nets) were not
    run is left out."""
    table = hessian_table(df)
    final, early_step = _final_step(table), config.early_step
    present = set(table["norm"])
    out = []
    for net, depth in _groups(table):
        where = f"{NET_LABELS.get(net, net)}, depth {depth}, step {early_step}"
        early = _at_step(table, net, depth, early_step)
        if {"none", "bn"} <= present:
            ratio = _by_seed(early, "outlier_ratio", ("none", "bn"))
            fraction = _by_seed(early, "gradient_fraction", ("none", "bn"))
            out += [
                test_claim(
                    f"Without BN the outlier ratio λ1/λK (Ghorbani et al.'s measure) is larger early in "
                    f"training ({where})",
                    SOURCE_G,
                    "log(λ1/λK without norm) − log(λ1/λK with BN), K = classes, BN with batch statistics",
                    np.log(ratio["none"] / ratio["bn"]).to_numpy(dtype=float),
                ),
                test_claim(
                    f"Without BN the gradient concentrates in the top-K Hessian eigenspace ({where})",
                    SOURCE_G,
                    "‖Vᵀg‖²/‖g‖² (V: top-K eigenvectors) without norm minus with BN",
                    (fraction["none"] - fraction["bn"]).to_numpy(dtype=float),
                ),
            ]
        if {"popbn", "bn"} <= present:
            pop = _by_seed(early, "outlier_ratio", ("popbn", "bn"))
            out.append(
                test_claim(
                    f"BN with population statistics raises the outlier ratio λ1/λK over BN with batch "
                    f"statistics: the outliers come back, not necessarily all the way ({where})",
                    SOURCE_G + ".1",
                    "log(λ1/λK, BN with population statistics) − log(λ1/λK, BN with batch statistics)",
                    np.log(pop["popbn"] / pop["bn"]).to_numpy(dtype=float),
                )
            )
    for net in dict.fromkeys(n for n, _ in _groups(table)):
        depths = sorted(int(d) for d in table.loc[table["net"] == net, "depth"].unique())
        if len(depths) < 2 or not {"none", "bn"} <= present:
            continue
        shallow, deep = depths[0], depths[-1]
        label = f"{NET_LABELS.get(net, net)}, depth {deep} vs {shallow}"
        statistic = f"log(λmax none / λmax BN) at depth {deep} minus at depth {shallow}"
        out += [
            test_claim(
                f"BN's smoothing of the top eigenvalue is stronger in deep than shallow nets "
                f"({label}, matched step {final})",
                SOURCE_Y,
                statistic + f", both at step {final}",
                _depth_contrast(
                    {
                        d: _by_seed(_at_step(table, net, d, final), "lambda_max", ("none", "bn"))
                        for d in depths
                    }
                ),
            ),
            test_claim(
                f"BN's smoothing of the top eigenvalue is stronger in deep than shallow nets "
                f"({label}, matched loss)",
                SOURCE_Y,
                statistic + ", each run read at its first probe step with loss ≤ the pair's common level",
                _depth_contrast({d: lambda_max_at_matched_loss(table, net, d, "none", "bn") for d in depths}),
            ),
        ]
    if {"resnet", "plain_resnet"} <= set(table["net"]) and "bn" in present:
        deep = int(table.loc[table["net"] == "resnet", "depth"].max())
        lam = {
            n: _by_seed(_at_step(table, n, deep, final), "lambda_max", ("bn",))["bn"]
            for n in ("resnet", "plain_resnet")
        }
        out.append(
            test_claim(
                f"Residual connections smooth the loss landscape (BN ResNet-{deep}, step {final})",
                SOURCE_Y,
                "log(λmax without residual connections / λmax with them)",
                np.log(lam["plain_resnet"] / lam["resnet"]).dropna().to_numpy(dtype=float),
            )
        )
    return out


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """φ(t) = Σ_j w_j N(t; θ_j, σ²) on ``grid`` (SLQ nodes θ and weights w, Ghorbani et al. 2019)."""
    z = (grid[:, None] - nodes[None, :]) / sigma  # (n_grid, n_nodes)
    return (np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))) @ weights


def _curves(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a ``curve`` label per norm and view (BN's inference view is its own curve)."""
    out = table.copy()
    out["curve"] = [
        LABELS.get(n, n) + (" (running stats)" if v == "inference" else "")
        for n, v in zip(out["norm"], out["view"], strict=True)
    ]
    return out


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    table = _curves(hessian_table(df))
    norms = ordered_norms(table["norm"].unique())
    palette = norm_palette(norms)
    curve_colors = {LABELS.get(n, n): palette[n] for n in norms}
    curve_colors |= {LABELS["bn"] + " (running stats)": palette["bn"]} if "bn" in norms else {}
    order = [c for c in curve_colors if c in set(table["curve"])]
    dashes = {c: (4, 2) if c.endswith("(running stats)") else "" for c in order}
    groups = _groups(table)
    columns = ["λmax", "trace", "density", "λ1/λK", "gradient fraction", "loss"]
    fig, axes = plt.subplots(
        len(groups), len(columns), figsize=(3.0 * len(columns), 2.6 * len(groups)), squeeze=False
    )
    density = df[df["probe"] == "hessian_density"]
    for row, (net, depth) in enumerate(groups):
        part = table[(table["net"] == net) & (table["depth"] == depth)]
        name = f"{NET_LABELS.get(net, net)}-{depth}"
        for col, metric in ((0, "lambda_max"), (1, "trace"), (3, "outlier_ratio"), (4, "gradient_fraction"),
                            (5, "loss")):  # fmt: skip
            ax = axes[row, col]
            sns.lineplot(part, x="step", y=metric, hue="curve", hue_order=order, palette=curve_colors,
                         style="curve", style_order=order, dashes=dashes, errorbar=("pi", 100),
                         ax=ax, legend=row == 0 and col == 0)  # fmt: skip
            ax.set(xlabel="training step", ylabel=columns[col], title=f"({'abcdef'[col]}) {name}")
        axes[row, 0].set_yscale("log")
        axes[row, 1].set_yscale("symlog", linthresh=1.0)
        axes[row, 3].set_yscale("log")
        axes[row, 4].set_ylim(0, 1)
        _density_panel(axes[row, 2], density, net, depth, curve_colors, name)
    if groups:
        axes[0, 0].legend(loc="best", fontsize="x-small")
    fig.tight_layout()
    save_figure(fig, out_dir, "hessian_spectrum")
    return claims(df, config)


def _density_panel(ax: Any, density: pd.DataFrame, net: str, depth: int, colors: dict, name: str) -> None:
    """SLQ density at the last density step, first seed, for none, BN (both views) and popbn."""
    rows = density[(density["net"] == net) & (density["depth"] == depth)]
    rows = rows[rows["seed"] == rows["seed"].min()] if len(rows) else rows
    if rows.empty:
        ax.set_visible(False)
        return
    step = int(rows["step"].max())
    rows = _curves(rows[(rows["step"] == step) & rows["norm"].isin(["none", "bn", "popbn"])])
    lo, hi = float(rows["node"].min()), float(rows["node"].max())
    sigma = 0.01 * (hi - lo) if hi > lo else 1.0
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 1001)
    for curve in [c for c in colors if c in set(rows["curve"])]:  # house order
        part = rows[rows["curve"] == curve]
        phi = smoothed_density(part["node"].to_numpy(float), part["value"].to_numpy(float), grid, sigma)
        style = "--" if curve.endswith("(running stats)") else "-"
        ax.plot(grid, np.maximum(phi, 1e-12), style, color=colors[curve], label=curve)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set(xlabel="eigenvalue", ylabel="density", title=f"(c) {name}, step {step}")
    ax.legend(loc="upper right", fontsize="x-small")


STUDY = Study(
    name="hessian_spectrum",
    title="Hessian eigenvalues, trace and spectral density over training, with and without normalization",
    reproduces="Ghorbani, Krishnan & Xiao 2019, §4 (Fig. 4-7); Yao et al. 2020 (PyHessian), §4",
    figures=("hessian_spectrum",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("net", "depth", "norm", "seed"),
)
