"""Analysis: loading by config fields, bootstrap statistics against hand-computed values, claims."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from analysis.claims import test_claim
from analysis.load import load_runs
from analysis.stats import bootstrap_ci, bootstrap_coverage, summarize
from analysis.style import NORM_ORDER, norm_palette, ordered_norms
from studies.lab.store import DONE, RECORDS, RunStore


def make_results(root):
    store = RunStore(root, "toy", "quick")
    for norm, lr in (("bn", 0.1), ("none", 0.1), ("bn", 1.0)):
        rid = f"{norm}-{lr}"
        config = {"arch": "mlp", "norm": norm, "dataset": "d", "seed": 0, "lr": lr}
        store.begin(rid, config, {})
        store.finish(rid, config, [{"step": 0, "probe": "p", "metric": "m", "value": lr}])
    store.begin("unfinished", {"norm": "bn"}, {})
    return store


def test_load_selects_by_config_and_skips_unfinished(tmp_path):
    make_results(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unfinished run"):
        df = load_runs(tmp_path, "toy", norm="bn", config_columns=["lr"])
    assert sorted(df["run_id"]) == ["bn-0.1", "bn-1.0"]
    assert sorted(df["lr"]) == [0.1, 1.0] and set(df["norm"]) == {"bn"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_runs(tmp_path, "toy", lr=(0.1,))) == 2
        assert load_runs(tmp_path, "absent").empty


def test_load_reports_corrupt_file_and_line(tmp_path):
    store = make_results(tmp_path)
    path = store.run_dir("bn-0.1") / RECORDS
    path.write_text(path.read_text() + '{"broken": \n')
    with (
        pytest.raises(ValueError, match=r"bn-0.1/records.jsonl:2: corrupt record"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        load_runs(tmp_path, "toy")
    assert (store.run_dir("bn-0.1") / DONE).exists()


def test_bootstrap_ci_values():
    est = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert est.estimate == 3.0 and est.n == 5
    assert 1.0 <= est.ci_low < 3.0 < est.ci_high <= 5.0
    assert bootstrap_ci([2.0, 2.0, 2.0]).to_dict() == {"estimate": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 3}
    assert bootstrap_ci([7.0]).ci_low == 7.0
    assert bootstrap_ci([np.nan, np.inf]).n == 0
    assert bootstrap_ci([1.0, np.nan, 3.0]).estimate == 2.0  # non-finite values dropped
    # a large sample: the CI of the mean matches the normal approximation mean ± 1.96 s/√n
    x = np.random.default_rng(1).normal(10.0, 2.0, size=400)
    est = bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert est.ci_low == pytest.approx(x.mean() - half, abs=0.05)
    assert est.ci_high == pytest.approx(x.mean() + half, abs=0.05)


def test_bootstrap_coverage_against_closed_forms():
    # n = 2: the interval is the two values themselves (each is resampled twice with probability
    # 1/4 > 2.5%), so it contains the mean of a symmetric distribution with probability 1 − 2·(1/2)² = 1/2
    two = bootstrap_coverage(2, trials=1500, n_resamples=999)
    assert two.n == 2 and two.trials == 1500
    assert two.se == pytest.approx(np.sqrt(two.coverage * (1 - two.coverage) / 1500))
    assert abs(two.coverage - 0.5) < 4 * two.se
    # n = 3: about the range, 1 − 2·(1/2)³ = 3/4 for the percentile interval; far below the nominal 95%
    three = bootstrap_coverage(3, trials=1500, n_resamples=999)
    assert abs(three.coverage - 0.75) < 0.05
    # one value: a point interval never holds a continuous mean; many values: close to nominal
    assert bootstrap_coverage(1, trials=50).coverage == 0.0
    assert 0.9 < bootstrap_coverage(40, trials=600, n_resamples=999).coverage < 0.98
    assert bootstrap_coverage(3, trials=40, seed=5) == bootstrap_coverage(3, trials=40, seed=5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            bootstrap_coverage(bad)
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        bootstrap_coverage(3, trials=0)


def test_summarize_groups():
    import pandas as pd

    df = pd.DataFrame({"norm": ["a", "a", "b"], "value": [1.0, 3.0, 5.0]})
    out = summarize(df, ["norm"])
    assert (
        list(out["norm"]) == ["a", "b"] and list(out["estimate"]) == [2.0, 5.0] and list(out["n"]) == [2, 1]
    )


def test_claim_directions():
    up = test_claim("c", "s", "stat", [1.0, 1.2, 0.9, 1.1], direction=">")
    assert up.holds and up.ci_low > 0 and up.n == 4
    assert not test_claim("c", "s", "stat", [1.0, -1.0, 0.5, -0.4], direction=">").holds
    assert test_claim("c", "s", "stat", [-1.0, -1.2, -0.9], direction="<").holds
    assert test_claim("c", "s", "stat", [0.01, -0.02, 0.0], direction=">=").holds
    assert not test_claim("c", "s", "stat", [-0.5, -0.6, -0.55], direction=">=").holds
    assert not test_claim("c", "s", "stat", [], direction=">=").holds
    with pytest.raises(ValueError, match="direction"):
        test_claim("c", "s", "stat", [1.0], direction="!=")


def test_palette_is_fixed_per_norm():
    full = norm_palette()
    assert set(full) == set(NORM_ORDER) and len(set(full.values())) == len(NORM_ORDER)
    assert norm_palette(["bn", "none"]) == {"bn": full["bn"], "none": full["none"]}
    assert ordered_norms({"ln", "bn", "zz", "none"}) == ["none", "bn", "ln", "zz"]
