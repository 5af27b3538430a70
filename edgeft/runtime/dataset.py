"""Reading labelled samples: text CSV/JSONL, image CSVs and image folders. Pure python (+ Pillow
to check images), so the device reads its retraining data with the same rules as training.

Text: CSV or JSONL with a text and a label column. Images: a folder with one sub-folder per
class, or a CSV with a `path` (or `image`) column and a label column; relative paths are
read from the CSV's folder. Every bad row ends in one `DataError` naming file, line, field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, did_you_mean

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGE_COLUMNS = ("path", "image", "file")


@dataclass
class Dataset:
    kind: str  # "text" or "image"
    items: list[str]  # texts, or image paths
    labels: list[str | None]
    source: str
    lines: list[int] = field(default_factory=list)  # where each item is in its file

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: list[int], source: str | None = None) -> Dataset:
        return Dataset(
            self.kind,
            [self.items[i] for i in idx],
            [self.labels[i] for i in idx],
            source or self.source,
            [self.lines[i] for i in idx] if self.lines else [],
        )

    def fingerprint(self) -> str:
        """Content hash (items and labels), for caches and 'is this output current'."""
        h = hashlib.sha256(self.kind.encode())
        for x, y in zip(self.items, self.labels, strict=True):
            h.update(b"\x00" + str(x).encode() + b"\x01" + str(y).encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


def blank(value) -> bool:
    """Nothing to read: empty, white space only, or only invisible characters (zero-width
    spaces, byte-order marks, control characters), which tokenizers drop."""
    if value is None:
        return True
    return isinstance(value, str) and all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in value)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}). "
            "Save the file as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty. Expected a header row and data rows.")
    return text


def _column(path: Path, columns, wanted: str, what: str) -> str:
    if wanted in columns:
        return wanted
    found = ", ".join(str(c) for c in columns) or "none"
    raise DataError(
        f"{path}: no {what} column '{wanted}' (columns: {found}).{did_you_mean(wanted, columns)} "
        f"Name it with --{what}-column."
    )


def _rows_csv(path: Path, text: str, delimiter: str = ","):
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
        if not any(h and h.strip() for h in header):
            raise DataError(f"{path}: line 1: empty header row. Expected column names, e.g. text,label.")
        for row in reader:
            line = reader.reader.line_num
            if None in row:
                raise DataError(
                    f"{path}: line {line}: {len(header) + len(row[None])} fields, "
                    f"the header has {len(header)}. Quote fields that contain commas."
                )
            if any(v is None for v in row.values()):
                n = sum(v is not None for v in row.values())
                raise DataError(f"{path}: line {line}: {n} fields, the header has {len(header)}.")
            yield line, row, header
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.reader.line_num}: bad CSV ({e}).") from None


def _rows_jsonl(path: Path, text: str):
    # split on newlines only: str.splitlines() also breaks at U+2028 and form feeds, which
    # JSON writers leave unescaped inside strings
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg}).") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of 5,000 digits, deep nesting
            raise DataError(f"{path}: line {n}: JSON beyond what edgeft reads ({type(e).__name__}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object per line, got {type(row).__name__}.")
        yield n, row, list(row.keys())


def _label(value, path, line, label_column, required):
    if blank(value):
        if required:
            raise DataError(f"{path}: line {line}: empty label in column '{label_column}'.")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int, bool)):
        raise DataError(f"{path}: line {line}: label must be a string or an integer, got {value!r}.")
    return str(value).strip()


def load_dataset(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    require_labels: bool = True,
) -> Dataset:
    """Read a text CSV/JSONL, an image CSV or an image folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _load_image_folder(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".tsv"):
        raise DataError(f"{path}: unknown data format '{suffix}'. Expected .csv, .jsonl or an image folder.")
    text = _read_text(path)
    if suffix in (".jsonl", ".json"):
        rows = _rows_jsonl(path, text)
    else:
        rows = _rows_csv(path, text, "\t" if suffix == ".tsv" else ",")

    items, labels, lines = [], [], []
    kind = None
    col = None
    for line, row, header in rows:
        if kind is None:
            if text_column not in header and text_column == "text":
                col = next((c for c in IMAGE_COLUMNS if c in header), None)
            if col is None:
                col = _column(path, header, text_column, "text")
            # a column of image file names is image data, whatever the column is called
            first = row.get(col)
            looks_like_image = isinstance(first, str) and Path(first.strip()).suffix.lower() in IMAGE_SUFFIXES
            kind = "image" if col in IMAGE_COLUMNS or looks_like_image else "text"
            if require_labels:
                _column(path, header, label_column, "label")
        value = row.get(col)
        if blank(value):
            what = "image path" if kind == "image" else "text"
            raise DataError(f"{path}: line {line}: empty {what} in column '{col}'.")
        if not isinstance(value, str):
            raise DataError(f"{path}: line {line}: column '{col}' must be a string, got {value!r}.")
        if kind == "image":
            value = str(_check_image(path.parent / value, f"{path}: line {line}"))
        items.append(value)
        labels.append(_label(row.get(label_column), path, line, label_column, require_labels))
        lines.append(line)
    if not items:
        raise DataError(f"{path}: no data rows after the header.")
    return Dataset(kind, items, labels, str(path), lines)


def _check_image(p: Path, where: str) -> Path:
    from PIL import Image

    try:
        exists = p.is_file()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise DataError(f"{where}: unusable image path ({type(e).__name__}).") from None
    if not exists:
        raise DataError(f"{where}: image {p} does not exist.")
    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # Pillow raises many types for broken files
        raise DataError(f"{where}: unreadable image {p} ({type(e).__name__}: {e}).") from None
    return p


def _load_image_folder(path: Path) -> Dataset:
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class sub-folders. Expected one folder per class holding its images.")
    items, labels = [], []
    for d in classes:
        files = sorted(
            f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        for f in files:
            items.append(str(_check_image(f, str(path))))
            labels.append(d.name)
    if not items:
        raise DataError(f"{path}: no images (jpg, png, bmp, webp) in its class folders.")
    return Dataset("image", items, labels, str(path), [])
