"""Out-of-distribution flags: is an input unlike every class the device's head knows?

A field device meets inputs from no class it was taught: another product on the line, a new
defect, a wrong camera, a log entry from another plant. The softmax head answers them with a
class anyway, often confidently. The score here looks at the features instead:

    score(x) = 1 - max_c cos(x, prototype_c)

where prototype_c is the mean of class c's L2-normalised features in the bundle's replay memory.
A score near 0 is an input close to a known class; inputs of another domain sit far from all.

The threshold is set on the replay's hold-out rows (validation rows the head never trained on)
so that a chosen share of in-distribution inputs is flagged (false alarms, default 5%): the
split-conformal quantile, the ceil((n + 1)(1 - alpha))-th smallest of the n hold-out scores.
- "split" (the softmax family's replay, which holds training rows of every class): the
  prototypes come from the training rows only, so a hold-out row and a new input are scored
  against the same fixed prototypes. For an input drawn like the hold-out rows (the replay's
  class-balanced mix, not necessarily the field's) the chance of a false alarm is then at
  most alpha, whatever the feature distribution.
- "leave-one-out" (a replay without training rows for some class, e.g. the ridge family's,
  which keeps hold-out rows only): the prototypes use every row, and each hold-out row is
  scored against prototypes that leave it out. Close to the same promise, not exactly it: a
  hold-out row is scored without itself, a new input with every hold-out row.
With fewer than 1/alpha - 1 hold-out rows no threshold can promise alpha, and nothing is flagged
(said in `describe()`).

numpy only.
"""

from __future__ import annotations

import math

import numpy as np

FALSE_ALARM = 0.05


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest of n scores; inf
    when n is too small for that rank (no threshold can promise alpha)."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    return float(np.sort(scores)[rank - 1]) if n and rank <= n else math.inf


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class OOD:
    """Prototypes and a threshold from replay features; scores and flags for new features."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, holdout: np.ndarray, n_classes: int,
                 false_alarm: float = FALSE_ALARM):
        if not 0 < false_alarm < 1:
            raise ValueError(f"false_alarm {false_alarm}: expected a share between 0 and 1")
        U = _unit(features)
        labels = np.asarray(labels, dtype=np.int64)
        holdout = np.asarray(holdout, dtype=bool)
        self.n_classes, self.false_alarm = n_classes, false_alarm
        fit = ~holdout
        split = fit.any() and set(labels[holdout].tolist()) <= set(labels[fit].tolist())
        self.mode = "split" if split else "leave-one-out"
        rows = fit if split else np.ones(len(labels), bool)
        self.sums = np.zeros((n_classes, U.shape[1]))
        np.add.at(self.sums, labels[rows], U[rows])
        self.counts = np.bincount(labels[rows], minlength=n_classes)
        self.known = self.counts > 0
        self.prototypes = _unit(self.sums)
        self.calibration_rows = int(holdout.sum())
        scores = (self.scores(U[holdout]) if split else self._leave_one_out(U[holdout], labels[holdout]))
        self.threshold = conformal_threshold(scores, false_alarm)

    def _leave_one_out(self, U: np.ndarray, y: np.ndarray) -> np.ndarray:
        sims = U @ self.prototypes.T  # (n, C) against the full prototypes
        sims[:, ~self.known] = -np.inf
        own = self.sums[y] - U  # each row's own class without it
        norms = np.linalg.norm(own, axis=1)
        loo = np.where(norms > 1e-12, np.einsum("ij,ij->i", U, own) / np.maximum(norms, 1e-12), -np.inf)
        sims[np.arange(len(y)), y] = loo  # a class seen only in this row has no prototype left
        return 1.0 - sims.max(axis=1)

    def scores(self, features: np.ndarray) -> np.ndarray:
        sims = _unit(features) @ self.prototypes.T
        sims[:, ~self.known] = -np.inf
        return 1.0 - sims.max(axis=1)

    def flags(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, unknown): unknown where the score is above the threshold."""
        s = self.scores(features)
        return s, s > self.threshold

    def describe(self, labels: list[str] | None = None) -> dict:
        missing = [labels[c] if labels else c for c in np.flatnonzero(~self.known).tolist()]
        out = {"score": "1 - max cosine similarity to the class prototypes (replay features)", "mode": self.mode,
               "threshold": None if math.isinf(self.threshold) else self.threshold,
               "false_alarm": self.false_alarm, "calibration_rows": self.calibration_rows,
               "prototype_rows": int(self.counts.sum()), "classes_without_prototype": missing}
        if math.isinf(self.threshold):
            need = math.ceil(1 / self.false_alarm) - 1
            out["note"] = (f"{self.calibration_rows} hold-out rows cannot set a {self.false_alarm:.0%} false-alarm "
                           f"threshold (at least {need} are needed): nothing is flagged")
        return out
