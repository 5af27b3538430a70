"""The ridge head family in a bundle: written at build, re-solved by `edgeft device retrain`.

A ridge head version in the manifest names three files, all hashed:

    heads/head-NNNN.onnx    features -> logits, probs (MatMul, Add, Relu, MatMul, Add, Softmax)
    heads/stats-NNNN.npz    the per-class statistics of its lineage (runtime/ridge.py)
    replay/replay-NNNN.npz  features of held-out rows for the guard (the softmax family's format)

and says "family": "ridge" (head entry and heads[] entry), so a bundle keeps its family across
retrains and rollbacks. Such a manifest is schema 3: an edgeft that reads only 2 would retrain it
as a softmax head from a replay memory that holds only hold-out rows, so it is told to upgrade.
A softmax bundle (schema 1 or 2) is untouched by any of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np

from ..errors import BundleError, DataError, UsageError
from . import atomic, ridge
from .bundle import Bundle
from .manifest import MANIFEST, check_manifest, file_entry, read_manifest
from .result import RetrainResult
from .version import __version__

SCHEMA = 3
FOLDS = 5


def _entry(path: Path, rel: str) -> dict:
    return file_entry(path / rel)


def row_digests(ds) -> np.ndarray:
    """A digest per row of a Dataset: sha256 over its kind, its content (the text, or the image
    file's bytes) and its label, cut to ridge.DIGEST bytes. The same row in another file, or
    given again, has the same digest; a changed label makes it another row."""
    out = np.zeros((len(ds), ridge.DIGEST), np.uint8)
    for i, (item, label) in enumerate(zip(ds.items, ds.labels, strict=True)):
        h = hashlib.sha256(ds.kind.encode() + b"\x00")
        h.update(Path(item).read_bytes() if ds.kind == "image" else str(item).encode())
        h.update(b"\x01" + str(label).encode())
        out[i] = np.frombuffer(h.digest()[: ridge.DIGEST], np.uint8)
    return out


def fresh_rows(stats: ridge.Statistics, digests: np.ndarray) -> tuple[np.ndarray, dict]:
    """Which rows a retrain adds: not already in the statistics, and not a repeat of an earlier
    row of the same file. Returns the mask and the counts the report gives."""
    known = stats.known(digests)
    first = ridge.first_occurrences(digests)
    keep = first & ~known
    return keep, {"in_file": int(len(digests)), "added": int(keep.sum()),
                  "skipped_already_in_statistics": int(known.sum()),
                  "skipped_repeated_in_file": int((~first & ~known).sum())}


def _holdout(path: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    rel = manifest["head"].get("replay")
    if not rel:
        raise UsageError(f"{path}: a ridge head needs the replay memory's hold-out rows for its guard; "
                         "build with --replay N (N > 0).")
    with np.load(path / rel, allow_pickle=False) as z:
        hold = z["holdout"].astype(bool)
        return z["features"][hold], z["labels"][hold].astype(np.int64)


def add_ridge_head(path: str | Path, train, *, width: int = ridge.DEFAULT_WIDTH, seed: int = ridge.DEFAULT_SEED,
                   batch_size: int = 32, manifest: dict | None = None) -> dict:
    """Fit the ridge head on a finished bundle's own features of its training rows and make it the
    active head version (the trained head stays the version before it, one rollback away).

    `train` is the run's training Dataset (the rows the trained head learned from); lambda is
    chosen on the replay hold-out (validation rows, never in the statistics) by balanced accuracy.
    Returns the new manifest. `manifest`: one still in memory (edgeft build, before it writes
    manifest.json once): read instead of the file, and the new one returned unwritten."""
    t0 = time.perf_counter()
    path = Path(path)
    m = read_manifest(path) if manifest is None else manifest
    labels = list(m["labels"])
    index = {n: i for i, n in enumerate(labels)}
    unknown = sorted({v for v in train.labels if v not in index})
    if unknown:
        raise DataError(f"{train.source}: labels the bundle does not have: {', '.join(unknown[:5])}.")
    bundle = Bundle(path, providers=["CPUExecutionProvider"], check_hashes=False, manifest=manifest)
    X = bundle.features(list(train.items), batch_size)
    y = np.array([index[v] for v in train.labels], dtype=np.int64)
    Xh, yh = _holdout(path, m)
    head, stats, choice = ridge.fit_features(X, y, labels, width=width, seed=seed, holdout=(Xh, yh))
    stats.remember(row_digests(train))  # a device retrain given a training row again skips it
    trained = bundle.head_outputs(Xh)["logits"] if len(yh) else np.zeros((0, len(labels)))
    version = max(h["version"] for h in m["heads"]) + 1
    metrics = {
        "replay_holdout_accuracy": {
            "before": float((trained.argmax(1) == yh).mean()) if len(yh) else None,
            "after": float((head.logits(Xh).argmax(1) == yh).mean()) if len(yh) else None, "rows": int(len(yh))},
        "fit": {"lambda": head.lam, "lambda_chosen_on_rows": choice["rows"], "train_rows": int(len(y)),
                "width": width, "temperature": head.temperature},
        "statistics_bytes_per_class": dict(zip(labels, stats.nbytes_per_class(), strict=True)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    head_rel, stats_rel = write_version(path, version, head, stats, labels)
    replay_rel = m["head"]["replay"]
    entry = {"version": version, "file": head_rel, "replay": replay_rel, "statistics": stats_rel, "family": ridge.FAMILY,
             "labels": labels, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "source": "build: ridge head on the bundle's features", "metrics": metrics,
             "ridge": {"width": width, "seed": seed, "projection_sha256": head.projection.sha256}}
    new = dict(m)
    new["schema"] = max(m["schema"], SCHEMA)
    new["head"] = {"version": version, "file": head_rel, "replay": replay_rel, "statistics": stats_rel,
                   "family": ridge.FAMILY}
    new["heads"] = [*m["heads"], entry]
    new["files"] = {**m["files"], head_rel: _entry(path, head_rel), stats_rel: _entry(path, stats_rel)}
    check_manifest(new, path / MANIFEST)
    if manifest is None:
        atomic.write_json(path / MANIFEST, new)
    return new


def load_lineage(path: Path, manifest: dict) -> tuple[ridge.Statistics, ridge.Projection]:
    """The active ridge version's statistics and projection, checked to be one lineage."""
    h = manifest["head"]
    rel = h.get("statistics")
    if not isinstance(rel, str) or rel not in manifest["files"]:
        raise BundleError(f"{path / MANIFEST}: the ridge head v{h['version']} names no statistics file.")
    try:
        stats = ridge.Statistics.from_file(path / rel)
        projection = ridge.read_projection(path / h["file"])
    except (ValueError, KeyError, OSError) as e:
        raise BundleError(f"{path / rel}: unusable ridge statistics ({e}).") from None
    if stats.projection_sha256 != projection.sha256:
        raise BundleError(f"{path / rel}: its projection hash does not match the head {h['file']}; "
                          "statistics and head are of different lineages.")
    if stats.labels != list(manifest["labels"])[: len(stats.labels)]:
        raise BundleError(f"{path / rel}: its labels {stats.labels} are not the bundle's {manifest['labels']}.")
    return stats, projection


def frontier(choice: dict) -> list[dict]:
    """Per lambda, its best offset's row: new samples (out-of-fold) vs the old classes' accuracy."""
    best = {}
    for r in choice["grid"]:
        key = (r["new_oof_accuracy"], r["old_accuracy"] or 0.0, -abs(r["offset"]))
        if r["lambda"] not in best or key > best[r["lambda"]][0]:
            best[r["lambda"]] = (key, r)
    return [r for _, r in best.values()]


def tradeoff(choice: dict) -> str:
    """The measured frontier in one line, for a technician deciding whether to relax --margin."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}%"

    return ", ".join(f"lambda {r['lambda']:g}" + (f" offset {r['offset']:+g}" if r["offset"] else "")
                     + f": new {pct(r['new_oof_accuracy'])} / old {pct(r['old_accuracy'])}"
                     for r in frontier(choice))


def current_lambda(path: Path, manifest: dict) -> float | None:
    """The active ridge head's regulariser: its version's metrics, else the head file's own metadata."""
    active = next((h for h in manifest["heads"] if h["version"] == manifest["head"]["version"]), {})
    lam = (active.get("metrics") or {}).get("fit", {}).get("lambda")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam > 0:
        try:
            lam = ridge.read_onnx(path / manifest["head"]["file"]).lam
        except (OSError, KeyError, ValueError):
            return None
    return float(lam) if lam > 0 else None


def fit_and_judge(path: Path, bundle: Bundle, X_new: np.ndarray, y_new: np.ndarray, labels: list[str],
                  replay: dict, margin: float, lineage: tuple | None = None) -> tuple[ridge.RidgeHead, ridge.Statistics, dict, list[str]]:
    """Statistics + new rows -> the head at the lambda the guard's criterion chose, its metrics and
    the guard's reasons to refuse (empty: accepted). Nothing is written."""
    stats, projection = lineage or load_lineage(path, bundle.manifest)
    added = list(range(len(stats.labels), len(labels)))  # classes this retrain adds: their offset is chosen
    stats.ensure_labels(labels)
    Xr, yr = replay["features"], replay["labels"].astype(np.int64)
    hold_r = replay["holdout"].astype(bool)
    Xh, yh = Xr[hold_r], yr[hold_r]
    per_class = np.bincount(y_new)
    if per_class[per_class > 0].min() < 2:
        raise DataError("too few rows to judge the new head; give at least 2 per class.")

    def old_logits(X):  # classes the old head does not have can never be its answer
        z = bundle.head_outputs(X)["logits"]
        return np.concatenate([z, np.full((len(X), len(labels) - z.shape[1]), -np.inf, np.float32)], axis=1)

    hold_pred = old_logits(Xh).argmax(1)
    before_new, before_hold = _accuracy(old_logits(X_new), y_new), _accuracy(old_logits(Xh), yh)
    seen = replay.get("seen")
    hold_seen = seen[hold_r].astype(bool) if seen is not None else None
    t_fit = time.perf_counter()
    choice = ridge.choose(stats, projection, X_new, y_new, Xh, yh, margin=margin, hold_before=hold_pred,
                          current_lambda=current_lambda(path, bundle.manifest), hold_in_stats=hold_seen,
                          folds=FOLDS, offset_classes=added)
    stats.add(projection(X_new), y_new, X_new)
    for c in added:
        stats.offsets[c] = choice["offset"]
    head = ridge.fit(stats, projection, choice["lambda"])
    head.temperature = ridge.calibrate_temperature(head, np.concatenate([Xh, X_new]), np.concatenate([yh, y_new]))
    fit_seconds = time.perf_counter() - t_fit
    after_new = choice["new_oof_accuracy"]
    hold_logits = head.logits(Xh)
    keep = choice["hold_keep"]
    n_old, before_old = choice["old_rows"], choice["old_before"]
    # the old classes after: the stored rows out-of-fold at the chosen setting, the hold-out by the head itself
    after_old = (choice["stored_oof_right"] + int((hold_logits[keep].argmax(1) == yh[keep]).sum())) / n_old if n_old else None
    metrics = _metrics(choice, head, stats, projection, labels, added, margin, fit_seconds, hold_seen, hold_r,
                       before_new, before_hold, before_old, after_old, hold_logits, yh, y_new)
    reasons = _reasons(choice, len(y_new), before_new, after_new, before_old, after_old, margin)
    return head, stats, metrics, reasons


def _accuracy(z: np.ndarray, y: np.ndarray) -> float | None:
    return float((z.argmax(1) == y).mean()) if len(y) else None


def _old_rows_how(choice: dict) -> str:
    """What the old classes' accuracy rests on, as the metrics and a refusal say it."""
    return (f"{choice['stored_rows_out_of_fold']} rows kept in the statistics, out-of-fold ({choice['folds']} folds), "
            f"+ {choice['replay_holdout_rows']} replay hold-out rows")


def _metrics(choice, head, stats, projection, labels, added, margin, fit_seconds, hold_seen, hold_r,
             before_new, before_hold, before_old, after_old, hold_logits, yh, y_new) -> dict:
    """The retrain's metrics (what fit_and_judge reports; nothing is decided here)."""
    after_new, n_old = choice["new_oof_accuracy"], choice["old_rows"]
    unseen = int((~hold_seen).sum()) if hold_seen is not None else int(hold_r.sum())
    metrics = {
        "new_holdout_accuracy": {"before": before_new, "after": after_new, "rows": int(len(y_new)),
                                 "how": f"{choice['folds']}-fold out-of-fold over every new sample"},
        "old_classes_accuracy": {"before": before_old, "after": after_old, "rows": n_old,
                                 "stored_rows_out_of_fold": choice["stored_rows_out_of_fold"],
                                 "replay_holdout_rows": choice["replay_holdout_rows"], "how": _old_rows_how(choice)},
        "replay_holdout_accuracy": {"before": before_hold, "after": _accuracy(hold_logits, yh), "rows": int(len(yh)),
                                    "unseen_rows": unseen},
        "margin": margin,
        "fit": {"family": ridge.FAMILY, "lambda": choice["lambda"], "offset": choice["offset"],
                "offset_classes": [labels[c] for c in added], "within_margin": choice["within_margin"],
                "folds": choice["folds"], "temperature": head.temperature, "width": projection.width,
                "decided_on": {"new_rows_out_of_fold": choice["new_rows"], "old_rows": n_old,
                               "old_rows_out_of_fold": choice["stored_rows_out_of_fold"],
                               "replay_holdout_rows": choice["replay_holdout_rows"],
                               "settings_tried": len(choice["grid"]),
                               "lambda_grid": [min(r["lambda"] for r in choice["grid"]),
                                               max(r["lambda"] for r in choice["grid"])],
                               "lambda_at_grid_edge": choice["lambda_at_grid_edge"],
                               "recall_tolerance": choice["recall_tolerance"]},
                "statistics_rows": stats.counts, "frontier": frontier(choice)},
        "statistics_bytes_per_class": dict(zip(labels, stats.nbytes_per_class(), strict=True)),
        "seconds": {"fit": round(fit_seconds, 3)},
    }
    return metrics


def _reasons(choice, n_new, before_new, after_new, before_old, after_old, margin) -> list[str]:
    """The guard's reasons to refuse (empty: accepted)."""
    reasons = []
    if after_new is None or not (after_new > before_new or after_new == 1.0):
        reasons.append(f"accuracy on the {n_new} new samples (out-of-fold) did not improve "
                       f"({100 * before_new:.1f}% -> {100 * (after_new or 0):.1f}%)")
    if before_old is not None and before_old - after_old > margin + 1e-12:
        reasons.append(f"accuracy on the earlier classes dropped {100 * (before_old - after_old):.1f} points "
                       f"({100 * before_old:.1f}% -> {100 * after_old:.1f}%, {_old_rows_how(choice)}), more than the "
                       f"{100 * margin:.1f}-point margin")
    if reasons:
        reasons.append(f"measured trade-off (new samples out-of-fold / earlier classes): {tradeoff(choice)}")
    return reasons


def write_version(path: Path, version: int, head: ridge.RidgeHead, stats: ridge.Statistics,
                  labels: list[str]) -> tuple[str, str]:
    """heads/head-N.onnx and heads/stats-N.npz (each written whole under a temporary name, then renamed)."""
    head_rel, stats_rel = f"heads/head-{version:04d}.onnx", f"heads/stats-{version:04d}.npz"
    ridge.write_onnx(path / head_rel, head, metadata={"labels": labels, "version": version,
                                                       "edgeft_version": __version__})
    atomic.write_bytes(path / stats_rel, stats.to_bytes())
    return head_rel, stats_rel


def commit(path: Path, m: dict, *, head: ridge.RidgeHead, stats: ridge.Statistics, labels: list[str],
           new_labels: list[str], replay: tuple[np.ndarray, np.ndarray, np.ndarray], entry: dict, keep: int,
           prune) -> tuple[int, list[str]]:
    """Write version N+1 (head, statistics, replay memory), then commit it with the manifest (one
    rename: the commit point), then delete versions beyond `keep`. Returns (version, pruned files)."""
    version = max(h["version"] for h in m["heads"]) + 1
    head_rel, stats_rel = write_version(path, version, head, stats, labels)
    replay_rel = f"replay/replay-{version:04d}.npz"
    X, y, hold, seen = replay
    buf = __import__("io").BytesIO()
    np.savez(buf, features=X.astype(np.float32), labels=y, holdout=hold, seen=seen)
    atomic.write_bytes(path / replay_rel, buf.getvalue())
    entry = {"version": version, "file": head_rel, "replay": replay_rel, "statistics": stats_rel,
             "family": ridge.FAMILY, "labels": labels, **entry, "added_classes": new_labels,
             "ridge": {"width": stats.width, "projection_sha256": stats.projection_sha256}}
    new = dict(m)
    new["schema"] = max(m["schema"], SCHEMA)
    new["labels"] = labels
    new["head"] = {"version": version, "file": head_rel, "replay": replay_rel, "statistics": stats_rel,
                   "family": ridge.FAMILY}
    new["heads"] = [*m["heads"], entry]
    new["files"] = {**m["files"], **{rel: _entry(path, rel) for rel in (head_rel, stats_rel, replay_rel)}}
    pruned = prune(new, keep)
    try:
        check_manifest(new, path / MANIFEST)  # never commit a manifest the device would refuse
    except BundleError:
        for rel in (head_rel, stats_rel, replay_rel):
            (path / rel).unlink(missing_ok=True)
        raise
    atomic.write_json(path / MANIFEST, new)  # the commit point
    for rel in pruned:
        (path / rel).unlink(missing_ok=True)
    return version, pruned


def next_replay(replay: dict, X_new: np.ndarray, y_new: np.ndarray, hold_new: np.ndarray, per_class: int):
    """The replay memory for the next version: every hold-out row kept (the next guard's old
    classes), plus a quarter of each class's new rows marked hold-out for later guards; and, as
    calibration rows of the out-of-distribution threshold (runtime/ood.py), the earlier rows that
    are not hold-out, topped up per class to `per_class` with new ones. The ridge statistics hold
    every new row, so those are marked seen: a later guard reports how many of its rows were
    unseen, and the threshold scores a seen row against its class without itself."""
    Xr, yr = replay["features"], replay["labels"].astype(np.int64)
    hr = replay["holdout"].astype(bool)
    sr = replay.get("seen", np.zeros(len(yr), dtype=bool)).astype(bool) | ~hr  # a training row is in the statistics
    hn = np.asarray(hold_new, dtype=bool)
    X, Y, H, S = [Xr], [yr], [hr], [sr]
    for c in np.unique(y_new):
        take = np.flatnonzero((y_new == c) & hn)[:per_class]
        room = max(0, per_class - int(((yr == c) & ~hr).sum()))
        rest = np.flatnonzero((y_new == c) & ~hn)[:room]
        for rows, hold in ((take, True), (rest, False)):
            X.append(X_new[rows]), Y.append(np.full(len(rows), c)), H.append(np.full(len(rows), hold))
            S.append(np.ones(len(rows), bool))
    return (np.concatenate(X), np.concatenate(Y).astype(np.int64), np.concatenate(H), np.concatenate(S))


def read_replay(path: Path, manifest: dict) -> dict:
    rel = manifest["head"].get("replay")
    if not rel:
        raise BundleError(f"{path}: this ridge head has no replay hold-out; rebuild it with edgeft build (--replay N).")
    with np.load(path / rel, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def retrain(bundle: Bundle, new, data, cfg, t0: float, *, refused, prune) -> dict:
    """`edgeft device retrain` on a ridge head: statistics + new rows, lambda by the guard's
    criterion, the guard, then version N+1. `new` is retrain.Samples (the rows, their features,
    their stratified hold-out mask), `cfg` the RetrainConfig; retrain.py passes its refusal
    error and its pruning (this module never imports it: no import cycle). Raises `refused`
    with the bundle unchanged."""
    path, m = bundle.path, bundle.manifest
    replay = read_replay(path, m)
    digests = row_digests(new.ds)
    lineage = load_lineage(path, m)
    keep, rows = fresh_rows(lineage[0], digests)
    if not keep.any():
        raise DataError(f"{new.ds.source}: all {rows['in_file']} rows are already in head v{m['head']['version']}'s "
                        "statistics (same content and label); nothing new to learn.")
    if not keep.all():  # the statistics are sums: a row counted twice would weigh twice
        new = dataclasses.replace(new, X=new.X[keep], y=new.y[keep], hold=new.hold[keep])
    head, stats, metrics, reasons = fit_and_judge(path, bundle, new.X, new.y, new.labels, replay, cfg.margin, lineage)
    stats.remember(digests[keep])
    metrics["rows"] = rows
    metrics["seconds"]["features"] = round(new.feature_seconds, 3)
    metrics["feature_cache_hit"] = new.cache_hit
    if reasons:
        raise refused(f"{path}: retrain refused, head v{m['head']['version']} stays: " + "; ".join(reasons) + ".")
    per_class = cfg.replay_per_class or m.get("replay", {}).get("per_class", 100)
    entry = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "device retrain",
             "data": {"source": str(data), "fingerprint": new.ds.fingerprint(), "rows": len(new.ds),
                      "counts": new.ds.counts()},
             "metrics": metrics}
    version, pruned = commit(path, m, head=head, stats=stats, labels=new.labels, new_labels=new.added,
                             replay=next_replay(replay, new.X, new.y, new.hold, per_class), entry=entry,
                             keep=cfg.keep, prune=prune)
    return RetrainResult(version=version, previous_version=m["head"]["version"], labels=new.labels,
                         added_classes=new.added, pruned=pruned, metrics=metrics, family=ridge.FAMILY,
                         skipped_rows=rows["in_file"] - rows["added"], seconds=round(time.perf_counter() - t0, 3))
