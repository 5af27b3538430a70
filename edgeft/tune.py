"""`edgeft tune`: search fine-tuning settings with optuna, write the best as a recipe.

Each trial is one ordinary `edgeft train` run with the trial's settings, scored by its own
--metric at its best epoch on the validation rows (the same rows for every trial: --val, or
the same seeded split of --data). optuna's TPE sampler (seeded) proposes the next settings from
the trials so far; the search stops after --trials trials or --timeout seconds, whichever
comes first. The space, per method in --methods:

    head      head_lr log-uniform 3e-4 .. 3e-2 (epochs: the method's early-stopped default)
    lora      lr 1e-4 .. 1e-2, head_lr 1e-3 .. 5e-2, epochs 2 .. 8, lora_r 4 | 8 | 16
    ia3       lr 3e-4 .. 3e-2, head_lr 1e-3 .. 5e-2, epochs 2 .. 8
    prompt,   lr default / 10 .. default * 10, head_lr 1e-3 .. 5e-2, epochs 2 .. 8,
    prefix    virtual_tokens 5 | 10 | 20
    others    lr default / 10 .. default * 10, head_lr 1e-3 .. 5e-2, epochs 2 .. 8

OUTPUT/tune.json holds every trial (settings, score, seconds, state); OUTPUT/best-run is the
best trial's run; OUTPUT/recipe.toml is a recipe whose [train] table repeats it
(`edgeft run OUTPUT/recipe.toml`). The validation rows chose the winner, so its validation
score is optimistic: judge it on test rows (`edgeft evaluate OUTPUT/best-run --data TEST`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .errors import EdgeftError, UsageError, refuse_existing
from .methods import DEFAULTS
from .names import METHODS, PROMPT_METHODS
from .runtime import atomic

log = logging.getLogger(__name__)

HEAD_LR = (1e-3, 5e-2)
EPOCHS = (2, 8)


def suggest(trial, method: str) -> dict:
    """The trial's settings for `method` (see the module docstring)."""
    if method == "head":
        return {"head_lr": trial.suggest_float("head_head_lr", 3e-4, 3e-2, log=True)}
    if method == "lora":
        lr = (1e-4, 1e-2)
    elif method == "ia3":
        lr = (3e-4, 3e-2)
    else:
        lr = (DEFAULTS[method]["lr"] / 10, DEFAULTS[method]["lr"] * 10)
    out = {"lr": trial.suggest_float(f"{method}_lr", *lr, log=True),
           "head_lr": trial.suggest_float(f"{method}_head_lr", *HEAD_LR, log=True),
           "epochs": trial.suggest_int(f"{method}_epochs", *EPOCHS)}
    if method == "lora":
        out["lora_r"] = trial.suggest_categorical("lora_r", [4, 8, 16])
    if method in PROMPT_METHODS:
        out["virtual_tokens"] = trial.suggest_categorical(f"{method}_virtual_tokens", [5, 10, 20])
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string


def recipe_text(cfg: TrainConfig, score: float, metric: str) -> str:
    """A recipe whose [train] table is `cfg` (the options that differ from TrainConfig's defaults)."""
    base = TrainConfig(model="x", data="x", output="x")
    lines = [f"# written by edgeft tune: the best of its trials, {metric} {score:.4f} on the validation rows",
             "# (optimistic: the search chose it on those rows; evaluate it on test rows)",
             'output = "out"', "", "[train]"]
    for k, v in cfg.to_dict().items():
        if k in ("output", "progress", "resume", "folds", "keep_folds") or v is None:
            continue
        if k in ("model", "data", "val") and Path(str(v)).exists():
            v = str(Path(v).resolve())
        if k in ("model", "data", "method") or v != getattr(base, k):
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _check(cfg: TrainConfig, methods: list[str], trials: int, timeout: float | None) -> None:
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise UsageError(f"--methods: {', '.join(bad) or 'none given'}: choose from {', '.join(METHODS)}.")
    if trials < 1 or (timeout is not None and timeout <= 0):
        raise UsageError("--trials must be at least 1 and --timeout positive.")
    if cfg.folds or cfg.resume or cfg.nproc > 1:
        raise UsageError("edgeft tune runs plain single-process trials: drop --folds, --resume and --nproc.")
    refuse_existing(cfg.output, None)


class _Objective:
    """One optuna trial = one ordinary run in `tmp`/trials; keeps only the best run so far on disk
    and a record of every trial."""

    def __init__(self, cfg: TrainConfig, methods: list[str], tmp: Path):
        self.cfg, self.methods, self.tmp = cfg, methods, tmp
        self.maximize = cfg.metric != "loss"
        self.records: list[dict] = []
        self.best: dict = {}

    def _failed(self, trial, method: str, settings: dict, run: Path, error: str, t: float):
        import optuna

        self.records.append({"trial": trial.number + 1, "method": method, **settings, "state": "failed",
                             "error": error, "seconds": round(time.perf_counter() - t, 2)})
        shutil.rmtree(run, ignore_errors=True)
        return optuna.TrialPruned(error)

    def __call__(self, trial) -> float:
        from .train import train

        cfg = self.cfg
        method = trial.suggest_categorical("method", self.methods) if len(self.methods) > 1 else self.methods[0]
        settings = suggest(trial, method)
        run = self.tmp / "trials" / f"trial-{trial.number + 1}"
        trial_cfg = replace(cfg, method=method, output=str(run), progress=False, **settings)
        t = time.perf_counter()
        try:
            summary = train(trial_cfg)
        except EdgeftError as e:  # e.g. a method this model cannot take: the trial fails, the search goes on
            raise self._failed(trial, method, settings, run, str(e), t) from None
        score = summary.best["loss"] if cfg.metric == "loss" else summary.best[cfg.metric]
        if not math.isfinite(score):  # a diverged run: failed, so it cannot hold the best place
            raise self._failed(trial, method, settings, run, f"{cfg.metric} is {score}", t)
        self.records.append({"trial": trial.number + 1, "method": method, **settings, "state": "complete",
                             cfg.metric: score, "best_epoch": summary.best["epoch"],
                             "seconds": round(time.perf_counter() - t, 2)})
        log.info("trial %d: %s %s -> %s %.4f", trial.number + 1, method,
                 " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()),
                 cfg.metric, score)
        best = self.best
        if not best or (score > best["score"] if self.maximize else score < best["score"]):
            if best:
                shutil.rmtree(best["run"], ignore_errors=True)
            best.update(score=score, run=run, cfg=trial_cfg, trial=trial.number + 1, settings=settings)
        else:
            shutil.rmtree(run, ignore_errors=True)
        return score


def tune(cfg: TrainConfig, methods: list[str], trials: int = 20, timeout: float | None = None) -> dict:
    """Run the search; write OUTPUT (tune.json, recipe.toml, best-run); return the report."""
    import optuna

    _check(cfg, methods, trials, timeout)
    output = Path(cfg.output)
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with atomic.directory(output) as tmp:
        objective = _Objective(cfg, methods, tmp)
        direction = "maximize" if objective.maximize else "minimize"
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=cfg.seed))
        study.optimize(objective, n_trials=trials, timeout=timeout)
        best, records = objective.best, objective.records
        if not best:
            reasons = "; ".join(sorted({r["error"] for r in records if r.get("error")}))
            raise UsageError(f"edgeft tune: no trial finished ({reasons or 'no trial ran within --timeout'}).")
        best["run"].rename(tmp / "best-run")
        shutil.rmtree(tmp / "trials", ignore_errors=True)
        atomic.write_text(tmp / "recipe.toml", recipe_text(best["cfg"], best["score"], cfg.metric))
        done = [r for r in records if r["state"] == "complete"]
        report = {"metric": cfg.metric, "direction": direction,
                  "best": {"trial": best["trial"], "score": best["score"], "method": best["cfg"].method,
                           **best["settings"]},
                  "trials": records, "completed": len(done), "failed": len(records) - len(done),
                  "methods": methods, "budget": {"trials": trials, "timeout": timeout},
                  "sampler": f"optuna TPESampler(seed={cfg.seed})", "optuna": optuna.__version__,
                  "validation": "the same rows for every trial (--val, or the seeded split of --data)",
                  "seconds": round(time.perf_counter() - t0, 2), "output": str(output)}
        atomic.write_json(tmp / "tune.json", report)
    return report
