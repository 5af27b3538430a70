"""`edgeft export`: a model directory (or run) -> backbone.onnx, head.onnx and model.onnx.

backbone.onnx   model inputs -> features (the vector the head reads)
head.onnx       features -> logits, probs
model.onnx      the two joined (onnx.compose), so it computes exactly backbone then head

Batch and sequence length are dynamic. Each file is self-contained (no external data).
Labels, inputs and preprocessing travel in the metadata of every file and in export.json,
and parity against PyTorch on validation rows runs right away.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ExportConfig
from .errors import ModelError, ParityError, refuse_existing
from .float32 import tolerance
from .results import ExportResult
from .runs import Loaded, load_model, validation_data
from .runtime import atomic
from .runtime.compare import Thresholds, checks, compare
from .runtime.manifest import file_entry
from .runtime.session import write_meta

log = logging.getLogger(__name__)

PARITY_ROWS = 64
FILES = ("backbone.onnx", "head.onnx", "model.onnx")


class _Backbone(nn.Module):
    def __init__(self, backbone, names):
        super().__init__()
        self.backbone, self.names = backbone, names

    def forward(self, *args):
        return self.backbone(**dict(zip(self.names, args, strict=True)))


class _Head(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        logits = self.head(features)
        return logits, torch.softmax(logits, dim=-1)


def _example_inputs(loaded: Loaded) -> dict[str, np.ndarray]:
    if loaded.spec.modality == "text":
        arrays = loaded.pre(["an example input for export", "two"])
        names = ["input_ids", "attention_mask"]
        if getattr(loaded.model.backbone.model.config, "type_vocab_size", 0):
            names.append("token_type_ids")
        return {n: arrays[n] for n in names}
    h, w = loaded.spec.preprocessing["size"]
    return {"pixel_values": np.zeros((2, 3, h, w), dtype=np.float32)}


def _quiet_export(module, args, path, input_names, output_names, dynamic_axes, opset):
    """torch.onnx.export without the exporter's chatter; real failures become ModelError."""
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"ONNX export of {path.name} failed at opset {opset}: {first}") from None
    finally:
        # the exporter restores the wrapper's mode when done; a wrapper left in train mode
        # would switch the wrapped model's dropout back on
        module.eval()


def _set_metadata(path: Path, meta: dict) -> None:
    import onnx

    m = onnx.load(str(path))
    write_meta(m, meta, __version__)
    onnx.save(m, str(path))


def _write_onnx(tmp: Path, loaded: Loaded, meta: dict, opset: int) -> None:
    """backbone.onnx, head.onnx, model.onnx (the two fused) with their metadata, and the preprocessing."""
    import onnx

    from .onnx_graph import fuse

    model, spec = loaded.model, loaded.spec
    example = _example_inputs(loaded)
    names = list(example)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    axes = {n: ({0: "batch", 1: "sequence"} if spec.modality == "text" else {0: "batch"}) for n in names}
    _quiet_export(_Backbone(model.backbone, names).eval(), args, tmp / "backbone.onnx", names, ["features"],
                  {**axes, "features": {0: "batch"}}, opset)
    feats = torch.zeros(2, spec.feature_dim)
    _quiet_export(_Head(model.head).eval(), (feats,), tmp / "head.onnx", ["features"], ["logits", "probs"],
                  {"features": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}}, opset)
    fused = fuse(onnx.load(str(tmp / "backbone.onnx")), onnx.load(str(tmp / "head.onnx")))
    onnx.save(fused, str(tmp / "model.onnx"))
    for f in FILES:
        _set_metadata(tmp / f, {**meta, "part": f.removesuffix(".onnx")})
    if spec.modality == "text":
        (tmp / "tokenizer.json").write_text(loaded.pre.tokenizer.to_str())
    (tmp / "preprocessor.json").write_text(json.dumps(loaded.pre.spec(), indent=2))
    (tmp / "labels.json").write_text(json.dumps({"labels": loaded.labels}, indent=2))


def export(source: str | Path, output: str | Path, opset: int = ExportConfig.opset, data: str | Path | None = None,
           overwrite: bool = False) -> ExportResult:
    """Export, check parity on validation rows (or `data`), write export.json; return it."""
    t0 = time.perf_counter()
    output = Path(output)
    refuse_existing(output, overwrite)
    opset = ExportConfig(opset, data).opset
    loaded = load_model(source)
    loaded.merge_lora()
    loaded.model.eval()
    spec = loaded.spec
    if data:
        from .runs import load_labelled

        ds = load_labelled(data, loaded)
    else:
        ds = validation_data(loaded.info.get("validation"))

    meta = {
        "edgeft_version": __version__, "task": "classification", "modality": spec.modality,
        "labels": loaded.labels, "inputs": list(_example_inputs(loaded)), "preprocessing": loaded.pre.spec(),
        "feature_dim": spec.feature_dim, "pooling": spec.pooling, "base_model": spec.source,
        "precision": "fp32", "opset": int(opset),
    }
    with atomic.directory(output, replace=overwrite) as tmp:
        _write_onnx(tmp, loaded, meta, opset)
        parity = None
        if ds is not None:
            parity = export_parity(tmp, loaded, ds)
            failed = [c for c in parity["checks"] if not c["passed"]]
            if failed:
                raise ParityError(f"{output}: ONNX differs from PyTorch: " + "; ".join(c["message"] for c in failed))
        else:
            log.warning("no validation data found for %s: parity was not checked; pass --data", source)
        info = ExportResult(
            **meta,
            source=str(source),
            files={f: file_entry(tmp / f) for f in FILES},
            outputs={"backbone.onnx": ["features"], "head.onnx": ["logits", "probs"], "model.onnx": ["logits", "probs"]},
            validation=loaded.info.get("validation"),
            parity=parity,
            seconds=round(time.perf_counter() - t0, 3),
        )
        atomic.write_json(tmp / "export.json", info.to_json())
    return info


def export_parity(directory: Path, loaded: Loaded, ds, rows: int = PARITY_ROWS) -> dict:
    """ORT (fused, and backbone then head) against PyTorch on up to `rows` rows, in mixed batch sizes."""
    from .runs import predict_logits
    from .runtime.session import OnnxModel

    items = ds.items[:rows]
    index = {n: i for i, n in enumerate(loaded.labels)}
    y = [index[v] for v in ds.labels[: len(items)]]
    backbone, head, fused = (OnnxModel(directory / f) for f in FILES)
    ref = predict_logits(loaded.model, loaded.pre, items, batch_size=16).numpy()
    got, split = [], []
    i, sizes = 0, [1, 3, 16]  # varied batch sizes: padding and the dynamic batch axis both get exercised
    while i < len(items):
        n = sizes[len(got) % len(sizes)]
        arrays = loaded.pre(items[i : i + n])
        got.append(fused(arrays)["logits"])
        split.append(head({"features": backbone(arrays)["features"]})["logits"])
        i += n
    got, split = np.concatenate(got), np.concatenate(split)
    report = compare(ref, got, y, loaded.labels, items)
    report["fused_vs_split_max_abs_diff"] = float(np.abs(got - split).max())
    # the gate: float32's own reach for this model on this CPU (edgeft.float32), not a fixed 1e-4
    report["max_abs_diff_limit"] = tolerance(loaded.model, loaded.pre, items, ref)
    report["checks"] = checks(report, Thresholds(max_abs_diff=report["max_abs_diff_limit"]))
    return report
