"""Retrain a bundle's head on the device, guarded and reversible. numpy + onnxruntime only.

retrain: features of the new samples from the bundle's own backbone (cached by content
hash) + the bundle's replay memory of training features -> a numpy softmax head. A guard
accepts it only if accuracy on held-out new samples improves and accuracy on the replay
hold-out drops by no more than a margin. An accepted head becomes version N+1:

    1. heads/head-N+1.onnx and replay/replay-N+1.npz are written (temporary name, rename)
    2. manifest.json is replaced in one rename: the commit point
    3. versions beyond `keep` are deleted

A power cut before step 2 leaves the old manifest, which names only old, complete files; after
it, the new version is whole. rollback rewrites the manifest to point at an earlier version.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError, ConfigError, DataError, EdgeftError, UsageError, did_you_mean
from . import atomic
from .bundle import Bundle
from .dataset import Dataset, load_dataset
from .features import features as parallel_features
from .head import LinearHead, fit_softmax, head_logits, read_head_onnx
from .manifest import MANIFEST, check_manifest, file_entry, read_manifest
from .result import RetrainResult, RollbackResult
from .retrain_config import RetrainConfig
from .version import __version__

HOLDOUT = RetrainConfig.holdout  # of the new samples, per class, held out for early stopping and the guard
SEED = RetrainConfig.seed

__all__ = ["RetrainConfig", "RetrainRefused", "device_features", "history", "retrain", "rollback"]


class RetrainRefused(EdgeftError):
    """The guard refused the new head: the bundle is unchanged."""

    exit_code = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _split(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified hold-out mask: a share of each class with at least 2 samples (at least one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        k = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        mask[rng.choice(idx, k, replace=False)] = True
    return mask


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float | None:
    return float((logits.argmax(1) == y).mean()) if len(y) else None


def device_features(bundle: Bundle, ds: Dataset, batch_size: int = 32) -> tuple[np.ndarray, bool]:
    """Features from the bundle's backbone; cached under the bundle by (backbone, preprocessing, data) hash."""
    m = bundle.manifest
    weights = [m["files"][m["backbone"]]["sha256"]]
    if m["backbone"].endswith(".xml"):  # an OpenVINO IR keeps its weights in the .bin beside it
        weights.append(m["files"].get(m["backbone"][:-4] + ".bin", {}).get("sha256"))
    key = hashlib.sha256(json.dumps([weights, m["preprocessing"], ds.fingerprint()],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = bundle.path / "cache" / f"features-{key}.npy"
    if path.exists():
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.shape[0] == len(ds):
                return feats, True
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    feats = _features_by_length(bundle, ds, batch_size)
    buf = io.BytesIO()
    np.save(buf, feats, allow_pickle=False)
    atomic.write_bytes(path, buf.getvalue())
    return feats, False


def _features_by_length(bundle: Bundle, ds: Dataset, batch_size: int) -> np.ndarray:
    """The backbone's features, batch by batch (never all images in memory). Texts run in order
    of length, so a batch pads to about its own length instead of its longest stranger's
    (on 1,000 review snippets a third less backbone time); rows come back in file order.
    A text's features then differ from another batch's only by float rounding of the padding
    (the attention mask hides it); a bundle that answers one row per call (dynamic int8:
    runtime.max_batch 1) is batched that way here too. The batches run on every core, one
    single-threaded session each (runtime/features.py): the same batches, the same bits."""
    if ds.kind != "text" or len(ds) < 2:
        return parallel_features(bundle, ds.items, batch_size)
    order = np.argsort([len(t) for t in ds.items], kind="stable")
    feats = parallel_features(bundle, [ds.items[i] for i in order], batch_size)
    out = np.empty_like(feats)
    out[order] = feats
    return out


def _load_replay(bundle: Bundle) -> dict:
    entry = bundle.manifest["head"]
    rel = entry.get("replay") or next((h.get("replay") for h in bundle.manifest["heads"]
                                        if h["version"] == entry["version"]), None)
    if not rel:
        raise BundleError(f"{bundle.path}: this bundle has no replay memory; rebuild it with edgeft build (--replay N).")
    with np.load(bundle.path / rel, allow_pickle=False) as z:
        return {"features": z["features"], "labels": z["labels"].astype(np.int64),
                "holdout": z["holdout"].astype(bool)}


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic.write_bytes(path, buf.getvalue())


@dataclass
class Samples:
    """The new labelled samples, their features from the bundle's backbone, and their hold-out."""

    ds: Dataset
    labels: list[str]  # the head's labels after this retrain (the bundle's, then added ones)
    added: list[str]
    y: np.ndarray
    X: np.ndarray
    hold: np.ndarray  # held out for early stopping and the guard
    cache_hit: bool
    feature_seconds: float


def _read_samples(bundle: Bundle, data, cfg: RetrainConfig) -> Samples:
    """Read the new samples, refuse what this bundle cannot learn, and compute their features."""
    m = bundle.manifest
    ds = load_dataset(data, cfg.text_column, cfg.label_column)
    if ds.kind != m["modality"]:
        raise DataError(f"{ds.source}: {ds.kind} data, but the bundle's model reads {m['modality']}.")
    limit = m.get("retrain", {}).get("max_samples")
    if limit and len(ds) > limit:
        raise DataError(f"{ds.source}: {len(ds)} rows; this device retrains on at most {limit} "
                        "(the profile's retrain_max_samples).")
    known = list(m["labels"])
    added = sorted({y for y in ds.labels} - set(known))
    if added and not cfg.add_classes:
        hints = "".join(did_you_mean(n, known) for n in added[:1])
        raise DataError(f"{ds.source}: labels the model does not know: {', '.join(added)}.{hints} "
                        "Pass --add-classes to add them as new classes.")
    labels = known + added
    index = {n: i for i, n in enumerate(labels)}
    y = np.array([index[v] for v in ds.labels], dtype=np.int64)
    t = time.perf_counter()
    X, cache_hit = device_features(bundle, ds)
    seconds = time.perf_counter() - t
    hold = _split(y, cfg.holdout, cfg.seed)
    if not hold.any():
        raise DataError(f"{ds.source}: too few rows to hold any out for the guard; give at least 2 per class.")
    return Samples(ds, labels, added, y, X, hold, cache_hit, seconds)


def _fit_head(new: Samples, replay: dict, cfg: RetrainConfig) -> LinearHead:
    """The seam where a head family is fitted: training rows (replay + new, hold-outs aside) -> a head."""
    Xr, yr, hold_r = replay["features"], replay["labels"], replay["holdout"]
    X_train = np.concatenate([Xr[~hold_r], new.X[~new.hold]])
    y_train = np.concatenate([yr[~hold_r], new.y[~new.hold]])
    X_hold = np.concatenate([Xr[hold_r], new.X[new.hold]])
    y_hold = np.concatenate([yr[hold_r], new.y[new.hold]])
    t = time.perf_counter()
    fit = fit_softmax(X_train, y_train, len(new.labels), l2=cfg.l2, max_iter=cfg.max_iter, holdout=(X_hold, y_hold))
    report = {"iterations": fit.iterations, "best_iteration": fit.best_iteration, "l2": cfg.l2,
              "train_rows": int(len(y_train)), "train_loss": fit.train_loss, "holdout_loss": fit.holdout_loss}
    return LinearHead(fit.weight, fit.bias, report, time.perf_counter() - t)


def _guard(bundle: Bundle, head: LinearHead, new: Samples, replay: dict, cfg: RetrainConfig) -> dict:
    """The old head and the new one on the same held-out rows: the metrics, or RetrainRefused."""
    old_w, old_b = read_head_onnx(bundle.path / bundle.manifest["head"]["file"])

    def old_logits(X):  # classes the old head does not have can never be its answer
        z = head_logits(X, old_w, old_b)
        return np.concatenate([z, np.full((len(X), len(new.labels) - z.shape[1]), -np.inf)], axis=1)

    Xh, yh = new.X[new.hold], new.y[new.hold]
    Xr, yr = replay["features"][replay["holdout"]], replay["labels"][replay["holdout"]]
    before_new, after_new = _accuracy(old_logits(Xh), yh), _accuracy(head.logits(Xh), yh)
    before_old, after_old = _accuracy(old_logits(Xr), yr), _accuracy(head.logits(Xr), yr)
    metrics = {
        "new_holdout_accuracy": {"before": before_new, "after": after_new, "rows": len(yh)},
        "replay_holdout_accuracy": {"before": before_old, "after": after_old, "rows": len(yr)},
        "margin": cfg.margin,
        "fit": head.fit,
        "seconds": {"features": round(new.feature_seconds, 3), "fit": round(head.fit_seconds, 3)},
        "feature_cache_hit": new.cache_hit,
    }
    reasons = []
    # "improves": better than before, or already perfect and still perfect (retraining on the
    # same samples again, or adding them to the replay memory, must not be refused for that)
    if not (after_new > before_new or after_new == 1.0):
        reasons.append(f"accuracy on the {len(yh)} held-out new samples did not improve "
                       f"({100 * before_new:.1f}% -> {100 * after_new:.1f}%)")
    if before_old is not None and before_old - after_old > cfg.margin + 1e-12:
        reasons.append(f"accuracy on the replay hold-out of earlier classes dropped "
                       f"{100 * (before_old - after_old):.1f} points ({100 * before_old:.1f}% -> {100 * after_old:.1f}%), "
                       f"more than the {100 * cfg.margin:.1f}-point margin")
    if reasons:
        raise RetrainRefused(f"{bundle.path}: retrain refused, head v{bundle.manifest['head']['version']} stays: "
                             + "; ".join(reasons) + ".")
    return metrics


def _write_version(bundle: Bundle, head: LinearHead, new: Samples, replay: dict, cfg: RetrainConfig,
                   version: int) -> tuple[str, str]:
    """Write head version N+1 and its replay memory (each whole, under a new name); nothing is committed yet."""
    head_rel, replay_rel = f"heads/head-{version:04d}.onnx", f"replay/replay-{version:04d}.npz"
    head.write_onnx(bundle.path / head_rel,
                    metadata={"labels": new.labels, "version": version, "edgeft_version": __version__})
    per_class = cfg.replay_per_class or bundle.manifest.get("replay", {}).get("per_class", 100)
    Xn, yn, hn = _merge_replay(replay["features"], replay["labels"], replay["holdout"], new.X, new.y, new.hold,
                               per_class)
    _save_npz(bundle.path / replay_rel, features=Xn.astype(np.float32), labels=yn, holdout=hn)
    return head_rel, replay_rel


def _next_manifest(m: dict, new: Samples, data, metrics: dict, version: int, written: tuple[str, str],
                   path: Path) -> dict:
    head_rel, replay_rel = written
    entry = {"version": version, "file": head_rel, "replay": replay_rel, "labels": new.labels, "created": _now(),
             "source": "device retrain", "data": {"source": str(data), "fingerprint": new.ds.fingerprint(),
                                                  "rows": len(new.ds), "counts": new.ds.counts()},
             "added_classes": new.added, "metrics": metrics}
    files = dict(m["files"])
    for rel in written:
        files[rel] = file_entry(path / rel)
    return {**m, "labels": new.labels, "head": {"version": version, "file": head_rel, "replay": replay_rel},
            "heads": [*m["heads"], entry], "files": files}


def _commit(path: Path, manifest: dict, written: tuple[str, str], keep: int) -> list[str]:
    """Replace the manifest in one rename (the commit point), then delete versions beyond `keep`."""
    pruned = _prune(manifest, keep)
    try:
        check_manifest(manifest, path / MANIFEST)  # never commit a manifest the device would refuse
    except BundleError:
        for rel in written:
            (path / rel).unlink(missing_ok=True)
        raise
    atomic.write_json(path / MANIFEST, manifest)  # the commit point
    for rel in pruned:
        (path / rel).unlink(missing_ok=True)
    return pruned


def _config(config: RetrainConfig | None, options: dict) -> RetrainConfig:
    if config is not None and options:
        raise UsageError(f"retrain: pass a RetrainConfig or options ({', '.join(sorted(options))}), not both.")
    if config is not None:
        return config
    try:
        return RetrainConfig(**options)
    except TypeError as e:  # an option RetrainConfig does not have
        raise ConfigError(f"retrain: {e}.") from None


def retrain(path: str | Path, data: str | Path, config: RetrainConfig | None = None, *, public_key=None,
            **options) -> RetrainResult:
    """Fit, guard, and (if accepted) commit head version N+1. Returns the report; raises RetrainRefused.

    `options` are RetrainConfig's fields (margin=0.05, add_classes=True, ...), or pass a config."""
    cfg = _config(config, options)
    t0 = time.perf_counter()
    path = Path(path)
    bundle = Bundle(path, public_key=public_key)
    m = bundle.manifest
    new = _read_samples(bundle, data, cfg)
    if m["head"].get("family", "softmax") == "ridge":  # the closed-form family: statistics, not replay rows
        from .ridge_bundle import retrain as retrain_ridge

        return retrain_ridge(bundle, new, data, cfg, t0, refused=RetrainRefused, prune=_prune)
    replay = _load_replay(bundle)
    head = _fit_head(new, replay, cfg)
    metrics = _guard(bundle, head, new, replay, cfg)
    # accepted: write version N+1, then commit it with the manifest
    version = max(h["version"] for h in m["heads"]) + 1
    written = _write_version(bundle, head, new, replay, cfg, version)
    pruned = _commit(path, _next_manifest(m, new, data, metrics, version, written, path), written, cfg.keep)
    return RetrainResult(version=version, previous_version=m["head"]["version"], labels=new.labels,
                         added_classes=new.added, pruned=pruned, metrics=metrics,
                         seconds=round(time.perf_counter() - t0, 3))


def _merge_replay(Xr, yr, hr, Xn, yn, hn, per_class: int):
    """Replay memory for the next version: the new samples of a class first, then older ones, up to per_class."""
    X, Y, H = [], [], []
    for c in np.union1d(np.unique(yr), np.unique(yn)):
        nx, nh = Xn[yn == c], hn[yn == c]
        ox, oh = Xr[yr == c], hr[yr == c]
        xs, hs = np.concatenate([nx, ox])[:per_class], np.concatenate([nh, oh])[:per_class]
        if len(hs) >= 2 and not hs.any():
            hs[-1] = True  # every class keeps at least one held-out row for the next guard
        X.append(xs), Y.append(np.full(len(xs), c)), H.append(hs)
    return np.concatenate(X), np.concatenate(Y).astype(np.int64), np.concatenate(H)


def _prune(manifest: dict, keep: int) -> list[str]:
    """Drop head versions beyond the newest `keep` (never the active one); return files to delete."""
    active = manifest["head"]["version"]
    live = [h for h in manifest["heads"] if not h.get("pruned")]
    excess = len(live) - max(keep, 1)
    victims = [h for h in sorted(live, key=lambda h: h["version"]) if h["version"] != active][:max(excess, 0)]
    kinds = ("file", "replay", "statistics")
    still_used = {h.get(k) for h in live if h not in victims for k in kinds}
    removed = []
    for h in victims:
        h["pruned"] = True
        for k in kinds:
            rel = h.get(k)
            if rel and rel not in still_used and rel in manifest["files"]:
                del manifest["files"][rel]
                removed.append(rel)
    return removed


def rollback(path: str | Path, version: int | None = None, public_key=None) -> RollbackResult:
    """Make an earlier head version active again (default: the one before the active one)."""
    path = Path(path)
    m = read_manifest(path)
    Bundle(path, public_key=public_key)  # refuses a damaged or unsigned bundle before anything changes
    active = m["head"]["version"]
    live = {h["version"]: h for h in m["heads"] if not h.get("pruned")}
    if version is None:
        earlier = [v for v in live if v < active]
        if not earlier:
            raise UsageError(f"{path}: head v{active} is the oldest version kept; nothing to roll back to.")
        version = max(earlier)
    if version not in live:
        known = ", ".join(f"v{v}" for v in sorted(live))
        raise UsageError(f"{path}: no head version {version} (kept: {known}).")
    h = live[version]
    labels = h.get("labels") or m["heads"][0].get("labels") or m["labels"]
    past = m.get("rollbacks", [])
    if not isinstance(past, list):
        raise BundleError(f"{path / MANIFEST}: 'rollbacks' must be a list, got {type(past).__name__}.")
    new = dict(m)
    new["head"] = {"version": version, "file": h["file"],
                   **{k: h[k] for k in ("replay", "statistics", "family") if h.get(k)}}
    new["labels"] = labels
    new["rollbacks"] = [*past, {"from": active, "to": version, "at": _now()}]
    _check_rollback(path, new, version)
    atomic.write_json(path / MANIFEST, new)
    return RollbackResult(from_version=active, to_version=version, labels=labels)


def _check_rollback(path: Path, new: dict, version: int) -> None:
    """Refuse a rollback whose manifest the device would then refuse: the same checks as loading it."""
    from .session import OnnxModel

    where = f"{path / MANIFEST}: "
    try:
        check_manifest(new, path / MANIFEST)
        # the head file is hashed in 'files' (checked above) and Bundle(path) just matched every hash
        outputs = OnnxModel(path / new["head"]["file"], ["CPUExecutionProvider"], 1).session.get_outputs()
        dims = outputs[0].shape if outputs else []
        if dims and isinstance(dims[-1], int) and dims[-1] != len(new["labels"]):
            raise BundleError(f"{where}{len(new['labels'])} labels, but the head {new['head']['file']} "
                              f"has {dims[-1]} outputs.")
    except BundleError as e:
        reason = str(e)[len(where):] if str(e).startswith(where) else str(e)
        raise BundleError(f"{path}: rollback to head v{version} refused, the bundle would not load: "
                          f"{reason.rstrip('.')}. The bundle is unchanged.") from None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _after(metrics: dict, key: str) -> float | None:
    """metrics[key]['after'] when it is a finite number (history shows it), else None."""
    entry = metrics.get(key)
    v = entry.get("after") if isinstance(entry, dict) else None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    return float(v) if ok else None


def history(path: str | Path) -> list[dict]:
    m = read_manifest(path)
    active = m["head"]["version"]
    out = []
    for h in m["heads"]:  # read_manifest checked the entries; the descriptive fields are shown when they fit
        metrics = h.get("metrics", {})
        out.append({
            "version": h["version"], "active": h["version"] == active, "pruned": bool(h.get("pruned")),
            "created": _text(h.get("created")), "source": _text(h.get("source")),
            "classes": len(h.get("labels") or m["labels"]),
            "added_classes": h.get("added_classes", []), "data": h.get("data"),
            "new_accuracy": _after(metrics, "new_holdout_accuracy"),
            "replay_accuracy": _after(metrics, "replay_holdout_accuracy"),
            # a ridge retrain's guard judges the earlier classes on more rows than the hold-out
            "old_classes_accuracy": _after(metrics, "old_classes_accuracy"),
        })
    return out
