"""What each build-side step returns: a typed result whose `to_json()` is the file it writes.

    train   -> TrainResult   (run/metrics.json)
    merge   -> MergeResult   (model/merge.json, and edgeft.json's "merge")
    export  -> ExportResult  (export/export.json)
    quantize -> QuantizeResult (quantized/quantize.json)
    verify  -> VerifyReport  (--json, --json-file, the recipe's verify.json; --junit from it)
    build   -> BuildResult   (bundle/manifest.json)

Code reads the fields (`r.seconds`, `r.parity`); files, --json and the recipe's step records
take `r.to_json()`. Sections below the top level are plain JSON, documented where they are made
(edgeft/runtime/compare.py for the parity figures, edgeft/runtime/manifest.py for the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .runtime.result import Result, optional


@dataclass
class TrainResult(Result):
    """A training run's summary: the best epoch's figures, every epoch, what trained, timing."""

    edgeft_version: str
    method: str
    model: str
    labels: list[str]
    parameters: dict  # trainable, total, ratio
    epochs: list[dict]  # one per epoch: accuracy, macro_f1, train_loss, val_loss, ...
    best: dict  # the kept epoch, re-evaluated: epoch, metric, loss, accuracy, macro_f1, per_class, confusion
    accuracy: float
    macro_f1: float
    stopped_early: bool
    data: dict  # train and val: source, rows, counts, fingerprint
    trained: dict  # what ran (learning rates, pooling and why, epochs run)
    timing: dict  # total_seconds, feature_seconds, loop_seconds, step_seconds, samples_per_second, ...
    ridge: dict | None = optional()  # the closed-form head fitted on the same cached features (--head ridge)

    @property
    def seconds(self) -> float:
        return self.timing["total_seconds"]


@dataclass
class MergeResult(Result):
    """Merged against unmerged logits on validation rows, and what was merged."""

    max_abs_diff: float
    max_abs_diff_limit: float  # float32's reach for the unmerged model (edgeft.float32)
    rows: int
    merged_lora: bool
    seconds: float


@dataclass
class ExportResult(Result):
    """export.json: the ONNX files' metadata, hashes and their parity with PyTorch."""

    edgeft_version: str
    task: str
    modality: str
    labels: list[str]
    inputs: list[str]
    preprocessing: dict
    feature_dim: int
    pooling: str | None
    base_model: str | None
    precision: str
    opset: int
    source: str
    files: dict  # name -> {"sha256", "bytes"}
    outputs: dict
    validation: dict | str | None
    parity: dict | None  # edgeft.export.export_parity; None when no rows were found to check
    seconds: float


@dataclass
class QuantizeResult(Result):
    """quantize.json: what was quantized and how, what calibrated, and the parity that passed."""

    edgeft_version: str
    mode: str
    precision: str  # int8 or fp16 (the backbone; the head stays fp32)
    source: str  # the fp32 export
    per_channel: bool
    op_types: list[str]
    head: str
    kept_float: list[str]  # nodes the search kept in float
    search: dict | None  # the search's ranking, attempts and cost; None when the plain attempt passed
    all_int8: dict | None  # the all-int8 attempt the search replaced
    fusion: dict | None  # dynamic-fused: what ONNX Runtime's optimizer fused, gated as fp32
    calibration: dict | None  # data, rows (drawn), of (rows in the file), drawn, used; None: no rows drawn
    files: dict  # name -> {"sha256", "bytes", "fp32_bytes"}
    parity: dict  # edgeft.runtime.compare.compare(): rows, sources, agreement, bounds, checks, certified ...
    latency: dict  # fp32_ms, quantized_ms (median, batch 1), runs, inputs, speedup
    seconds: float

    @property
    def rows(self) -> int:  # the rows that judged
        return self.parity["rows"]

    @property
    def calibrated_rows(self) -> int:
        return self.calibration["rows"] if self.calibration else 0


@dataclass
class VerifyReport(Result):
    """An artifact against its PyTorch reference: the parity figures, the checks, the verdict."""

    figures: dict = field(metadata={"flatten": True})  # edgeft.runtime.compare.compare(): rows, agreement, bounds, ...
    sources: dict = field(default_factory=dict)  # rows judged per source ("data", "parity-data")
    artifact: str = ""
    kind: str = ""
    reference: str = ""
    data: str = ""
    parity_data: str | None = None
    certified: bool = False
    precision: str = "fp32"
    thresholds: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    passed: bool = False
    candidate_ms_per_row: float = 0.0
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.figures["rows"]


@dataclass
class BuildResult(Result):
    """A built bundle: where it is and its manifest (edgeft/runtime/manifest.py has the schema)."""

    path: Path
    manifest: dict

    def to_json(self) -> dict:  # manifest.json itself
        return self.manifest

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]

    @property
    def quantization(self) -> dict | None:
        return self.manifest.get("quantization")

    @property
    def seconds(self) -> float:
        return self.manifest["build_seconds"]

    @property
    def bytes(self) -> int:  # the whole bundle: every file the manifest lists
        return sum(f["bytes"] for f in self.manifest["files"].values())
