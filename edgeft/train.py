"""`edgeft train`: the training loop on accelerate.

AdamW with a separate learning rate for the head, warmup then linear decay, gradient
clipping; evaluation every epoch; early stopping; atomic checkpoints (the best and the last
K); `--resume` continues from the last checkpoint with the same result as an uninterrupted
run, because batch order is a function of (seed, epoch) and every RNG state is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__, checkpoints, methods
from .checkpoints import STATE_FILE
from .config import TrainConfig
from .data import Augment, Dataset, check_labels, label_names, load_dataset, stratified_split
from .errors import DataError, UsageError
from .models import (
    NO_POOLER,
    ModelSpec,
    build_preprocessor,
    build_task_model,
    check_modality,
    load_spec,
)
from .results import TrainResult
from .runtime import atomic
from .runtime.metrics import classification_report

log = logging.getLogger(__name__)

EVAL_BATCH = 64


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Turns row indices into model inputs (tensors) for one dataset."""

    ds: Dataset
    pre: object
    y: torch.Tensor
    encoded: list = field(default_factory=list)  # text: token ids per row
    augment: Augment | None = None

    @classmethod
    def build(cls, ds: Dataset, pre, labels: list[str], augment=None) -> Inputs:
        index = {name: i for i, name in enumerate(labels)}
        y = torch.tensor([index[v] for v in ds.labels], dtype=torch.long)
        encoded = pre.encode_ids(ds.items) if ds.kind == "text" else []
        return cls(ds, pre, y, encoded, augment)

    def batch(self, idx, train: bool = False) -> dict[str, torch.Tensor]:
        if self.ds.kind == "text":
            arrays = self.pre.collate([self.encoded[i] for i in idx])
        else:
            aug = self.augment if train else None
            arrays = self.pre([self.ds.items[i] for i in idx], augment=aug)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def batches(n: int, size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Batch order is a pure function of (seed, epoch): a resumed run sees the same batches."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    return [order[i : i + size] for i in range(0, n, size)]


# ---------------------------------------------------------------- feature cache


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFT_CACHE", Path.home() / ".cache" / "edgeft")) / "features"


def model_fingerprint(spec: ModelSpec) -> str:
    """Identifies the backbone's weights and the feature recipe, without reading the weights."""
    h = hashlib.sha256(json.dumps([spec.path, spec.pooling, spec.preprocessing], sort_keys=True).encode())
    p = Path(spec.path)
    files = sorted(p.glob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def by_length(inputs: Inputs, batch_size: int, rows: list[int] | None = None) -> list[list[int]]:
    """Batches of similar-length texts: padding to the batch's longest costs less (images: in order)."""
    rows = list(range(len(inputs.ds))) if rows is None else rows
    order = sorted(rows, key=lambda i: len(inputs.encoded[i][0])) if inputs.encoded else rows
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def extract_features(model, inputs: Inputs, batch_size: int = EVAL_BATCH, rows: list[int] | None = None) -> torch.Tensor:
    """Features of `rows` (default: all), in that order."""
    model.eval()
    rows = list(range(len(inputs.ds))) if rows is None else rows
    where = {r: i for i, r in enumerate(rows)}
    out = torch.empty(0)
    for idx in by_length(inputs, batch_size, rows):
        f = model.features(**inputs.batch(idx)).float().cpu()
        if out.numel() == 0:
            out = torch.empty(len(rows), f.shape[1])
        out[[where[i] for i in idx]] = f
    return out


def cached_features(model, spec: ModelSpec, inputs: Inputs, accelerator=None) -> tuple[torch.Tensor, bool]:
    """Features for every row, from the cache when this model has seen this data before.

    With several processes, each extracts its share of the rows and all of them end with the
    whole set; the main process decides whether the cache is used and writes it.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import load_file, save_file

    world = accelerator.num_processes if accelerator else 1
    main = accelerator is None or accelerator.is_main_process
    key = f"{model_fingerprint(spec)}-{inputs.ds.fingerprint()}"
    path = cache_dir() / f"{key}.safetensors"
    feats = None
    if main and path.exists():
        try:
            feats = load_file(path)["features"]
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    hit = [feats is not None]
    if world > 1:
        broadcast_object_list(hit)
    if hit[0]:
        return (feats if feats is not None else load_file(path)["features"]), True
    if world > 1:
        mine = list(range(accelerator.process_index, len(inputs.ds), world))
        parts = gather_object([(mine, extract_features(model, inputs, rows=mine))])
        feats = torch.empty(len(inputs.ds), parts[0][1].shape[1])
        for rows, f in parts:
            feats[rows] = f
    else:
        feats = extract_features(model, inputs)
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"features": feats.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return feats, False


# ---------------------------------------------------------------- loop pieces


def make_optimizer(model: nn.Module, plan: methods.Plan, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the head gets its own lr; no weight decay on biases and norms."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if name not in plan.trainable:
            continue
        is_head = name.startswith("head.")
        no_decay = p.ndim < 2
        groups.setdefault((is_head, no_decay), []).append(p)
    params = [
        {"params": ps, "lr": cfg.head_lr if is_head else cfg.lr,
         "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (is_head, no_decay), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(params)


def make_scheduler(optimizer, total_steps: int, warmup: float):
    warm = int(total_steps * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


# ---------------------------------------------------------------- the run


def _prepare_data(cfg: TrainConfig):
    train_ds = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    if cfg.val:
        val_ds = load_dataset(cfg.val, cfg.text_column, cfg.label_column)
        if val_ds.kind != train_ds.kind:
            raise DataError(f"{cfg.val}: {val_ds.kind} data, but the training data is {train_ds.kind}.")
    else:
        train_ds, val_ds = stratified_split(train_ds, cfg.val_fraction, cfg.seed)
    labels = label_names(train_ds)
    check_labels(val_ds, labels)
    return train_ds, val_ds, labels


def _check_output(cfg: TrainConfig, run: Path, state: dict) -> Path | None:
    """Refuse to clobber another run; on --resume, find the checkpoint and check it fits."""
    if cfg.resume:
        ckpt = checkpoints.last_checkpoint(run)
        if ckpt is None:
            raise UsageError(f"{run}: no checkpoint to resume from. Run without --resume to start.")
        saved = json.loads((run / STATE_FILE).read_text())
        what = {"model": "--model", "method": "--method", "labels": "label set",
                "train_fingerprint": "training data", "val_fingerprint": "validation data"}
        for key, name in what.items():
            if saved.get(key) != state.get(key):
                raise UsageError(
                    f"{run}: --resume with a different {name} than the interrupted run. "
                    "Resume with the options it started with, or start a new --output."
                )
        return ckpt
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise UsageError(f"{run}: already exists and is not empty. Choose another --output, or --resume.")
    return None


def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator: DDP when launched on several processes (gloo on CPU, NCCL on GPUs)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if cfg.precision == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32.")
    if cfg.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16; use fp16 or fp32.")
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=int(os.environ.get("EDGEFT_DIST_TIMEOUT", 300))))]
    # Some trainable weights get no gradient in a step: layers gradual unfreezing has not reached
    # yet, a pooler the chosen pooling does not read. DDP must be told to look for them.
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(cpu=not cuda, mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                       kwargs_handlers=handlers)


# ---------------------------------------------------------------- what trains: two strategies


class HeadOnly:
    """head: the backbone is frozen, so its features are computed once (and cached on disk).

    Every process holds all features and takes the same steps on the whole global batch
    (identical seeds), so there is nothing to synchronise.
    """

    shared = True

    def __init__(self):
        self.feats: dict[str, torch.Tensor] = {}
        self.cache_hits: list[bool] = []

    def prepare(self, t: Trainer) -> None:
        for name, inp in (("train", t.train_in), ("val", t.val_in)):
            self.feats[name], hit = cached_features(t.core, t.spec, inp, t.accelerator)
            self.cache_hits.append(hit)

    def wrap(self, t: Trainer) -> None:
        t.model = t.core.to(t.accelerator.device)
        t.optimizer = t.accelerator.prepare(t.optimizer)

    def logits(self, t: Trainer, idx, split: str, train_mode: bool, net=None) -> torch.Tensor:
        x = self.feats[split][idx].to(t.accelerator.device)
        return t.core.head(t.core.dropout(x))

    def train_mode(self, core) -> None:
        core.backbone.eval()


class Loop:
    """Every other method: batches run through the backbone; DDP-wrapped on several processes."""

    def __init__(self, world: int):
        self.shared = world == 1  # no gradient synchronisation needed
        self.cache_hits: list[bool] = []

    def prepare(self, t: Trainer) -> None:
        pass

    def wrap(self, t: Trainer) -> None:
        if self.shared:
            t.model = t.core.to(t.accelerator.device)
            t.optimizer = t.accelerator.prepare(t.optimizer)
        else:
            t.model, t.optimizer = t.accelerator.prepare(t.core, t.optimizer)

    def logits(self, t: Trainer, idx, split: str, train_mode: bool, net=None) -> torch.Tensor:
        inputs = t.train_in if split == "train" else t.val_in
        batch = {k: v.to(t.accelerator.device) for k, v in inputs.batch(idx, train=train_mode).items()}
        return (net or t.model)(**batch)

    def train_mode(self, core) -> None:
        pass


# ---------------------------------------------------------------- the run


@dataclass
class Progress:
    """What a checkpoint records about the run so far (and --resume restores)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "value": None})
    bad_epochs: int = 0
    next_epoch: int = 0
    stopped_early: bool = False
    samples: int = 0
    step_seconds: float = 0.0  # training steps only: evaluation and checkpoints are timed apart


class Trainer:
    """One run: the model, its optimizer and schedule, the strategy, and the progress so far."""

    def __init__(self, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, labels: list[str], spec: ModelSpec):
        from accelerate.utils import set_seed

        self.cfg, self.spec, self.labels = cfg, spec, labels
        self.run = Path(cfg.output)
        self.accelerator = make_accelerator(cfg)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if not self.main:  # one process speaks; the others only report errors
            logging.getLogger("edgeft").setLevel(logging.WARNING)
        if self.world > 1:
            log.info("training on %d processes (%s); global batch %d = %d per process x %d x grad-accum %d",
                     self.world, self.accelerator.distributed_type, cfg.batch_size,
                     -(-cfg.batch_size // self.world // cfg.grad_accum), self.world, cfg.grad_accum)
        set_seed(cfg.seed)
        self.pre = build_preprocessor(spec)
        self.core = build_task_model(spec, len(labels), cfg.dropout)  # `model` may become its DDP wrapper
        self.model = self.core
        self.plan = methods.apply(
            self.core, cfg.method, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            lora_targets=cfg.lora_targets, train_layers=cfg.train_layers, unfreeze_every=cfg.unfreeze_every,
            virtual_tokens=cfg.virtual_tokens,
        )
        if cfg.backbone_dropout is not None:  # e.g. 0: runs that must match bit for bit across process counts
            for m in self.core.backbone.modules():
                if isinstance(m, nn.Dropout):
                    m.p = float(cfg.backbone_dropout)
        self.params = methods.count_parameters(self.core, self.plan.trainable)
        self.keys = methods.state_keys(self.core, self.plan)
        log.info("%s: %s of %s parameters train (%.2f%%)", cfg.method, f"{self.params['trainable']:,}",
                 f"{self.params['total']:,}", 100 * self.params["ratio"])
        self.augment = Augment(cfg.seed) if cfg.augment else None
        self.train_in = Inputs.build(train_ds, self.pre, labels, self.augment)
        self.val_in = Inputs.build(val_ds, self.pre, labels)
        self.strategy = HeadOnly() if cfg.method == "head" else Loop(self.world)
        self.progress = Progress()

    def prepare(self, resume_from: Path | None) -> None:
        """Features (head), optimizer and schedule, the process wrapping, and a resumed state."""
        cfg = self.cfg
        t_feat = time.perf_counter()
        self.strategy.prepare(self)
        self.feature_seconds = time.perf_counter() - t_feat
        self.optimizer = make_optimizer(self.core, self.plan, cfg)
        steps_per_epoch = math.ceil(len(self.train_in.ds) / cfg.batch_size)
        self.scheduler = make_scheduler(self.optimizer, steps_per_epoch * cfg.epochs, cfg.warmup)
        self.strategy.wrap(self)
        if resume_from is not None:
            saved = checkpoints.resume(resume_from, self.core, self.optimizer, self.scheduler)
            self.progress = Progress(saved["history"], saved["best"], saved["bad_epochs"], saved["epoch"] + 1)
            log.info("resuming from %s (epoch %d done)", resume_from.name, self.progress.next_epoch)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict]:
        self.core.eval()
        logits = torch.empty(len(self.val_in.ds), len(self.labels))
        for idx in by_length(self.val_in, EVAL_BATCH):  # every process evaluates all of it: same decisions
            logits[idx] = self.strategy.logits(self, idx, "val", False, net=self.core).float().cpu()
        loss = nn.functional.cross_entropy(logits, self.val_in.y.to(logits.device)).item()
        report = classification_report(self.val_in.y.numpy(), logits.argmax(-1).cpu().numpy(), self.labels)
        return loss, report

    def fit(self) -> None:
        cfg, p = self.cfg, self.progress
        t_loop = time.perf_counter()
        for epoch in range(p.next_epoch, cfg.epochs):
            if p.best["epoch"] is not None and p.bad_epochs >= cfg.patience:
                p.stopped_early = True
                break
            t0 = time.perf_counter()
            total, count = self.train_epoch(epoch)
            self.end_epoch(epoch, total, count, t0)
        self.loop_seconds = time.perf_counter() - t_loop

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training rows; the summed loss and the rows it covered (all processes)."""
        cfg = self.cfg
        methods.set_trainable(self.core, self.plan.trainable_at(epoch))
        self.model.train()
        self.core.train()
        methods.freeze_frozen_norms(self.core)
        self.strategy.train_mode(self.core)
        total, count = 0.0, 0
        order = batches(len(self.train_in.ds), cfg.batch_size, cfg.seed, epoch)
        bar = None
        if cfg.progress and self.main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        t_steps = time.perf_counter()
        for step, idx in enumerate(order):
            if self.augment is not None:  # augmentation draws depend on (seed, epoch, step) only
                self.augment.rng.seed(f"{cfg.seed}-{epoch}-{step}")
            loss, rows = self.step(idx)
            total, count = total + loss, count + rows
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
        self.progress.step_seconds += time.perf_counter() - t_steps
        if bar is not None:
            bar.close()
        if not self.strategy.shared:  # every process's share of the epoch's loss, summed
            from accelerate.utils import reduce

            tc = reduce(torch.tensor([total, float(count)], device=self.accelerator.device), reduction="sum")
            total, count = float(tc[0]), int(tc[1])
        self.progress.samples += count
        return total, count

    def step(self, idx: list[int]) -> tuple[float, int]:
        """One optimizer step on the global batch `idx`; this process's summed loss and row count."""
        cfg, shared, acc = self.cfg, self.strategy.shared, self.accelerator
        # Each process takes its share of the global batch, in grad-accum micro-batches.
        # Summed losses scaled by world / |batch|: DDP's gradient average then equals the
        # gradient of the mean loss over the whole global batch, whatever the split.
        shard = idx if shared else idx[self.rank::self.world]
        scale = (1 if shared else self.world) / len(idx)
        if not shard:  # fewer rows than processes: join the all-reduce with zero weight
            shard, scale = idx[:1], 0.0
        micro = [m for m in (shard[j::cfg.grad_accum] for j in range(cfg.grad_accum)) if m]
        total = 0.0
        for j, mb in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or shared else acc.no_sync(self.model)
            with sync, acc.autocast():
                logits = self.strategy.logits(self, mb, "train", True)
                loss = nn.functional.cross_entropy(logits.float(), self.train_in.y[mb].to(logits.device),
                                                   reduction="sum")
                acc.backward(loss * scale)
            total += loss.item()
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.core.parameters() if shared else self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, (len(shard) if scale else 0)

    def end_epoch(self, epoch: int, total: float, count: int, t0: float) -> None:
        """Evaluate, keep the best, log the epoch's line, write its checkpoint."""
        cfg, p = self.cfg, self.progress
        val_loss, report = self.evaluate()
        value = val_loss if cfg.metric == "loss" else report[cfg.metric]
        row = {
            "epoch": epoch + 1, "train_loss": total / count, "val_loss": val_loss,
            "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "lr": self.scheduler.get_last_lr()[-1], "seconds": round(time.perf_counter() - t0, 3),
        }
        p.history.append(row)
        if better(cfg.metric, value, p.best["value"]):
            p.best = {"epoch": epoch + 1, "value": value}
            p.bad_epochs = 0
            if self.main:
                checkpoints.save_best(self.run, self.core, self.keys)
        else:
            p.bad_epochs += 1
        log.info("epoch %d/%d  loss %.4f  val loss %.4f  accuracy %.4f  macro-F1 %.4f  %.1f s",
                 epoch + 1, cfg.epochs, row["train_loss"], val_loss, report["accuracy"],
                 report["macro_f1"], row["seconds"])
        if self.main:
            checkpoints.save_checkpoint(
                self.run, epoch, self.core, self.keys, self.optimizer, self.scheduler,
                {"epoch": epoch, "history": p.history, "best": p.best, "bad_epochs": p.bad_epochs},
                cfg.keep_checkpoints)

    def summary(self, t_start: float) -> TrainResult:
        """The best epoch's weights back in the model, evaluated once more; metrics.json's content."""
        cfg, p = self.cfg, self.progress
        self.model = self.core
        checkpoints.load_weights(self.core, checkpoints.best_weights(self.run))
        val_loss, report = self.evaluate()
        train_ds, val_ds = self.train_in.ds, self.val_in.ds
        return TrainResult(
            edgeft_version=__version__,
            method=cfg.method,
            model=self.spec.source,
            labels=self.labels,
            parameters=self.params,
            epochs=p.history,
            best={"epoch": p.best["epoch"], "metric": cfg.metric, "loss": val_loss, **report},
            accuracy=report["accuracy"],
            macro_f1=report["macro_f1"],
            stopped_early=p.stopped_early,
            data={
                "train": {"source": train_ds.source, "rows": len(train_ds), "counts": train_ds.counts(),
                          "fingerprint": train_ds.fingerprint()},
                "val": {"source": val_ds.source, "rows": len(val_ds), "counts": val_ds.counts(),
                        "fingerprint": val_ds.fingerprint()},
            },
            trained=self.record(),
            timing={
                "total_seconds": round(time.perf_counter() - t_start, 3),
                "feature_seconds": round(self.feature_seconds, 3),
                "loop_seconds": round(self.loop_seconds, 3),
                "step_seconds": round(p.step_seconds, 3),
                "samples_per_second": round(p.samples / p.step_seconds, 2) if p.step_seconds > 0 and p.samples
                else None,
                "feature_cache_hits": self.strategy.cache_hits,
            },
        )


    def record(self) -> dict:
        """What ran, as opposed to what was asked: the learning rates of what trained, the pooling
        and why, the epochs run (the options themselves are in run.json's config)."""
        cfg, p = self.cfg, self.progress
        lrs = {"head": cfg.head_lr}
        if any(not n.startswith("head.") for n in self.plan.trainable):
            lrs["backbone"] = cfg.lr
        return {
            "learning_rates": lrs, "schedule": f"warmup {cfg.warmup:g} of the steps, then linear decay to 0",
            "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
            "epochs": {"max": cfg.epochs, "ran": len(p.history), "best": p.best["epoch"],
                       "stopped_early": p.stopped_early},
            "pooling": self.spec.pooling, "pooling_reason": self.spec.pooling_reason,
            "seed": cfg.seed,
        }


def _check_inputs(cfg: TrainConfig):
    """Everything that can be wrong with the input, checked before anything is written."""
    train_ds, val_ds, labels = _prepare_data(cfg)
    spec = load_spec(cfg.model, cfg.pooling, cfg.max_length, cfg.image_size)
    check_modality(spec, train_ds.kind, train_ds.source)
    methods.check(cfg.method, spec, cfg.virtual_tokens)  # a method the model family cannot take: one line, nothing written
    if spec.pooling_reason == NO_POOLER:
        log.warning("%s: %s pooling, because %s", cfg.model, spec.pooling, NO_POOLER)
    if cfg.augment and spec.modality != "image":
        raise UsageError("--augment applies to image data only.")
    state = {
        "model": cfg.model, "method": cfg.method, "labels": labels,
        "train_fingerprint": train_ds.fingerprint(), "val_fingerprint": val_ds.fingerprint(),
    }
    resume_from = _check_output(cfg, Path(cfg.output), state)
    return train_ds, val_ds, labels, spec, state, resume_from


def train(cfg: TrainConfig) -> TrainResult | None:
    """Train per `cfg`; write the run directory; return the summary (also metrics.json), or None
    in a worker process other than the main one (the main one writes and reports)."""
    if cfg.folds:
        raise UsageError("folds: cross-validation writes a report of fold runs, not one run; run it with "
                         "edgeft train --folds K (edgeft.folds.cross_validate), not as a recipe's training step.")
    cfg = cfg.with_method_defaults()
    t_start = time.perf_counter()
    train_ds, val_ds, labels, spec, state, resume_from = _check_inputs(cfg)
    t = Trainer(cfg, train_ds, val_ds, labels, spec)
    if t.main:
        t.run.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            atomic.write_json(t.run / STATE_FILE, {**state, "config": cfg.to_dict(), "status": "running"})
    t.prepare(resume_from)
    t.fit()
    t.accelerator.wait_for_everyone()
    if not t.main:  # only the main process writes the run directory
        return None
    summary = t.summary(t_start)
    if cfg.head == "ridge" and isinstance(t.strategy, HeadOnly):  # the closed-form head, same cached features
        from .ridge_head import fit_on_features

        feats = t.strategy.feats
        summary.ridge = ridge = fit_on_features(feats["train"].numpy(), t.train_in.y.numpy(), feats["val"].numpy(),
                                                t.val_in.y.numpy(), labels)
        log.info("ridge head: accuracy %.4f on the validation rows (lambda %g, one solve in %.2f s)",
                 ridge["accuracy"], ridge["lambda"], ridge["seconds"])
    _write_outputs(t, summary)
    return summary


def _write_outputs(t: Trainer, summary: TrainResult) -> None:
    from safetensors.torch import save_file

    from .report import model_card, plot_confusion, plot_curves
    from .runs import training_source, validation_source

    cfg, spec, run, model, keys, labels = t.cfg, t.spec, t.run, t.core, t.keys, t.labels
    sd = model.state_dict()
    tmp = run / ".trained.safetensors.tmp"
    save_file({k: sd[k].detach().contiguous() for k in keys}, str(tmp),
              metadata={"edgeft_method": cfg.method, "format": "pt"})
    os.replace(tmp, run / "trained.safetensors")
    if cfg.method in methods.ADAPTERS:
        with atomic.directory(run / "adapter", replace=True) as d:
            model.backbone.save_pretrained(str(d))
    if spec.modality == "text":
        atomic.write_text(run / "tokenizer.json", t.pre.tokenizer.to_str())
    atomic.write_json(run / "preprocessor.json", t.pre.spec())
    atomic.write_json(run / "labels.json", {"labels": labels})
    atomic.write_json(run / "metrics.json", summary.to_json())
    plot_curves(summary.epochs, run / "curves.png")
    plot_confusion(summary.best["confusion"], labels, run / "confusion.png")
    atomic.write_text(run / "README.md", model_card(cfg, spec, summary, t.plan))
    atomic.write_json(run / "run.json", {
        "edgeft_version": __version__,
        "schema": 1,
        "status": "complete",
        "method": cfg.method,
        "config": cfg.to_dict(),
        "model": spec.to_dict(),
        "labels": labels,
        "lora_targets": t.plan.lora_targets,
        "validation": validation_source(cfg.to_dict()),
        "training": training_source(cfg.to_dict()),
        "trained_keys": keys,
        "parameters": summary.parameters,
        "trained": summary.trained,
        "data": {k: {"rows": v["rows"], "fingerprint": v["fingerprint"]} for k, v in summary.data.items()},
    })
    atomic.write_json(run / STATE_FILE, {**json.loads((run / STATE_FILE).read_text()), "status": "complete"})
