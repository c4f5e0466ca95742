"""Batch size — Wu & He 2018, Fig. 1: BN's error grows at small batches, GN's does not.

Wu & He ("Group Normalization", ECCV 2018, Fig. 1) train ResNet-50 on ImageNet with BN and GN at 32,
16, 8, 4 and 2 images per GPU (BN's statistics are computed over those images), scaling the learning
rate linearly with the batch (0.1 · N/32, Goyal et al. 2017) and training for the same number of epochs.
BN's validation error rises from 23.6% at 32 to 34.7% at 2, GN's stays at 24.1–24.2%.

Setup. The quick preset trains an MLP (3 hidden ReLU layers of 128 units, Linear → norm → ReLU,
Kaiming-normal init with zero biases) on MNIST-1D (4000 training examples) with BN, GN (8 groups of 16
units: GN normalizes each sample over a group of features) and LN, at batch sizes 2, 4, 8, 16, 32, 64,
with SGD (momentum 0.9, no weight decay), learning rate ``base_lr · batch / ref_batch`` = 0.1 · B/32
(Wu & He's rule) and a cosine decay to 0 over the run. Every run sees the *same number of samples*:
``epochs`` = 3 passes over the training set, i.e. 3 · ⌊4000/B⌋ updates (6000 at B = 2, 186 at B = 64).
At this budget every net is undertrained (test error 0.46–0.57), and the number of updates falls
32-fold across the grid: the slopes of claims 1–2 measure that as well as any dependence on batch
statistics (GN's and LN's training loss rises with the batch size). Wu & He train to convergence.
The paper preset trains the VGG of ``studies.lab.nets`` (6 conv layers, widths 16–64, 2-D) on
Fashion-MNIST for 10 epochs with weight decay 1e-4, 5 seeds (not checked here: no GPU).

Records. The train loop's rows (minibatch loss/accuracy about ten times per epoch) and the test loss and
accuracy once per epoch. Test accuracy is measured in inference mode: BN normalizes with its *running*
statistics (momentum 0.1), as Wu & He evaluate it; GN and LN have no running statistics.

Claims tested (from the records; test error = 1 − final test accuracy; one value per seed, paired by
seed where norms are compared):

1. *GN's error is flat across batch sizes.* Statistic = slope of GN's test error against log2(batch
   size) over all batch sizes (least squares, per seed); holds if the 95% CI lies inside (−0.01, 0.01),
   i.e. less than one point of error per doubling of the batch.
2. *LN's error is flat across batch sizes* (LN, like GN, uses no batch statistics; our extension of
   Fig. 1). Same statistic and rule for LN.
3. *BN degrades at small batches.* Statistic = BN's test error at batch 2 minus at batch 32; holds if the
   95% CI's lower end is above 0.
4. *GN beats BN at batch 2.* Statistic = test error of BN minus GN at batch 2; holds if the CI's lower
   end is above 0.
5. *BN is slightly better than GN at batch 32.* Statistic = test error of GN minus BN at batch 32;
   holds if the CI's lower end is above 0: it tests that BN is better, not that the gap is small
   (Wu & He: about 0.5 points; the committed quick runs: 5.9).

A claim whose batch sizes are not in the grid (or whose runs diverged) has n = 0 and does not hold.

Reproduce::

    whybn run batch_size                    # quick preset, ~2 minutes on 2 idle CPU cores
    whybn run batch_size --preset paper --device cuda
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.claims import Claim, test_claim
from analysis.load import diverged_runs
from analysis.style import NORM_LABELS, labeled_legend, norm_palette, ordered_norms, save_figure, use_style
from studies.lab.runs import load_run_data, make_run_net, run_train_config, train_run
from studies.lab.study import RunContext, Study

SOURCE = "Wu & He 2018, Fig. 1"
FLAT_SLOPE = 0.01  # claims 1-2: |slope of test error per doubling of the batch| below this
SMALL_BATCH, REFERENCE_BATCH = 2, 32  # claims 3-5 compare these batch sizes
LOGS_PER_EPOCH = 10  # "train" rows per epoch


@dataclass(frozen=True)
class Config:
    """The study's settings; every field but ``norms``, ``batch_sizes`` and ``seeds`` goes into each run."""

    arch: str = "mlp"
    norms: tuple[str, ...] = ("bn", "gn", "ln")
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    seeds: int = 3
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    depth: int = 3
    width: int = 128
    groups: int = 8  # GN's groups
    activation: str = "relu"
    init: str = "kaiming"
    base_lr: float = 0.1  # learning rate at ref_batch; lr = base_lr * batch_size / ref_batch
    ref_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    epochs: int = 3  # the same number of passes over the training set (samples seen) at every batch size


QUICK = Config()
PAPER = replace(
    QUICK, arch="vgg", dataset="fashion_mnist", depth=6, width=16, epochs=10, seeds=5, weight_decay=1e-4
)


def grid(config: Config) -> list[dict[str, Any]]:
    """One run per (norm, batch size, seed), with the linearly scaled learning rate."""
    base = {k: v for k, v in asdict(config).items() if k not in ("norms", "batch_sizes", "seeds")}
    return [
        {
            "norm": norm,
            "batch_size": batch,
            "lr": config.base_lr * batch / config.ref_batch,
            "seed": seed,
            **base,
        }
        for norm in config.norms
        for batch in config.batch_sizes
        for seed in range(config.seeds)
    ]


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train one (norm, batch size, seed) for ``epochs`` passes; evaluate once per epoch."""
    data = load_run_data(rc)
    model = make_run_net(rc, data.info, norm_options={"groups": rc["groups"]} if rc["norm"] == "gn" else None)
    per_epoch = len(data.train) // rc["batch_size"]
    config = run_train_config(
        rc,
        optimizer="sgd",
        steps=rc["epochs"] * per_epoch,
        eval_every=per_epoch,
        log_every=max(1, per_epoch // LOGS_PER_EPOCH),
    )
    result = train_run(
        model, data, rc, ctx, config=config, desc=f"batch_size {rc['norm']} B{rc['batch_size']} s{rc['seed']}"
    )
    return result.records


# ----------------------------------------------------------------------------------------------------
# analysis


def final_error(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: test error = 1 − test accuracy at the run's last evaluation (columns norm, batch_size, seed).

    A diverged run has no final evaluation at its last step and is left out.
    """
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    last = acc.loc[acc.groupby("run_id")["step"].idxmax()]
    diverged = diverged_runs(df)
    last = last[~last["run_id"].isin(diverged)]
    out = last[["norm", "batch_size", "seed"]].copy()
    out["error"] = 1.0 - last["value"].to_numpy()
    return out.reset_index(drop=True)


def error_slopes(errors: pd.DataFrame, norm: str) -> np.ndarray:
    """Per seed: least-squares slope of ``norm``'s test error against log2(batch size)."""
    part = errors[errors["norm"] == norm]
    slopes = [
        np.polyfit(np.log2(run["batch_size"].to_numpy(float)), run["error"].to_numpy(), 1)[0]
        for _, run in part.groupby("seed")
        if run["batch_size"].nunique() >= 2
    ]
    return np.asarray(slopes, dtype=float)


def _at_batch(errors: pd.DataFrame, batch: int) -> pd.DataFrame:
    """Test error at ``batch``: index seed, one column per norm."""
    return errors[errors["batch_size"] == batch].pivot_table(index="seed", columns="norm", values="error")


def _difference(wide: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Per seed ``wide[a] − wide[b]`` where both exist."""
    if not {a, b} <= set(wide.columns):
        return np.array([])
    return (wide[a] - wide[b]).dropna().to_numpy()


def _flat_claim(claim: str, norm: str, errors: pd.DataFrame) -> Claim:
    """An equivalence claim: holds if the slope's whole 95% CI lies inside (−FLAT_SLOPE, FLAT_SLOPE)."""
    result = test_claim(
        claim,
        SOURCE,
        f"least-squares slope of {norm.upper()}'s test error against log2(batch size), per seed",
        error_slopes(errors, norm),
        threshold=FLAT_SLOPE,
        direction="<",
    )
    return replace(
        result,
        holds=bool(result.holds and result.ci_low > -FLAT_SLOPE),
        criterion=f"95% CI inside ({-FLAT_SLOPE:g}, {FLAT_SLOPE:g})",
    )


def claims(df: pd.DataFrame) -> list[Claim]:
    """The claims of the module docstring, in its order."""
    errors = final_error(df)
    small = _at_batch(errors, SMALL_BATCH)
    reference = _at_batch(errors, REFERENCE_BATCH)
    bn = errors[errors["norm"] == "bn"].pivot_table(index="seed", columns="batch_size", values="error")
    bn_drop = (
        (bn[SMALL_BATCH] - bn[REFERENCE_BATCH]).dropna().to_numpy()
        if {SMALL_BATCH, REFERENCE_BATCH} <= set(bn.columns)
        else np.array([])
    )
    return [
        _flat_claim("GN's test error is flat across batch sizes", "gn", errors),
        _flat_claim(
            "LN's test error is flat across batch sizes (no batch statistics, like GN)", "ln", errors
        ),
        test_claim(
            f"BN's test error is higher at batch {SMALL_BATCH} than at batch {REFERENCE_BATCH}",
            SOURCE,
            f"BN test error at batch {SMALL_BATCH} minus at batch {REFERENCE_BATCH}",
            bn_drop,
        ),
        test_claim(
            f"GN's test error is lower than BN's at batch {SMALL_BATCH}",
            SOURCE,
            f"test error BN minus GN at batch {SMALL_BATCH}",
            _difference(small, "bn", "gn"),
        ),
        test_claim(
            f"BN's test error is lower than GN's at batch {REFERENCE_BATCH} (Wu & He: slightly)",
            SOURCE,
            f"test error GN minus BN at batch {REFERENCE_BATCH}",
            _difference(reference, "gn", "bn"),
        ),
    ]


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    norms = ordered_norms(df["norm"].unique())
    palette = norm_palette(norms)
    batches = sorted(df["batch_size"].unique())
    errors = final_error(df)

    # (a) Fig. 1: final test error against the batch size; then per norm the test error per epoch
    fig, axes = plt.subplots(1, 1 + len(norms), figsize=(3.3 * (1 + len(norms)), 2.9))
    sns.lineplot(
        errors,
        x="batch_size",
        y="error",
        hue="norm",
        hue_order=norms,
        palette=palette,
        marker="o",
        errorbar=("pi", 100),
        ax=axes[0],
    )
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(batches, [str(b) for b in batches])
    axes[0].minorticks_off()
    axes[0].invert_xaxis()  # as Wu & He: the batch shrinks to the right
    axes[0].set(title="(a) test error after training", xlabel="batch size (images per batch)", ylabel="error")
    labeled_legend(axes[0], loc="upper left")

    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")].copy()
    acc["error"] = 1.0 - acc["value"]
    acc = acc.sort_values(["run_id", "step"])
    acc["epoch"] = acc.groupby("run_id").cumcount()  # one evaluation per epoch, the first at step 0
    batch_palette = dict(zip(batches, sns.color_palette("viridis", len(batches)), strict=True))
    for ax, norm, letter in zip(axes[1:], norms, "bcdefg", strict=False):
        sns.lineplot(
            acc[acc["norm"] == norm],
            x="epoch",
            y="error",
            hue="batch_size",
            hue_order=batches,
            palette=batch_palette,
            errorbar=None,
            ax=ax,
            legend=ax is axes[-1],
        )
        ax.set(title=f"({letter}) {NORM_LABELS.get(norm, norm)}", xlabel="epoch", ylabel="test error")
    axes[-1].legend(title="batch", loc="upper right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out_dir, "batch_size")
    return claims(df)


STUDY = Study(
    name="batch_size",
    title="Test error against the batch size for BN, GN and LN (linear learning-rate scaling)",
    reproduces="Wu & He 2018, Fig. 1",
    figures=("batch_size",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "norm", "batch_size", "seed"),
    config_columns=("batch_size", "lr"),
)
