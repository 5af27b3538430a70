"""Typed step results: each step of the chain returns one, and `to_json()` is what it writes.

A result's fields are the top-level keys of the file it writes (metrics.json, export.json,
verify.json, manifest.json ...), in that order, so the file's schema is written down once,
here and in edgeft/results.py, instead of being a dict read by key across modules. Sections
below the top level stay plain JSON (dicts, lists): other tools read them back from the files.

numpy only (the device side uses it too); the build side's results are in edgeft/results.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

OMIT_NONE = {"omit_none": True}  # field(metadata=OMIT_NONE): the key is left out while it is None


def optional(default=None):
    """A field whose key the file carries only when it has a value."""
    return field(default=default, metadata=OMIT_NONE)


@dataclass
class Result:
    """Base of the typed results: `to_json()` gives the file's content, strict JSON."""

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            if f.metadata.get("flatten"):  # a section whose keys sit at the top level of the file
                out.update(plain(value or {}))
                continue
            out[f.name] = plain(value)
        return out


def plain(value):
    """`value` as JSON types: results by their to_json(), paths as strings, tuples as lists."""
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(kw_only=True)
class RetrainResult(Result):
    """An accepted `device retrain`: the version it made active, what the guard measured, timing.

    (A refused retrain raises RetrainRefused, whose report is the same `metrics`.)"""

    accepted: bool = True
    version: int
    previous_version: int
    labels: list[str]
    added_classes: list[str]
    pruned: list[str]  # head files deleted because more than `keep` versions were kept
    metrics: dict  # the guard's figures: new_holdout_accuracy, replay_holdout_accuracy, old_classes_accuracy, fit ...
    seconds: float
    family: str | None = optional()  # the closed-form family ("ridge"); absent for the softmax head
    skipped_rows: int | None = optional()  # ridge: rows of the file already learned, counted once


@dataclass
class RollbackResult(Result):
    """A `device rollback`: the head version it left, the one now active, and its classes."""

    from_version: int
    to_version: int
    labels: list[str]

    def to_json(self) -> dict:
        return {"from": self.from_version, "to": self.to_version, "labels": self.labels}
