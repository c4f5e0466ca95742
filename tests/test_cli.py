"""The `whybn` command: list, run (with overrides), figures, all, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from studies import cli
from studies.lab.study import Study
from tests.test_store import TOY, ToyConfig


@pytest.fixture
def toy_registry(monkeypatch):
    analyzed = []

    def analyze(df, config, out_dir):
        analyzed.append(config)
        (out_dir / "toy.png").write_bytes(b"png")
        return []

    study = Study(**{**TOY.__dict__, "analyze": analyze, "figures": ("toy",)})

    def get_study(name):
        if name != "toy":
            raise KeyError(f"unknown study {name!r}; known studies: toy")
        return study

    monkeypatch.setattr(cli, "STUDY_NAMES", ("toy",))
    monkeypatch.setattr(cli, "get_study", get_study)
    return analyzed


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    calls = []

    def run(rc, ctx):
        calls.append(rc["norm"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        return [{"step": 0, "probe": "train", "metric": "loss", "value": 1.0}]

    study = Study(**{**TOY.__dict__, "run": run})
    monkeypatch.setattr(cli, "STUDY_NAMES", ("toy",))
    monkeypatch.setattr(cli, "get_study", lambda name: study)
    args = ["run", "toy", "--results", str(tmp_path), "--seeds", "1"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert err == "whybn: interrupted; finished runs are kept, and the same command resumes with the rest\n"
    assert cli.main(args) == 0
    assert "1 run(s) done (0 diverged), 1 already finished" in capsys.readouterr().out
    assert len(calls) == 3  # the interrupted run is redone, the finished one is not


def test_list(toy_registry, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "study" in out and "toy" in out


def test_run_then_skip_then_figures(toy_registry, tmp_path, capsys):
    args = ["run", "toy", "--results", str(tmp_path), "--set", "scale=2", "--seeds", "1"]
    assert cli.main(args) == 0
    assert "2 run(s) done (0 diverged), 0 already finished" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "0 run(s) done (0 diverged), 2 already finished" in capsys.readouterr().out
    saved = json.loads((tmp_path / "toy/quick/sweep.json").read_text())
    assert saved["config"]["scale"] == 2.0 and saved["config"]["seeds"] == 1
    assert (tmp_path / "toy/quick/figures/toy.png").exists()
    assert json.loads((tmp_path / "toy/quick/figures/claims.json").read_text()) == []
    assert cli.main(["figures", "toy", "--results", str(tmp_path)]) == 0
    # figures re-draws with the config the runs used, not the bare preset
    assert toy_registry[-1] == ToyConfig(scale=2.0, seeds=1)


def test_all_runs_every_study(toy_registry, tmp_path, capsys):
    assert cli.main(["all", "--results", str(tmp_path)]) == 0
    assert "4 run(s) done" in capsys.readouterr().out


def test_all_with_worker_processes_gives_the_serial_records(toy_registry, tmp_path, capsys):
    from studies.lab.store import RunStore

    assert cli.main(["all", "--results", str(tmp_path / "one"), "--no-paper"]) == 0
    assert cli.main(["all", "--results", str(tmp_path / "two"), "--no-paper", "--workers", "2"]) == 0
    assert "4 run(s) done" in capsys.readouterr().out
    one, two = (RunStore(tmp_path / d, "toy", "quick") for d in ("one", "two"))
    assert one.run_ids(done=True) == two.run_ids(done=True) != []
    assert all(one.load(r)[1] == two.load(r)[1] for r in one.run_ids())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nope"], "unknown study 'nope'; known studies: toy"),
        (["run", "toy", "--set", "bogus=1"], "--set bogus: ToyConfig has no such key"),
        (["run", "toy", "--set", "scale=big"], "--set scale=big: expected a value of type float"),
        (["run", "toy", "--preset", "huge"], "has no preset 'huge'; presets: quick"),
        (["run", "toy", "--device", "tpu"], "--device must be 'cpu' or 'cuda"),
        (["figures", "toy"], "no finished runs of 'toy'"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(toy_registry, tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("whybn: error: ") and message in err


def test_cuda_missing_is_a_clear_error(toy_registry, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["run", "toy", "--device", "cuda", "--results", str(tmp_path)]) == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "toy").exists()  # nothing written before the error


def test_console_entry_point_and_module():
    out = subprocess.run(
        [sys.executable, "-m", "studies", "list"], capture_output=True, text=True, check=True
    )
    assert "activation_drift" in out.stdout and "Ioffe & Szegedy 2015, Fig. 1" in out.stdout


def test_readme_lists_every_figure_of_every_study():
    """The README's figure table names each figure of each registered study with its command."""
    from pathlib import Path

    from studies.registry import STUDY_NAMES, get_study

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in STUDY_NAMES:
        for figure in get_study(name).figures:
            row = f"| `results/{name}/quick/figures/{figure}.pdf` | `whybn run {name}` |"
            assert row in readme, f"README lacks the figure row {row}"


def test_threads_are_set_and_checked(toy_registry, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert cli.main(["run", "toy", "--results", str(tmp_path), "--threads", "0"]) == 2
        assert "--threads must be a positive integer, got 0" in capsys.readouterr().err
        assert cli.main(["run", "toy", "--results", str(tmp_path), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_sweep_whose_every_run_failed_draws_nothing_and_says_why(toy_registry, tmp_path, capsys):
    args = ["run", "toy", "--results", str(tmp_path), "--set", "scale=-1", "--set", "norms=bn"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "toy: no run finished, so there is nothing to draw: 2 run(s) failed, the first" in out
    assert "RuntimeError: boom" in out and "`whybn status toy --preset quick" in out
    assert toy_registry == []  # analyze never called


def test_figures_that_fail_on_a_partly_failed_sweep_are_reported_not_raised(
    toy_registry, tmp_path, capsys, monkeypatch
):
    study = cli.get_study("toy")

    def analyze(df, config, out_dir):
        raise ValueError("Number of columns must be a positive integer, not 0")

    monkeypatch.setattr(cli, "get_study", lambda name: Study(**{**study.__dict__, "analyze": analyze}))
    with pytest.warns(UserWarning, match=r"skipped 2 failed run\(s\) \(FAILED, no DONE\)"):
        assert cli.main(["run", "toy", "--results", str(tmp_path), "--set", "scale=-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("whybn: toy: drawing the figures from the runs that finished failed (ValueError: ")
    assert "2 run(s) failed, the first" in err
    # no failed run: an analysis error is a bug to see in full
    with pytest.raises(ValueError, match="Number of columns"):
        cli.main(["run", "toy", "--results", str(tmp_path / "ok")])


def test_figures_that_fail_when_every_run_diverged_name_the_divergence(
    toy_registry, tmp_path, capsys, monkeypatch
):
    """Diverged runs are data, not failures; when every one diverged and the study's figures cannot
    be drawn from what they recorded, the message says so instead of a traceback."""
    study = cli.get_study("toy")

    def diverging(rc, ctx):
        return [{"step": 0, "probe": "train", "metric": "diverged", "value": 1.0}]

    def analyze(df, config, out_dir):
        raise KeyError("gradient_term")

    patched = Study(**{**study.__dict__, "run": diverging, "analyze": analyze})
    monkeypatch.setattr(cli, "get_study", lambda name: patched)
    assert cli.main(["run", "toy", "--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        "whybn: toy: drawing the figures from the runs that finished failed (KeyError: 'gradient_term')"
        in err
    )
    assert "every finished run diverged (4): a smaller learning rate" in err
    assert cli.main(["figures", "toy", "--results", str(tmp_path)]) == 1
    assert "every finished run diverged (4)" in capsys.readouterr().err
