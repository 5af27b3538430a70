"""Load a finished training run back into a PyTorch model, and evaluate it on labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import methods
from .data import check_labels, load_dataset
from .errors import UsageError
from .models import ModelSpec, build_task_model, check_modality
from .runtime.metrics import classification_report, softmax
from .runtime.preprocess import load_preprocessor


def read_run(run: str | Path) -> dict:
    run = Path(run)
    info = run / "run.json"
    if not info.exists():
        state = run / "train_state.json"
        if state.exists():
            raise UsageError(f"{run}: this run did not finish. Continue it with edgeft train ... --resume.")
        raise UsageError(f"{run}: not a training run (no run.json).")
    return json.loads(info.read_text())


def load_run(run: str | Path):
    """(model in eval mode, preprocessor, labels, run info) of a finished run."""
    run = Path(run)
    info = read_run(run)
    spec = ModelSpec(**info["model"])
    cfg = info["config"]
    model = build_task_model(spec, len(info["labels"]), cfg.get("dropout", 0.1))
    methods.apply(model, info["method"], lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                  lora_dropout=cfg["lora_dropout"], lora_targets=info.get("lora_targets") or None,
                  train_layers=cfg["train_layers"], unfreeze_every=cfg["unfreeze_every"])
    from .train import load_weights

    load_weights(model, run / "trained.safetensors")
    pre = load_preprocessor(run, json.loads((run / "preprocessor.json").read_text()))
    return model.eval(), pre, info["labels"], info


@torch.no_grad()
def predict_logits(model, pre, items: list, batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(items), batch_size):
        arrays = pre(items[i : i + batch_size])
        out.append(model(**{k: torch.from_numpy(v) for k, v in arrays.items()}))
    return torch.cat(out)


def evaluate(run: str | Path, data: str | Path, text_column="text", label_column="label") -> dict:
    model, pre, labels, info = load_run(run)
    ds = load_dataset(data, text_column, label_column)
    check_modality(ModelSpec(**info["model"]), ds.kind, ds.source)
    check_labels(ds, labels)
    logits = predict_logits(model, pre, ds.items).numpy()
    index = {n: i for i, n in enumerate(labels)}
    y = [index[v] for v in ds.labels]
    report = classification_report(y, logits.argmax(-1), labels)
    report["rows"] = len(ds)
    report["data"] = str(data)
    report["mean_confidence"] = float(softmax(logits).max(-1).mean())
    return report
