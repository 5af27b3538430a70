"""Checkpoints of a training run: save (atomic), find the last one, resume, load trained weights.

A run directory holds `checkpoints/epoch-NNN/` (weights, optimizer, scheduler and RNG state,
progress) for the last K epochs and `checkpoints/best/` (weights only). Every folder is
written under a temporary name and renamed, so a crash leaves the previous one intact.
Weights are safetensors; the optimizer state is read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import TrainingError
from .runtime import atomic

STATE_FILE = "train_state.json"  # the run's options and status, written before the first epoch


def _save_weights(model, keys, path: Path) -> None:
    from safetensors.torch import save_file

    sd = model.state_dict()
    save_file({k: sd[k].detach().contiguous() for k in keys}, str(path))


def save_checkpoint(run: Path, epoch: int, model, keys, optimizer, scheduler, progress: dict, keep: int) -> None:
    """Write checkpoints/epoch-NNN and keep only the last `keep` of them."""
    ckpts = run / "checkpoints"
    with atomic.directory(ckpts / f"epoch-{epoch:03d}", replace=True) as tmp:
        _save_weights(model, keys, tmp / "weights.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state()}},
            tmp / "state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
    done = sorted(d for d in ckpts.iterdir() if d.name.startswith("epoch-"))
    for d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def save_best(run: Path, model, keys) -> None:
    with atomic.directory(run / "checkpoints" / "best", replace=True) as tmp:
        _save_weights(model, keys, tmp / "weights.safetensors")


def best_weights(run: Path) -> Path:
    return run / "checkpoints" / "best" / "weights.safetensors"


def last_checkpoint(run: Path) -> Path | None:
    ckpts = run / "checkpoints"
    if not ckpts.is_dir():
        return None
    done = sorted(d for d in ckpts.iterdir() if d.name.startswith("epoch-") and (d / "progress.json").exists())
    return done[-1] if done else None


def resume(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; return its progress record."""
    load_weights(model, ckpt / "weights.safetensors")
    st = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng"]["torch"])
    return json.loads((ckpt / "progress.json").read_text())


def load_weights(model, path: Path) -> None:
    """Trained weights (a subset of the model's state) into `model`; unknown layers are an error."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing = set(state) - set(model.state_dict())
    if missing:
        raise TrainingError(f"{path}: weights for layers this model does not have: {sorted(missing)[:3]}.")
    model.load_state_dict(state, strict=False)
