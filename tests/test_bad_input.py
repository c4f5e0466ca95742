"""Bad input to `whybn run` fails before any run trains or any run directory is written.

One case per row of the README's "Bad input" table: through ``studies.cli.main`` (exit status 2, one
``whybn: error: ...`` message naming the input and what was expected, no run directory), and, for the
run-config checks, through ``validate_runs(study, plan_runs(study, config))`` directly. Then the pieces:
``validate_runs`` on every preset of every study (no false alarm), several problems in one message,
and ``check_dataset_available`` against the loaders' own errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from studies import cli
from studies.lab import data
from studies.lab.data import (
    CIFAR10_SUBDIR,
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    FASHION_MNIST_FILES,
    check_dataset_available,
    load_dataset,
)
from studies.lab.study import apply_overrides
from studies.lab.sweep import plan_runs
from studies.lab.validate import validate_runs
from studies.registry import STUDY_NAMES, get_study

README = Path(__file__).resolve().parents[1] / "README.md"


def _touch_cifar10(directory: Path, batches: tuple[str, ...] | None = None) -> Path:
    """Empty files named like the CIFAR-10 batches (availability looks at names, never reads them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH) if batches is None else batches:
        (directory / name).touch()
    return directory


def _touch_fashion_mnist(directory: Path, names: tuple[str, ...] | None = None) -> Path:
    """Empty files named like the Fashion-MNIST IDX files (all four unless ``names`` says)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in tuple(FASHION_MNIST_FILES.values()) if names is None else names:
        (directory / name).touch()
    return directory


def _no_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cifar10_env_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.CIFAR10_ENV, str(tmp_path / "nowhere"))


def _cifar10_no_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.CIFAR10_ENV, raising=False)


def _cifar10_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch_cifar10(tmp_path / "partial", batches=("data_batch_1", "data_batch_2"))


def _fashion_mnist_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()


@dataclass(frozen=True)
class Case:
    """One row of the README table: ``whybn run ARGV`` and the error it gets."""

    id: str
    argv: tuple[str, ...]  # after `whybn run`; "{tmp}" stands for the test's scratch directory
    message: str  # the error's first words after "whybn: error: "; the README quotes them
    also: tuple[str, ...] = ()  # more words the error names (accepted values, the bad value)
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    planned: bool = False  # found by validate_runs on the planned grid (after plan_runs)


CASES = (
    Case("unknown study", ("nosuchstudy",), "unknown study 'nosuchstudy'; known studies: activation_drift"),
    Case(
        "unknown preset",
        ("activation_drift", "--preset", "huge"),
        "study 'activation_drift' has no preset 'huge'; presets: quick, paper",
    ),
    Case(
        "unknown --set key",
        ("activation_drift", "--set", "nosuchkey=1"),
        "--set nosuchkey: Config has no such key; keys: ",
        also=("activation", "data_root", "norms", "seeds"),
    ),
    Case(
        "--set value of the wrong type",
        ("activation_drift", "--set", "lr=abc"),
        "--set lr=abc: expected a value of type float",
        also=("could not convert string to float: 'abc'",),
    ),
    Case("--set without =", ("activation_drift", "--set", "lr"), "--set expects key=value, got 'lr'"),
    Case("--seeds 0", ("activation_drift", "--seeds", "0"), "--seeds must be >= 1, got 0"),
    Case(
        "--threads 0", ("activation_drift", "--threads", "0"), "--threads must be a positive integer, got 0"
    ),
    Case(
        "unknown name in a study's own grid field",
        ("placement", "--set", "variants=bn_sideways"),
        "placement: unknown variant(s) bn_sideways; known: ",
        also=("bn_before", "none"),
    ),
    Case(
        "an arch a study does not take",
        ("placement", "--set", "archs=resnet"),
        "placement: archs must be among mlp, vgg, got resnet",
    ),
    Case(
        "unknown net of the depth study",
        ("depth", "--set", "rank_nets=sideways"),
        "depth: unknown net(s) sideways in rank_nets; known: ",
        also=("linear", "relu"),
    ),
    Case(
        "too few steps for a study's dynamics",
        ("scale_invariance", "--set", "steps=0"),
        "scale_invariance: steps must be >= probe_every (the weight norm's growth needs two probe points), "
        "got steps=0, probe_every=100",
    ),
    Case(
        "a probe interval of no steps",
        ("landscape", "--set", "probe_every=0", "--seeds", "1"),
        "study 'landscape': probe_every must be an int >= 1 (a number of steps), got 0",
        planned=True,
    ),
    Case(
        "a size below one (width, depth, units, *_size, ...)",
        ("activation_drift", "--set", "width=-1", "--seeds", "1"),
        "study 'activation_drift': width must be an int >= 1 (a size or count), got -1",
        planned=True,
    ),
    Case(
        "too few probes for Hutch++",
        ("hessian_spectrum", "--set", "trace_probes=2", "--seeds", "1"),
        "study 'hessian_spectrum': trace_probes must be an int >= 4 (a size or count), got 2",
        planned=True,
    ),
    Case(
        "an empty grid",
        ("activation_drift", "--set", "norms="),
        "study 'activation_drift': the grid has no runs (norms=()); give each list at least one value",
    ),
    Case(
        "unknown loss",
        ("edge_of_stability", "--set", "loss=hinge"),
        "edge_of_stability: loss must be one of mse, ce, got 'hinge'",
    ),
    Case(
        "--workers 0", ("activation_drift", "--workers", "0"), "--workers: expected a positive integer, got 0"
    ),
    Case(
        "SLURM where there is none",
        ("activation_drift", "--executor", "slurm"),
        "--executor slurm: sbatch/srun not found on this machine",
        also=("--executor submitit-local",),
        setup=lambda tmp_path, monkeypatch: monkeypatch.setenv("PATH", str(tmp_path)),
    ),
    Case(
        "CUDA device without CUDA",
        ("activation_drift", "--device", "cuda"),
        "--device cuda: CUDA is not available on this machine",
        setup=_no_cuda,
    ),
    Case(
        "unknown device",
        ("activation_drift", "--device", "tpu"),
        "--device must be 'cpu' or 'cuda[:N]', got 'tpu'",
    ),
    Case(
        "unknown arch",
        ("batch_size", "--set", "arch=nosucharch", "--seeds", "1"),
        "study 'batch_size': arch 'nosucharch' is not a known architecture; known: ",
        also=("mlp, dln, vgg, resnet, transformer",),
        planned=True,
    ),
    Case(
        "unknown norm",
        ("activation_drift", "--set", "norms=bn,nosuchnorm", "--seeds", "1"),
        "study 'activation_drift': norm 'nosuchnorm' is not a known normalization; known: ",
        also=("none, bn, ln, gn, in, dbn, iternorm, wn, noisy_bn, noise, lp_bn",),
        planned=True,
    ),
    Case(
        "norm the arch cannot use",
        ("activation_drift", "--set", "norms=in", "--seeds", "1"),
        "study 'activation_drift': arch 'mlp' cannot use norm 'in'",
        also=("spatial positions",),
        planned=True,
    ),
    Case(
        "norm option out of range",
        ("batch_size", "--set", "norms=gn", "--set", "groups=0", "--seeds", "1"),
        "study 'batch_size': norm 'gn' with groups=0: groups must be a positive int, got 0",
        planned=True,
    ),
    Case(
        "unknown activation",
        ("activation_drift", "--set", "activation=swish", "--seeds", "1"),
        "study 'activation_drift': activation 'swish' is not a known activation; known: ",
        also=("relu, tanh, sigmoid, identity, gelu",),
        planned=True,
    ),
    Case(
        "training field out of range",
        ("activation_drift", "--set", "lr=-1", "--seeds", "1"),
        "study 'activation_drift': TrainConfig.lr: expected a finite number > 0, got -1.0",
        planned=True,
    ),
    Case(
        "training fields that contradict each other",
        ("hessian_spectrum", "--set", "optimizer=adam", "--seeds", "1"),
        "study 'hessian_spectrum': TrainConfig.momentum: expected 0 unless optimizer='sgd' (adam uses betas)",
        planned=True,
    ),
    Case(
        "unknown optimizer",
        ("activation_drift", "--set", "optimizer=sgdd", "--seeds", "1"),
        "study 'activation_drift': optimizer 'sgdd' is not a known optimizer; known: sgd, adam, adamw",
        planned=True,
    ),
    Case(
        "unknown probe mode",
        ("activation_drift", "--set", "probe_bn=foo", "--seeds", "1"),
        "study 'activation_drift': probe_bn 'foo' is not a mode of the probes' norms; known: batch, running",
        planned=True,
    ),
    Case(
        "unknown dataset",
        ("activation_drift", "--set", "dataset=imagenet", "--seeds", "1"),
        "study 'activation_drift': dataset 'imagenet' is not a known dataset; known: ",
        also=("mnist1d, fashion_mnist, digits, gaussian, cifar10",),
        planned=True,
    ),
    Case(
        "missing CIFAR-10 directory",
        ("activation_drift", "--set", "dataset=cifar10", "--set", "data_root={tmp}/nowhere", "--seeds", "1"),
        "study 'activation_drift': dataset 'cifar10': CIFAR-10 not found: looked ",
        also=("nowhere (option root)", "neither it nor cifar-10-batches-py/", "--set data_root=DIR"),
        planned=True,
    ),
    Case(
        "incomplete CIFAR-10 directory",
        ("activation_drift", "--set", "dataset=cifar10", "--set", "data_root={tmp}/partial", "--seeds", "1"),
        "study 'activation_drift': dataset 'cifar10': CIFAR-10 not found: looked ",
        also=("partial (option root)", "holds data_batch_1..5 and test_batch"),
        setup=_cifar10_incomplete,
        planned=True,
    ),
    Case(
        "$WHYBN_CIFAR10_DIR pointing nowhere",
        ("activation_drift", "--set", "dataset=cifar10", "--seeds", "1"),
        "study 'activation_drift': dataset 'cifar10': CIFAR-10 not found: looked ",
        also=("nowhere ($WHYBN_CIFAR10_DIR)",),
        setup=_cifar10_env_nowhere,
        planned=True,
    ),
    Case(
        "CIFAR-10 without a directory",
        ("activation_drift", "--set", "dataset=cifar10", "--seeds", "1"),
        "study 'activation_drift': dataset 'cifar10': CIFAR-10 not found: looked nowhere "
        "(no root option, no $WHYBN_CIFAR10_DIR)",
        setup=_cifar10_no_env,
        planned=True,
    ),
    Case(
        "missing Fashion-MNIST files",
        (
            "activation_drift",
            "--set",
            "dataset=fashion_mnist",
            "--set",
            "data_root={tmp}/empty",
            "--seeds",
            "1",
        ),
        "study 'activation_drift': dataset 'fashion_mnist': Fashion-MNIST not found in ",
        also=(
            "empty (option root); missing: train-images-idx3-ubyte.gz",
            "apt-get install dataset-fashion-mnist",
        ),
        setup=_fashion_mnist_empty,
        planned=True,
    ),
)


def _argv(case: Case, tmp_path: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp_path)) for a in case.argv]


def _run_dirs(results: Path) -> list[Path]:
    """Every run directory under ``results`` (``<study>/<preset>/runs/<run_id>``)."""
    return [run for runs in results.rglob("runs") for run in runs.iterdir()]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``cli.main`` sets torch's thread count (``--threads``, default 1): give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input_exits_2_before_any_run(case, tmp_path, monkeypatch, capsys):
    """Rows with ``planned=True`` need ``validate_runs`` called from ``plan_runs`` (the CLI wiring)."""
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    results = tmp_path / "results"
    status = cli.main(["run", *_argv(case, tmp_path), "--results", str(results)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"whybn: error: {case.message}"), err
    for words in case.also:
        assert words in err
    assert not results.exists() or _run_dirs(results) == []  # nothing trained, nothing written


@pytest.mark.parametrize("case", [c for c in CASES if c.planned], ids=[c.id for c in CASES if c.planned])
def test_validate_runs_finds_the_bad_input(case, tmp_path, monkeypatch):
    """The same rows through ``validate_runs(study, plan_runs(study, config))``, without the CLI."""
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    args = cli.build_parser().parse_args(["run", *_argv(case, tmp_path)])
    study = get_study(args.study)
    config = apply_overrides(study.preset(args.preset), args.set, seeds=args.seeds)
    missing_data = "not found" in case.message
    with pytest.raises(FileNotFoundError if missing_data else ValueError) as info:
        validate_runs(study, plan_runs(study, config))
    assert str(info.value).startswith(case.message)
    for words in case.also:
        assert words in str(info.value)


def test_readme_table_quotes_every_case():
    """The README's "Bad input" section quotes the start of each case's error."""
    text = README.read_text()
    assert "## Bad input" in text
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    for case in CASES:
        assert case.message.split("; known")[0].rstrip() in section, case.id


@pytest.fixture
def all_data_present(tmp_path, monkeypatch):
    """Point the dataset variables at directories holding (empty) files of every expected name."""
    monkeypatch.setenv(data.CIFAR10_ENV, str(_touch_cifar10(tmp_path / "cifar")))
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(_touch_fashion_mnist(tmp_path / "fashion")))


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_every_preset_of_every_study_validates(name, all_data_present):
    """No false alarm: the names the studies themselves use (popbn, lp_bn with p, whitening's
    least-squares part, ...) pass, at every preset."""
    study = get_study(name)
    for preset in study.presets:
        planned = plan_runs(study, study.preset(preset))
        assert planned
        validate_runs(study, planned)


def test_distinct_problems_are_listed_once_each(tmp_path):
    study = get_study("activation_drift")
    sets = ["norms=foo,bn,bar", "dataset=cifar10", f"data_root={tmp_path / 'nowhere'}"]
    config = apply_overrides(study.preset("quick"), sets, seeds=3)
    with pytest.raises(ValueError) as info:  # a name problem: ValueError even with missing data
        validate_runs(study, plan_runs(study, config))
    message = str(info.value)
    assert message.startswith("study 'activation_drift': 3 problems in the planned runs:\n")
    assert message.count("norm 'foo' is not a known normalization") == 1  # 3 seeds, one line
    assert message.count("norm 'bar' is not a known normalization") == 1
    assert message.count("CIFAR-10 not found") == 1
    assert "'bn'" not in message


def test_only_missing_data_is_a_file_not_found_error(tmp_path):
    study = get_study("activation_drift")
    config = apply_overrides(study.preset("quick"), ["dataset=cifar10", f"data_root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"^study 'activation_drift': dataset 'cifar10': CIFAR-10"):
        validate_runs(study, plan_runs(study, config))
    _touch_cifar10(tmp_path / CIFAR10_SUBDIR)  # the parent of cifar-10-batches-py/ is accepted too
    validate_runs(study, plan_runs(study, config))


def test_landscape_p_is_checked_as_its_run_converts_it(all_data_present):
    study = get_study("landscape")
    for good in ("1", "2", "inf"):
        validate_runs(study, plan_runs(study, apply_overrides(study.preset("quick"), [f"lp_ps={good}"])))
    config = apply_overrides(study.preset("quick"), ["lp_ps=1,3,1.0"])
    with pytest.raises(ValueError) as info:
        validate_runs(study, plan_runs(study, config))
    assert "norm 'lp_bn' with p='3': p must be 1, 2 or inf, got 3" in str(info.value)
    assert "norm 'lp_bn' with p='1.0': p must be 1, 2 or inf, got '1.0'" in str(
        info.value
    )  # int("1.0") fails


def test_study_extra_names_belong_to_their_study_only(all_data_present):
    popbn = {"norms": ("popbn",)}
    hessian = get_study("hessian_spectrum")
    validate_runs(hessian, plan_runs(hessian, replace(hessian.preset("quick"), **popbn)))
    drift = get_study("activation_drift")
    with pytest.raises(ValueError, match="norm 'popbn' is not a known normalization"):
        validate_runs(drift, plan_runs(drift, replace(drift.preset("quick"), **popbn)))


def test_a_run_config_without_the_protocol_fields_is_named():
    study = replace(get_study("activation_drift"), name="broken")
    planned = [("mlp-bn-s0", {"study": "broken", "arch": "mlp", "norm": "bn", "seed": 0})]
    with pytest.raises(ValueError) as info:
        validate_runs(study, planned)
    assert str(info.value) == (
        "study 'broken': run mlp-bn-s0 has no 'dataset' field "
        "(every run config has arch, norm, dataset, seed)"
    )


# --------------------------------------------------------------------------------------------------
# check_dataset_available: the loader's error, without reading


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_availability_error_is_the_loaders(name, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as checked:
        check_dataset_available(name, root=root)
    with pytest.raises(FileNotFoundError) as loaded:
        load_dataset(name, root=root)
    assert str(checked.value) == str(loaded.value)
    assert str(root) in str(checked.value)


def test_availability_looks_at_names_only(tmp_path, monkeypatch):
    """Complete directories of empty files count as present: nothing is read."""
    check_dataset_available("cifar10", root=_touch_cifar10(tmp_path / "c"))
    plain = tuple(n.removesuffix(".gz") for n in FASHION_MNIST_FILES.values())  # uncompressed names work too
    check_dataset_available("fashion_mnist", root=_touch_fashion_mnist(tmp_path / "f", plain))
    monkeypatch.setenv(data.CIFAR10_ENV, str(tmp_path / "c"))
    check_dataset_available("cifar10")  # from the environment variable
    for name in ("mnist1d", "digits", "gaussian"):  # generated or bundled: always there
        check_dataset_available(name, root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing: t10k-labels-idx1-ubyte\.gz\.\n"):
        check_dataset_available("fashion_mnist", root=_touch_fashion_mnist(tmp_path / "g", plain[:3]))
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'; known datasets: mnist1d"):
        check_dataset_available("imagenet")
