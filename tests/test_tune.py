"""`edgeft tune`: optuna trials of ordinary runs; the best written as a recipe `edgeft run` repeats."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.config import read_toml


@pytest.mark.parametrize("methods,trials", [("head", 2), pytest.param("head,lora", 3, marks=pytest.mark.slow)])
def test_tune_writes_a_recipe_that_repeats_the_best_trial(methods, trials, tiny_bert, text_data, tmp_path):
    out = tmp_path / "tune"
    r = CliRunner().invoke(main, ["tune", "--model", str(tiny_bert), "--data", str(text_data["train"]),
                                  "--val", str(text_data["val"]), "--methods", methods, "--trials", str(trials),
                                  "--pooling", "mean", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("tune  ok") and f"{trials} of {trials} trials" in r.stdout
    report = json.loads((out / "tune.json").read_text())
    assert report["completed"] == trials and len(report["trials"]) == trials
    scores = [t["accuracy"] for t in report["trials"]]
    assert report["best"]["score"] == max(scores)
    assert {t["method"] for t in report["trials"]} <= set(methods.split(","))
    assert sorted(p.name for p in out.iterdir()) == ["best-run", "recipe.toml", "tune.json"]  # the others deleted
    best_metrics = json.loads((out / "best-run" / "metrics.json").read_text())
    assert best_metrics["best"]["accuracy"] == report["best"]["score"]
    recipe = read_toml(out / "recipe.toml")
    assert recipe["train"]["method"] == report["best"]["method"]
    # the recipe repeats the best trial: same settings, same seed, same validation rows, same score
    r = CliRunner().invoke(main, ["run", str(out / "recipe.toml")])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "out" / "run" / "metrics.json").read_text())
    assert again["best"]["accuracy"] == pytest.approx(report["best"]["score"], abs=1e-9)
    assert again["best"]["epoch"] == best_metrics["best"]["epoch"]


def test_tune_bad_input(tiny_bert, text_data, tmp_path):
    base = ["tune", "--model", str(tiny_bert), "--data", str(text_data["train"])]
    r = CliRunner().invoke(main, [*base, "--methods", "lora,magic", "--output", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--methods: magic: choose from" in r.stderr
    r = CliRunner().invoke(main, [*base, "--trials", "0", "--output", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--trials must be at least 1" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prompt_methods_search_their_virtual_tokens():
    """prompt and prefix trials also choose how many tokens they learn, and the settings make a valid config."""
    import optuna

    from edgeft.config import TrainConfig
    from edgeft.tune import suggest

    trial = optuna.trial.FixedTrial({"prefix_lr": 1e-2, "prefix_head_lr": 1e-2, "prefix_epochs": 3,
                                     "prefix_virtual_tokens": 20})
    settings = suggest(trial, "prefix")
    assert settings["virtual_tokens"] == 20
    assert TrainConfig(model="m", data="d", output="o", method="prefix", **settings).virtual_tokens == 20
    assert "virtual_tokens" not in suggest(optuna.trial.FixedTrial({"lora_lr": 1e-3, "lora_head_lr": 1e-2,
                                                                     "lora_epochs": 3, "lora_r": 8}), "lora")
