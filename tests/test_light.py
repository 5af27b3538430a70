"""The device side and the CLI's start-up stay free of torch and transformers."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "accelerate")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_runtime_imports_without_torch():
    assert _loaded_after(
        "import edgeft.runtime, edgeft.runtime.preprocess, edgeft.runtime.metrics, "
        "edgeft.runtime.atomic, edgeft.data"
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
