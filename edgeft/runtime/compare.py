"""Compare a candidate's logits with a reference's on the same inputs: numbers and pass/fail checks.

numpy only: the build's parity gate (edgeft.build, edgeft.quantize.gate) and `edgeft device check` use the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .stats import CONFIDENCE, parity_bounds, row_id, rows_needed, smallest_margin_rows


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
            labels: list[str] | None = None, items: list | None = None, worst: int = 5, *,
            labelled=None, examples: bool = True, confidence: float = CONFIDENCE) -> dict:
    """Numbers that say how far `candidate` logits are from `reference` logits, with their
    one-sided confidence bounds (edgeft.runtime.stats) and the rows closest to flipping.

    `y`: label indices, None for an unlabelled row (or None for none); `labelled`: a mask of
    the rows whose labels may judge accuracy (rows the model did not train on). Rows are
    named by index and a hash of their input; `examples=False` leaves the input text out.
    """
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
    name = lambda k: labels[k] if labels else int(k)  # noqa: E731

    def row(i: int) -> dict:
        return {"row": int(i), **({"id": row_id(items[i])} if items is not None else {}),
                **({"input": str(items[i])[:200]} if items is not None and examples else {})}

    order = np.argsort(-row_diff)[:worst]
    out["worst"] = [{**row(i), "max_abs_diff": float(row_diff[i]), "reference": name(ref_top[i]),
                     "candidate": name(cand_top[i])} for i in order]
    out["bounds"] = parity_bounds(reference, candidate, y, labelled=labelled, confidence=confidence)
    out["smallest_margin"] = [{**row(r["row"]), "margin": r["margin"], "flipped": r["flipped"],
                               "reference": name(ref_top[r["row"]]), "candidate": name(cand_top[r["row"]])}
                              for r in smallest_margin_rows(reference, candidate, worst)]
    if y is not None:
        y = np.array([-1 if v is None else int(v) for v in y])
        keep = y >= 0
        if labelled is not None:
            keep &= np.asarray(labelled, dtype=bool)
        if not keep.any():
            return out
        y, ref_top, cand_top = y[keep], ref_top[keep], cand_top[keep]
        out["labelled_rows"] = int(keep.sum())
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


def checks(report: dict, t: Thresholds, certify: bool = False) -> list[dict]:
    """One entry per check: name, passed, value, limit, message (and the bound it rests on).

    certify=False judges the point figures (a device re-running a few reference rows);
    certify=True (a gate: build, quantize, verify) judges agreement below 100% on its one-sided
    lower bound, so too few rows cannot pass, and the message says how many would. The
    accuracy drop is judged on its point figure with its upper bound reported beside it:
    certifying half a point takes 598 labelled unseen rows without a harmful flip, more than
    most validation sets hold (the agreement bound already caps the drop: a drop needs a
    flip, so the drop is at most 1 - the agreement bound).
    """
    out = []
    b = report.get("bounds")
    n = report["rows"]
    if t.max_abs_diff is not None:
        v = report["max_abs_diff"]
        out.append({"name": "max_abs_diff", "passed": v <= t.max_abs_diff, "value": v, "limit": t.max_abs_diff,
                    "message": f"max |Δ logits| {v:.2e} (limit {t.max_abs_diff:.1e}) on {n} rows"})
    v = report["agreement"]
    entry = {"name": "agreement", "passed": v >= t.min_agreement, "value": v, "limit": t.min_agreement,
             "message": f"top-1 agreement {v:.2%} (at least {t.min_agreement:.2%}; "
                        f"{report['disagreements']} of {n} rows differ)"}
    if b is not None:
        low = b["agreement_lower"]
        entry["bound"] = low
        entry["message"] += f"; at least {low:.2%} at {b['confidence']:.0%} confidence"
        if certify and t.min_agreement < 1.0:
            entry["passed"] = low >= t.min_agreement - 1e-12
            if not entry["passed"]:
                need = rows_needed(t.min_agreement, report["disagreements"], b["confidence"])
                entry["rows_needed"] = need
                entry["message"] += (f", which cannot certify {t.min_agreement:.2%}: "
                                     + (f"{need} rows with no further flip would ({need - n} more; "
                                        "pass unlabelled inputs with --parity-data)" if need and need > n else
                                        "more rows would not help, the flips are too many"))
    out.append(entry)
    if t.max_accuracy_drop is not None and "accuracy_drop" in report:
        v = report["accuracy_drop"]
        entry = {"name": "accuracy_drop", "passed": v <= t.max_accuracy_drop + 1e-12, "value": v,
                 "limit": t.max_accuracy_drop,
                 "message": f"accuracy {report['accuracy']:.2%} vs reference {report['reference_accuracy']:.2%}: "
                            f"drop {100 * v:.2f} points (at most {100 * t.max_accuracy_drop:.2f}) on "
                            f"{report.get('labelled_rows', n)} labelled rows"}
        if b is not None and b.get("accuracy_drop_upper") is not None:
            entry["bound"] = b["accuracy_drop_upper"]
            entry["message"] += (f"; at most {100 * b['accuracy_drop_upper']:.2f} points at "
                                 f"{b['confidence']:.0%} confidence ({b['harmful_flips']} harmful flips)")
        out.append(entry)
    return out
