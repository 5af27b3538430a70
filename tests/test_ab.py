"""`edgeft compare`: McNemar's exact test, the paired interval, and the command as a CI gate."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.ab import mcnemar_exact, paired_difference_interval, wilson, z_for
from edgeft.cli import main


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (1, 9), (7, 3), (12, 30), (40, 41), (0, 120)])
def test_mcnemar_exact_equals_scipys_binomial_test(b, c):
    stats = pytest.importorskip("scipy.stats")
    want = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_by_hand():
    assert mcnemar_exact(0, 5) == pytest.approx(2 * 0.5**5)  # all five discordant rows favour B
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(5, 5) == 1.0


def test_wilson_and_z():
    assert z_for(0.95) == pytest.approx(1.959963984540054, abs=1e-9)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the textbook Wilson upper end for 0/10
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)


def test_paired_interval_shape():
    lo, hi = paired_difference_interval(40, 5, 5, 10)  # b == c: symmetric around no difference
    assert lo == pytest.approx(-hi) and lo < 0 < hi
    lo, hi = paired_difference_interval(0, 0, 30, 0)  # B right on all 30, A on none
    assert hi == 1.0 and 0.8 < lo < 1.0
    lo, hi = paired_difference_interval(50, 0, 0, 0)  # identical answers: only sampling width left
    assert lo < 0 < hi and hi - lo < 0.2


@pytest.mark.parametrize("pa,pb,rho,n", [(0.8, 0.8, 0.5, 60), (0.85, 0.92, 0.6, 120), (0.95, 0.97, 0.3, 200),
                                         (0.6, 0.7, 0.0, 40)])
def test_paired_interval_keeps_its_coverage(pa, pb, rho, n):
    """Simulated paired answers: the 95% interval holds the true difference in about 95% of draws
    (Newcombe's method 10 keeps near-nominal coverage; the Wald interval falls well below it here)."""
    rng = np.random.default_rng(0)
    # a 2x2 joint distribution with the given marginals and correlation
    cov = rho * np.sqrt(pa * (1 - pa) * pb * (1 - pb))
    p11 = pa * pb + cov
    probs = np.array([p11, pa - p11, pb - p11, 1 - pa - pb + p11])  # both, only A, only B, neither
    assert (probs >= 0).all()
    draws = rng.multinomial(n, probs, size=2000)
    hits = 0
    for a, b, c, d in draws:
        lo, hi = paired_difference_interval(int(a), int(b), int(c), int(d))
        hits += lo <= pb - pa <= hi
    assert hits / len(draws) >= 0.925, hits / len(draws)


def test_compare_command_is_a_gate(full_text_run, lora_text_run, text_data, tmp_path):
    from edgeft.export import export

    exported = tmp_path / "export"
    export(lora_text_run, exported)
    runner = CliRunner()
    # a model against its own export: the same answers, no difference, and "better" fails
    r = runner.invoke(main, ["compare", str(lora_text_run), str(exported), "--data", str(text_data["val"]),
                             "--require", "better", "--junit", str(tmp_path / "ab.xml"), "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["a"]["kind"] == "pytorch" and report["b"]["kind"] == "onnx"
    assert report["table"]["only_a_right"] == report["table"]["only_b_right"] == 0
    assert report["mcnemar_p"] == 1.0 and report["verdict"] == "no significant difference"
    assert report["rows"] == sum(c["rows"] for c in report["per_class"]) == 18
    assert "not significantly more accurate" in r.stderr
    suite = ET.parse(tmp_path / "ab.xml").getroot()
    assert suite.get("failures") == "1" and suite.find("testcase/failure") is not None
    # not worse by more than half a point at the interval's lower end: with 18 rows the interval
    # is wide, so even identical answers cannot show that
    r = runner.invoke(main, ["compare", str(lora_text_run), str(exported), "--data", str(text_data["val"]),
                             "--require", "not-worse", "--margin", "0.005"])
    assert r.exit_code == 1 and "lower end" in r.stderr
    # two different models, printed as a table; no requirement: exit 0
    r = runner.invoke(main, ["compare", str(full_text_run), str(lora_text_run), "--data", str(text_data["val"])])
    assert r.exit_code == 0, r.output
    assert "McNemar exact p" in r.stdout and "verdict:" in r.stdout


def test_compare_bad_input(lora_text_run, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\npump leak,pump\nbelt noise,conveyor\n")
    r = CliRunner().invoke(main, ["compare", str(lora_text_run), str(lora_text_run), "--data", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{bad}: line 3: label 'conveyor' is not one of the models' classes" in r.stderr
    r = CliRunner().invoke(main, ["compare", str(lora_text_run), str(bad), "--data", str(bad)])
    assert r.exit_code == 2 and "expected a run or model directory" in r.stderr
