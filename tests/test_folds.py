"""`edgeft train --folds K`: stratified folds, one run per fold, mean and spread per metric."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
from click.testing import CliRunner
from tiny import write_csv

from edgeft.cli import main
from edgeft.folds import fold_of
from edgeft.runs import training_data, validation_data


def test_folds_are_stratified_seeded_and_even():
    labels = ["a"] * 10 + ["b"] * 7 + ["c"] * 4
    f = fold_of(labels, 3, seed=1)
    assert f == fold_of(labels, 3, seed=1) and f != fold_of(labels, 3, seed=2)
    sizes = Counter(f)
    assert max(sizes.values()) - min(sizes.values()) <= 1 and sum(sizes.values()) == len(labels)
    for y in "abc":  # every class spread over the folds as evenly as its count allows
        per = Counter(f[i] for i, v in enumerate(labels) if v == y)
        assert max(per.values()) - min(per.get(k, 0) for k in range(3)) <= 1


def _cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_cross_validation_writes_a_report_and_keeps_folds_on_request(tiny_bert, text_data, tmp_path):
    common = ["--model", tiny_bert, "--data", text_data["train"], "--method", "head", "--pooling", "mean",
              "--epochs", "3", "--no-progress", "--folds", "3"]
    r = _cli(*common, "--output", tmp_path / "cv")
    assert r.exit_code == 0, r.output
    assert "3 folds of 48 rows" in r.stdout and "accuracy" in r.stdout and "±" in r.stdout
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == ["cv.json"]  # fold runs not kept
    report = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert report["folds"] == 3 and report["rows"] == 48 and len(report["per_fold"]) == 3
    assert sum(f["val_rows"] for f in report["per_fold"]) == 48
    assert all(f["train_rows"] + f["val_rows"] == 48 for f in report["per_fold"])
    for m in ("accuracy", "macro_f1", "loss"):
        values = [f[m] for f in report["per_fold"]]
        assert report["metrics"][m]["mean"] == pytest.approx(statistics.fmean(values))
        assert report["metrics"][m]["std"] == pytest.approx(statistics.stdev(values))
        last = [f["last_epoch"][m] for f in report["per_fold"]]
        assert report["metrics"]["last_epoch"][m]["mean"] == pytest.approx(statistics.fmean(last))
    assert all(f["epochs_run"] == 3 for f in report["per_fold"])  # --epochs 3 < the head's patience

    r = _cli(*common, "--keep-folds", "--output", tmp_path / "kept")
    assert r.exit_code == 0, r.output
    seen = []
    for k in (1, 2, 3):
        fold = tmp_path / "kept" / f"fold-{k}"
        assert (fold / "run" / "run.json").exists() and (fold / "run" / "trained.safetensors").exists()
        val = [json.loads(line) for line in (fold / "data" / "val.jsonl").read_text().splitlines()]
        train = [json.loads(line) for line in (fold / "data" / "train.jsonl").read_text().splitlines()]
        assert not {v["text"] for v in val} & {t["text"] for t in train}
        seen += [v["text"] for v in val]
        # a kept fold is a complete run whose recorded rows are where they now are (not in the staging folder)
        info = json.loads((fold / "run" / "run.json").read_text())
        assert len(validation_data(info["validation"]).items) == len(val)
        assert len(training_data(info["training"]).items) == len(train)
        # and it evaluates on its own validation rows
        r = CliRunner().invoke(main, ["evaluate", str(fold / "run"), "--data", str(fold / "data" / "val.jsonl"),
                                      "--json"])
        assert r.exit_code == 0, r.output
    assert len(seen) == 48  # every row is validated exactly once (texts may repeat in the tiny data)


def test_cross_validation_bad_input(tiny_bert, text_data, tmp_path):
    base = ["--model", tiny_bert, "--data", text_data["train"], "--method", "head", "--no-progress"]
    r = _cli(*base, "--folds", "1", "--output", tmp_path / "a")
    assert r.exit_code == 2 and "folds: expected an integer of at least 2" in r.stderr
    r = _cli(*base, "--folds", "3", "--val", text_data["val"], "--output", tmp_path / "b")
    assert r.exit_code == 2 and "drop --val" in r.stderr
    few = write_csv(tmp_path / "few.csv", [("pump leak", "pump"), ("pump seal", "pump"), ("belt noise", "belt"),
                                          ("belt roller", "belt"), ("belt slip", "belt")])
    r = _cli("--model", tiny_bert, "--data", few, "--method", "head", "--folds", "3", "--output", tmp_path / "c")
    assert r.exit_code == 2 and "class 'pump' has 2 rows; --folds 3 needs at least 3" in r.stderr
    assert "Traceback" not in r.output
    assert not any((tmp_path / n).exists() for n in "abc")
