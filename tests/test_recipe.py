"""`edgeft run`: the whole chain from one recipe, skipping current steps, stopping on failure."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny import new_class_rows, write_csv

from edgeft.cli import main
from edgeft.errors import ConfigError, DataError
from edgeft.recipe import load_recipe, run_recipe


@pytest.fixture
def recipe(tmp_path, tiny_bert, text_data):
    write_csv(tmp_path / "new.csv", new_class_rows(24, seed=1))
    write_csv(tmp_path / "new_test.csv", new_class_rows(8, seed=2))
    (tmp_path / "make_inputs.py").write_text(
        "import sys\nopen(sys.argv[1], 'w').write('\\n'.join(f'pump seal leak {i}' for i in range(40)) + '\\n')\n")
    p = tmp_path / "recipe.toml"
    p.write_text(f"""
output = "out"
[train]
model = "{tiny_bert}"
data = "{text_data['train']}"
val = "{text_data['val']}"
method = "lora"
pooling = "mean"
epochs = 8
batch-size = 8
lr = 0.005
head-lr = 0.03
patience = 8
[build]
devices = ["x86-64-server"]
parity_data = "make_inputs.py"  # a script the recipe runs into out/parity-data/
uncertified = true              # 18 + 40 rows cannot certify 99%: judged on the point estimate
[verify]
data = "{text_data['val']}"
[retrain]
device = "x86-64-server"
data = "new.csv"
add_classes = true
margin = 0.1
test = ["{text_data['val']}", "new_test.csv"]
""")
    return p


def test_recipe_runs_the_chain_then_skips_current_steps(recipe, tmp_path):
    r = CliRunner().invoke(main, ["run", str(recipe)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    s = json.loads((out / "summary.json").read_text())
    assert [st["step"] for st in s["steps"]] == ["train", "merge", "export", "build x86-64-server",
                                                 "verify x86-64-server", "retrain"]
    assert all(st["status"] == "ok" for st in s["steps"])
    dev = s["devices"]["x86-64-server"]
    assert dev["precision"] == "int8" and dev["agreement"] >= 0.99 and dev["ms_per_input"] > 0
    assert (out / "parity-data" / "inputs.txt").read_text().count("\n") == 40 and not (tmp_path / "inputs.txt").exists()
    built = json.loads((out / "bundles/x86-64-server/manifest.json").read_text())["parity"]
    assert built["sources"] == {"validation": 18, "parity-data": 40} and "not certified" in built["judged_on"]
    assert s["retrain"]["added_classes"] == ["valve"]
    assert s["retrain"]["test_after"]["new_test.csv"]["accuracy"] > s["retrain"]["test_before"]["new_test.csv"]["accuracy"]
    for d in ("run", "model", "export", "bundles/x86-64-server", "verify/x86-64-server", "retrain/bundle"):
        assert (out / d).is_dir(), d
    assert "device retrain: head v2, added valve" in r.stdout
    # the built bundle itself is untouched: the retrain worked on a copy
    assert json.loads((out / "bundles/x86-64-server/manifest.json").read_text())["head"]["version"] == 1

    again = run_recipe(recipe)
    assert {st["status"] for st in again["steps"]} == {"skipped (current)"}

    # a changed [verify] table redoes verify (and what follows it), nothing before it
    recipe.write_text(recipe.read_text().replace("[verify]\n", "[verify]\nmin_agreement = 0.9\n"))
    third = run_recipe(recipe)
    status = {st["step"]: st["status"] for st in third["steps"]}
    assert status["train"] == status["build x86-64-server"] == "skipped (current)"
    assert status["verify x86-64-server"] == "ok"


@pytest.mark.slow  # a second whole chain (train, build, verify) before the failing step
def test_failing_step_stops_the_chain(recipe, tmp_path):
    recipe.write_text(recipe.read_text().replace("add_classes = true", "add_classes = false"))
    with pytest.raises(DataError, match="retrain: .*labels the model does not know: valve"):
        run_recipe(recipe)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["steps"][-1]["status"] == "failed"
    r = CliRunner().invoke(main, ["run", str(recipe)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("error: retrain:")
    assert "Traceback" not in r.output


def test_recipe_errors(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[train]\nmodel = "m"\ndata = "d"\n[biuld]\ndevices = ["cpu"]\n')
    with pytest.raises(ConfigError, match=r"unknown table or key 'biuld'.*Did you mean \"build\""):
        load_recipe(p)
    p.write_text('[train]\nmodel = "m"\ndata = "d"\n[build]\ndevise = ["x"]\n')
    with pytest.raises(ConfigError, match=r"unknown key 'devise' in \[build\]"):
        load_recipe(p)
    p.write_text('[build]\ndevices = ["x86-64-server"]\n')
    with pytest.raises(ConfigError, match=r"needs a \[train\] table"):
        load_recipe(p)
    p.write_text('[train]\nmodel = "m"\ndata = "d"\n[build]\ndevices = ["x86-64-server"]\n[retrain]\ndevice = "iphone"\ndata = "x"\n')
    with pytest.raises(ConfigError, match=r"\[retrain\] device must be one of \[build\] devices"):
        load_recipe(p)


# ---------------------------------------------------------------- inputs the fuzzing found (tests/test_fuzz.py)


def test_recipe_output_must_be_a_folder_name(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('output = 1\n[train]\nmodel = "m"\ndata = "d"\n')
    with pytest.raises(ConfigError, match=r"r.toml: output: expected a folder name, got 1\.$"):
        load_recipe(f)


@pytest.mark.parametrize("text", ["[build]\ndevices = 5\n", "[build]\ndevices = [1]\n",
                                  '[build]\ndevices = [1]\n[retrain]\ndevice = "x"\n'])
def test_recipe_devices_must_be_names(tmp_path, text):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nmodel = "m"\ndata = "d"\n' + text)
    with pytest.raises(ConfigError, match=r"r.toml: \[build\] devices: expected a list of profile names"):
        load_recipe(f)


def test_recipe_path_too_long_for_the_file_system_is_kept_as_written(tmp_path):
    """A name too long for the file system is not a path here: no OSError, the value as written."""
    f = tmp_path / "recipe.toml"
    f.write_text('[train]\nmodel = "m"\ndata = "d.csv"\n[build]\ndata = "' + "d" * 300 + '"\n')
    assert load_recipe(f)["build"]["data"] == "d" * 300
