"""End to end on the real all-MiniLM-L6-v2 and the maintenance example (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeft.config import TrainConfig
from edgeft.runs import evaluate
from edgeft.train import train

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "maintenance"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method,floor", [("head", 0.55), ("lora", 0.62)])
def test_minilm_on_maintenance_logs(method, floor, tmp_path):
    """6 teams, 120 held-out entries (chance: 0.17). Measured: head 0.66, lora 0.72."""
    run = tmp_path / method
    s = train(TrainConfig(model="minilm", data=str(EXAMPLE / "train.csv"), output=str(run),
                          method=method, progress=False))
    assert s["model"] == "minilm"
    spec = json.loads((run / "run.json").read_text())["model"]
    assert spec["pooling"] == "mean" and spec["feature_dim"] == 384
    test = evaluate(run, EXAMPLE / "test.csv")
    assert test["rows"] == 120
    assert test["accuracy"] >= floor, test["accuracy"]
    assert all(c["support"] == 20 for c in test["per_class"].values())
