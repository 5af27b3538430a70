"""`edgeft verify`: an exported artifact against its PyTorch reference, as a CI gate.

Runs both on the same labelled rows, checks the thresholds (fp32: max |Δ logits| <= 1e-4 and
100% top-1 agreement; quantized: agreement >= 99% and accuracy drop <= 1 point), and writes
the figures as JSON and JUnit XML. The caller exits 1 when a check fails.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .errors import UsageError
from .results import VerifyReport
from .runtime import atomic
from .runtime.bundle import Bundle
from .runtime.compare import Thresholds, checks, compare
from .runtime.manifest import MANIFEST
from .runtime.preprocess import load_preprocessor
from .runtime.session import OnnxModel

BATCH = 16
FLOAT64_ROWS = 128  # rows of the float64 run that sets the fp32 |Δ logits| limit (edgeft/float32.py)


def open_artifact(artifact: Path, ref_pre, public_key=None):
    """(run(items) -> logits, precision, labels, description, modality) for an export folder, an
    .onnx file or a bundle; modality is None for a bare .onnx file run with `ref_pre`."""
    if artifact.is_dir() and (artifact / MANIFEST).exists():
        bundle = Bundle(artifact, public_key=public_key)  # signature and hashes before anything runs
        m = bundle.manifest
        return (lambda items: bundle.logits(items, BATCH)), m["precision"], m["labels"], "bundle", m["modality"]
    if artifact.is_file():
        if artifact.suffix != ".onnx":
            raise UsageError(f"{artifact}: expected an .onnx file, a folder from edgeft export, or a bundle.")
        onnx_path, pre_dir = artifact, artifact.parent if (artifact.parent / "preprocessor.json").exists() else None
    elif (artifact / "model.onnx").exists():
        onnx_path, pre_dir = artifact / "model.onnx", artifact
    else:
        raise UsageError(f"{artifact}: no model.onnx or manifest.json here; expected a folder from edgeft export, a bundle or an .onnx file.")
    model = OnnxModel(onnx_path)
    meta = model.metadata()
    pre, modality = ref_pre, None
    if pre_dir is not None:
        spec = json.loads((pre_dir / "preprocessor.json").read_text())
        pre, modality = load_preprocessor(pre_dir, spec), "text" if "max_length" in spec else "image"

    def run(items):
        return np.concatenate([model(pre(items[i : i + BATCH]))["logits"] for i in range(0, len(items), BATCH)])

    return run, meta.get("precision", "fp32"), meta.get("labels"), "onnx", modality


def verify(artifact: str | Path, reference: str | Path, data: str | Path, *, text_column="text",
           label_column="label", max_abs_diff=None, min_agreement=None, max_accuracy_drop=None,
           limit: int | None = None, public_key=None, parity_data: str | Path | None = None,
           certify: bool = False) -> VerifyReport:
    """`data`: labelled rows (accuracy and agreement); `parity_data`: more inputs, labels
    optional, that judge agreement (edgeft.certify.parity_inputs). Every figure carries its
    one-sided 95% bound (edgeft.runtime.stats); with `certify`, agreement below 100% is judged
    on its lower bound, so too few rows cannot pass and the message says how many would."""
    from .certify import Rows, parity_inputs
    from .runs import load_labelled, load_model, predict_logits
    from .runtime.stats import stratified

    t0 = time.perf_counter()
    artifact = Path(artifact)
    ref = load_model(reference)
    run, precision, artifact_labels, kind, _ = open_artifact(artifact, ref.pre, public_key)
    ds = load_labelled(data, ref, text_column, label_column)
    index = {n: i for i, n in enumerate(ref.labels)}
    pick = stratified(ds.labels, limit) if limit else range(len(ds))  # across classes, never the head
    rows = Rows()
    rows.add([ds.items[i] for i in pick], [index[ds.labels[i]] for i in pick], "data")
    if parity_data is not None:
        extra, names = parity_inputs(parity_data, ref.spec.modality, text_column)
        rows.add(extra, [index.get(n) if n is not None else None for n in names], "parity-data")
    items = rows.items
    t = Thresholds.for_precision(precision).override(
        max_abs_diff=max_abs_diff, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)

    ref_logits = predict_logits(ref.model, ref.pre, items, batch_size=BATCH).numpy()
    limit = None
    if t.max_abs_diff is not None and max_abs_diff is None:  # fp32 by default: float32's reach, not 1e-4
        from .float32 import tolerance

        n = min(len(items), FLOAT64_ROWS)
        limit = tolerance(ref.model, ref.pre, items[:n], ref_logits[:n])
        t = t.override(max_abs_diff=limit)
    t1 = time.perf_counter()
    got = run(items)
    candidate_seconds = time.perf_counter() - t1
    figures = compare(ref_logits, got, rows.labels(), ref.labels, items)
    found = checks(figures, t, certify=certify)
    artifact_labels = artifact_labels or ref.labels
    found.insert(0, {"name": "labels", "passed": artifact_labels == ref.labels, "value": artifact_labels,
                     "limit": ref.labels, "message": "labels and their order match the reference"
                     if artifact_labels == ref.labels else f"artifact labels {artifact_labels} != reference {ref.labels}"})
    return VerifyReport(
        figures=figures, sources=rows.counts(), artifact=str(artifact), kind=kind, reference=str(reference),
        data=str(data), parity_data=str(parity_data) if parity_data is not None else None, certified=certify,
        precision=precision, thresholds=dict(t.__dict__), checks=found, passed=all(c["passed"] for c in found),
        candidate_ms_per_row=round(1000 * candidate_seconds / max(len(items), 1), 3),
        seconds=round(time.perf_counter() - t0, 3))


def write_junit(rep: VerifyReport, path: str | Path) -> None:
    """One test case per check; a failed check is a <failure> with its numbers."""
    report = rep.to_json()
    suite = ET.Element("testsuite", name="edgeft.verify", tests=str(len(report["checks"])),
                       failures=str(sum(not c["passed"] for c in report["checks"])), errors="0",
                       time=f"{report['seconds']:.3f}")
    props = ET.SubElement(suite, "properties")
    for key in ("artifact", "reference", "data", "precision", "rows"):
        ET.SubElement(props, "property", name=key, value=str(report[key]))
    b = report.get("bounds") or {}
    for key in ("confidence", "agreement_lower", "accuracy_drop_upper", "labelled_rows", "flips", "harmful_flips"):
        if b.get(key) is not None:
            ET.SubElement(props, "property", name=key, value=str(b[key]))
    for c in report["checks"]:
        case = ET.SubElement(suite, "testcase", classname="edgeft.verify", name=c["name"], time="0")
        if not c["passed"]:
            ET.SubElement(case, "failure", message=c["message"], type="ParityError").text = (
                f"value {c['value']!r}, limit {c['limit']!r}")
        else:
            ET.SubElement(case, "system-out").text = c["message"]
    atomic.write_bytes(path, ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True))


def table(rep: VerifyReport) -> str:
    report = rep.to_json()
    conf = (report.get("bounds") or {}).get("confidence", 0.95)
    lines = [f"{'check':<15} {'value':>12} {f'{conf:.0%} bound':>12} {'limit':>12}  result"]
    for c in report["checks"]:
        bound = "-"
        if c["name"] == "labels":
            v, lim = "-", "-"
        elif c["name"] == "max_abs_diff":
            v, lim = f"{c['value']:.2e}", f"{c['limit']:.0e}"
        else:
            v, lim = f"{100 * c['value']:.2f}%", f"{100 * c['limit']:.2f}%"
            bound = f"{100 * c['bound']:.2f}%" if c.get("bound") is not None else "-"
        lines.append(f"{c['name']:<15} {v:>12} {bound:>12} {lim:>12}  {'pass' if c['passed'] else 'FAIL'}")
    judged = " + ".join(f"{n} {s}" for s, n in (report.get("sources") or {}).items())
    lines.append(f"accuracy {report['accuracy']:.4f} (reference {report['reference_accuracy']:.4f}) on "
                 f"{report.get('labelled_rows', report['rows'])} labelled rows  mean |Δ| {report['mean_abs_diff']:.2e}  "
                 f"rows {report['rows']}{f' ({judged})' if judged else ''}  precision {report['precision']}")
    for c in report["checks"]:
        if c.get("rows_needed"):
            lines.append(f"{c['name']}: {c['rows_needed']} rows with no further flip would certify "
                         f"{100 * c['limit']:.2f}% (--parity-data adds unlabelled inputs)")
    return "\n".join(lines)
