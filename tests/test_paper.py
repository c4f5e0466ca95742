"""`whybn paper` on a tiny fixture of results: generated TeX, the not-yet-run box, and the PDF itself.

The PDF tests need TeX (`make tex`); without latexmk they skip and say so.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from analysis.claims import test_claim
from analysis.load import load_runs
from analysis.paper import default_summary, latex_problems, pdf_pages, write_paper_tex
from analysis.stats import summarize
from analysis.style import save_figure
from analysis.tables import parse_number
from studies import cli
from studies.lab.store import DONE, RECORDS, RunStore
from studies.lab.study import Study
from studies.lab.sweep import analyze_study, run_sweep

needs_tex = pytest.mark.skipif(
    shutil.which("latexmk") is None,
    reason="latexmk not installed: `make tex`, or apt-get install latexmk texlive-latex-base "
    "texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended",
)

ACCURACY = {("none", 0): 0.40, ("none", 1): 0.42, ("none", 2): 0.41, ("bn", 0): 0.66, ("bn", 1): 0.70}


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("none", "bn")
    seeds: int = 3
    lr: float = 0.5


def grid(config: Config) -> list[dict]:
    return [
        {"arch": "mlp", "norm": n, "dataset": "gaussian", "seed": s, "lr": config.lr}
        for n in config.norms
        for s in range(config.seeds)
        if (n, s) in ACCURACY
    ]


def run(rc: dict, ctx) -> list[dict]:
    acc = ACCURACY[(rc["norm"], rc["seed"])]
    rows = [{"step": t, "probe": "train", "layer": "", "metric": "loss", "value": 2.0 - t} for t in range(2)]
    rows += [
        {"step": t, "probe": "eval", "layer": "", "metric": "test_accuracy", "value": acc * t}
        for t in range(2)
    ]
    return rows


def analyze(df, config, out_dir):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    save_figure(fig, out_dir, "toy_fig")
    acc = df[(df["probe"] == "eval") & (df["step"] == 1)].pivot_table(
        index="seed", columns="norm", values="value"
    )
    diff = (acc["bn"] - acc["none"]).dropna().to_numpy()
    return [
        test_claim(
            "BN's β-accuracy is ≥ 10% higher (lr_0.5 & more) — #1",
            "Ioffe & Szegedy 2015, Fig. 1",
            "accuracy with BN − without",
            diff,
            threshold=0.1,
        ),
        test_claim("An unsourced claim", "Nobody 1999", "s", diff, threshold=1.0),
    ]


TOY = Study(
    name="toy_paper",
    title="A toy study with β and 50% & an_underscore",
    reproduces="Ioffe & Szegedy 2015, Fig. 1",
    figures=("toy_fig", "never_drawn"),
    presets={"quick": Config()},
    grid=grid,
    run=run,
    analyze=analyze,
    config_columns=("lr",),
    summarize=lambda df: summarize(df[df["probe"] == "eval"], ["norm", "step"]),
)
LATER = Study(
    name="later_study",
    title="A study nobody has run yet",
    reproduces="Santurkar et al. 2018, Fig. 4",
    figures=("later",),
    presets={"quick": Config()},
    grid=grid,
    run=run,
    analyze=analyze,
)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """tmp results with one analyzed study and one registered study without results."""
    root = tmp_path / "results"
    store = RunStore(root, TOY.name, "quick")
    run_sweep(TOY, Config(), store, log=lambda s: None)
    analyze_study(TOY, Config(), store)
    studies = {TOY.name: TOY, LATER.name: LATER}
    monkeypatch.setattr(cli, "STUDY_NAMES", tuple(studies))
    monkeypatch.setattr(cli, "get_study", studies.__getitem__)
    return root


def test_generated_tex(results):
    out = write_paper_tex([TOY, LATER], results, "quick", log=lambda s: None)
    assert out == results / "paper" / "quick"
    assert {p.name for p in out.iterdir()} == {"studies.tex", "scoreboard.tex", "macros.tex", "reproduce.tex"}
    figures = results / "toy_paper" / "quick" / "figures"
    assert {"claims.tex", "summary.tex", "summary_study.tex", "macros.tex"} <= {
        p.name for p in figures.iterdir()
    }
    own = (figures / "summary_study.tex").read_text()
    assert r"norm & step & estimate [95\% CI] & $n$ \\" in own and "\nbn & 1 & 0.68 [" in own

    studies = (out / "studies.tex").read_text()
    assert r"\WBstudy{toy_paper}{A toy study with \ensuremath{\beta} and 50\% \& an\_underscore}" in studies
    assert r"\citet{ioffe2015batch}, Fig.~1" in studies
    assert r"\WBfigure{\WBresults/toy_paper/quick/figures/toy_fig.pdf}" in studies
    assert r"\WBfigure{\WBresults/toy_paper/quick/figures/never_drawn.pdf}" in studies  # box in the PDF
    assert r"\WBnotrun{later_study}{whybn run later_study}" in studies
    assert str(results) not in studies  # no absolute paths in what is committed

    # the numbers round-trip: records -> summary.tex / macros
    claims = json.loads((figures / "claims.json").read_text())
    macros = (out / "macros.tex").read_text()
    assert r"\WBset{all/studies}{2}" in macros and r"\WBset{all/run}{1}" in macros
    assert r"\WBset{all/claims}{2}" in macros and r"\WBset{all/holds}{1}" in macros
    assert r"\WBset{toy_paper/config/lr}{0.5}" in macros
    assert r"\WBset{toy_paper/runs}{5}" in macros
    # the paper quotes the simulated coverage of its bootstrap intervals at the claims' seed count (2)
    coverage = macros.split(r"\WBset{stats/coverage}{")[1].split("}\n")[0]
    assert coverage.endswith(r"\% for $n = 2$") and abs(float(coverage.split("\\")[0]) - 50) <= 4
    value = macros.split(r"\WBset{toy_paper/claim1/value}{")[1].split("}\n")[0]
    got = parse_number(value)
    want = [claims[0]["estimate"], claims[0]["ci_low"], claims[0]["ci_high"]]
    assert got == pytest.approx(want, abs=0.005)
    summary = (figures / "summary.tex").read_text()
    bn_acc = np.mean([ACCURACY[("bn", 0)], ACCURACY[("bn", 1)]])
    line = next(ln for ln in summary.splitlines() if ln.startswith("mlp & bn & test accuracy"))
    assert parse_number(line.split(" & ")[3])[0] == pytest.approx(bn_acc, abs=0.005)
    assert line.split(" & ")[4].startswith("2")  # n = 2 seeds

    scoreboard = (out / "scoreboard.tex").read_text()
    assert scoreboard.count(r"\hyperref[sec:toy_paper]") == 2 and "Nobody 1999" in scoreboard


def test_config_numbers_in_macros():
    from analysis.tables import config_number

    assert [config_number(v) for v in (0.05, 200, 1e-06, 2.5e-07, -0.5)] == [
        "0.05",
        "200",
        r"\ensuremath{10^{-6}}",  # was "1e-06", a hyphen in the text
        r"\ensuremath{2.5\times10^{-7}}",
        r"\textminus{}0.5",
    ]


def test_default_summary_values(results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load_runs(results, "toy_paper", config_columns=("lr",))
    out = default_summary(df, ["arch", "norm"]).set_index(["metric", "norm"])
    assert out.loc[("test accuracy", "none"), "estimate"] == pytest.approx(0.41)
    assert out.loc[("test accuracy", "none"), "n"] == 3
    assert out.loc[("train loss", "bn"), "estimate"] == pytest.approx(1.0)
    assert list(out.index.get_level_values("norm")[:2]) == ["none", "bn"]  # house order
    assert (out["diverged"] == 0).all()


def test_default_summary_leaves_diverged_runs_out_and_counts_them():
    """A diverged run's last records are from before it diverged: an untrained net's step-0 accuracy
    printed as "final" in the paper (norm_zoo's transformers without norm at lr 0.05 showed the
    chance-level 0.084 and a train loss of 35.5 though both seeds diverged by step 4)."""

    def rows(run_id: str, norm: str, seed: int, accuracy: float, diverged_at: int | None) -> list[dict]:
        last = 2 if diverged_at is None else diverged_at
        out = [
            {"run_id": run_id, "norm": norm, "seed": seed, "step": t, "probe": p, "metric": m, "value": v}
            for t in range(last)
            for p, m, v in (("eval", "test_accuracy", accuracy * t + 0.1), ("train", "loss", 3.0 - t))
        ]
        if diverged_at is not None:
            out.append(
                {"run_id": run_id, "norm": norm, "seed": seed, "step": diverged_at, "probe": "train"}
                | {"metric": "diverged", "value": 1.0}
            )
        return out

    df = pd.DataFrame(
        rows("a", "bn", 0, 0.5, None)
        + rows("b", "bn", 1, 0.7, 1)
        + rows("c", "none", 0, 0.5, 1)
        + rows("d", "none", 1, 0.5, 1)
    )
    out = default_summary(df, ["norm"]).set_index(["metric", "norm"])
    bn, none = out.loc[("test accuracy", "bn")], out.loc[("test accuracy", "none")]
    assert (bn["estimate"], bn["n"], bn["diverged"]) == (pytest.approx(0.6), 1, 1)
    assert math.isnan(none["estimate"]) and (none["n"], none["diverged"]) == (0, 2)
    assert out.loc[("train loss", "bn"), "estimate"] == pytest.approx(2.0)


def test_loading_reports_truncated_records_and_skips_unfinished(results):
    store = RunStore(results, "toy_paper", "quick")
    first, second = store.run_ids()[:2]
    (store.run_dir(second) / DONE).unlink()
    with pytest.warns(UserWarning, match=f"skipped 1 unfinished run.*{second}"):
        df = load_runs(results, "toy_paper")
    assert second not in set(df["run_id"]) and first in set(df["run_id"])
    path = store.run_dir(first) / RECORDS
    text = path.read_text()
    path.write_text(text[: len(text) - 25])  # cut the last line mid-record
    n_lines = text.count("\n")
    with pytest.raises(ValueError, match=rf"{first}/records.jsonl:{n_lines}: corrupt record"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_runs(results, "toy_paper")


def test_latex_problems_and_pages():
    log = (
        "LaTeX Warning: Reference `sec:x' on page 2 undefined on input line 5.\n"
        "Package natbib Warning: Citation `foo' on page 1 undefined on input line 9.\n"
        "Package whybn Warning: Number `a/b' undefined (run `whybn paper') on input line 3.\n"
        "! Undefined control sequence.\n"
        "Output written on build/main.pdf (7 pages, 1234 bytes).\n"
    )
    assert len(latex_problems(log)) == 4
    assert latex_problems("LaTeX Font Info: nothing\n") == []
    assert pdf_pages(log) == 7 and pdf_pages("") is None


def test_paper_without_latexmk_says_what_to_install(results, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(["paper", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "latexmk not found" in err and "texlive-latex-extra" in err
    assert (results / "paper" / "quick" / "studies.tex").is_file()  # the TeX was still written
    assert cli.main(["paper", "--results", str(results), "--tex-only"]) == 0


@needs_tex
def test_paper_pdf_builds_from_fixture(results, tmp_path, capsys):
    build = tmp_path / "build"
    assert cli.main(["paper", "--results", str(results), "--build-dir", str(build)]) == 0
    assert f"paper: {build / 'main.pdf'}" in capsys.readouterr().out
    pdf = build / "main.pdf"
    assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")
    log = (build / "main.log").read_text(errors="replace")
    assert latex_problems(log) == []  # no undefined references, citations or numbers; no errors
    blg = (build / "main.blg").read_text(errors="replace")
    assert "Warning--I didn't find a database entry" not in blg
    # the pages: title + introduction + methods (3), the toy results with its tables, the
    # not-yet-run section, the scoreboard, reproduction and references
    assert 5 <= pdf_pages(log) <= 12
    assert "whybn: not yet run: later_study" in log
    assert "whybn: missing figure:" in log and "never_drawn.pdf" in log
    aux = (build / "main.aux").read_text()
    for label in (
        "sec:toy_paper",
        "sec:later_study",
        "tab:scoreboard",
        "fig:toy_paper:toy_fig",
        "tab:toy_paper:claims",
        "tab:toy_paper:summary_study",
        "tab:toy_paper:summary",
        "sec:reproduction",
    ):
        assert rf"\newlabel{{{label}}}" in aux, label
    assert r"\bibcite{ioffe2015batch}" in aux


@needs_tex
def test_paper_builds_with_no_results_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "STUDY_NAMES", (LATER.name,))
    monkeypatch.setattr(cli, "get_study", {LATER.name: LATER}.__getitem__)
    results = tmp_path / "empty"
    assert cli.main(["paper", "--results", str(results)]) == 0
    build = results / "paper" / "quick" / "build"  # other results never overwrite paper/build
    log = (build / "main.log").read_text(errors="replace")
    assert (build / "main.pdf").is_file() and latex_problems(log) == []
    assert "whybn: not yet run: later_study" in log
