"""`edgeft compare A B --data DATA`: two models on the same labelled rows, with significance.

Each side is a run or model directory (PyTorch), an export folder or .onnx file, or a bundle
(run as a device runs it). Both answer the same rows, so the comparison is paired:

- McNemar's exact test on the discordant pairs: b rows only A gets right, c rows only B gets
  right; under "equally accurate" each discordant row is a fair coin, so the two-sided p-value
  is min(1, 2 P(X <= min(b, c))) for X ~ Binomial(b + c, 1/2) (exact at any sample size, where
  the chi-squared form needs b + c of 25 or more).
- A confidence interval on the accuracy difference B - A: Newcombe's hybrid score interval for
  paired proportions (Newcombe 1998, method 10): Wilson intervals for each accuracy, combined
  with the correlation of the paired answers. It stays inside [-1, 1] and keeps its coverage
  where the Wald interval does not (few rows, accuracies near 1).
- Per-class recall of each side and its difference, and a verdict line.

`--require better` (B significantly more accurate) or `--require not-worse --margin M` (the
interval's lower end above -M) make it a CI gate: exit 1 when the requirement fails.
"""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .runtime import atomic
from .runtime.manifest import MANIFEST
from .runtime.stats import binomial_cdf

REQUIREMENTS = ("none", "better", "not-worse")
Z95 = 1.959963984540054  # two-sided 95%


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf(min(b, c), n, 0.5))


def z_for(confidence: float) -> float:
    """The two-sided normal quantile for `confidence` (by bisection on erf: no scipy on the device)."""
    if not 0.5 < confidence < 1.0:
        raise UsageError(f"confidence {confidence}: expected a number between 0.5 and 1.")
    target, lo, hi = (1 + confidence) / 2, 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends where rounding leaves 1e-16


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval (method 10) for accuracy(B) - accuracy(A) from the 2x2 paired table:
    a both right, b only A right, c only B right, d both wrong."""
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + c) / n, (a + b) / n  # accuracy of B, of A
    l1, u1 = wilson(a + c, n, z)
    l2, u2 = wilson(a + b, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lower), min(1.0, upper)


@dataclass
class Side:
    path: str
    kind: str  # "pytorch", "onnx", "bundle"
    labels: list[str]
    modality: str  # "text" or "image"
    predict: object  # items -> logits (n, C) in `labels` order


def open_side(path: str | Path, public_key=None) -> Side:
    """A run or model directory, an export folder or .onnx file (verify.open_artifact), or a bundle, as a predictor."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such run, model, export or bundle.")
    is_onnx = path.suffix == ".onnx" if path.is_file() else (path / "model.onnx").is_file()
    if (path.is_dir() and (path / MANIFEST).exists()) or is_onnx:
        from .verify import open_artifact

        folder = path.parent if path.is_file() else path
        if is_onnx and not (folder / "preprocessor.json").exists():
            raise UsageError(f"{path}: no preprocessor.json beside it; compare an edgeft export folder.")
        run, _, labels, kind, modality = open_artifact(path, None, public_key)
        if not labels:
            raise UsageError(f"{path}: its metadata names no labels; compare an edgeft export folder.")
        return Side(str(path), kind, list(labels), modality, run)
    if path.is_file():
        raise UsageError(f"{path}: expected a run or model directory, an export folder, an .onnx file or a bundle.")
    from .runs import load_model, predict_logits

    loaded = load_model(path)
    return Side(str(path), "pytorch", list(loaded.labels), loaded.spec.modality,
                lambda items: predict_logits(loaded.model, loaded.pre, items).numpy())


def _answers(side: Side, items: list, labels: list[str]) -> np.ndarray:
    """`side`'s top-1 answers as indices into `labels` (the two sides may order classes differently)."""
    pos = {n: i for i, n in enumerate(labels)}
    own = np.asarray(side.predict(items)).argmax(1)
    return np.array([pos[side.labels[j]] for j in own])


def compare(a: str | Path, b: str | Path, data: str | Path, *, text_column: str = "text",
            label_column: str = "label", confidence: float = 0.95, require: str = "none",
            margin: float = 0.0, public_key=None) -> dict:
    """The paired comparison of B against A on `data`'s labelled rows; report["passed"] says
    whether `require` holds."""
    from .runtime.dataset import load_dataset

    if require not in REQUIREMENTS:
        raise UsageError(f"--require {require!r}: expected one of {', '.join(REQUIREMENTS)}.")
    if not 0 <= margin < 1:
        raise UsageError(f"--margin {margin}: expected accuracy units between 0 and 1 (0.005 = half a point).")
    z = z_for(confidence)
    t0 = time.perf_counter()
    side_a, side_b = open_side(a, public_key), open_side(b, public_key)
    if sorted(side_a.labels) != sorted(side_b.labels):
        raise UsageError(f"{b}: its classes {side_b.labels} are not {a}'s {side_a.labels}; "
                         "an A/B comparison needs the same classes.")
    labels = side_a.labels
    ds = load_dataset(data, text_column, label_column)
    pos = {n: i for i, n in enumerate(labels)}
    for side in (side_a, side_b):
        if side.modality != ds.kind:
            raise DataError(f"{data}: {ds.kind} rows, but {side.path} takes {side.modality} inputs.")
    for i, name in enumerate(ds.labels):
        if name not in pos:
            where = f"line {ds.lines[i]}: " if ds.lines else ""
            raise DataError(f"{data}: {where}label {name!r} is not one of the models' classes ({', '.join(labels)}).")
    y = np.array([pos[n] for n in ds.labels])
    ra = _answers(side_a, ds.items, labels) == y
    rb = _answers(side_b, ds.items, labels) == y
    both, only_a, only_b, neither = (int(np.sum(ra & rb)), int(np.sum(ra & ~rb)), int(np.sum(~ra & rb)),
                                     int(np.sum(~ra & ~rb)))
    n = len(y)
    p = mcnemar_exact(only_a, only_b)
    lo, hi = paired_difference_interval(both, only_a, only_b, neither, z)
    alpha = 1 - confidence
    diff = float(rb.mean() - ra.mean())
    if p < alpha:
        verdict = "B is more accurate than A" if diff > 0 else "B is less accurate than A"
    else:
        verdict = "no significant difference"
    passed = {"none": True, "better": p < alpha and diff > 0, "not-worse": lo >= -margin - 1e-12}[require]
    per_class = []
    for c, name in enumerate(labels):
        m = y == c
        if m.any():
            rec_a, rec_b = float(ra[m].mean()), float(rb[m].mean())
            per_class.append({"label": name, "rows": int(m.sum()), "recall_a": rec_a, "recall_b": rec_b,
                              "difference": rec_b - rec_a})
    return {
        "a": {"path": side_a.path, "kind": side_a.kind, "accuracy": float(ra.mean())},
        "b": {"path": side_b.path, "kind": side_b.kind, "accuracy": float(rb.mean())},
        "data": str(data), "rows": n,
        "table": {"both_right": both, "only_a_right": only_a, "only_b_right": only_b, "both_wrong": neither},
        "difference": diff, "confidence": confidence,
        "interval": [lo, hi], "interval_method": "Newcombe (1998) hybrid score, paired",
        "mcnemar_p": p, "test": "McNemar exact (two-sided binomial on the discordant rows)",
        "verdict": verdict, "require": require, "margin": margin, "passed": passed,
        "per_class": per_class, "seconds": round(time.perf_counter() - t0, 3),
    }


def requirement_message(report: dict) -> str:
    r, lo = report["require"], report["interval"][0]
    if r == "better":
        return (f"B is not significantly more accurate than A (McNemar p {report['mcnemar_p']:.3g}, "
                f"difference {100 * report['difference']:+.2f} points)")
    return (f"B may be worse than A by more than {100 * report['margin']:.2f} points: the interval's lower end "
            f"is {100 * lo:+.2f} points")


def table(report: dict) -> str:
    t, conf = report["table"], report["confidence"]
    lo, hi = report["interval"]
    lines = [f"A {report['a']['path']} ({report['a']['kind']})  accuracy {report['a']['accuracy']:.2%}",
             f"B {report['b']['path']} ({report['b']['kind']})  accuracy {report['b']['accuracy']:.2%}",
             f"{report['rows']} rows: both right {t['both_right']}, only A {t['only_a_right']}, "
             f"only B {t['only_b_right']}, both wrong {t['both_wrong']}",
             f"B - A {100 * report['difference']:+.2f} points, {conf:.0%} interval [{100 * lo:+.2f}, {100 * hi:+.2f}]  "
             f"McNemar exact p {report['mcnemar_p']:.3g}",
             f"{'class':<20} {'rows':>5} {'recall A':>9} {'recall B':>9} {'B - A':>8}"]
    for c in report["per_class"]:
        lines.append(f"{c['label'][:20]:<20} {c['rows']:>5} {c['recall_a']:>9.2%} {c['recall_b']:>9.2%} "
                     f"{100 * c['difference']:>+7.1f}")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def write_junit(report: dict, path: str | Path) -> None:
    """One test case (the requirement); a failed requirement is a <failure> with its numbers."""
    failed = not report["passed"]
    suite = ET.Element("testsuite", name="edgeft.compare", tests="1", failures=str(int(failed)), errors="0",
                       time=f"{report['seconds']:.3f}")
    props = ET.SubElement(suite, "properties")
    for key, value in (("a", report["a"]["path"]), ("b", report["b"]["path"]), ("data", report["data"]),
                       ("rows", report["rows"]), ("difference", report["difference"]),
                       ("interval_lower", report["interval"][0]), ("interval_upper", report["interval"][1]),
                       ("mcnemar_p", report["mcnemar_p"]), ("require", report["require"])):
        ET.SubElement(props, "property", name=key, value=str(value))
    case = ET.SubElement(suite, "testcase", classname="edgeft.compare", name=f"require-{report['require']}", time="0")
    if failed:
        ET.SubElement(case, "failure", message=requirement_message(report), type="ComparisonError").text = report["verdict"]
    else:
        ET.SubElement(case, "system-out").text = report["verdict"]
    atomic.write_bytes(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))
