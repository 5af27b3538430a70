"""`edgeft demo`: the built-in example, end to end, offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .errors import UsageError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "maintenance"


def run_demo(output: str | Path, method: str = "head") -> dict:
    if not (EXAMPLE / "train.csv").exists():
        raise UsageError(f"{EXAMPLE}: the example data is missing; run the demo from a clone of the edgeft repository.")
    from .runs import evaluate
    from .runtime import atomic
    from .train import train

    out = Path(output)
    t0 = time.perf_counter()
    run = out / f"run-{method}"
    if run.exists():  # the demo is repeatable: it replaces its own earlier output
        if not (run / "train_state.json").exists():
            raise UsageError(f"{run}: exists and is not an edgeft run; choose another --output.")
        shutil.rmtree(run)
    cfg = TrainConfig(model="minilm", data=str(EXAMPLE / "train.csv"), output=str(run), method=method)
    train(cfg)
    test = evaluate(run, EXAMPLE / "test.csv")
    result = {"run": str(run), "test": test, "seconds": time.perf_counter() - t0}
    atomic.write_json(out / "demo.json", result)
    return result
