"""The ridge head family on the workstation: fitted from a head-only run's cached features in one solve.

`edgeft train --method head --head ridge` trains the softmax head as always (the run PyTorch,
export and the parity gate know) and fits the closed-form head (runtime/ridge.py) on the same
cached features, lambda chosen on the validation rows; metrics.json reports both, and the run
records its family, so `edgeft build` of it makes the ridge head the bundle's active one
(fitted again there on the bundle's own features: what the device computes).
"""

from __future__ import annotations

import time

import numpy as np

from .runtime import ridge


def fit_on_features(train_X, train_y, val_X, val_y, labels: list[str]) -> dict:
    """One solve on the training features (plus the lambda search on the validation rows): its report."""
    t0 = time.perf_counter()
    X, y = np.asarray(train_X, dtype=np.float32), np.asarray(train_y, dtype=np.int64)
    Xv, yv = np.asarray(val_X, dtype=np.float32), np.asarray(val_y, dtype=np.int64)
    head, stats, choice = ridge.fit_features(X, y, labels, holdout=(Xv, yv))
    pred = head.logits(Xv).argmax(1) if len(yv) else np.zeros(0, dtype=np.int64)
    return {"family": ridge.FAMILY, "accuracy": float((pred == yv).mean()) if len(yv) else None,
            "balanced_accuracy": ridge.balanced_accuracy(pred, yv, len(labels)) if len(yv) else None,
            "lambda": head.lam, "lambda_chosen_on_rows": choice["rows"], "width": stats.width,
            "train_rows": int(len(y)), "seconds": round(time.perf_counter() - t0, 3)}
