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
- "statistics" (the ridge family, whose statistics keep per-class sums of the normalised
  features of every row it learned): the prototypes are those sums, and the calibration rows
  are every row of the replay memory, a row the sums hold scored against its class without
  itself (leave-one-out), the others (the build's validation rows) as they are. After a ridge
  retrain the replay keeps hold-out rows only, so leave-one-out over the replay alone would
  rest its prototypes on a few dozen rows.
With fewer than 1/alpha - 1 hold-out rows no threshold can promise alpha, and nothing is flagged
(said in `describe()`).

numpy only.
"""

from __future__ import annotations

import math
from pathlib import Path

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
        U = _unit(features)
        labels = np.asarray(labels, dtype=np.int64)
        holdout = np.asarray(holdout, dtype=bool)
        fit = ~holdout
        split = fit.any() and set(labels[holdout].tolist()) <= set(labels[fit].tolist())
        rows = fit if split else np.ones(len(labels), bool)
        sums = np.zeros((n_classes, U.shape[1]))
        np.add.at(sums, labels[rows], U[rows])
        # split: the hold-out rows are in no prototype; leave-one-out: each is in its own class's
        self._setup(sums, np.bincount(labels[rows], minlength=n_classes), U[holdout], labels[holdout],
                    np.zeros(int(holdout.sum()), bool) if split else np.ones(int(holdout.sum()), bool),
                    "split" if split else "leave-one-out", false_alarm)

    @classmethod
    def from_sums(cls, sums: np.ndarray, counts: np.ndarray, features: np.ndarray, labels: np.ndarray,
                  in_sums: np.ndarray, false_alarm: float = FALSE_ALARM) -> OOD:
        """Prototypes from per-class sums of normalised features over every row a head learned
        (the ridge statistics keep them: runtime/ridge.py), calibrated on `features`: a row
        counted in the sums (`in_sums`) is scored against its class without itself, any other
        against the prototypes as they are (mode "statistics")."""
        out = cls.__new__(cls)
        out._setup(np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.int64), _unit(features),
                   np.asarray(labels, dtype=np.int64), np.asarray(in_sums, dtype=bool), "statistics", false_alarm)
        return out

    def _setup(self, sums, counts, U_cal, y_cal, in_sums, mode: str, false_alarm: float) -> None:
        if not 0 < false_alarm < 1:
            raise ValueError(f"false_alarm {false_alarm}: expected a share between 0 and 1")
        self.n_classes, self.false_alarm, self.mode = len(sums), false_alarm, mode
        self.sums, self.counts = sums, counts
        self.known = self.counts > 0
        self.prototypes = _unit(self.sums)
        self.calibration_rows = int(len(y_cal))
        self.threshold = conformal_threshold(self._calibration_scores(U_cal, y_cal, in_sums), false_alarm)

    def _calibration_scores(self, U: np.ndarray, y: np.ndarray, in_sums: np.ndarray) -> np.ndarray:
        """Each calibration row's score; a row inside its class's sum is scored without itself."""
        sims = U @ self.prototypes.T  # (n, C) against the full prototypes
        sims[:, ~self.known] = -np.inf
        loo = np.flatnonzero(in_sums)
        if len(loo):
            own = self.sums[y[loo]] - U[loo]  # each row's own class without it
            norms = np.linalg.norm(own, axis=1)
            sims[loo, y[loo]] = np.where(norms > 1e-12, np.einsum("ij,ij->i", U[loo], own) / np.maximum(norms, 1e-12),
                                         -np.inf)  # a class seen only in this row has no prototype left
        return 1.0 - sims.max(axis=1)

    def _leave_one_out(self, U: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row's score against the prototypes without itself (every row inside the sums)."""
        return self._calibration_scores(U, y, np.ones(len(y), bool))

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
        where = "the head's statistics" if self.mode == "statistics" else "replay features"
        out = {"score": f"1 - max cosine similarity to the class prototypes ({where})", "mode": self.mode,
               "threshold": None if math.isinf(self.threshold) else self.threshold,
               "false_alarm": self.false_alarm, "calibration_rows": self.calibration_rows,
               "prototype_rows": int(self.counts.sum()), "classes_without_prototype": missing}
        if math.isinf(self.threshold):
            need = math.ceil(1 / self.false_alarm) - 1
            out["note"] = (f"{self.calibration_rows} hold-out rows cannot set a {self.false_alarm:.0%} false-alarm "
                           f"threshold (at least {need} are needed): nothing is flagged")
        return out


def from_ridge_statistics(path: Path, manifest: dict, false_alarm: float = FALSE_ALARM) -> OOD | None:
    """The out-of-distribution scorer of a ridge head whose statistics keep per-class sums of
    normalised features: prototypes over every learned row, calibrated on every replay row
    (mode "statistics"). None when they keep none (statistics from before them):
    the caller falls back to the replay memory alone."""
    from . import ridge

    h = manifest["head"]
    stats_rel, replay_rel = h.get("statistics"), h.get("replay")
    if not (stats_rel and replay_rel and (path / stats_rel).is_file() and (path / replay_rel).is_file()):
        return None
    try:
        found = ridge.read_unit_sums(path / stats_rel)
    except (ValueError, KeyError, OSError):
        return None
    if found is None:
        return None
    sums, counts = found
    with np.load(path / replay_rel, allow_pickle=False) as z:
        hold = z["holdout"].astype(bool)
        seen = z["seen"].astype(bool) if "seen" in z.files else np.zeros(len(hold), bool)
        features, labels = z["features"], z["labels"].astype(np.int64)
    n = len(manifest["labels"])
    if len(sums) != n or not len(labels):
        return None
    return OOD.from_sums(sums, counts, features, labels, ~hold | seen, false_alarm)
