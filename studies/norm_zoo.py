"""Norm zoo — the central table: every normalization in every architecture, trained and probed alike.

Norms ``none, bn, ln, gn, in, dbn, iternorm, wn`` (``studies.lab.norms``) in four architectures
(``studies.lab.nets``): an MLP, a VGG-style CNN, a CIFAR-style ResNet and a small pre-norm
transformer, each in its 1-D variant for MNIST-1D. Instance norm normalizes over spatial positions
and is undefined on the ``(N, C)`` inputs of the MLP's hidden layers and of the transformer's
per-token norms (``NEEDS_POSITIONS``): those combinations are *not applicable*; the grid has no run
for them and the table lists them with ``applicable = False``.

Setup. Every net is trained with the same recipe: SGD with momentum 0.9, batch 64, constant learning
rate ``lr`` (0.05), He/Kaiming-normal init with zero biases (with PyTorch's default init a deep
no-norm ReLU net barely moves on MNIST-1D, DESIGN.md), the arch's default activation (ReLU; GELU in
the transformer), norm before the activation (pre-norm in the transformer). Per (arch, norm) we record:

* *final test accuracy* (running statistics, eval mode) after ``steps`` updates; a run that diverges
  scores chance accuracy 1/classes (argmax of non-finite logits is arbitrary). A run diverges when its
  loss or parameters become non-finite (the training loop stops it) or when DBN's eigendecomposition
  fails on exploding activations (``torch.linalg.LinAlgError``; its logged rows are then lost and it
  counts as censored for the steps to target);
* *test accuracy with batch statistics* (probe ``batch_stats``): every test minibatch of ``batch_size``
  normalized with its own statistics, which separates a net that did not learn from one whose running
  statistics fail at inference;
* *steps to the target training loss* ``target_loss`` (1.2, about half the initial log 10 ≈ 2.3): the
  first logged step at which the mean of the last ``loss_window`` logged minibatch losses (logged every
  ``log_every`` updates) is ≤ the target. A run that never gets there is *censored* at ``steps`` (kept,
  flagged ``censored``, never dropped);
* *the largest stable learning rate*: separate short runs (``ladder_steps`` updates, ``ladder_seeds``
  seeds, same recipe otherwise) at each lr of ``ladder_lrs`` (a factor-of-~3 ladder). A ladder run is
  *stable* iff it does not diverge (no non-finite loss or parameter) and the mean minibatch loss of its
  last quarter (logged steps ≥ ¾·ladder_steps) is below its loss at step 0 and below log K, the loss of
  a uniform prediction over the K classes: a net that starts above log K (2.66 for the no-norm MLP, 2.95
  for the VGG) and collapses to chance (2.35) has not trained, though its loss fell. The largest stable lr is
  the largest stable ladder lr; if none is stable it is the smallest ladder lr divided by the ladder's
  first ratio (left-censored, ``lr_censored="below"``), if the largest is stable it is a lower bound
  (right-censored, ``"above"``);
* at the end of training (and at init when ``probe_init``), every probe on a fixed probe batch (the
  first ``probe_size`` training examples), batch-dependent norms in ``bn="batch"`` mode (batch
  statistics, the training loss; no running statistic updated):
  λmax of the Hessian (``probes.hessian.hessian_eigenvalues``, largest algebraic, Lanczos), its trace
  (``hessian_trace``, Hutch++ with ``trace_probes`` products), β_eff (``probes.smoothness.
  landscape_along_gradient`` at η = lr × ``step_multipliers``), ICS (``probes.ics.ics_gradient_change``
  with the run's own optimizer: relative ℓ2 ‖G − G'‖/‖G‖ per layer, layers with nothing before them
  left out, then the mean over layers) and the layer-input condition number κ of every
  parameterized layer's input covariance (``probes.conditioning.layer_input_conditioning``, whose
  features of a transformer's linear layer are the C of its ``(N, T, C)`` tokens; mean of log κ and
  median of κ over layers).

Quick preset: MNIST-1D (4000 train / 1000 test), MLP 3×64, VGG 4 convs (widths 8-16), ResNet-8
(width 8), transformer 2 blocks of width 32 (4 heads, patch 4), 160 updates (2.6 epochs), 2 seeds;
ladder 0.03, 0.1, 0.3, 1, 3 with 40 updates each, 1 seed; probes at the end only, on 128 examples
(Hessian λmax to relative tolerance 1e-2, trace with 12 products). Paper preset:
Fashion-MNIST (``dataset=cifar10`` with ``data_root`` for CIFAR-10), MLP 4×256, VGG 8 convs (16 →
128), ResNet-20 (width 16), transformer 4 blocks of width 64, 5000 updates, 5 seeds; ladder 0.003 …
10 (×~3), 500 updates, 3 seeds; probes at init and at the end on 1000 examples.

Claims tested (from the records; one value per (arch, seed), paired by arch and seed, pooled over the
archs where both norms apply; BN's probes measured with batch statistics, its test accuracy in eval
mode with running statistics, as it is deployed):

1. *BN trains to higher accuracy than no normalization* (Ioffe & Szegedy 2015). Statistic = final test
   accuracy with BN minus without; holds if the 95% CI is above 0.
2. *BN reaches a given training loss in fewer steps* (Ioffe & Szegedy 2015, §4.2). Statistic =
   log(steps to target without BN / with BN), censored runs at ``steps`` (which understates the gain
   when only the no-norm run is censored); holds if the CI is above 0.
3. *BN allows a larger stable learning rate* (Bjorck, Gomes, Selman & Weinberger 2018). Statistic =
   log(largest stable lr with BN / without), one value per (arch, ladder seed); holds if the CI is
   above 0.
4. *BN lowers λmax of the training-loss Hessian at the end of training* (Santurkar et al. 2018;
   Ghorbani et al. 2019), at matched step. Statistic = log(λmax without BN / with BN); holds if the CI
   is above 0. (Matched-loss comparisons need λmax along training: see ``hessian_spectrum``.)
5. *Whitening gives better-conditioned layer inputs than BN* (Huang et al. 2018 for DBN, 2019 for
   IterNorm). Statistic = log(median κ with BN / median κ with DBN) (resp. IterNorm) at the end of
   training; holds if the CI is above 0 (one claim each).
6. *LN and GN are competitive with BN in the transformer* (Ba, Kiros & Hinton 2016 for LN, whose paper
   predates the transformer; Wu & He 2018 for GN). Statistic = final
   test accuracy with LN (resp. GN) minus with BN, transformer only, per seed; non-inferiority with a
   margin of ``margin`` (2 percentage points): holds if the CI's lower end is above −margin.

A statistic that is not finite for a pair (e.g. λmax ≤ 0, a diverged run without probes) is left out
(``n`` counts the rest).

Outputs (next to the figures): ``norm_zoo_runs.csv`` (one row per main run: every metric above,
``diverged``, ``censored``), ``norm_zoo_ladder.csv`` (per arch, norm and ladder seed: the largest stable
lr and its censoring), ``norm_zoo_table.csv`` (per arch and norm of the config, ``applicable`` or not:
n, means and standard deviations over seeds, counts of diverged and censored runs, the geometric mean
of the largest stable lr) for the paper's LaTeX table, and the figure ``norm_zoo`` (rows = metrics,
columns = archs, x = norms in house order, "n/a" where a norm does not apply, "diverged" where a run
diverged, "∞" where a value is infinite (a singular layer-input covariance), and in the stable-lr row
how many values are censored bounds; a point per seed and a bar at the mean; in the accuracy row, grey
× = the mean test accuracy with test-batch statistics).

Reproduce::

    whybn run norm_zoo                    # quick preset, ~3 minutes on 2 idle CPU cores
    whybn run norm_zoo --preset paper --device cuda
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.claims import Claim, test_claim
from analysis.style import NORM_LABELS, norm_palette, ordered_norms, save_figure, use_style
from probes.conditioning import layer_input_conditioning
from probes.functional import norm_mode
from probes.hessian import hessian_eigenvalues, hessian_trace
from probes.ics import ics_gradient_change
from probes.smoothness import landscape_along_gradient
from studies.lab.nets import make_net
from studies.lab.runs import load_run_data, make_run_net, run_train_config
from studies.lab.study import RunContext, Study
from studies.lab.train import ProbeContext, ProbeSchedule, require_converged, train

ARCH_LABELS = {"mlp": "MLP", "vgg": "VGG", "resnet": "ResNet", "transformer": "Transformer"}
#: Per-run metrics of the table and figure: column → axis label (figure rows, in this order).
METRICS = {
    "test_accuracy": "test accuracy",
    "steps_to_target": "steps to target loss",
    "max_stable_lr": "largest stable lr",
    "lambda_max": "λmax (end)",
    "trace": "Hessian trace (end)",
    "beta_eff": "β_eff (end)",
    "ics": "ICS, rel. ℓ2 (end)",
    "cond_median": "median κ of layer inputs (end)",
}
LOG_METRICS = ("max_stable_lr", "lambda_max", "beta_eff", "cond_median")
SOURCE_IOFFE = "Ioffe & Szegedy 2015"
SOURCE_BJORCK = "Bjorck, Gomes, Selman & Weinberger 2018"
SOURCE_HESSIAN = "Santurkar et al. 2018; Ghorbani, Krishnan & Xiao 2019"
SOURCE_WHITEN = {"dbn": "Huang et al. 2018 (DBN)", "iternorm": "Huang et al. 2019 (IterNorm)"}
SOURCE_LN = {"ln": "Ba, Kiros & Hinton 2016", "gn": "Wu & He 2018"}


@dataclass(frozen=True)
class Config:
    archs: tuple[str, ...] = ("mlp", "vgg", "resnet", "transformer")
    norms: tuple[str, ...] = ("none", "bn", "ln", "gn", "in", "dbn", "iternorm", "wn")
    seeds: int = 2
    dataset: str = "mnist1d"
    data_root: str | None = None  # directory of fashion_mnist / cifar10 files
    n_train: int | None = None  # subset sizes for fashion_mnist, gaussian, cifar10 (None: all)
    n_test: int | None = None
    mlp_depth: int = 3  # hidden layers
    mlp_width: int = 64
    vgg_depth: int = 4  # conv layers
    vgg_width: int = 8  # base channels
    resnet_depth: int = 8  # 6n + 2
    resnet_width: int = 8
    transformer_depth: int = 2  # blocks
    transformer_width: int = 32
    init: str = "kaiming"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    steps: int = 160
    log_every: int = 10
    target_loss: float = 1.2
    loss_window: int = 5  # logged minibatch losses averaged for steps-to-target
    ladder_lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    ladder_steps: int = 40
    ladder_seeds: int = 1
    ladder_log_every: int = 5
    probe_init: bool = False  # probes at step 0 too
    probe_size: int = 128  # the first probe_size training examples
    eig_tol: float = 1e-2
    trace_probes: int = 12
    step_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # β_eff at η = lr × each
    margin: float = 0.02  # claim 6: non-inferiority margin in accuracy


QUICK = Config()
PAPER = replace(
    QUICK,
    seeds=5,
    dataset="fashion_mnist",
    mlp_depth=4,
    mlp_width=256,
    vgg_depth=8,
    vgg_width=16,
    resnet_depth=20,
    resnet_width=16,
    transformer_depth=4,
    transformer_width=64,
    steps=5000,
    log_every=25,
    ladder_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    ladder_steps=500,
    ladder_seeds=3,
    ladder_log_every=10,
    probe_init=True,
    probe_size=1000,
    eig_tol=1e-3,
    trace_probes=60,
)


def net_size(config: Config | dict[str, Any], arch: str) -> tuple[int, int]:
    """``(depth, width)`` of ``arch`` in ``config``."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return int(get(f"{arch}_depth")), int(get(f"{arch}_width"))


@cache
def applicable(arch: str, norm: str) -> bool:
    """Whether ``make_net`` builds ``arch`` with ``norm`` (``in`` needs spatial positions)."""
    try:
        make_net(arch, norm=norm, in_shape=(16,), num_classes=2, depth=None, width=None)
    except ValueError:
        return False
    return True


def grid(config: Config) -> list[dict[str, Any]]:
    """Main runs (``kind="main"``, every seed at ``lr``), then the lr ladder (``kind="ladder"``)."""
    unknown = sorted(set(config.archs) - set(ARCH_LABELS))
    if unknown:
        raise KeyError(f"unknown arch(s) {unknown}; known: {', '.join(ARCH_LABELS)}")
    base = {k: v for k, v in asdict(config).items() if k not in ("archs", "norms", "seeds", "lr")}
    pairs = [(a, n) for a in config.archs for n in config.norms if applicable(a, n)]
    main = [
        {"arch": a, "norm": n, "kind": "main", "lr": config.lr, "seed": s, **base}
        for a, n in pairs
        for s in range(config.seeds)
    ]
    ladder = [
        {"arch": a, "norm": n, "kind": "ladder", "lr": lr, "seed": s, **base}
        for a, n in pairs
        for lr in config.ladder_lrs
        for s in range(config.ladder_seeds)
    ]
    return main + ladder


# ----------------------------------------------------------------------------------------------------
# probes


def layer_input_condition_numbers(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, bn: str = "batch"
) -> dict[str, float]:
    """κ of the input covariance of every parameterized layer, by qualified name
    (:func:`probes.conditioning.layer_input_conditioning`: a linear layer's features are its input's
    last dimension, ``(N, T, C)`` → ``(N·T, C)``; a convolution's its channels)."""
    spectra = layer_input_conditioning(model, batch, bn=bn).layers
    return {name: stats.condition_number for name, stats in spectra.items()}


Probe = Callable[[ProbeContext], list[dict[str, Any]]]


def zoo_probes(batch: tuple[Tensor, Tensor], rc: dict[str, Any]) -> dict[str, Probe]:
    """The probes of a main run, by name, each on the fixed probe ``batch`` with ``bn="batch"``; and
    ``batch_stats``: test accuracy with every test minibatch (of ``batch_size``) normalized with its own
    statistics, which tells a net that trained from one whose running statistics fail at inference."""

    def on_device(ctx: ProbeContext) -> tuple[Tensor, Tensor]:
        return batch[0].to(ctx.device), batch[1].to(ctx.device)

    def hessian(ctx: ProbeContext) -> list[dict[str, Any]]:
        b = on_device(ctx)
        eig = hessian_eigenvalues(ctx.model, ctx.loss_fn, b, k=1, tol=rc["eig_tol"], seed=rc["seed"])
        require_converged(eig, "λmax of the Hessian", rc["eig_tol"])  # else a failed row, not a value
        trace = hessian_trace(ctx.model, ctx.loss_fn, b, n_probes=rc["trace_probes"], seed=rc["seed"])
        return [
            {"metric": "lambda_max", "value": float(eig.values[0])},
            {"metric": "trace", "value": trace.value},
        ]

    def landscape(ctx: ProbeContext) -> list[dict[str, Any]]:
        etas = [rc["lr"] * m for m in rc["step_multipliers"]]
        result = landscape_along_gradient(ctx.model, ctx.loss_fn, on_device(ctx), step_sizes=etas)
        return [
            {"metric": "beta_eff", "value": result.beta_eff},
            {"metric": "loss", "value": result.loss},  # the probe batch's loss
        ]

    def ics(ctx: ProbeContext) -> list[dict[str, Any]]:
        result = ics_gradient_change(ctx.model, ctx.loss_fn, on_device(ctx), ctx.optimizer)
        return [
            {"layer": r.layer, "metric": "relative_l2", "value": r.relative_l2}
            for r in result.layers
            if r.preceding  # the first layer has nothing before it: G' = G by definition
        ]

    def conditioning(ctx: ProbeContext) -> list[dict[str, Any]]:
        kappa = layer_input_condition_numbers(ctx.model, on_device(ctx))
        return [{"layer": name, "metric": "condition_number", "value": k} for name, k in kappa.items()]

    def batch_stats_accuracy(ctx: ProbeContext) -> list[dict[str, Any]]:
        x, y = ctx.test_set.tensors
        n = len(x) // rc["batch_size"] * rc["batch_size"]  # whole minibatches only
        with torch.no_grad(), norm_mode(ctx.model, "batch"):
            hits = [
                (ctx.model(xb).argmax(dim=-1) == yb).sum()
                for xb, yb in zip(x[:n].split(rc["batch_size"]), y[:n].split(rc["batch_size"]), strict=True)
            ]
        return [{"metric": "test_accuracy", "value": float(torch.stack(hits).sum()) / n}]

    return {
        "hessian": hessian,
        "landscape": landscape,
        "ics": ics,
        "conditioning": conditioning,
        "batch_stats": batch_stats_accuracy,
    }


def run(rc: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Train one net; a main run is probed at the end (and at init), a ladder run only trained."""
    data = load_run_data(rc)
    train_set, test_set, info = data.train, data.test, data.info
    depth, width = net_size(rc, rc["arch"])
    model = make_run_net(rc, info, depth=depth, width=width)
    main = rc["kind"] == "main"
    steps = rc["steps"] if main else rc["ladder_steps"]
    config = run_train_config(
        rc,
        optimizer="sgd",
        steps=steps,
        eval_every=max(steps, 1),
        log_every=rc["log_every"] if main else rc["ladder_log_every"],
    )
    probes = []
    if main:
        batch = (train_set.tensors[0][: rc["probe_size"]], train_set.tensors[1][: rc["probe_size"]])
        at = (0, steps) if rc["probe_init"] else (steps,)
        probes = [ProbeSchedule(fn, steps=at, name=name) for name, fn in zoo_probes(batch, rc).items()]
    meta = {
        "step": 0,
        "probe": "data",
        "layer": "",
        "metric": "num_classes",
        "value": float(info.num_classes),
    }
    done = [0]  # updates made, for a run whose forward pass raises

    def count(step_ctx: ProbeContext, loss: float) -> None:
        done[0] = step_ctx.step + 1

    try:
        result = train(
            model,
            train_set,
            config=config,
            test_set=test_set,
            probes=probes,
            seed=rc["seed"],
            device=ctx.device,
            progress=ctx.progress,
            desc=f"norm_zoo {rc['kind']} {rc['arch']} {rc['norm']} lr{rc['lr']:g} s{rc['seed']}",
            on_step=count,
        )
    except torch.linalg.LinAlgError as error:
        # DBN's eigendecomposition fails on the non-finite or exploding activations of a diverging run
        # before the loop can see a non-finite loss: the run diverged (its logged rows are lost).
        diverged = {"step": done[0], "probe": "train", "layer": "", "metric": "diverged", "value": 1.0}
        return [{**diverged, "error": repr(error)}, meta]
    return [*result.records, meta]


# ----------------------------------------------------------------------------------------------------
# analysis

RUN_KEYS = ["arch", "norm", "seed"]


def _last(rows: pd.DataFrame, probe: str, metric: str) -> pd.Series:
    """Per run (arch, norm, seed): the value of ``probe``/``metric`` at the run's last step."""
    part = rows[(rows["probe"] == probe) & (rows["metric"] == metric)]
    return part.loc[part.groupby(RUN_KEYS)["step"].idxmax()].set_index(RUN_KEYS)["value"]


def steps_to_target(losses: pd.DataFrame, target: float, window: int, steps: int) -> tuple[int, bool]:
    """First logged step where the mean of the last ``window`` logged minibatch losses is ≤ ``target``;
    ``(steps, True)`` (censored) if that never happens. ``losses``: one run's ``step``, ``value``."""
    ordered = losses.sort_values("step")
    smooth = ordered["value"].rolling(window, min_periods=window).mean()
    hit = ordered["step"][smooth.to_numpy() <= target]
    return (int(hit.iloc[0]), False) if len(hit) else (steps, True)


def run_table(df: pd.DataFrame, config: Config) -> pd.DataFrame:
    """One row per main run (arch, norm, seed): every metric of the table (module docstring)."""
    rows = df[df["kind"] == "main"]
    classes = rows[(rows["probe"] == "data") & (rows["metric"] == "num_classes")].set_index(RUN_KEYS)["value"]
    out = pd.DataFrame(index=classes.index)
    diverged = rows[(rows["probe"] == "train") & (rows["metric"] == "diverged")].set_index(RUN_KEYS)
    out["diverged"] = out.index.isin(diverged.index)
    accuracy = _last(rows[rows["probe"] == "eval"], "eval", "test_accuracy").reindex(out.index)
    out["test_accuracy"] = accuracy.where(~out["diverged"], 1.0 / classes)  # diverged: chance
    out["test_accuracy_batch_stats"] = _last(rows, "batch_stats", "test_accuracy")
    hits = {
        key: steps_to_target(part, config.target_loss, config.loss_window, config.steps)
        for key, part in rows[(rows["probe"] == "train") & (rows["metric"] == "loss")].groupby(RUN_KEYS)
    }
    # a run without logged losses (its forward pass raised) never reached the target: censored
    out["steps_to_target"] = pd.Series({k: v[0] for k, v in hits.items()}, dtype=float)
    out["censored"] = pd.Series({k: v[1] for k, v in hits.items()}, dtype=object)
    out = out.fillna({"steps_to_target": float(config.steps), "censored": True}).astype({"censored": bool})
    end = rows[rows["step"] == config.steps]
    for label, part in (("", end), ("_init", rows[rows["step"] == 0])):
        for probe, metric in (("hessian", "lambda_max"), ("hessian", "trace"), ("landscape", "beta_eff"),
                              ("landscape", "loss")):  # fmt: skip
            name = "probe_loss" if metric == "loss" else metric
            values = part[(part["probe"] == probe) & (part["metric"] == metric)].set_index(RUN_KEYS)["value"]
            out[name + label] = values
        ics = part[(part["probe"] == "ics") & (part["metric"] == "relative_l2")]
        out["ics" + label] = ics.groupby(RUN_KEYS)["value"].mean()
        kappa = part[(part["probe"] == "conditioning") & (part["metric"] == "condition_number")]
        out["cond_median" + label] = kappa.groupby(RUN_KEYS)["value"].median()
        out["cond_log_mean" + label] = np.log(kappa["value"]).groupby([kappa[k] for k in RUN_KEYS]).mean()
    if not config.probe_init:
        out = out.drop(columns=[c for c in out.columns if c.endswith("_init")])
    return out.reset_index()


def ladder_table(df: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per (arch, norm, ladder seed): the largest stable lr (module docstring) and its censoring."""
    ladder = df[df["kind"] == "ladder"]
    rows = ladder[ladder["probe"] == "train"]
    classes = ladder[(ladder["probe"] == "data") & (ladder["metric"] == "num_classes")]
    uniform = classes.groupby([*RUN_KEYS, "lr"])["value"].first().map(np.log)  # log K
    stable: dict[tuple, list[float]] = {}
    for (arch, norm, seed, lr), run in rows.groupby([*RUN_KEYS, "lr"]):
        losses = run[run["metric"] == "loss"]
        first = losses.loc[losses["step"] == 0, "value"]
        late = losses.loc[losses["step"] >= 0.75 * config.ladder_steps, "value"]
        below = min(first.iloc[0], uniform.get((arch, norm, seed, lr), np.inf)) if len(first) else -np.inf
        ok = not (run["metric"] == "diverged").any() and len(late) > 0 and late.mean() < below
        stable.setdefault((arch, norm, seed), [])
        if ok:
            stable[arch, norm, seed].append(float(lr))
    lrs = sorted(config.ladder_lrs)
    below = lrs[0] / (lrs[1] / lrs[0] if len(lrs) > 1 else 3.0)
    records = [
        {
            "arch": arch,
            "norm": norm,
            "seed": seed,
            "max_stable_lr": max(ok) if ok else below,
            "lr_censored": "" if ok and max(ok) < lrs[-1] else ("above" if ok else "below"),
        }
        for (arch, norm, seed), ok in stable.items()
    ]
    return pd.DataFrame(records, columns=[*RUN_KEYS, "max_stable_lr", "lr_censored"]).set_index(RUN_KEYS)


def summary_table(runs: pd.DataFrame, ladder: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per (arch, norm) of the config, applicable or not: n, means and standard deviations over seeds of
    the main runs' metrics; the geometric mean over ladder seeds of the largest stable lr."""
    metrics = [c for c in runs.columns if c not in (*RUN_KEYS, "diverged", "censored")]
    records = []
    for arch in config.archs:
        for norm in ordered_norms(config.norms):
            part = runs[(runs["arch"] == arch) & (runs["norm"] == norm)]
            lad = ladder[(ladder["arch"] == arch) & (ladder["norm"] == norm)]
            row: dict[str, Any] = {"arch": arch, "norm": norm, "applicable": applicable(arch, norm),
                                   "n": len(part), "n_diverged": int(part["diverged"].sum()),
                                   "n_censored": int(part["censored"].sum())}  # fmt: skip
            with np.errstate(invalid="ignore"):  # an infinite κ (singular covariance) has no sd
                for metric in metrics:
                    row[f"{metric}_mean"] = part[metric].mean()
                    row[f"{metric}_sd"] = part[metric].std()
            row["max_stable_lr_mean"] = (
                float(np.exp(np.log(lad["max_stable_lr"]).mean())) if len(lad) else np.nan
            )
            row["lr_censored"] = ",".join(sorted(set(lad["lr_censored"]) - {""}))
            records.append(row)
    return pd.DataFrame(records)


def _paired(
    runs: pd.DataFrame, column: str, a: str, b: str, archs: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Columns ``a``, ``b``: ``column`` of the two norms, indexed by (arch, seed), both present."""
    part = runs if archs is None else runs[runs["arch"].isin(archs)]
    wide = part.pivot_table(index=["arch", "seed"], columns="norm", values=column, aggfunc="first")
    if not {a, b} <= set(wide.columns):
        return pd.DataFrame(columns=[a, b], dtype=float)
    return wide[[a, b]].dropna()


def _log_ratio(pair: pd.DataFrame, num: str, den: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(pair[num] / pair[den]).to_numpy(dtype=float)


def claims(runs: pd.DataFrame, ladder: pd.DataFrame, config: Config) -> list[Claim]:
    """The claims of the module docstring from the per-run and ladder tables (``run_table``,
    ``ladder_table`` with a flat index); a claim whose norms were not run is left out."""
    present = set(runs["norm"])
    out = []
    if {"none", "bn"} <= present:
        acc = _paired(runs, "test_accuracy", "none", "bn")
        steps = _paired(runs, "steps_to_target", "none", "bn")
        lr = _paired(ladder, "max_stable_lr", "none", "bn")
        bounds = _paired(ladder.assign(c=_censored(ladder)), "c", "none", "bn")
        censored = int(bounds.reindex(lr.index).any(axis=1).sum())
        lam = _paired(runs, "lambda_max", "none", "bn")
        unpaired = sorted(set(runs["arch"]) - set(lam.index.get_level_values("arch")))
        left_out = f"; {', '.join(unpaired)} left out: no λmax in a pair (a diverged run)" if unpaired else ""
        out += [
            test_claim(
                "BN trains to higher test accuracy than no normalization (pooled over archs)",
                SOURCE_IOFFE,
                "final test accuracy with BN minus without, per (arch, seed)",
                (acc["bn"] - acc["none"]).to_numpy(dtype=float),
            ),
            test_claim(
                f"BN reaches the training loss {config.target_loss:g} in fewer steps (pooled over archs)",
                SOURCE_IOFFE + ", §4.2",
                f"log(steps to target without BN / with BN), censored at {config.steps}, per (arch, seed)",
                _log_ratio(steps, "none", "bn"),
            ),
            test_claim(
                "BN allows a larger stable learning rate than no normalization (pooled over archs; "
                f"{censored} of {len(lr)} pairs censored)",
                SOURCE_BJORCK,
                "log(largest stable lr with BN / without), per (arch, ladder seed); a censored lr enters "
                "as its bound (the ladder's top, or its bottom / 3), so the estimate is a bound where "
                "pairs are censored",
                _log_ratio(lr, "bn", "none"),
            ),
            test_claim(
                f"BN lowers λmax of the training-loss Hessian at the end of training (step {config.steps}"
                f"{left_out})",
                SOURCE_HESSIAN,
                "log(λmax without BN / with BN), BN with batch statistics, per (arch, seed)",
                _log_ratio(lam, "none", "bn"),
            ),
        ]
    for whitening in ("dbn", "iternorm"):
        if {"bn", whitening} <= present:
            cond = _paired(runs, "cond_median", whitening, "bn")
            out.append(
                test_claim(
                    f"{NORM_LABELS[whitening]} gives better-conditioned layer inputs than BN "
                    "(pooled over archs)",
                    SOURCE_WHITEN[whitening],
                    f"log(median κ of layer-input covariances with BN / with {whitening}), end of training, "
                    "per (arch, seed)",
                    _log_ratio(cond, "bn", whitening),
                )
            )
    for norm in ("ln", "gn"):
        if {"bn", norm} <= present and "transformer" in set(runs["arch"]):
            acc = _paired(runs, "test_accuracy", norm, "bn", archs=("transformer",))
            out.append(
                test_claim(
                    f"{NORM_LABELS[norm]} is competitive with BN in the transformer "
                    f"(not worse by more than {config.margin:g})",
                    SOURCE_LN[norm],
                    f"final test accuracy with {norm} minus with BN, transformer, per seed",
                    (acc[norm] - acc["bn"]).to_numpy(dtype=float),
                    threshold=-config.margin,
                )
            )
    return out


def _censored(ladder: pd.DataFrame) -> pd.Series:
    """Per ladder row, whether its largest stable lr is a censored bound (``lr_censored`` "above" or
    "below"; empty, or NaN once read back from the CSV, when measured)."""
    return ladder["lr_censored"].fillna("") != ""


def _cell_note(cell: pd.DataFrame, metric: str, is_applicable: bool) -> str:
    """What a figure cell says besides its points: "n/a" (a norm the arch cannot take), "diverged",
    "∞" where the runs' values are +∞ (a singular layer-input covariance: κ = ∞), and for the
    largest stable lr how many values are censored bounds (drawn as points)."""
    if not is_applicable:
        return "n/a"
    if metric == "max_stable_lr":
        bounds = int(_censored(cell).sum())
        return (
            "" if not bounds else "censored" if bounds == len(cell) else f"{bounds} of {len(cell)} censored"
        )
    if cell["diverged"].any():
        return "diverged"
    infinite = int(np.isposinf(cell[metric].to_numpy(dtype=float)).sum())
    if infinite:
        return "∞" if infinite == len(cell) else f"∞ ({infinite} of {len(cell)})"
    return ""


def analyze(df: pd.DataFrame, config: Config, out_dir: Path) -> list[Claim]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    runs = run_table(df, config)
    ladder = ladder_table(df, config).reset_index()
    runs.to_csv(out_dir / "norm_zoo_runs.csv", index=False)
    ladder.to_csv(out_dir / "norm_zoo_ladder.csv", index=False)
    summary_table(runs, ladder, config).to_csv(out_dir / "norm_zoo_table.csv", index=False)

    norms = ordered_norms(config.norms)
    palette = norm_palette(norms)
    archs = [a for a in config.archs if a in set(runs["arch"])]
    fig, axes = plt.subplots(
        len(METRICS), len(archs), figsize=(3.2 * len(archs), 2.0 * len(METRICS)), squeeze=False
    )
    for col, arch in enumerate(archs):
        for row, (metric, label) in enumerate(METRICS.items()):
            ax = axes[row, col]
            source = ladder if metric == "max_stable_lr" else runs
            part = source[source["arch"] == arch].dropna(subset=[metric])
            part = part[np.isfinite(part[metric])]
            if len(part):
                sns.stripplot(part, x="norm", y=metric, order=norms, hue="norm", hue_order=norms,
                              palette=palette, size=3.5, jitter=0.15, legend=False, ax=ax)  # fmt: skip
                sns.pointplot(part, x="norm", y=metric, order=norms, color="0.2", errorbar=None,
                              markers="_", markersize=12, linestyle="none", ax=ax)  # fmt: skip
            if metric == "test_accuracy":  # x: with test-batch statistics instead of running ones
                mine = runs[runs["arch"] == arch]
                sns.pointplot(mine, x="norm", y="test_accuracy_batch_stats", order=norms, color="0.5",
                              errorbar=None, markers="x", markersize=4, linestyle="none", ax=ax)  # fmt: skip
            cells = source[source["arch"] == arch]
            for i, norm in enumerate(norms):
                note = _cell_note(cells[cells["norm"] == norm], metric, applicable(arch, norm))
                if note:
                    ax.text(
                        i, 0.5, note, transform=ax.get_xaxis_transform(), ha="center", fontsize=6, rotation=90
                    )
            if metric in LOG_METRICS:
                ax.set_yscale("log")
            elif metric == "trace":
                ax.set_yscale("symlog", linthresh=1.0)
            elif metric == "steps_to_target":
                ax.axhline(config.steps, color="0.5", ls="--", lw=0.8)  # censored runs sit on it
                ax.set_ylim(0, 1.05 * config.steps)
            ax.set_xlim(-0.5, len(norms) - 0.5)
            ax.set(xlabel="", ylabel=label if col == 0 else "")
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
            if row == 0:
                ax.set_title(ARCH_LABELS.get(arch, arch))
    fig.tight_layout()
    save_figure(fig, out_dir, "norm_zoo")
    return claims(runs, ladder, config)


STUDY = Study(
    name="norm_zoo",
    title="Every norm in every architecture: accuracy, speed, stable learning rate and every probe",
    reproduces="the central comparison table (Ioffe & Szegedy 2015; Ba et al. 2016; Huang et al. 2018, "
    "2019; Bjorck et al. 2018; Santurkar et al. 2018; Ghorbani et al. 2019)",
    figures=("norm_zoo",),
    presets={"quick": QUICK, "paper": PAPER},
    grid=grid,
    run=run,
    analyze=analyze,
    run_id_keys=("arch", "norm", "kind", "lr", "seed"),
    config_columns=("kind", "lr"),
)
