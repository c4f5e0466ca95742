"""The shared training loop: determinism, schedules, the probe schedule, divergence, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from studies.lab.train import (
    ProbeContext,
    ProbeSchedule,
    TrainConfig,
    evaluate,
    lr_at,
    make_optimizer,
    make_scheduler,
    set_seed,
    train,
)


def blobs(n: int = 96, dim: int = 5, seed: int = 0) -> TensorDataset:
    """Two linearly separable Gaussian blobs, labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=g) * 0.5 + (2.0 * y[:, None] - 1.0)
    return TensorDataset(x, y)


def mlp(dim: int = 5, width: int = 16, classes: int = 2, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, classes),
    )


def key(t: torch.Tensor) -> bytes:
    return t.detach().cpu().numpy().tobytes()


def rows(result, probe: str, metric: str) -> dict[int, float]:
    return {r["step"]: r["value"] for r in result.records if r["probe"] == probe and r["metric"] == metric}


# ----------------------------------------------------------------------------------------------------
# determinism and records


def test_same_seed_identical_records_different_seed_differs():
    data, test = blobs(), blobs(40, seed=1)
    config = TrainConfig(lr=0.05, momentum=0.9, batch_size=16, steps=30, log_every=1, eval_every=10)

    def probe(ctx):
        yield {"metric": "w_norm", "value": ctx.model[0].weight.norm()}

    def run(seed):
        return train(
            mlp(dropout=0.3),
            data,
            config=config,
            test_set=test,
            seed=seed,
            probes=[ProbeSchedule(probe, every=5)],
        )

    a, b, c = run(0), run(0), run(1)
    assert len(a.records) == len(b.records) > 0
    assert a.records == b.records  # every row, values compared exactly
    assert a.records != c.records
    assert rows(a, "train", "loss") != rows(c, "train", "loss")


def test_record_schema_and_when_rows_are_written():
    config = TrainConfig(lr=0.05, batch_size=16, steps=25, log_every=10, eval_every=10, eval_train=True)
    result = train(mlp(), blobs(), config=config, test_set=blobs(40, seed=1))
    for r in result.records:
        assert set(r) == {"step", "probe", "layer", "metric", "value"}
        assert isinstance(r["step"], int) and isinstance(r["value"], float) and r["layer"] == ""
    assert sorted(rows(result, "train", "loss")) == [0, 10, 20, 24]  # every log_every and the last update
    assert sorted(rows(result, "train", "accuracy")) == [0, 10, 20, 24]
    for metric in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
        assert sorted(rows(result, "eval", metric)) == [0, 10, 20, 25]  # every eval_every and the end
    assert not result.diverged and result.steps_done == 25 and result.seconds > 0
    assert result.final["test_accuracy"] == rows(result, "eval", "test_accuracy")[25]
    assert result.final["loss"] == rows(result, "train", "loss")[24]
    assert set(result.final) >= {"loss", "accuracy", "lr", "test_loss", "test_accuracy"}


def test_eval_row_at_the_end_is_not_duplicated():
    result = train(
        mlp(), blobs(), config=TrainConfig(steps=20, eval_every=10, batch_size=16), test_set=blobs()
    )
    steps = [r["step"] for r in result.records if r["metric"] == "test_loss"]
    assert steps == [0, 10, 20]


def test_loss_decreases_on_separable_problem():
    data = blobs(128)
    config = TrainConfig(lr=0.1, momentum=0.9, batch_size=32, steps=120, log_every=1, eval_every=60)
    result = train(mlp(), data, config=config, test_set=blobs(64, seed=2))
    loss = rows(result, "train", "loss")
    assert np.mean([loss[t] for t in range(110, 120)]) < 0.2 * np.mean([loss[t] for t in range(5)])
    assert result.final["test_accuracy"] >= 0.95
    assert rows(result, "eval", "test_loss")[120] < rows(result, "eval", "test_loss")[0]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_path_trains(optimizer):
    config = TrainConfig(
        optimizer=optimizer, lr=1e-2, batch_size=32, steps=80, eval_every=80, weight_decay=1e-4
    )
    result = train(mlp(), blobs(128), config=config, test_set=blobs(64, seed=2))
    assert isinstance(make_optimizer(mlp().parameters(), config), torch.optim.Adam)
    assert result.final["test_accuracy"] >= 0.95
    assert rows(result, "eval", "test_loss")[80] < 0.5 * rows(result, "eval", "test_loss")[0]


def test_regression_loss_writes_no_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))
    torch.manual_seed(0)
    config = TrainConfig(lr=0.1, batch_size=16, steps=50, eval_every=50)
    result = train(nn.Linear(3, 1), data, config=config, loss_fn=F.mse_loss, test_set=data)
    assert {r["metric"] for r in result.records} == {"loss", "lr", "test_loss"}
    assert result.final["test_loss"] < 0.05 * rows(result, "eval", "test_loss")[0]


# ----------------------------------------------------------------------------------------------------
# learning-rate schedules


def lrs(config: TrainConfig) -> list[float]:
    """The lr of every update, as recorded by the loop."""
    result = train(nn.Linear(5, 2), blobs(), config=config)
    lr = rows(result, "train", "lr")
    return [lr[t] for t in range(config.steps)]


def test_constant_and_step_schedule():
    assert lrs(TrainConfig(lr=0.1, steps=6, log_every=1, batch_size=16)) == [0.1] * 6
    got = lrs(TrainConfig(lr=0.1, steps=8, schedule="step", log_every=1, batch_size=16))
    # default milestones (steps // 2, 3 steps // 4) = (4, 6)
    assert got == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2, rel=1e-12)
    got = lrs(TrainConfig(lr=1.0, steps=5, schedule="step", milestones=(1, 3), gamma=0.5, log_every=1))
    assert got == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25], rel=1e-12)


def test_cosine_linear_and_warmup_schedule():
    got = lrs(TrainConfig(lr=0.2, steps=10, schedule="cosine", log_every=1, batch_size=16))
    assert got[0] == pytest.approx(0.2) and got[5] == pytest.approx(0.1)
    assert got[9] == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.9)))
    got = lrs(
        TrainConfig(lr=0.2, steps=10, schedule="linear", min_lr_fraction=0.5, log_every=1, batch_size=16)
    )
    assert got == pytest.approx([0.2 * (1 - 0.5 * t / 10) for t in range(10)], rel=1e-12)
    # warmup 4 steps: (t + 1) / 4, then cosine over the 8 remaining steps
    config = TrainConfig(lr=0.4, steps=12, warmup_steps=4, schedule="cosine", log_every=1, batch_size=16)
    got = lrs(config)
    assert got[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-12)
    assert got[4] == pytest.approx(0.4) and got[8] == pytest.approx(0.2)
    assert got == pytest.approx([lr_at(t, config) for t in range(12)], rel=1e-12)


def test_make_scheduler_matches_lr_at():
    config = TrainConfig(lr=0.3, steps=20, warmup_steps=3, schedule="linear", min_lr_fraction=0.1)
    optimizer = make_optimizer(nn.Linear(2, 2).parameters(), config)
    scheduler = make_scheduler(optimizer, config)
    for t in range(20):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(t, config), rel=1e-12)
        optimizer.step()
        scheduler.step()


# ----------------------------------------------------------------------------------------------------
# probes


def probe_and_update_batches(steps: int, schedule_steps, every=None):
    """Train; return {step: batch a probe saw} and [input of the last forward before each update]."""
    model = mlp()
    probe_batches: dict[int, bytes] = {}
    forward_inputs: list[bytes] = []
    update_batches: list[bytes] = []
    model.register_forward_pre_hook(lambda m, args: forward_inputs.append(key(args[0])))

    def probe(ctx: ProbeContext):
        if ctx.step == 0:
            ctx.optimizer.register_step_pre_hook(lambda opt, a, k: update_batches.append(forward_inputs[-1]))
        assert ctx.batch[0].shape == (16, 5) and ctx.batch[1].shape == (16,)
        probe_batches[ctx.step] = key(ctx.batch[0])
        return [{"metric": "called", "value": 1}]

    config = TrainConfig(lr=0.05, batch_size=16, steps=steps)  # 6 batches per epoch: epochs wrap around
    schedule = ProbeSchedule(probe, steps={0, *schedule_steps}, every=every, name="batch_probe")
    result = train(model, blobs(), config=config, probes=[schedule])
    assert rows(result, "batch_probe", "called").keys() == probe_batches.keys()
    return probe_batches, update_batches


def test_probe_runs_at_scheduled_steps_with_the_batch_the_optimizer_uses():
    probe_batches, update_batches = probe_and_update_batches(20, {3, 6, 13, 20}, every=7)
    assert sorted(probe_batches) == [0, 3, 6, 7, 13, 14, 20]
    assert len(update_batches) == 20
    for step in (0, 3, 6, 7, 13, 14):
        assert probe_batches[step] == update_batches[step]
    # at step == steps the probe gets the batch that would come next: the one a 21st update uses
    _, longer = probe_and_update_batches(21, set())
    assert longer[:20] == update_batches and probe_batches[20] == longer[20]


def test_each_epoch_is_a_permutation_and_drop_last():
    data = blobs(40)
    seen: list[torch.Tensor] = []

    def probe(ctx):
        seen.append(ctx.batch[0])
        return []

    config = TrainConfig(batch_size=16, steps=6, drop_last=False)
    train(nn.Linear(5, 2), data, config=config, probes=[ProbeSchedule(probe, every=1)])
    assert [len(b) for b in seen[:6]] == [16, 16, 8, 16, 16, 8]
    epoch = torch.cat(seen[:3])
    assert sorted(map(key, epoch)) == sorted(map(key, data.tensors[0]))
    seen.clear()
    train(
        nn.Linear(5, 2),
        data,
        config=TrainConfig(batch_size=16, steps=5),
        probes=[ProbeSchedule(probe, every=1)],
    )
    assert [len(b) for b in seen] == [16] * 6


def test_full_batch_uses_whole_set_every_step():
    data = blobs(50)
    sizes = []
    model = nn.Linear(5, 2)
    model.register_forward_pre_hook(lambda m, args: sizes.append(key(args[0])))
    result = train(
        model, data, config=TrainConfig(full_batch=True, batch_size=7, steps=5, lr=0.5, log_every=1)
    )
    assert sizes == [key(data.tensors[0])] * 5
    loss = rows(result, "train", "loss")
    assert all(loss[t + 1] < loss[t] for t in range(4))  # full-batch GD at a small lr descends


def test_probe_sees_parameters_before_the_update():
    model = mlp()
    before_update: list[torch.Tensor] = []
    seen: dict[int, torch.Tensor] = {}

    def probe(ctx):
        if ctx.step == 0:
            ctx.optimizer.register_step_pre_hook(
                lambda opt, a, k: before_update.append(model[0].weight.detach().clone())
            )
        seen[ctx.step] = ctx.model[0].weight.detach().clone()
        return []

    train(model, blobs(), config=TrainConfig(steps=8, batch_size=16), probes=[ProbeSchedule(probe, every=2)])
    for step in (0, 2, 4, 6):
        assert torch.equal(seen[step], before_update[step])
        assert not torch.equal(seen[step], before_update[step + 1])
    assert torch.equal(seen[8], model[0].weight)


def test_probes_do_not_change_the_trajectory():
    """Probes may use the RNG and switch modes; the loop restores both."""

    def noisy(ctx):
        ctx.model.eval()
        torch.rand(1000)
        return [{"metric": "r", "value": torch.rand(())}]

    config = TrainConfig(steps=15, batch_size=16, log_every=1)
    plain = train(mlp(dropout=0.5), blobs(), config=config)
    probed = train(mlp(dropout=0.5), blobs(), config=config, probes=[ProbeSchedule(noisy, every=3)])
    assert rows(plain, "train", "loss") == rows(probed, "train", "loss")


def test_failing_probe_is_recorded_and_training_goes_on():
    def broken(ctx):
        if ctx.step == 4:
            raise RuntimeError("boom")
        yield {"metric": "ok", "value": 1.0, "layer": "fc", "extra": "kept"}
        if ctx.step == 6:
            yield {"value": 2.0}  # no metric: a bad row fails the call

    config = TrainConfig(steps=10, batch_size=16)
    result = train(mlp(), blobs(), config=config, probes=[ProbeSchedule(broken, every=2, name="fragile")])
    assert result.steps_done == 10 and not result.diverged
    failed = [r for r in result.records if r["metric"] == "failed"]
    assert [r["step"] for r in failed] == [4, 6]
    assert all(r["probe"] == "fragile" and math.isnan(r["value"]) for r in failed)
    assert "boom" in failed[0]["error"] and "metric" in failed[1]["error"]
    ok = [r for r in result.records if r["metric"] == "ok"]
    assert [r["step"] for r in ok] == [0, 2, 8, 10]
    assert ok[0] == {
        "step": 0,
        "probe": "fragile",
        "layer": "fc",
        "metric": "ok",
        "value": 1.0,
        "extra": "kept",
    }


def test_probe_schedule_validation():
    assert ProbeSchedule(lambda ctx: [], steps=range(0, 10, 5)).steps == frozenset({0, 5})
    assert ProbeSchedule(print, every=3).name == "print"
    with pytest.raises(ValueError, match="steps, every"):
        ProbeSchedule(print)
    with pytest.raises(ValueError, match="every"):
        ProbeSchedule(print, every=0)
    with pytest.raises(ValueError, match="steps"):
        ProbeSchedule(print, steps=[-1])
    with pytest.raises(ValueError, match=r"beyond config\.steps"):
        train(nn.Linear(5, 2), blobs(), config=TrainConfig(steps=3), probes=[ProbeSchedule(print, steps=[4])])


def test_on_step_can_stop_early():
    calls = []

    def on_step(ctx, loss):
        calls.append((ctx.step, loss))
        return ctx.step == 4

    config = TrainConfig(steps=50, batch_size=16, eval_every=100)
    result = train(mlp(), blobs(), config=config, test_set=blobs(), on_step=on_step)
    assert [s for s, _ in calls] == [0, 1, 2, 3, 4]
    assert result.stopped_early and not result.diverged and result.steps_done == 5
    assert sorted(rows(result, "eval", "test_loss")) == [0, 5]


# ----------------------------------------------------------------------------------------------------
# divergence


class NanAt(nn.Module):
    """A linear model whose output turns NaN at its ``k``-th training forward pass."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc, self.k, self.calls = nn.Linear(5, 2), k, 0

    def forward(self, x):
        out = self.fc(x)
        if self.training:
            self.calls += 1
            if self.calls > self.k:
                out = out * float("nan")
        return out


def test_nan_output_ends_the_run_as_diverged():
    probed = []
    config = TrainConfig(steps=20, batch_size=16, eval_every=2)
    result = train(
        NanAt(7),
        blobs(),
        config=config,
        test_set=blobs(),
        probes=[ProbeSchedule(lambda ctx: probed.append(ctx.step) or [], every=1)],
    )
    assert result.diverged and result.steps_done == 7
    assert result.records[-1] == {
        "step": 7,
        "probe": "train",
        "layer": "",
        "metric": "diverged",
        "value": 1.0,
    }
    assert max(r["step"] for r in result.records) == 7 and probed == list(range(8))
    assert sorted(rows(result, "eval", "test_loss")) == [0, 2, 4, 6]  # no evaluation after divergence
    assert result.final["diverged"] == 1.0


def test_a_linear_algebra_failure_in_the_forward_is_divergence():
    """A whitening layer's eigendecomposition fails on exploded activations: the run is diverged data."""

    class FailsAt(nn.Module):
        def __init__(self, step: int) -> None:
            super().__init__()
            self.lin, self.calls, self.step = nn.Linear(5, 2), 0, step

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls > self.step:
                    raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return self.lin(x)

    result = train(FailsAt(4), blobs(), config=TrainConfig(steps=20, batch_size=16), test_set=blobs())
    assert result.diverged and result.steps_done == 4
    last = result.records[-1]
    assert (last["step"], last["metric"], last["value"]) == (4, "diverged", 1.0)
    assert last["reason"].startswith("LinAlgError: linalg.eigh")


def test_huge_lr_diverges_without_exception():
    config = TrainConfig(lr=1e12, steps=100, batch_size=16)
    result = train(mlp(), blobs(), config=config, test_set=blobs())
    assert result.diverged and result.steps_done < 100
    assert [r["metric"] for r in result.records].count("diverged") == 1


def test_non_finite_parameters_after_a_step_diverge():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.w * x

    data = TensorDataset(torch.full((8, 1), 1e30), torch.zeros(8, 1))
    # loss = mean(w * 1e30) is finite, the update w -= 1e30 * 1e30 overflows to -inf
    result = train(
        Scaled(), data, config=TrainConfig(lr=1e30, steps=5, batch_size=8), loss_fn=lambda out, y: out.mean()
    )
    assert result.diverged and result.steps_done == 1
    assert result.records[-1]["metric"] == "diverged" and result.records[-1]["step"] == 1


def test_overflowing_running_statistics_diverge_while_the_parameters_stay_finite():
    # BN renormalizes the exploding activations, so the training loss and the weights stay finite, but
    # its running variance overflows to inf and the eval-mode network outputs nan: it used to be "done",
    # with a nan test loss and an accuracy from nan logits in the claims
    torch.manual_seed(0)
    x, y = blobs().tensors
    data = TensorDataset(x * 1e20, y)  # a batch variance of ~1e40 overflows float32 in running_var
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    result = train(model, data, config=TrainConfig(lr=0.1, steps=20, batch_size=16), test_set=data)
    assert result.diverged and result.steps_done == 1
    last = result.records[-1]
    assert (last["step"], last["metric"]) == (1, "diverged")
    assert last["reason"] == "non-finite buffer 1.running_var"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in rows(result, "eval", "test_loss").values())
    assert all(math.isfinite(v) for v in rows(result, "train", "loss").values())


def test_a_non_finite_evaluation_loss_is_divergence():
    class NanInEval(nn.Module):  # finite weights and buffers, nan outputs in eval mode only
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(x) if self.training else self.fc(x) * float("nan")

    result = train(NanInEval(), blobs(), config=TrainConfig(steps=10, batch_size=16), test_set=blobs())
    assert result.diverged and result.steps_done == 0
    last = result.records[-1]
    assert (last["step"], last["metric"]) == (0, "diverged")
    assert last["reason"] == "non-finite test_loss in evaluation (eval mode)"


# ----------------------------------------------------------------------------------------------------
# evaluation, seeds, config


def test_evaluate_matches_manual_and_restores_flags():
    model = mlp()
    model.train()
    model[1].eval()  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    data = blobs(30)
    result = evaluate(model, data, batch_size=7)
    assert [m.training for m in model.modules()] == flags
    model.eval()
    with torch.no_grad():
        out = model(data.tensors[0])
    assert result["loss"] == pytest.approx(float(F.cross_entropy(out, data.tensors[1])), rel=1e-6)
    assert result["accuracy"] == pytest.approx(float((out.argmax(1) == data.tensors[1]).float().mean()))
    assert evaluate(model, Subset(data, range(10)))["loss"] == pytest.approx(
        float(F.cross_entropy(out[:10], data.tensors[1][:10])), rel=1e-6
    )


def test_training_keeps_the_models_modes():
    model = mlp()
    model[1].eval()  # frozen BN statistics: the loop must not switch it back to train mode
    stats = model[1].running_mean.clone()
    train(model, blobs(), config=TrainConfig(steps=5, batch_size=16, eval_every=2), test_set=blobs())
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)


def test_set_seed_seeds_torch_and_leaves_numpy_global_state():
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    rng = set_seed(3)
    a = torch.rand(3)
    rng2 = set_seed(3)
    assert torch.equal(a, torch.rand(3)) and rng.random() == rng2.random()
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "rmsprop"),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("nesterov", True),  # without momentum
        ("weight_decay", -1.0),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("steps", -1),
        ("schedule", "exponential"),
        ("warmup_steps", 5000),
        ("eval_every", 0),
        ("log_every", True),
        ("full_batch", 1),
        ("drop_last", "yes"),
        ("milestones", (5, 3)),
        ("gamma", 0.0),
        ("min_lr_fraction", 2.0),
        ("betas", (0.9, 1.5)),
        ("max_grad_norm", -1.0),
        ("eval_train", None),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}: expected"):
        TrainConfig(**{field: value})


def test_batch_larger_than_dataset_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        train(nn.Linear(5, 2), blobs(10), config=TrainConfig(batch_size=64, steps=1))
    result = train(nn.Linear(5, 2), blobs(10), config=TrainConfig(batch_size=64, steps=1, drop_last=False))
    assert result.steps_done == 1


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, blobs(), config=TrainConfig(lr=1.0, steps=1, batch_size=16, max_grad_norm=1e-3))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert 0 < moved.norm() <= 1e-3 * (1 + 1e-5)
