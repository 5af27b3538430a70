"""The rows a parity gate judges on, and where each came from.

Agreement with the reference needs no label, so a gate can judge every row calibration did
not see: the validation (or --data) rows, the training rows not drawn for calibration, and
the user's unlabelled inputs (--parity-data). Accuracy needs labels and rows the model did
not train on: only validation/--data rows and labelled --parity-data rows judge it. Training
rows fit the model, so their answers tend to have wide margins: they make agreement look
better than on new inputs, and every report counts them apart (`sources`).

Rows are drawn stratified across classes and seeded (edgeft.runtime.stats.stratified),
never the head of a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .runtime.stats import CONFIDENCE, cover_classes, margins, rows_needed, stratified

MAX_ROWS = 5000  # per source; more rarely moves a bound and costs build time
CALIBRATION_ROWS = 300  # NNCF's recipe calibrates on 300; MinMax ranges rarely move beyond
CALIBRATION_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Rows:
    """Judging rows: items, label indices (None: unlabelled or not to judge accuracy), source tags."""

    items: list = field(default_factory=list)
    y: list = field(default_factory=list)
    source: list = field(default_factory=list)  # "validation", "training", "parity-data" per row

    def add(self, items, y, tag: str) -> None:
        self.items += list(items)
        self.y += list(y)
        self.source += [tag] * len(items)

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int] | None:
        """Label indices with None for rows that do not judge accuracy; None when no row does."""
        return self.y if any(v is not None for v in self.y) else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.source:
            out[s] = out.get(s, 0) + 1
        return out

    def describe(self) -> str:
        return " + ".join(f"{n} {s}" for s, n in self.counts().items()) or "no rows"


def parity_inputs(path: str | Path, modality: str, text_column: str = "text"):
    """Unlabelled (or labelled) inputs for --parity-data: a .txt file (one text or image path
    a line), a CSV/JSONL (labels optional), or a folder of images (class sub-folders optional).
    Returns (items, label names or None per row)."""
    from .data import load_dataset

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (--parity-data).")
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        items = [ln for ln in lines if ln]
        if not items:
            raise DataError(f"{path}: no inputs in it (one per line) (--parity-data).")
        if modality == "image":
            missing = [x for x in items if not (path.parent / x).is_file() and not Path(x).is_file()]
            if missing:
                raise DataError(f"{path}: line naming {missing[0]!r}: no such image (--parity-data).")
            items = [str(path.parent / x) if (path.parent / x).is_file() else x for x in items]
        return items, [None] * len(items)
    if path.is_dir() and modality == "image" and not any(d.is_dir() for d in path.iterdir()):
        items = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise DataError(f"{path}: no images (jpg, png, bmp, webp) in it (--parity-data).")
        return items, [None] * len(items)
    ds = load_dataset(path, text_column, require_labels=False)
    if ds.kind != modality:
        raise DataError(f"{path}: {ds.kind} inputs, but the model takes {modality} (--parity-data).")
    return ds.items, list(ds.labels)


def reference_rows(reference_logits: np.ndarray, n: int, smallest: int | None = None, seed: int = 0) -> list[int]:
    """Indices of the rows a bundle carries for `device check`: the `smallest` rows closest to
    flipping (smallest fp32 margin: where a device's kernels would first change an answer),
    then rows of every class the reference answers, round-robin."""
    smallest = max(1, n // 4) if smallest is None else smallest
    order = np.argsort(margins(reference_logits), kind="stable")[:smallest]
    return cover_classes(np.asarray(reference_logits).argmax(1).tolist(), n, first=order.tolist(), seed=seed)


def calibration_items(ds, n: int = CALIBRATION_ROWS, *, shared: bool = False, seed: int = CALIBRATION_SEED) -> list:
    """The rows that calibrate (and rank nodes for the search): up to `n` of `ds` drawn across
    classes, seeded (unlabelled rows form one group, drawn at random), never the head of a file.
    `shared`: `ds` must also judge (no other rows are left to calibrate on): then at most half
    of it calibrates, so the other half judges (judging_rows leaves the drawn rows out).
    `edgeft quantize` and `edgeft build` both draw here."""
    if ds is None or n <= 0:
        return []
    limit = min(n, len(ds) // 2) if shared else n
    return [ds.items[i] for i in stratified(list(ds.labels), limit, seed)]


def describe_calibration(items: list, ds, shared: bool) -> dict:
    """What quantize.json and the build's manifest say of the calibration rows."""
    return {"data": ds.source, "rows": len(items), "of": len(ds),
            "drawn": f"stratified across classes, seed {CALIBRATION_SEED}",
            **({"shared": "the other rows of this file judge"} if shared else {})}


def judging_rows(labels: list[str], *, held_out=None, training=None, calibrated: set | None = None,
                 parity_data=None, modality: str, seed: int = 0, max_rows: int = MAX_ROWS,
                 text_column: str = "text") -> Rows:
    """Every row calibration did not use, drawn stratified per source (up to `max_rows` each).

    held_out: the validation and/or --data Datasets (labelled, judge accuracy), each alone or as
    (tag, Dataset) to name its source (default "validation"); training: the training Dataset,
    whose rows judge agreement only; rows whose items are in `calibrated` are left out of both;
    parity_data: a path for parity_inputs (labels, where present and known, judge accuracy)."""
    index = {n: i for i, n in enumerate(labels)}
    rows = Rows()
    calibrated = calibrated or set()
    seen: set = set()
    for entry in (held_out if isinstance(held_out, list) else [held_out]):
        tag, ds = entry if isinstance(entry, tuple) else ("validation", entry)
        if ds is None:
            continue
        free = [i for i, x in enumerate(ds.items) if x not in calibrated and x not in seen]
        pick = [free[j] for j in stratified([ds.labels[i] for i in free], max_rows, seed)]
        seen.update(ds.items[i] for i in pick)
        rows.add([ds.items[i] for i in pick], [index.get(ds.labels[i]) for i in pick], tag)
    if training is not None:
        free = [i for i, x in enumerate(training.items) if x not in calibrated and x not in seen]
        pick = [free[j] for j in stratified([training.labels[i] for i in free], max_rows, seed)]
        rows.add([training.items[i] for i in pick], [None] * len(pick), "training")
    if parity_data is not None:
        items, names = parity_inputs(parity_data, modality, text_column)
        pick = stratified([n if n in index else None for n in names], max_rows, seed)
        rows.add([items[i] for i in pick], [index.get(names[i]) if names[i] is not None else None for i in pick],
                 "parity-data")
    return rows


def too_few(rows: Rows, min_agreement: float, confidence: float = CONFIDENCE) -> int | None:
    """The rows a gate needs to certify `min_agreement` even with no flip, when `rows` has fewer
    (None when it has enough, or when the budget is 100%: judged on every row, no bound)."""
    if min_agreement >= 1.0:
        return None
    need = rows_needed(min_agreement, 0, confidence)
    return need if need is not None and len(rows) < need else None


def refusal(where, rows: Rows, min_agreement: float, need: int) -> str:
    """The one line of a gate that has too few rows to certify its budget."""
    return (f"{where}: {len(rows)} rows to judge ({rows.describe()}) cannot certify {min_agreement:.2%} agreement "
            f"at {CONFIDENCE:.0%} confidence: that takes at least {need} rows with no flip ({need - len(rows)} more). "
            "Pass unlabelled inputs with --parity-data FILE (one per line), or judge the point estimate knowingly "
            "with --uncertified.")


def holds(rel: str, keep_examples: bool = False) -> str:
    """What kind of data a bundle file holds, for the manifest (issue: what a bundle reveals)."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("heads/") or name.startswith("backbone") or rel.endswith((".onnx", ".ort", ".xml", ".bin")):
        return "model weights (trained on the training rows)"
    if rel.startswith("replay/"):
        return "features and labels of training and validation rows (derived data: not the rows, but from them)"
    if rel == "reference/inputs.npz":
        return ("examples: preprocessed rows of the owner's data (token ids map back to text, pixels are the "
                "images), for device check (--keep-examples)" if keep_examples else
                "synthetic inputs made by edgeft (random token ids over the vocabulary, or noise images), "
                "for device check: no rows of the owner's data")
    if rel == "reference/outputs.npz":
        return "statistics: the model's outputs and features of the reference inputs at build"
    if rel == "reference/items.json":
        return ("examples: the reference rows' texts or image names" if keep_examples
                else "the synthetic reference inputs' numbers only")
    if rel == "parity.json":
        return ("statistics of the parity check, with example inputs" if keep_examples
                else "statistics of the parity check; rows by index and hash")
    if name in ("tokenizer.json", "preprocessor.json"):
        return "preprocessing (vocabulary, sizes, normalisation)"
    return "other"
