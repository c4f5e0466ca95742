"""The run helpers every study shares (studies/lab/runs.py): they must do exactly what the studies did
by hand — same data, same seeded net, same TrainConfig, same ``train`` call — so records stay identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import studies.lab.runs as runs
from analysis.style import NORM_LABELS, labeled_legend
from studies.lab.data import DatasetInfo, dataset_info, load_dataset
from studies.lab.nets import make_net
from studies.lab.runs import (
    RunData,
    load_run_data,
    make_run_net,
    run_net_arguments,
    run_train_config,
    train_run,
)
from studies.lab.study import RunContext
from studies.lab.train import ProbeSchedule, TrainConfig, train

#: A tiny run config: Gaussian classes (generated, no files), a 2-layer BN MLP.
RC = {
    "arch": "mlp",
    "norm": "bn",
    "dataset": "gaussian",
    "n_train": 96,
    "n_test": 48,
    "seed": 3,
    "depth": 2,
    "width": 16,
    "activation": "tanh",
    "init": "kaiming",
    "lr": 0.05,
    "momentum": 0.9,
    "batch_size": 32,
    "steps": 6,
    "eval_every": 3,
    "probe_every": 2,
}


def _hand_built_net(info: DatasetInfo) -> torch.nn.Module:
    """The net of ``RC`` as the studies built it by hand: seed, then ``make_net`` with every field."""
    torch.manual_seed(RC["seed"])
    return make_net(
        "mlp",
        norm="bn",
        in_shape=info.in_shape,
        num_classes=info.num_classes,
        depth=2,
        width=16,
        activation="tanh",
        init="kaiming",
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_run_data_is_load_dataset_with_the_run_options():
    data = load_run_data(RC)
    train_set, test_set = load_dataset("gaussian", n_train=96, n_test=48)
    assert isinstance(data, RunData)
    assert torch.equal(data.train.tensors[0], train_set.tensors[0])
    assert torch.equal(data.test.tensors[1], test_set.tensors[1])
    assert (len(data.train), len(data.test)) == (96, 48)
    assert data.info == dataset_info(train_set)
    assert (data.info.in_shape, data.info.num_classes) == ((40,), 10)


def test_load_run_data_without_a_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="'dataset'"):
        load_run_data({"seed": 0})


def test_make_run_net_equals_a_seeded_make_net():
    info = load_run_data(RC).info
    torch.manual_seed(123)  # whatever the RNG state before, the net depends on rc["seed"] only
    ours = make_run_net(RC, info)
    after_ours = torch.get_rng_state()
    direct = _hand_built_net(info)
    assert torch.equal(after_ours, torch.get_rng_state())  # the same draws, in the same number
    a, b = _state(ours), _state(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = make_run_net({**RC, "seed": RC["seed"] + 1}, info)
    assert not torch.equal(other.state_dict()["head.weight"], a["head.weight"])


def test_make_run_net_overrides_and_options():
    info = load_run_data(RC).info
    model = make_run_net(RC, info, width=8, norm="gn", norm_options={"groups": 2})
    assert model.head.in_features == 8
    assert type(model.blocks[0].norm).__name__ == "GroupNorm"
    args = run_net_arguments({**RC, "placement": "after"}, depth=5)
    assert args == {
        "arch": "mlp",
        "norm": "bn",
        "depth": 5,
        "width": 16,
        "activation": "tanh",
        "placement": "after",
        "init": "kaiming",
    }
    assert "activation" not in run_net_arguments({k: v for k, v in RC.items() if k != "activation"})


def test_make_run_net_names_a_missing_field():
    info = load_run_data(RC).info
    no_width = {k: v for k, v in RC.items() if k != "width"}
    with pytest.raises(ValueError, match="width"):
        make_run_net(no_width, info)
    assert make_run_net(no_width, info, width=4).head.in_features == 4  # an override fills it in
    with pytest.raises(ValueError, match="'seed'"):
        make_run_net({k: v for k, v in RC.items() if k != "seed"}, info)


def test_run_train_config_reads_the_run_fields_then_overrides():
    config = run_train_config(RC, log_every=RC["probe_every"])
    assert config == TrainConfig(lr=0.05, momentum=0.9, batch_size=32, steps=6, eval_every=3, log_every=2)
    assert run_train_config(RC, steps=4, full_batch=True) == TrainConfig(
        lr=0.05, momentum=0.9, batch_size=32, steps=4, eval_every=3, full_batch=True
    )
    assert run_train_config({"seed": 0}) == TrainConfig()  # nothing set: the defaults
    with pytest.raises(ValueError, match="probe_every is not a TrainConfig field"):
        run_train_config(RC, probe_every=2)
    with pytest.raises(ValueError, match=r"TrainConfig\.lr"):  # TrainConfig's own checks still apply
        run_train_config({**RC, "lr": -1.0})


def test_train_run_passes_seed_device_progress_and_the_rest(monkeypatch):
    seen = {}

    def fake_train(model, train_set, **kwargs):
        seen.update(model=model, train_set=train_set, **kwargs)
        return "result"

    monkeypatch.setattr(runs, "train", fake_train)
    data = load_run_data(RC)
    model = torch.nn.Linear(40, 10)
    config = run_train_config(RC)
    probe = ProbeSchedule(lambda ctx: [], every=2, name="nothing")

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets)

    def on_step(ctx, loss):
        return None

    ctx = RunContext(device="meta", progress=True)
    result = train_run(
        model, data, RC, ctx, config=config, probes=[probe], desc="d", loss_fn=loss_fn, on_step=on_step
    )
    assert result == "result"
    assert seen["model"] is model and seen["train_set"] is data.train and seen["test_set"] is data.test
    assert (seen["seed"], seen["device"], seen["progress"], seen["desc"]) == (3, "meta", True, "d")
    assert seen["config"] is config and seen["probes"] == [probe]
    assert seen["loss_fn"] is loss_fn and seen["on_step"] is on_step
    train_run(model, data, RC, RunContext(), config=config)
    assert (seen["device"], seen["progress"], seen["desc"], seen["probes"]) == ("cpu", False, "mlp bn s3", ())
    assert seen["loss_fn"] is F.cross_entropy and seen["on_step"] is None
    with pytest.raises(ValueError, match="'seed'"):
        train_run(model, data, {"arch": "mlp"}, RunContext(), config=config)


def test_the_helpers_give_the_records_of_the_hand_written_run():
    """Load, seed, build and train by hand, then with the helpers: bit-identical records."""
    train_set, test_set = load_dataset("gaussian", n_train=96, n_test=48)
    info = dataset_info(train_set)
    model = _hand_built_net(info)
    config = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, steps=6, eval_every=3, log_every=2)
    by_hand = train(model, train_set, config=config, test_set=test_set, seed=RC["seed"]).records

    torch.manual_seed(999)
    data = load_run_data(RC)
    helped = train_run(
        make_run_net(RC, data.info),
        data,
        RC,
        RunContext(),
        config=run_train_config(RC, log_every=RC["probe_every"]),
    ).records
    assert len(by_hand) == len(helped) > 10
    assert helped == by_hand


def test_labeled_legend_shows_the_labels():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for name in ("bn", "lp1", "none"):
        ax.plot([0, 1], [0, 1], label=name)
    legend = labeled_legend(ax, {**NORM_LABELS, "lp1": "ℓ1 BN"}, loc="upper left")
    assert [t.get_text() for t in legend.get_texts()] == ["BatchNorm", "ℓ1 BN", "no norm"]
    assert ax.get_legend() is legend and legend._loc == 2  # "upper left"
    assert [t.get_text() for t in labeled_legend(ax).get_texts()] == ["BatchNorm", "lp1", "no norm"]
    plt.close(fig)
