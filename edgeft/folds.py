"""`edgeft train --folds K`: stratified K-fold cross-validation of a training configuration.

Every class's rows are shuffled (seeded) and dealt to the K folds in turn, so each fold holds
about 1/K of every class. Fold k trains on the other K - 1 folds with the configuration as
given and is judged on fold k at its best epoch, exactly as `edgeft train` judges its --val.
The report (cv.json) gives each metric per fold and its mean and sample standard deviation
over the folds: the spread says how much one train/validation split can be trusted. The fold
runs are deleted unless --keep-folds asks for them (each is then a complete run directory,
its training and validation rows written beside it as JSONL, so evaluate/merge/build work on it).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .data import label_names, load_dataset
from .errors import UsageError, refuse_existing
from .runtime import atomic

log = logging.getLogger(__name__)

METRICS = ("accuracy", "macro_f1", "loss")


def fold_of(labels: list, k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of every row: each class shuffled with `seed`, then dealt round-robin.
    The deal starts where the previous class's ended, so fold sizes differ by at most one."""
    rng = random.Random(seed)
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out = [0] * len(labels)
    start = 0
    for y in sorted(by_class, key=str):
        idx = by_class[y][:]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            out[i] = (start + j) % k
        start = (start + len(idx)) % k
    return out


def _write_rows(path: Path, ds, idx: list[int], cfg: TrainConfig) -> None:
    """JSONL with the configuration's own column names (image paths absolute)."""
    key = cfg.text_column if (ds.kind == "text" or cfg.text_column != "text") else "path"
    lines = [json.dumps({key: str(Path(ds.items[i]).resolve()) if ds.kind == "image" else ds.items[i],
                         cfg.label_column: ds.labels[i]}, ensure_ascii=False) for i in idx]
    atomic.write_text(path, "\n".join(lines) + "\n")


def _check(cfg: TrainConfig):
    """The options and the data, before anything is written; returns the rows."""
    k = cfg.folds
    if not k:
        raise UsageError("--folds: expected the number of folds (2 or more).")
    if cfg.val:
        raise UsageError("--folds splits --data into its own validation folds; drop --val (or evaluate on it afterwards).")
    if cfg.resume:
        raise UsageError("--folds cannot --resume; run the cross-validation again.")
    if cfg.nproc > 1:
        raise UsageError("--folds trains its folds one after another on one process; drop --nproc.")
    refuse_existing(cfg.output, None)
    ds = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    small = {y: n for y, n in ds.counts().items() if n < k}
    if small:
        y, n = next(iter(small.items()))
        raise UsageError(f"{cfg.data}: class {y!r} has {n} rows; --folds {k} needs at least {k} rows in every "
                         "class (each fold's validation part holds one or more of each).")
    return ds


def _fold_figures(s) -> dict:
    """A fold run's figures for cv.json: its best epoch, and its last one."""
    best, last = s.best, s.epochs[-1]
    return {"train_rows": s.data["train"]["rows"], "val_rows": s.data["val"]["rows"], "best_epoch": best["epoch"],
            "accuracy": best["accuracy"], "macro_f1": best["macro_f1"], "loss": best["loss"],
            "epochs_run": last["epoch"],
            "last_epoch": {"accuracy": last["accuracy"], "macro_f1": last["macro_f1"], "loss": last["val_loss"]},
            "seconds": s.seconds}


def cross_validate(cfg: TrainConfig) -> dict:
    """Train cfg.folds fold runs; write OUTPUT/cv.json (and the fold runs with keep_folds); return the report."""
    from .train import train

    k, t0, output = cfg.folds, time.perf_counter(), Path(cfg.output)
    ds = _check(cfg)
    labels = label_names(ds)
    assign = fold_of(ds.labels, k, cfg.seed)
    folds = []
    with atomic.directory(output) as tmp, tempfile.TemporaryDirectory(prefix="edgeft-folds-") as scratch:
        for f in range(k):
            home = (tmp if cfg.keep_folds else Path(scratch)) / f"fold-{f + 1}"
            (home / "data").mkdir(parents=True)
            _write_rows(home / "data" / "train.jsonl", ds, [i for i, a in enumerate(assign) if a != f], cfg)
            _write_rows(home / "data" / "val.jsonl", ds, [i for i, a in enumerate(assign) if a == f], cfg)
            fold_cfg = replace(cfg, data=str(home / "data" / "train.jsonl"), val=str(home / "data" / "val.jsonl"),
                               output=str(home / "run"), folds=None, keep_folds=False)
            log.info("fold %d/%d: %d training rows, %d validation rows", f + 1, k, len(assign) - assign.count(f),
                     assign.count(f))
            folds.append({"fold": f + 1, **_fold_figures(train(fold_cfg)),
                          **({"run": str(output / f"fold-{f + 1}" / "run")} if cfg.keep_folds else {})})
        staged = str(tmp.resolve())
        summary = {m: _spread([r[m] for r in folds]) for m in METRICS}
        summary["last_epoch"] = {m: _spread([r["last_epoch"][m] for r in folds]) for m in METRICS}
        report = {"folds": k, "rows": len(ds), "labels": labels, "data": str(Path(cfg.data).resolve()),
                  "method": cfg.method, "model": cfg.model, "seed": cfg.seed, "stratified": True,
                  "std": "sample standard deviation over the folds (n - 1)",
                  "selection": ("each fold's best epoch is chosen on the fold it is scored on, as edgeft train "
                                "chooses on --val: optimistic by that choice; metrics.last_epoch is each fold's "
                                "last epoch, chosen by nothing but the stopping rule"),
                  "metrics": summary, "per_fold": folds,
                  "kept_folds": cfg.keep_folds, "config": {**cfg.to_dict(), "output": str(output)},
                  "seconds": round(time.perf_counter() - t0, 3)}
        atomic.write_json(tmp / "cv.json", report)
    if cfg.keep_folds:  # the kept runs name their rows where they were written: where they are now
        for f in range(k):
            _repoint(output / f"fold-{f + 1}" / "run", staged, str(output.resolve()))
    return report


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "min": min(values), "max": max(values)}


def _repoint(run: Path, old: str, new: str) -> None:
    """Paths under `old` (the staging folder) in a kept fold run's JSON files -> under `new`."""
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return new + v[len(old):] if isinstance(v, str) and (v == old or v.startswith(old + "/")) else v

    for name in ("run.json", "train_state.json", "metrics.json"):
        p = run / name
        if p.is_file():
            atomic.write_json(p, fix(json.loads(p.read_text())))
