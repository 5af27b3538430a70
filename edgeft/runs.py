"""Load a finished run or a merged model directory back into PyTorch; evaluate it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import methods
from .checkpoints import load_weights
from .data import Dataset, check_labels, load_dataset, stratified_split
from .errors import DataError, UsageError
from .models import ModelSpec, build_task_model, check_modality, load_spec
from .names import VIRTUAL_TOKENS
from .runtime.metrics import classification_report, softmax
from .runtime.preprocess import load_preprocessor

MODEL_INFO = "edgeft.json"


@dataclass
class Loaded:
    model: torch.nn.Module  # a TaskModel in eval mode
    pre: object  # its preprocessor
    labels: list[str]
    info: dict  # run.json or edgeft.json
    kind: str  # "run" or "model"
    path: Path

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.info["model"])

    def merge_lora(self) -> bool:
        """Fold a LoRA or (IA)3 run's adapters into its backbone, in place; False when there are none."""
        if self.kind != "run" or self.info["method"] not in methods.ADAPTERS:
            return False
        self.model.backbone = self.model.backbone.merge_and_unload()
        return True


def read_run(run: str | Path) -> dict:
    run = Path(run)
    info = run / "run.json"
    if not info.exists():
        if (run / "train_state.json").exists():
            raise UsageError(f"{run}: this run did not finish. Continue it with edgeft train ... --resume.")
        raise UsageError(f"{run}: not a training run (no run.json).")
    return json.loads(info.read_text())


def load_run(run: str | Path) -> Loaded:
    """A finished training run, with its method's wrapping (LoRA stays unmerged)."""
    run = Path(run)
    info = read_run(run)
    spec = ModelSpec(**info["model"])
    cfg = info["config"]
    model = build_task_model(spec, len(info["labels"]), cfg.get("dropout", 0.1))
    methods.apply(model, info["method"], lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                  lora_dropout=cfg["lora_dropout"], lora_targets=info.get("lora_targets") or None,
                  train_layers=cfg["train_layers"], unfreeze_every=cfg["unfreeze_every"],
                  virtual_tokens=cfg.get("virtual_tokens", VIRTUAL_TOKENS))  # runs from before the option: 10
    load_weights(model, run / "trained.safetensors")
    pre = load_preprocessor(run, json.loads((run / "preprocessor.json").read_text()))
    return Loaded(model.eval(), pre, info["labels"], info, "run", run)


def load_model_dir(path: str | Path) -> Loaded:
    """A model directory written by `edgeft merge`: backbone weights + head.safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / MODEL_INFO).read_text())
    spec = load_spec(str(path))
    model = build_task_model(spec, len(info["labels"]))
    model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    info = {**info, "model": spec.to_dict()}
    pre = load_preprocessor(path, spec.preprocessing)
    return Loaded(model.eval(), pre, info["labels"], info, "model", path)


def load_model(path: str | Path) -> Loaded:
    """A training run or a merged model directory, whichever `path` is."""
    path = Path(path)
    if (path / "run.json").exists() or (path / "train_state.json").exists():
        return load_run(path)
    if (path / MODEL_INFO).exists():
        return load_model_dir(path)
    raise UsageError(f"{path}: neither a training run (run.json) nor a model directory from edgeft merge (edgeft.json).")


def validation_source(cfg: dict) -> dict:
    """Where a run's validation data came from, so later steps can read the same rows."""
    cols = {"text_column": cfg.get("text_column", "text"), "label_column": cfg.get("label_column", "label")}
    if cfg.get("val"):
        return {"path": str(Path(cfg["val"]).resolve()), **cols}
    return {"split_of": str(Path(cfg["data"]).resolve()), "fraction": cfg["val_fraction"], "seed": cfg["seed"], **cols}


def training_source(cfg: dict) -> dict:
    """Where a run's training rows came from (the file, minus the held-out part if it was split)."""
    cols = {"text_column": cfg.get("text_column", "text"), "label_column": cfg.get("label_column", "label")}
    src = {"path": str(Path(cfg["data"]).resolve()), **cols}
    if not cfg.get("val"):
        src["minus_split"] = {"fraction": cfg["val_fraction"], "seed": cfg["seed"]}
    return src


def training_data(source: dict | None) -> Dataset | None:
    """The rows a run trained on, or None where the files are gone."""
    if not source or not Path(source["path"]).exists():
        return None
    ds = load_dataset(source["path"], source["text_column"], source["label_column"])
    if "minus_split" in source:
        ds = stratified_split(ds, source["minus_split"]["fraction"], source["minus_split"]["seed"])[0]
    return ds


def validation_data(source: dict | None) -> Dataset | None:
    """The validation rows a run held out, or None where the files are gone."""
    if not source:
        return None
    path = source.get("path") or source.get("split_of")
    if not Path(path).exists():
        return None
    ds = load_dataset(path, source["text_column"], source["label_column"])
    if "split_of" in source:
        ds = stratified_split(ds, source["fraction"], source["seed"])[1]
    return ds


def load_labelled(path, loaded: Loaded, text_column="text", label_column="label") -> Dataset:
    ds = load_dataset(path, text_column, label_column)
    check_modality(loaded.spec, ds.kind, ds.source)
    check_labels(ds, loaded.labels)
    return ds


@torch.no_grad()
def predict_logits(model, pre, items: list, batch_size: int = 64) -> torch.Tensor:
    """Logits in the order of `items`; texts run in batches of similar length (less padding)."""
    if not items:
        raise DataError("no rows to predict.")
    order = sorted(range(len(items)), key=lambda i: len(str(items[i]))) if isinstance(items[0], str) \
        and not hasattr(pre, "size") else list(range(len(items)))
    out = None
    for i in range(0, len(items), batch_size):
        idx = order[i : i + batch_size]
        arrays = pre([items[j] for j in idx])
        logits = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        if out is None:
            out = torch.empty(len(items), logits.shape[1])
        out[idx] = logits
    return out


def evaluate(path: str | Path, data: str | Path, text_column="text", label_column="label") -> dict:
    loaded = load_model(path)
    ds = load_labelled(data, loaded, text_column, label_column)
    logits = predict_logits(loaded.model, loaded.pre, ds.items).numpy()
    index = {n: i for i, n in enumerate(loaded.labels)}
    report = classification_report([index[v] for v in ds.labels], logits.argmax(-1), loaded.labels)
    report["rows"] = len(ds)
    report["data"] = str(data)
    report["mean_confidence"] = float(softmax(logits).max(-1).mean())
    return report
