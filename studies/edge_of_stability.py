"""Edge of stability — Cohen, Kaur, Li, Kolter & Talwalkar 2021: does full-batch GD drive λmax to 2/η?

Cohen et al. ("Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", ICLR
2021) train networks with full-batch gradient descent at a fixed step size η and track the *sharpness*
λmax, the largest eigenvalue of the Hessian of the full-batch training loss. Two phases (their Fig. 1):
*progressive sharpening*, λmax rises during training until it reaches 2/η, the largest sharpness at
which GD on a quadratic is stable; then the *edge of stability*, λmax hovers just above 2/η while the
loss keeps falling, non-monotonically. They report it for many architectures, with and without batch
normalization.

Setup. Cohen et al.'s ``fc-tanh``: an MLP with 2 hidden layers of 200 tanh units (PyTorch's default
init), trained with plain full-batch gradient descent (no momentum; ``TrainConfig(full_batch=True)``,
every update uses the whole training subset) on their squared loss L = (1/n) Σᵢ ½‖f(xᵢ) − e_{yᵢ}‖²
(``loss="mse"``, e_y the one-hot target; ``"ce"`` for cross-entropy), without norm and with BN before
each tanh. With BN the full batch *is* the batch, so BN normalizes with the statistics of the whole
training subset, in training and in the probe alike. Every ``probe_every`` updates the probe
``sharpness`` computes λmax of the full-batch training-loss Hessian by Lanczos
(``probes.hessian.hessian_eigenvalues``, k = 1, ``which="LA"``, tol 1e-3, BN measured with
``bn="batch"``: the loss GD descends; no running statistic is updated), from a fresh start vector at
each probe (the seeded random vector plus the loss gradient, ``start="gradient"``; no warm start from
the previous probe's eigenvector), together with its number of Hessian-vector products. A λmax that Lanczos
does not bring within the tolerance is not recorded as a value: that probe step gets a ``failed`` row
whose ``reason`` says so (estimate, tolerance, products spent), and training goes on.
*Quick*: the first 500 MNIST-1D training examples (Cohen et al.: 5000 CIFAR-10 images), η ∈ {0.1,
0.2} (2/η = 20 and 10), 1500 updates, λmax every 25 updates, 3 seeds. Smaller η needs more updates
to reach 2/η (at η = 0.05 λmax had reached only ~0.86·2/η after 2500 updates in a trial run), so
the quick preset stops at 0.1. *Paper*: 5000 Fashion-MNIST training examples, η ∈ {0.02, 0.05, 0.1},
20 000 updates, 5 seeds (not checked here: no GPU).

Claims tested (from the records; one value per seed, separately per norm and step size η;
s(t) = λmax(t)·η/2, the sharpness in units of the stability threshold 2/η; "late" = probe steps
t ≥ T/2, T the last step):

1. *Progressive sharpening*: λmax rises during training. Statistic = log(max_t λmax(t) / λmax(0));
   holds if the 95% CI is above 0 (a net that starts above 2/η and only falls does not sharpen).
2. *λmax reaches 2/η*: statistic = max over t > 0 of s(t), for the runs that start below the threshold
   (s(0) < 0.9); holds if the CI is above 0.9. A run that starts above it has nothing to reach (the BN
   nets here start at 1.8–2.0·2/η at η = 0.1 and only fall, to 1.01–1.03 at their lowest): it is
   left out, as a diverged run is, and the claim's text counts it; with every run left out the
   claim has n = 0 and does not hold (it is not tested).
3. *λmax then hovers at the edge*: statistic = |median over late steps of s(t) − 1|; holds if the CI is
   below 0.2, i.e. the late median sharpness is within [0.8, 1.2]·2/η.

Claims 1–3 are tested without norm and with BN (Cohen et al. report EoS with BN as well). A run that
diverged (non-finite loss; the loop stops it) has no statistic: it is left out of the bootstrap (n
counts the rest, so a claim with every run diverged has n = 0 and does not hold), and each claim's
text says how many of its runs diverged.

Figure ``edge_of_stability``: one column per η; top: λmax over training (each seed a line) per norm,
with 2/η dashed; bottom: the full-batch training loss. Diverged runs are not drawn (their last
values, a λmax of 35–41 at step 0 and a loss of 1e24, set the axes and flattened every other line);
a note in the panel counts them per norm.

Reproduce::

    whybn run edge_of_stability                    # quick preset, ~3 minutes on 2 idle CPU cores
    whybn run edge_of_stability --preset paper --device cuda
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from analysis.claims import Claim, test_claim
from analysis.load import diverged_runs
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from probes.hessian import hessian_eigenvalues
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule, require_converged

SOURCE = "Cohen, Kaur, Li, Kolter & Talwalkar 2021, Fig. 1"
SOURCE_BN = "Cohen, Kaur, Li, Kolter & Talwalkar 2021 (networks with batch normalization)"
REACH_THRESHOLD = 0.9  # claim 2: max_t λmax·η/2 above this
HOVER_TOLERANCE = 0.2  # claim 3: late median λmax·η/2 within 1 ± this
LATE_FRACTION = 0.5  # claim 3: probe steps t ≥ LATE_FRACTION·T are "late"


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("none", "bn")
    lrs: tuple[float, ...] = (0.1, 0.2)
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int = 500  # the first n_train training examples: the full batch
    n_test: int | None = None
    depth: int = 2
    width: int = 200
    activation: str = "tanh"
    init: str = "torch"
    loss: str = "mse"  # "mse": (1/n) Σ ½‖f(x) − onehot(y)‖²; "ce": cross-entropy
    steps: int = 1500
    probe_every: int = 25
    log_every: int = 10
    eval_every: int = 250
    eig_tol: float = 1e-3


QUICK = Config()
PAPER = replace(
    QUICK,
    lrs=(0.02, 0.05, 0.1),
    seeds=5,
    dataset="fashion_mnist",
    n_train=5000,
    steps=20_000,
    probe_every=100,
    log_every=50,
    eval_every=1000,
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per norm, step size and seed."""
    if config.loss not in LOSSES:
        raise ValueError(f"edge_of_stability: loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "lrs", "seeds")}
    return [
        {"arch": "mlp", "norm": norm, "lr": lr, "seed": seed, **base}
        for norm in config.norms
        for lr in config.lrs
        for seed in range(config.seeds)
    ]


def squared_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cohen et al.'s squared loss: mean over examples of ½‖f(x) − e_y‖², e_y the one-hot target."""
    onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(dim=-1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": squared_loss, "ce": F.cross_entropy}


def sharpness_probe(
    tol: float, seed: int, max_matvecs: int | None = None
) -> Callable[[ProbeContext], list[dict[str, Any]]]:
    """A probe: λmax of the Hessian of the loss on ``ctx.batch`` (the full batch), BN with its statistics.

    Rows (probe ``sharpness``): ``lambda_max``, ``n_matvecs``, ``converged`` (always 1: a λmax that
    Lanczos did not bring within ``tol`` in ``max_matvecs`` Hessian-vector products, default
    :func:`probes.hessian.hessian_eigenvalues`'s, is not recorded as a value: the probe raises
    :class:`~studies.lab.train.ProbeFailure`, so the step gets a ``failed`` row whose ``reason`` gives
    the estimate, ``tol`` and the matvecs spent, and training goes on).
    """

    def probe(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = hessian_eigenvalues(
            ctx.model,
            ctx.loss_fn,
            ctx.batch,
            k=1,
            which="LA",
            tol=tol,
            bn="batch",
            seed=seed,
            max_matvecs=max_matvecs,
        )
        require_converged(result, "the top Hessian eigenvalue", tol)
        return [
            {"metric": "lambda_max", "value": float(result.values[0])},
            {"metric": "n_matvecs", "value": result.n_matvecs},
            {"metric": "converged", "value": float(result.converged)},
        ]

    return probe


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Full-batch GD on the first ``n_train`` examples with the sharpness probe every ``probe_every``."""
    if rc["loss"] not in LOSSES:
        raise KeyError(f"unknown loss {rc['loss']!r}; known: {', '.join(LOSSES)}")
    data = load_run_data(rc)
    if len(data.train) < rc["n_train"]:
        raise ValueError(f"n_train {rc['n_train']} exceeds the {len(data.train)} training examples")
    subset = TensorDataset(*(t[: rc["n_train"]] for t in data.train.tensors))
    model = make_run_net(rc, data.info)
    schedule = ProbeSchedule(
        sharpness_probe(rc["eig_tol"], rc["seed"]), every=rc["probe_every"], name="sharpness"
    )
    result = train_run(
        model,
        replace(data, train=subset),
        rc,
        ctx,
        config=run_train_config(rc, optimizer="sgd", full_batch=True),
        probes=[schedule],
        desc=f"edge_of_stability {rc['norm']} lr{rc['lr']:g} s{rc['seed']}",
        loss_fn=LOSSES[rc["loss"]],
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def sharpness_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run_id, norm, lr, seed, step): ``lambda_max`` and ``edge`` = λmax·η/2."""
    rows = df[(df["probe"] == "sharpness") & (df["metric"] == "lambda_max")]
    table = rows[["run_id", "norm", "lr", "seed", "step", "value"]].rename(columns={"value": "lambda_max"})
    table = table.sort_values(["norm", "lr", "seed", "step"]).reset_index(drop=True)
    table["edge"] = table["lambda_max"] * table["lr"] / 2
    return table


def per_run_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """Per run (norm, lr, seed): ``rise`` = log(max λ / λ(0)), ``reach`` = max of s over t > 0 (NaN for a
    run that starts at or above the threshold, s(0) ≥ 0.9: ``starts_above``), ``hover`` = |(median of
    s over probe steps t ≥ T/2) − 1|, s = λmax·η/2, T the run's last probe step, and ``diverged``; a
    diverged run's statistics are NaN (GD left the edge of stability: no value to test)."""
    diverged = diverged_runs(df)
    rows = []
    for (run_id, norm, lr, seed), run in sharpness_table(df).groupby(["run_id", "norm", "lr", "seed"]):
        lam, edge, step = run["lambda_max"].to_numpy(), run["edge"].to_numpy(), run["step"].to_numpy()
        late = step >= LATE_FRACTION * step.max()
        starts_above = bool(edge[0] >= REACH_THRESHOLD)
        stats = {
            "rise": float(np.log(lam.max() / lam[0])),
            "reach": float(edge[step > 0].max()) if (step > 0).any() and not starts_above else np.nan,
            "late_median": float(np.median(edge[late])),
            "hover": float(abs(np.median(edge[late]) - 1)),
        }
        if run_id in diverged:
            stats = dict.fromkeys(stats, np.nan)
        rows.append(
            {"norm": norm, "lr": lr, "seed": seed, **stats, "diverged": run_id in diverged}
            | {"starts_above": starts_above and run_id not in diverged}
        )
    columns = ["norm", "lr", "seed", "rise", "reach", "late_median", "hover", "diverged", "starts_above"]
    return pd.DataFrame(rows, columns=columns)


def claims(df: pd.DataFrame) -> list[Claim]:
    """Claims 1–3 of the module docstring for each norm and step size present; each claim's text says
    how many of its runs diverged (they are left out: n counts the rest)."""
    stats = per_run_statistics(df)
    out = []
    for norm in ordered_norms(stats["norm"].unique()):
        source = SOURCE if norm == "none" else SOURCE_BN
        label = NORM_LABELS.get(norm, norm)
        for lr in sorted(stats.loc[stats["norm"] == norm, "lr"].unique()):
            part = stats[(stats["norm"] == norm) & (stats["lr"] == lr)].sort_values("seed")
            where = f"{label}, full-batch GD, η = {lr:g}, 2/η = {2 / lr:g}"
            where += f"; {int(part['diverged'].sum())} of {len(part)} runs diverged"
            out += [
                test_claim(
                    f"Progressive sharpening: λmax rises during training ({where})",
                    source,
                    "log(max over training of λmax / λmax at initialization)",
                    part["rise"].to_numpy(),
                    threshold=0.0,
                    direction=">",
                ),
                test_claim(
                    f"λmax reaches the stability threshold 2/η ({where}; "
                    f"{int(part['starts_above'].sum())} started above it, left out)",
                    source,
                    f"max over training steps t > 0 of λmax·η/2, runs with λmax(0)·η/2 < {REACH_THRESHOLD:g}",
                    part["reach"].to_numpy(),
                    threshold=REACH_THRESHOLD,
                    direction=">",
                ),
                test_claim(
                    f"λmax then hovers at the edge of stability 2/η ({where})",
                    source,
                    f"|(median of λmax·η/2 over probe steps t ≥ {LATE_FRACTION:g}·T) − 1| (T: last step)",
                    part["hover"].to_numpy(),
                    threshold=HOVER_TOLERANCE,
                    direction="<",
                ),
            ]
    return out


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    diverged = diverged_runs(df)
    table = sharpness_table(df)
    norms = ordered_norms(table["norm"].unique())
    palette = norm_palette(norms)
    lrs = sorted(table["lr"].unique())
    runs = table[["run_id", "norm", "lr"]].drop_duplicates()
    table = table[~table["run_id"].isin(diverged)]
    loss = df[(df["probe"] == "train") & (df["metric"] == "loss") & ~df["run_id"].isin(diverged)]
    fig, axes = plt.subplots(2, len(lrs), figsize=(3.4 * len(lrs), 5.2), squeeze=False)
    for col, lr in enumerate(lrs):
        top, bottom = axes[0, col], axes[1, col]
        notes = []
        for norm in norms:
            gone = runs.loc[(runs["lr"] == lr) & (runs["norm"] == norm), "run_id"].isin(diverged)
            if gone.any():
                notes.append(f"{NORM_LABELS.get(norm, norm)}: {gone.sum()} of {len(gone)} diverged")
        for ax, y in ((top, 0.04), (bottom, 0.96)):  # where the lines are not: λmax rises, the loss falls
            if notes:
                ax.text(0.98, y, "\n".join(notes) + " (not drawn)", transform=ax.transAxes, ha="right",
                        va="bottom" if y < 0.5 else "top", fontsize="x-small", color="0.3")  # fmt: skip
        sns.lineplot(table[table["lr"] == lr], x="step", y="lambda_max", hue="norm", hue_order=norms,
                     palette=palette, units="seed", estimator=None, lw=0.9, ax=top,
                     legend=col == 0)  # fmt: skip
        top.axhline(2 / lr, color="0.4", ls="--", lw=1, label="2/η")
        top.set(title=f"({'abcdefgh'[col]}) sharpness, η = {lr:g}", xlabel="update", ylabel="λmax")
        sns.lineplot(loss[loss["lr"] == lr], x="step", y="value", hue="norm", hue_order=norms,
                     palette=palette, units="seed", estimator=None, lw=0.9, ax=bottom,
                     legend=False)  # fmt: skip
        bottom.set(title=f"({'abcdefgh'[len(lrs) + col]}) training loss, η = {lr:g}", xlabel="update",
                   ylabel=f"full-batch {config.loss} loss", yscale="log")  # fmt: skip
    labeled_legend(axes[0, 0], loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "edge_of_stability")
    return claims(df)


STUDY = Study(
    name="edge_of_stability",
    title="Sharpness λmax against 2/η under full-batch gradient descent, with and without BN",
    reproduces="Cohen, Kaur, Li, Kolter & Talwalkar 2021, Fig. 1",
    figures=("edge_of_stability",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "norm", "lr", "seed"),
    config_columns=("lr",),
)
