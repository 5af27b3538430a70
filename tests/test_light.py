"""The device side and the CLI's start-up stay free of torch and transformers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "accelerate")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_runtime_imports_without_torch():
    assert _loaded_after(
        "import edgeft.runtime, edgeft.runtime.preprocess, edgeft.runtime.metrics, "
        "edgeft.runtime.atomic, edgeft.runtime.dataset, edgeft.runtime.retrain, edgeft.data"
    ) == []


def test_cli_help_imports_without_torch():
    code = (
        "from click.testing import CliRunner\nfrom edgeft.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0\n"
        "r = CliRunner().invoke(main, ['train', '--help'])\nassert r.exit_code == 0"
    )
    assert _loaded_after(code) == []


def test_train_help_shows_an_example():
    from click.testing import CliRunner

    from edgeft.cli import main

    for cmd in ("train", "evaluate", "demo"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0
    assert "edgeft train --model minilm" in CliRunner().invoke(main, ["train", "--help"]).output


EDGEFT = Path(__file__).resolve().parent.parent / "edgeft"


def _edgeft_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return {n for n in names if n == "edgeft" or n.startswith("edgeft.")}


def test_plugins_import_only_the_plugin_contract():
    files = sorted((EDGEFT.parent / "plugins").glob("*/*.py"))
    assert len(files) >= 5  # the four built-in targets and the openvino engine
    beyond = {str(p.relative_to(EDGEFT.parent)): n for p in files for n in _edgeft_names(p) if n != "edgeft.hookspecs"}
    assert beyond == {}, f"plugins import edgeft beyond edgeft.hookspecs: {beyond}"


CHECKOUT_PROBE = """
import json, sys
# no installed edgeft: drop what `pip install -e` puts on the import path
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") + repr(f)]
sys.path[:] = [p for p in sys.path if "plugins" not in p]
import edgeft
from edgeft.plugins import registry
reg = registry()
print(json.dumps({"edgeft": edgeft.__file__, "targets": {t.name: t.plugin for t in reg.targets.values()},
                  "engines": sorted(reg.engines)}))
"""


def test_a_source_checkout_that_pip_never_installed_has_its_targets(tmp_path):
    import shutil

    for part in ("edgeft", "plugins", "devices"):
        shutil.copytree(EDGEFT.parent / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", CHECKOUT_PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["edgeft"].startswith(str(tmp_path))
    assert d["targets"] == {"cpu": "cpu", "jetson": "jetson", "mobile": "mobile", "openvino": "openvino"}
    assert d["engines"] == ["onnxruntime", "openvino"]


def test_a_builtin_that_is_also_an_entry_point_registers_once(tmp_path):
    """An install whose metadata still lists a built-in as an entry point (under any name) gets it once."""
    info = tmp_path / "edgeft_again-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgeft-again\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[edgeft]\ncpu = edgeft_cpu\ncpu-again = edgeft_cpu\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "edgeft.cli", "devices", "--json"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["targets"]["cpu"]["plugin"] == "cpu"
