"""The steps every study's ``run(rc, ctx)`` shares: load the run's data, build its net, train it.

A run config ``rc`` is one row of a study's grid: a flat dict with at least ``arch``, ``norm``,
``dataset`` and ``seed``, and the net and training fields the study sets. The helpers read the fields
they know by name and take everything else as explicit arguments::

    data = load_run_data(rc)                                   # train, test, info
    model = make_run_net(rc, data.info)                         # seeded with rc["seed"], then built
    config = run_train_config(rc, log_every=rc["probe_every"])  # TrainConfig from rc's fields
    result = train_run(model, data, rc, ctx, config=config, probes=[...], desc="...")

Determinism (the order of random draws every study keeps): loading data draws from no global RNG;
:func:`make_run_net` calls ``torch.manual_seed(rc["seed"])`` immediately before ``make_net``, so the
initial weights depend on the seed and the net only; :func:`train_run` hands ``rc["seed"]`` to
:func:`~studies.lab.train.train`, which seeds again for the minibatch order and dropout-like noise.
Code a study runs between building the net and training (e.g. slicing a probe batch) must draw from
no global RNG, or draw the same way in every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from studies.lab.data import DatasetInfo, dataset_info, load_dataset, run_data_options
from studies.lab.nets import make_net
from studies.lab.study import RunContext
from studies.lab.train import ProbeContext, ProbeSchedule, TrainConfig, TrainResult, train

__all__ = [
    "NET_FIELDS",
    "NET_OPTION_FIELDS",
    "TRAIN_FIELDS",
    "RunData",
    "load_run_data",
    "make_run_net",
    "run_net_arguments",
    "run_train_config",
    "train_run",
]

#: Run-config fields every net is built from (a study may override any of them).
NET_FIELDS: tuple[str, ...] = ("arch", "norm", "depth", "width")
#: Run-config fields passed on to ``make_net`` as options when the run config has them.
NET_OPTION_FIELDS: tuple[str, ...] = ("activation", "placement", "init")
#: Run-config fields that :func:`run_train_config` reads: the fields of :class:`TrainConfig`.
TRAIN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class RunData:
    """The splits a run trains and evaluates on, and what its net needs to know about them."""

    train: TensorDataset
    test: TensorDataset
    info: DatasetInfo  # of ``train``: in_shape, num_classes


def load_run_data(rc: Mapping[str, Any]) -> RunData:
    """The ``(train, test)`` splits of ``rc["dataset"]`` with the run's data options, and their info.

    The options are :func:`~studies.lab.data.run_data_options` of ``rc`` (``data_root``, ``n_train``,
    ``n_test``, for the datasets that take them), so every study reads them the same way.
    """
    if "dataset" not in rc:
        raise ValueError("load_run_data: rc must have a 'dataset' field (a dataset name)")
    train_set, test_set = load_dataset(rc["dataset"], **run_data_options(rc))
    return RunData(train_set, test_set, dataset_info(train_set))


def run_net_arguments(rc: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of ``make_net`` a run config sets, ``overrides`` applied last.

    ``arch``, ``norm``, ``depth`` and ``width`` come from ``rc`` unless overridden (each is required),
    ``activation``, ``placement`` and ``init`` from ``rc`` where it has them; any other override
    (``norm_options``, ``residual``, ...) is passed on as given.

    >>> run_net_arguments({"arch": "mlp", "norm": "bn", "depth": 3, "width": 64, "init": "torch"}, depth=5)
    {'arch': 'mlp', 'norm': 'bn', 'depth': 5, 'width': 64, 'init': 'torch'}
    """
    arguments = {k: rc[k] for k in (*NET_FIELDS, *NET_OPTION_FIELDS) if k in rc}
    arguments.update(overrides)
    missing = [k for k in NET_FIELDS if k not in arguments]
    if missing:
        raise ValueError(
            f"make_run_net: expected the run config (or an override) to set {', '.join(missing)}; "
            f"it has {', '.join(sorted(rc)) or 'no fields'}"
        )
    return arguments


def make_run_net(rc: Mapping[str, Any], info: DatasetInfo, **overrides: Any) -> nn.Module:
    """The run's net, built right after ``torch.manual_seed(rc["seed"])``: same seed, same weights.

    ``make_net(arch, norm=..., in_shape=info.in_shape, num_classes=info.num_classes, depth=...,
    width=..., **options)`` with the arguments of :func:`run_net_arguments` (``rc``'s net fields,
    then ``overrides``, e.g. ``width=rc["mlp_width"]`` or ``norm_options={"groups": 8}``).
    """
    if "seed" not in rc:
        raise ValueError("make_run_net: rc must have a 'seed' field (an int)")
    arguments = run_net_arguments(rc, **overrides)
    arch = arguments.pop("arch")
    torch.manual_seed(rc["seed"])
    return make_net(arch, in_shape=info.in_shape, num_classes=info.num_classes, **arguments)


def run_train_config(rc: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` of every field of it that ``rc`` sets (``lr``, ``momentum``,
    ``batch_size``, ``steps``, ``eval_every``, ``log_every``, ...), then ``overrides``.

    A field neither sets keeps :class:`TrainConfig`'s default; an unknown override raises ValueError.

    >>> run_train_config({"lr": 0.5, "steps": 10, "seed": 0}, log_every=5).log_every
    5
    """
    unknown = sorted(set(overrides) - set(TRAIN_FIELDS))
    if unknown:
        raise ValueError(
            f"run_train_config: {', '.join(unknown)} is not a TrainConfig field; "
            f"fields: {', '.join(TRAIN_FIELDS)}"
        )
    return TrainConfig(**{**{k: rc[k] for k in TRAIN_FIELDS if k in rc}, **overrides})


def train_run(
    model: nn.Module,
    data: RunData,
    rc: Mapping[str, Any],
    ctx: RunContext,
    *,
    config: TrainConfig,
    probes: Sequence[ProbeSchedule] = (),
    desc: str | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    on_step: Callable[[ProbeContext, float], bool | None] | None = None,
) -> TrainResult:
    """:func:`~studies.lab.train.train` ``model`` on ``data.train`` (evaluating on ``data.test``) with
    the run's seed ``rc["seed"]`` and the context's device and progress bar.

    ``desc`` labels the progress bar (default: ``"<arch> <norm> s<seed>"``); ``config``, ``probes``,
    ``loss_fn`` and ``on_step`` go to ``train`` as they are.
    """
    if "seed" not in rc:
        raise ValueError("train_run: rc must have a 'seed' field (an int)")
    if desc is None:
        desc = f"{rc.get('arch', '')} {rc.get('norm', '')} s{rc['seed']}".strip()
    return train(
        model,
        data.train,
        config=config,
        loss_fn=loss_fn,
        test_set=data.test,
        probes=probes,
        seed=rc["seed"],
        device=ctx.device,
        progress=ctx.progress,
        desc=desc,
        on_step=on_step,
    )
