"""The parity gate: a candidate backbone is judged by head(backbone(x)) against reference logits.

`prepare_gate` is the one set-up, used by `edgeft quantize` (reference: the fp32 export) and
`edgeft build` (reference: PyTorch); `select_rows` is the one place that picks the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..runtime.compare import Thresholds, checks, compare

log = logging.getLogger(__name__)

# How many rows judge a candidate, per step. Batch 1 each for text: what a device sees, and no
# batch-mates moving dynamic int8's activation scales.
ROWS = {"quantize": 1000, "build": 512}
# images are decoded per use; quantize's 1,000 one at a time, build's 512 in batches of 16
IMAGE_BATCH = {"quantize": 1, "build": 16}
VERDICT = ("agreement", "accuracy_drop", "bytes", "failed")  # what a result keeps of an attempt it replaced


def file_bytes(path: Path) -> int:
    """A model's size on disk: an OpenVINO IR is the .xml and its .bin."""
    path = Path(path)
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.exists() else 0)


class Gate:
    """A candidate backbone (ONNX file) -> the parity checks of head(backbone(x)) against reference
    logits on fixed rows. `batches`: preprocessed input dicts, in the order of `reference`."""

    def __init__(self, reference: np.ndarray, y: list[int] | None, labels: list[str], batches, head,
                 thresholds: Thresholds, open_model=None, items: list | None = None, certify: bool = False):
        self.reference, self.y, self.labels, self.head, self.thresholds = reference, y, labels, head, thresholds
        self.certify = certify  # judge agreement on its one-sided lower bound (runtime.compare.checks)
        self.open_model = open_model  # path -> model(arrays) -> {"features"}; None: onnxruntime
        self.batches = batches  # a list, or a callable giving a fresh iterable (images: decoded per use)
        self.items = items  # the raw rows, in the order of `reference`

    def iter_batches(self) -> Iterable[dict[str, np.ndarray]]:
        return self.batches() if callable(self.batches) else self.batches

    def logits(self, model) -> np.ndarray:
        return np.concatenate([self.head({"features": model(a)["features"]})["logits"] for a in self.iter_batches()])

    def __call__(self, path: Path, label: str | None = None) -> dict:
        """The verdict on the model at `path`; logged as `label` when given."""
        from ..runtime.session import OnnxModel

        model = (self.open_model or OnnxModel)(path)
        rep = compare(self.reference, self.logits(model), self.y, self.labels)
        found = checks(rep, self.thresholds, certify=self.certify)
        verdict = {"passed": all(c["passed"] for c in found), "agreement": rep["agreement"],
                   "accuracy_drop": rep.get("accuracy_drop"), "bytes": file_bytes(path),
                   "failed": [c["message"] for c in found if not c["passed"]],
                   "rows": rep["rows"], "bounds": rep["bounds"]}
        if label:
            log.info("%s: agreement %.2f%% on %d rows (at least %.2f%% at 95%%), accuracy drop %.2f points%s", label,
                     100 * verdict["agreement"], rep["rows"], 100 * rep["bounds"]["agreement_lower"],
                     100 * (verdict["accuracy_drop"] or 0.0), "" if verdict["passed"] else " (misses the budget)")
        return verdict


def select_rows(ds, labels: list[str], n: int) -> tuple[list, list[int] | None]:
    """The rows that judge: up to `n` of `ds` drawn across classes (seeded; never the head of a
    file), with their label indices (None unless all are labelled)."""
    from ..runtime.stats import stratified

    pick = stratified(ds.labels, n)
    items, names = [ds.items[i] for i in pick], [ds.labels[i] for i in pick]
    if not all(v is not None for v in names):
        return items, None
    index = {name: i for i, name in enumerate(labels)}
    return items, [index[v] for v in names]


def prepare_gate(step: str, ds, labels: list[str], pre, head, thresholds: Thresholds, *, modality: str,
                 reference: Callable[[list, Iterable[dict]], np.ndarray], open_model=None,
                 rows: tuple[list, list | None] | None = None, certify: bool = False) -> Gate:
    """The gate of `step` ("quantize" or "build") on rows of `ds` (or on `rows`, (items, label
    indices or None), drawn by the caller: edgeft.certify.judging_rows): `reference(items, batches)`
    gives the logits every candidate is judged against, computed once."""
    items, y = rows if rows is not None else select_rows(ds, labels, ROWS[step])
    if modality == "text":
        # one text per call, as a device answers them: dynamic int8 takes its activation scales
        # from the whole batch, padding included, so batch-mates would move the answers judged.
        # Token rows are small: keep them for every candidate.
        batches = [pre(items[i : i + 1]) for i in range(len(items))]
    else:
        size = IMAGE_BATCH[step]
        batches = lambda: (pre(items[i : i + size]) for i in range(0, len(items), size))  # noqa: E731
    gate = Gate(None, y, labels, batches, head, thresholds, open_model=open_model, items=items, certify=certify)
    gate.reference = reference(items, gate.iter_batches())
    return gate


def describe_miss(result: dict) -> str:
    """One line: why a variant missed its budget, with the search's numbers."""
    text = f"{result['mode']}: " + ", ".join(result.get("failed") or ["failed"])
    s = result.get("search")
    if s and "nodes" in s:
        text += (f" even with {len(result.get('kept_float') or [])} of {s['nodes']} nodes kept in float "
                 f"(the search stops at {s['max_float']})")
    elif s:
        text += f" even after {s['method']} reverted {s['reverted']} of {s['quantizers']} quantizers to float"
    return text
