"""LaTeX tables and numbers: formatting, escaping, citations, and the round trip records → table → numbers.

Also the statistics behind them against hand-computed values (BCa bootstrap by exact enumeration).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from analysis import stats
from analysis.paper import claim_sizes, coverage_text
from analysis.stats import bootstrap_ci, summarize
from analysis.tables import (
    MINUS,
    CiteIndex,
    claim_macros,
    claims_table,
    dataframe_table,
    format_ci,
    format_number,
    latex_escape,
    macro_lines,
    parse_number,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.26066, "0.26"),
        (1.2571, "1.26"),
        (12.57, "12.6"),
        (257.1, "257"),
        (0.0179, "0.018"),
        (-1.408, f"{MINUS}1.41"),
        (-0.0001, f"{MINUS}" + r"\ensuremath{1.0\times10^{-4}}"),
        (0.0, "0.00"),
        (float("nan"), "--"),
        (None, "--"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_format_ci_shares_decimals():
    assert format_ci(0.26066, 0.237, 0.2727) == "0.26 [0.24, 0.27]"
    assert format_ci(0.9007, 0.6796, 1.2572) == "0.90 [0.68, 1.26]"
    assert format_ci(0.00178, -0.004, 0.0081) == f"0.0018 [{MINUS}0.0040, 0.0081]"
    assert format_ci(-0.0049, -0.0050, -0.0049) == f"{MINUS}0.0049 [{MINUS}0.0050, {MINUS}0.0049]"
    assert format_ci(float("nan"), float("nan"), float("nan")) == "--"
    assert format_number(-0.001, 2) == "0.00"  # never "-0.00"


def test_format_ci_tells_the_estimate_and_bounds_apart():
    # committed claims printed as 0.20 [0.20, 0.20] (depth) and 0.000000 [0.000000, 0.000000]
    # (scale_invariance, 2.26e-7 [9.5e-8, 4.8e-7]); a lower bound of −0.001 lost its minus
    sci = r"\ensuremath{{{}\times10^{{{}}}}}"
    cases = {
        (0.1995, 0.1985, 0.2017): "0.200 [0.199, 0.202]",
        (0.478, 0.476, 0.482): "0.478 [0.476, 0.482]",
        (
            2.26e-7,
            9.5e-8,
            4.8e-7,
        ): f"{sci.format('2.3', -7)} [{sci.format('9.5', -8)}, {sci.format('4.8', -7)}]",
        (0.004, -0.001, 1.2): f"0.004 [{MINUS}0.001, 1.200]",
        (
            1.04e5,
            1.0e5,
            1.06e5,
        ): f"{sci.format('1.04', 5)} [{sci.format('1.00', 5)}, {sci.format('1.06', 5)}]",
        (2.0, 2.0, 2.0): "2.00 [2.00, 2.00]",  # equal values may print equal
        (1.0 + 2e-13, 1.0, 1.0 + 4e-13): "1.00 [1.00, 1.00]",  # and so may rounding noise (< 1e-4)
    }
    for values, text in cases.items():
        assert format_ci(*values) == text
    for values in itertools.product((-3e-9, 1e-9, 2e-9, 0.2, 0.2001, 7.5e5, 7.51e5), repeat=3):
        parts = re.split(r" \[|, |\]$", format_ci(*values))[:3]
        largest = max(abs(v) for v in values)
        assert parse_number(format_ci(*values)) == pytest.approx(values, rel=0.01, abs=0.006 * largest)
        for (a, ta), (b, tb) in itertools.combinations(zip(values, parts, strict=True), 2):
            assert abs(a - b) <= 1e-4 * largest or ta != tb, (values, parts)
        assert all(MINUS in t for v, t in zip(values, parts, strict=True) if v < 0)


def test_format_number_of_numpy_scalars_and_dataframe_integers():
    assert format_number(np.float32("nan")) == "--" and format_number(np.float64(0.26)) == "0.26"
    tex = dataframe_table(pd.DataFrame({"lr": [0.1, 1.0], "n": [3, 3]}), caption="c", label="t")
    assert [row[1] for row in _table_rows(tex)] == ["3", "3"]  # an all-numeric row kept its int column


def test_parse_number_inverts_format():
    for x in (0.26, -1.41, 12.6, -3.2e-5, 4.5e6):
        assert parse_number(format_number(x))[0] == pytest.approx(x, rel=0.05)
    assert parse_number(format_ci(-0.5, -0.75, -0.25)) == [-0.5, -0.75, -0.25]


def test_latex_escape_specials_and_unicode():
    assert latex_escape("a_b 50% & #1 $x {y} ~ ^") == (
        r"a\_b 50\% \& \#1 \$x \{y\} \textasciitilde{} \textasciicircum{}"
    )
    assert latex_escape("back\\slash") == r"back\textbackslash{}slash"
    text = latex_escape("β-smoothness, λmax ≥ 2 × ℓ∞ — ‖G − G′‖, > -0.02, 15-85")
    assert r"\ensuremath{\beta}-smoothness" in text  # a hyphen between words stays a hyphen
    assert r"\ensuremath{\lambda}max \ensuremath{\geq} 2 \ensuremath{\times}" in text
    assert r"\ensuremath{\ell}\ensuremath{\infty} ---" in text
    assert rf"G {MINUS} G\ensuremath{{'}}" in text
    assert rf"> {MINUS}0.02" in text and "15-85" in text  # a negative number gets a minus, a range not
    assert all(ord(c) < 128 for c in text)
    assert latex_escape("10⁻⁶ 2ⁿ x₃ 5 µs") == (
        rf"10\textsuperscript{{{MINUS}}}\textsuperscript{{6}} 2\textsuperscript{{n}} x\textsubscript{{3}} "
        r"5 \ensuremath{\mu}s"
    )  # superscripts used to fall to the baseline (10-6), µ to "?"
    assert latex_escape("é") == "e"  # unknown accents fall back to the base letter
    with pytest.warns(UserWarning, match="U\\+2603"):
        assert latex_escape("☃") == "?"


def test_cite_index_links_known_sources(tmp_path):
    bib = tmp_path / "refs.bib"
    bib.write_text(
        "@inproceedings{ioffe2015batch,\n  author = {Ioffe, Sergey and Szegedy, Christian},\n"
        "  title = {BN},\n  year = {2015},\n}\n\n"
        "@article{santurkar2018how,\n  author = {Shibani Santurkar and Dimitris Tsipras},\n"
        "  year = {2018},\n}\n\n@article{vanlaarhoven2017l2,\n  author = {van Laarhoven, Twan},\n"
        "  year = {2017},\n}\n"
    )
    cites = CiteIndex.from_bib(bib)
    assert cites.keys == {"ioffe2015batch", "santurkar2018how", "vanlaarhoven2017l2"}
    assert cites.cite("Ioffe & Szegedy 2015, Fig. 1") == r"\citet{ioffe2015batch}, Fig.~1"
    assert cites.cite("Santurkar et al. 2018, Figs. 3 and 5") == r"\citet{santurkar2018how}, Figs.~3 and 5"
    assert cites.cite("van Laarhoven 2017; Unknown 2001 §3") == (
        r"van \citet{vanlaarhoven2017l2}; Unknown 2001 \S{}3"
    )
    assert CiteIndex.from_bib(tmp_path / "absent.bib").cite("Ioffe 2015_x") == r"Ioffe 2015\_x"


def test_repository_bib_covers_every_study_source():
    """Every "Author YEAR" a registered study names resolves to an entry of paper/refs.bib."""
    from analysis.paper import PAPER_DIR
    from studies.registry import STUDY_NAMES, get_study

    cites = CiteIndex.from_bib(PAPER_DIR / "refs.bib")
    for name in STUDY_NAMES:
        text = cites.cite(get_study(name).reproduces)
        assert r"\citet{" in text, f"{name}: no refs.bib entry for {get_study(name).reproduces!r}"


CLAIMS = [
    {
        "claim": "BN reduces β-smoothness by ≥ 10% (lr_0.05 & more)",
        "source": "Santurkar et al. 2018, Fig. 4",
        "statistic": "log(β without / β with)",
        "criterion": "95% CI lower bound > 0",
        "estimate": 0.9007512871151481,
        "ci_low": 0.6795821008599391,
        "ci_high": 1.2571655102256394,
        "n": 3,
        "holds": True,
    },
    {
        "claim": "Noisy BN trains about as well as BN",
        "source": "Santurkar et al. 2018, Fig. 2",
        "statistic": "accuracy difference",
        "criterion": "95% CI lower bound > -0.02",
        "estimate": -0.2443452380952381,
        "ci_low": -0.25119047619047624,
        "ci_high": -0.23288690476190477,
        "n": 5,
        "holds": False,
    },
    {
        "claim": "tiny effect",
        "source": "nobody",
        "statistic": "s",
        "criterion": "c",
        "estimate": 0.0017790694730903435,
        "ci_low": -0.0009,
        "ci_high": 0.0042,
        "n": 3,
        "holds": False,
    },
]


def _table_rows(tex: str) -> list[list[str]]:
    """The body rows of a generated longtable, split into cells."""
    body = tex.split(r"\endlastfoot", 1)[1].split(r"\end{longtable}")[0]
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return [line.removesuffix(r"\\").strip().split(" & ") for line in lines]


def _decimals(cell: str) -> int:
    m = re.search(r"\d+\.(\d+)", cell)
    return len(m.group(1)) if m else 0


def test_claims_table_round_trips_the_records():
    tex = claims_table(CLAIMS, caption="c", label="tab:x")
    assert r"\begin{longtable}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    rows = _table_rows(tex)
    assert len(rows) == len(CLAIMS)
    for claim, row in zip(CLAIMS, rows, strict=True):
        numbers = parse_number(row[3])
        step = 10.0 ** -_decimals(row[3])
        for got, want in zip(numbers, (claim["estimate"], claim["ci_low"], claim["ci_high"]), strict=True):
            assert abs(got - want) <= step / 2 + 1e-12
        assert int(row[4]) == claim["n"]
        assert row[5].strip() == (r"\WBholds" if claim["holds"] else r"\WBfails")
    assert r"\ensuremath{\beta}" in rows[0][1] and r"10\%" in rows[0][1] and r"lr\_0.05 \&" in rows[0][1]
    assert rf"> {MINUS}0.02" in rows[1][1]
    assert "0.90 [0.68, 1.26]" in rows[0][3]


def test_claim_macros_round_trip():
    macros = claim_macros("study", CLAIMS)
    assert macros["study/claims"] == "3" and macros["study/holds"] == "1"
    assert macros["study/claim1/value"] == "0.90 [0.68, 1.26]"
    assert macros["study/claim1/estimate"] == "0.90" and macros["study/claim1/ci"] == "[0.68, 1.26]"
    assert parse_number(macros["study/claim2/value"]) == [-0.24, -0.25, -0.23]
    assert macros["study/claim2/holds"] == "does not hold"
    text = macro_lines({"a/b_c": "1", "x": "y"})
    assert text == "\\WBset{a/b_c}{1}\n\\WBset{x}{y}\n"
    with pytest.raises(ValueError, match="macro key"):
        macro_lines({"bad key": "1"})


def test_dataframe_table_merges_ci_columns_and_round_trips():
    df = pd.DataFrame(
        {
            "norm": ["bn", "none"],
            "estimate": [0.6712, 0.4071],
            "ci_low": [0.642, 0.401],
            "ci_high": [0.693, 0.412],
            "n": [3, 3],
            "loss": [0.5412, 1.3977],
            "loss_ci_low": [0.48, 1.33],
            "loss_ci_high": [0.63, 1.44],
        }
    )
    tex = dataframe_table(df, caption="c", label="t")
    header = tex.split(r"\midrule")[0]
    assert r"norm & estimate [95\% CI] & $n$ & loss [95\% CI] \\" in header
    rows = _table_rows(tex)
    assert rows[0] == ["bn", "0.67 [0.64, 0.69]", "3", "0.54 [0.48, 0.63]"]
    assert parse_number(rows[1][1]) == [0.407, 0.401, 0.412]  # at 2 decimals the estimate = a bound
    assert "@{}lrrr@{}" in tex


def test_dataframe_table_prints_grid_coordinates_as_typed():
    """learning_rate's summary labelled its rows lr 0.0032, 0.032 and 1.00 (the estimates' rounding)
    where the runs used 0.00316, 0.0316 and 1, as the prose's macros say."""
    df = pd.DataFrame({"lr": [0.00316, 0.0316, 1.0, 1e-6], "estimate": [0.5] * 4, "ci_low": [0.4] * 4,
                       "ci_high": [0.6] * 4, "n": [3] * 4})  # fmt: skip
    rows = _table_rows(dataframe_table(df, caption="c", label="t", exact=["lr"]))
    assert [r[0] for r in rows] == ["0.00316", "0.0316", "1", r"\ensuremath{10^{-6}}"]
    assert [r[0] for r in _table_rows(dataframe_table(df, caption="c", label="t"))][:3] == [
        "0.0032",
        "0.032",
        "1.00",
    ]


def test_coverage_sentence_names_one_value_claims():
    """With claims of n = 1 only, the paper's coverage sentence quoted 73% for n = 3; an interval of one
    value is the point, and covers the true mean with probability 0."""
    claims = [{"n": 1}, {"n": 0}, {"n": 1}]
    assert claim_sizes(claims) == [1] and claim_sizes([*claims, {"n": 3}]) == [1, 3]
    assert coverage_text(claim_sizes(claims)) == r"0\% for $n = 1$"


def test_summarize_and_bootstrap_against_hand_computed_values(monkeypatch):
    # the mean and n per group are plain arithmetic
    df = pd.DataFrame({"norm": ["bn"] * 4 + ["none"] * 2, "value": [1.0, 2.0, 4.0, 8.0, 3.0, 3.0]})
    out = summarize(df, ["norm"]).set_index("norm")
    assert out.loc["bn", "estimate"] == 3.75 and out.loc["bn", "n"] == 4
    assert out.loc["none", "ci_low"] == out.loc["none", "ci_high"] == 3.0  # identical values

    # BCa by hand, on the exact bootstrap distribution of the mean of x (all 4^4 resamples)
    x = np.array([1.0, 2.0, 4.0, 8.0])
    means = np.array([np.mean(s) for s in itertools.product(x, repeat=len(x))])
    theta = x.mean()
    z0 = norm.ppf(np.mean(means < theta))
    jack = np.array([np.delete(x, i).mean() for i in range(len(x))])
    d = jack.mean() - jack
    a = (d**3).sum() / (6 * ((d**2).sum()) ** 1.5)
    quantiles = []
    for alpha in (0.025, 0.975):
        z = z0 + norm.ppf(alpha)
        quantiles.append(np.quantile(means, norm.cdf(z0 + z / (1 - a * z))))
    est = bootstrap_ci(x, n_resamples=20000)
    assert est.estimate == theta and est.n == 4
    assert est.ci_low == pytest.approx(quantiles[0], abs=0.26)  # one atom of the discrete distribution
    assert est.ci_high == pytest.approx(quantiles[1], abs=0.26)

    # ... and the interval is scipy.stats.bootstrap's, at the documented level
    calls = []
    real = stats.stats.bootstrap

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats.stats, "bootstrap", spy)
    bootstrap_ci(x)
    assert calls and calls[0]["method"] == "BCa"
    assert calls[0]["confidence_level"] == stats.DEFAULT_CONFIDENCE == 0.95
    assert calls[0]["n_resamples"] == stats.DEFAULT_RESAMPLES
    assert not math.isnan(bootstrap_ci([1.0, 2.0]).ci_low)
