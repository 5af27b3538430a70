"""`device predict --collect DIR`: keep the inputs flagged unknown, for a technician to label.

The start of the field loop that `device retrain` closes. DIR/unknown.csv gets one row per
flagged input, in the layout `device retrain --data` reads: a text (or, for images, a `path`
relative to DIR, the image copied into DIR/images/ under its content hash) and an empty `label`
column to fill in, then what the bundle answered (`predicted`, `ood_score`) and when
(`collected`, UTC). An input already in the file is not added again. The file is rewritten
whole through a temporary file and a rename, so a killed predict leaves the old file or the
new one, never half a row. Label the rows, delete the ones not to learn, then
`edgeft device retrain BUNDLE --data DIR/unknown.csv [--add-classes]`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import time
from pathlib import Path

from ..errors import DataError
from . import atomic

FILE = "unknown.csv"
EXTRA = ("predicted", "ood_score", "collected")


def collect(directory: str | Path, modality: str, answers: list[dict]) -> int:
    """Append the answers flagged `unknown` (each {"input", "label", "ood_score", "unknown", ...})
    to DIR/unknown.csv; return how many rows were added."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise DataError(f"{d}: --collect needs a folder, and this is a file.")
    flagged = [a for a in answers if a.get("unknown")]
    column = "text" if modality == "text" else "path"
    header = [column, "label", *EXTRA]
    path = d / FILE
    rows = _read(path, header)
    seen = {r[column] for r in rows}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    added = 0
    for a in flagged:
        key = a["input"] if modality == "text" else _keep_image(d, Path(a["input"]))
        if key in seen:
            continue
        seen.add(key)
        rows.append({column: key, "label": "", "predicted": a["label"], "ood_score": f"{a['ood_score']:.4f}",
                     "collected": now})
        added += 1
    if added:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        d.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, out.getvalue())
    return added


def _read(path: Path, header: list[str]) -> list[dict]:
    """The rows collected so far; a file of another layout (e.g. the other modality's) is refused."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != header:
            raise DataError(f"{path}: expected the columns {','.join(header)} (a file --collect wrote), "
                            f"found {','.join(reader.fieldnames or [])}.")
        return [dict(r) for r in reader]


def _keep_image(d: Path, src: Path) -> str:
    """Copy an image into DIR/images/ under its content hash; return its path relative to DIR."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    rel = Path("images") / f"{digest}{src.suffix.lower()}"
    if not (d / rel).exists():
        (d / "images").mkdir(parents=True, exist_ok=True)
        tmp = d / "images" / f".{digest}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(d / rel)
    return rel.as_posix()
