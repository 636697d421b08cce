"""`maskscale sweep fit --points FILE.csv` fits any table of points, and a sweep's fit uses each
run's realised compute (summary.json's flops, else the plan's), not the nominal budget."""

from __future__ import annotations

import json
import math

import pytest

from tests.eval.conftest import ROOT, run_cli

PAPER_BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20]
PAPER_L_OPT = {"mdm": [3.37, 3.26, 3.04, 2.92, 2.83], "arm": [2.85, 2.75, 2.56, 2.45, 2.38]}
SIZES = [19e6, 48e6, 85e6, 170e6, 302e6, 551e6, 1028e6, 2121e6]


def paper_table(path, extra_row: str = "") -> None:
    """The paper's optimal losses as planted IsoFLOP parabolas (as test_fit.py), one row per
    run; every other row named, the 1e20 ARM runs with a C_real column value."""
    rows = ["family,N,C,loss,name,C_real"]
    for fam, l_opts in PAPER_L_OPT.items():
        for c, l_opt in zip(PAPER_BUDGETS, l_opts):
            n_opt = (0.0816 if fam == "arm" else 0.0408) * c**0.5
            for i, n in enumerate(SIZES):
                loss = l_opt + 0.04 * math.log(n / n_opt) ** 2
                name = f"{fam}-{n:.3g}-{c:.3g}" if i % 2 else ""
                real = f"{c:.6g}" if (fam == "arm" and c == 1e20) else ""
                rows.append(f"{fam},{n:.6g},{c:g},{loss!r},{name},{real}")
    path.write_text("\n".join(rows) + "\n" + extra_row)


def test_fit_a_table_of_points_writes_the_same_outputs(tmp_path, capsys):
    table = tmp_path / "paper.csv"
    paper_table(table)
    out = tmp_path / "fit"
    code, stdout, err = run_cli(capsys, "sweep", "fit", "--points", table, "--out", out,
                                "--bootstrap", "30")  # fmt: skip
    assert code == 0, err
    fit = json.loads((out / "fit.json").read_text())
    mdm, arm = fit["families"]["mdm"], fit["families"]["arm"]
    assert -mdm["loss_law"]["exponent"] == pytest.approx(0.0625, abs=0.002)
    assert -arm["loss_law"]["exponent"] == pytest.approx(0.0642, abs=0.002)
    assert 14 < fit["gap_geomean"] < 18 and fit["bootstrap"]["resamples"] == 30
    assert len(fit["points"]) == 80 and {p["status"] for p in fit["points"]} == {"finished"}
    named = [p["name"] for p in fit["points"] if p["family"] == "arm"]
    assert named[:2] == ["arm-N1.9e+07-C6e+18", "arm-4.8e+07-6e+18"]
    sources = {p["C_source"] for p in fit["points"]}
    assert sources == {"table", "nominal"}
    report = (out / "report.md").read_text()
    assert report.startswith("# Scaling-law fit: table paper.csv")
    assert "80 of 80 rows of the table have a loss" in report and "planned" not in report
    assert "8 from the table's C_real column; 72 from nominal C" in report
    assert "unigram" not in report and "rests on 5 budgets, 40 runs" in report
    for png in ("isoflop.png", "scaling.png"):
        assert (out / png).stat().st_size > 10_000
    assert "Geometric mean multiple" in stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("family,N,C\narm,1e7,1e19\n", "paper.csv:1: header family,N,C lacks column(s) loss; "
         "the table needs family,N,C,loss (optional: name,C_real)"),
        ("family,N,C,loss\narm,1e7,1e19,3.1\narm,85M,1e19,3.0\n",
         "paper.csv:3: column 'N': '85M' is not a number; write the model's non-embedding "
         "parameter count, e.g. 8.5e7"),
        ("family,N,C,loss\narm,1e7,0,3.1\n", "paper.csv:2: column 'C': '0' is not a positive "
         "finite number"),
        ("family,N,C,loss\narm,1e7,1e19,nan\n", "paper.csv:2: column 'loss': 'nan' is not a "
         "finite number"),
        ("family,N,C,loss\ngpt,1e7,1e19,3\n", "paper.csv:2: column 'family': 'gpt' is not arm "
         "or mdm"),
        ("name,family,N,C,loss\na,arm,1e7,1e19,3\n\na,arm,1e8,1e19,3\n", "paper.csv:4: name "
         "'a' repeats line 2; names must be unique"),
        ("family,N,C,loss\n", "paper.csv: no rows under the header"),
    ],
)  # fmt: skip
def test_a_bad_table_names_file_line_and_column(tmp_path, capsys, text, message):
    table = tmp_path / "paper.csv"
    table.write_text(text)
    code, _, err = run_cli(capsys, "sweep", "fit", "--points", table, "--out", tmp_path / "o")
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_points_fit_that_table_alone(tmp_path, capsys):
    table = tmp_path / "paper.csv"
    paper_table(table)
    code, _, err = run_cli(capsys, "sweep", "fit", tmp_path, "--points", table)
    assert code == 2 and "--points FILE.csv fits that table alone" in err


def test_sweep_fit_uses_each_runs_realised_compute(tmp_path, capsys):
    """The 8e12 runs were extended to 1.5x their budget (summary.json's flops says so); the
    others have no flops in their summary, so the plan's (steps after rounding) stands in.
    Losses follow 20 C_real^-0.07: fitted on realised compute the exponent is recovered, where
    the nominal C would give ~-0.09."""
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        capsys, "sweep", "plan", "--budgets", "2e12,4e12,8e12", "--sizes",
        "tiny-0.03M,tiny-0.07M,tiny-0.13M,tiny-0.3M", "--config",
        ROOT / "configs/train/tiny-cpu.yaml", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    realised = {}
    for p in sweep["points"]:
        c_real = p["flops"] * (1.5 if p["C"] == 8e12 else 1.0)
        realised[p["name"]] = c_real
        loss = 20 * c_real**-0.07 + 0.05 * math.log(p["N"] / 9e4) ** 2
        summary = {"N": p["N"], "val": {"val/validation/loss": loss}}
        if p["C"] == 8e12:
            summary["flops"] = c_real
        (out / "runs" / p["name"] / "summary.json").write_text(json.dumps(summary))
    code, _, err = run_cli(capsys, "sweep", "fit", out, "--no-mlflow")
    assert code == 0, err
    fit = json.loads((out / "fit/fit.json").read_text())
    for p in fit["points"]:
        assert p["C_real"] == pytest.approx(realised[p["name"]], rel=1e-12)
        assert p["C_source"] == ("summary.json" if p["C"] == 8e12 else "plan")
    arm = fit["families"]["arm"]
    assert [o["status"] for o in arm["optima"]] == ["optimum"] * 3
    assert arm["optima"][2]["C_real"] == pytest.approx(1.5 * 8e12, rel=0.02)
    assert arm["loss_law"]["exponent"] == pytest.approx(-0.07, abs=0.002)
    report = (out / "fit/report.md").read_text()
    assert "8 from summary.json (tokens trained); 16 from sweep.json" in report
