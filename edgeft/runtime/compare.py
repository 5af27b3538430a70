"""Compare a candidate's logits with a reference's on the same inputs: numbers and pass/fail checks.

numpy only: the build's parity gate (edgeft.parity) and `edgeft device check` use the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None = 1e-4  # None: not checked (quantized models differ by design)
    min_agreement: float = 1.0  # share of rows whose top-1 label is the reference's
    max_accuracy_drop: float | None = None  # in accuracy units (0.01 = 1 point)

    @classmethod
    def for_precision(cls, precision: str) -> Thresholds:
        if precision in ("fp32", "float32"):
            return cls()
        return cls(max_abs_diff=None, min_agreement=0.99, max_accuracy_drop=0.005)

    def override(self, **kw) -> Thresholds:
        values = asdict(self)
        values.update({k: v for k, v in kw.items() if v is not None})
        return Thresholds(**values)


def compare(reference: np.ndarray, candidate: np.ndarray, y: list[int] | None = None,
            labels: list[str] | None = None, items: list | None = None, worst: int = 5) -> dict:
    """Numbers that say how far `candidate` logits are from `reference` logits."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    diff = np.abs(reference - candidate)
    row_diff = diff.max(axis=1)
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    out = {
        "rows": int(len(reference)),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "agreement": float((ref_top == cand_top).mean()) if len(reference) else 1.0,
        "disagreements": int((ref_top != cand_top).sum()),
    }
    order = np.argsort(-row_diff)[:worst]
    out["worst"] = [
        {"row": int(i), "max_abs_diff": float(row_diff[i]),
         "reference": (labels[ref_top[i]] if labels else int(ref_top[i])),
         "candidate": (labels[cand_top[i]] if labels else int(cand_top[i])),
         **({"input": str(items[i])[:200]} if items is not None else {})}
        for i in order
    ]
    if y is not None:
        y = np.asarray(y)
        out["accuracy"] = float((cand_top == y).mean())
        out["reference_accuracy"] = float((ref_top == y).mean())
        out["accuracy_drop"] = out["reference_accuracy"] - out["accuracy"]
        names = labels or [str(i) for i in range(reference.shape[1])]
        out["per_class"] = {
            names[c]: {"support": int((y == c).sum()),
                       "accuracy": float((cand_top[y == c] == c).mean()) if (y == c).any() else None,
                       "reference_accuracy": float((ref_top[y == c] == c).mean()) if (y == c).any() else None}
            for c in range(len(names))
        }
    return out


def checks(report: dict, t: Thresholds) -> list[dict]:
    """One entry per check: name, passed, value, limit, message."""
    out = []
    if t.max_abs_diff is not None:
        v = report["max_abs_diff"]
        out.append({"name": "max_abs_diff", "passed": v <= t.max_abs_diff, "value": v, "limit": t.max_abs_diff,
                    "message": f"max |Δ logits| {v:.2e} (limit {t.max_abs_diff:.0e})"})
    v = report["agreement"]
    out.append({"name": "agreement", "passed": v >= t.min_agreement, "value": v, "limit": t.min_agreement,
                "message": f"top-1 agreement {v:.2%} (at least {t.min_agreement:.2%}; "
                           f"{report['disagreements']} of {report['rows']} rows differ)"})
    if t.max_accuracy_drop is not None and "accuracy_drop" in report:
        v = report["accuracy_drop"]
        out.append({"name": "accuracy_drop", "passed": v <= t.max_accuracy_drop + 1e-12, "value": v,
                    "limit": t.max_accuracy_drop,
                    "message": f"accuracy {report['accuracy']:.2%} vs reference {report['reference_accuracy']:.2%}: "
                               f"drop {100 * v:.2f} points (at most {100 * t.max_accuracy_drop:.2f})"})
    return out
