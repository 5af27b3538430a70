"""Fuse a transformer backbone before quantizing it: ONNX Runtime's transformer optimizer.

`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")` rewrites a BERT-family
graph into ONNX Runtime's contrib operators (domain com.microsoft): EmbedLayerNormalization,
Attention, SkipLayerNormalization, BiasGelu. Dynamic int8 then quantizes the fused graph
(QAttention, QEmbedLayerNormalization, MatMulInteger), which is faster at batch 1 than the
same int8 on the unfused graph: fewer, larger kernels (STACK.md, measured on MiniLM).

Only ONNX Runtime's full builds run those operators: a target says whether it accepts them
(`Target.fused_ops`; the mobile target's reduced-operator build and TensorRT do not), and the
registry offers the fused modes to those targets only. The fused fp32 graph is gated like any
other step (quantize.budget): against the same reference as the quantized candidates, with the
fp32 thresholds, before anything is quantized.

The attention fusion matches only the eager attention pattern: edgeft exports text models with
`attn_implementation="eager"` (edgeft.models).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

from ..errors import UsageError
from . import dynamic
from .registry import Mode, register

# Hugging Face model_type -> ONNX Runtime optimizer model type (the families its BERT fusions match)
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
               "distilbert": "bert"}
# what the BERT optimizer fuses into; the counts are reported per type
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "LayerNormalization")
CONTRIB = "com.microsoft"
OPT_LEVEL = 1  # ORT's basic graph optimizations first (constant folding: the same on every CPU), then the fusions


def model_config(src: Path) -> dict:
    """The Hugging Face config of the model a backbone was exported from (its `base_model`, an
    alias or a folder), or {} when it cannot be found: the optimizer then reads the head count and
    width from the graph itself."""
    import onnx

    from ..runtime.session import read_meta

    meta = read_meta(onnx.load(str(src), load_external_data=False)) or {}
    base = meta.get("base_model")
    if not base:
        return {}
    path = Path(base)
    if not (path / "config.json").is_file():
        try:
            from ..models import resolve

            path = resolve(base)[1]
        except Exception:  # noqa: BLE001 - an alias this install cannot resolve: read the graph instead
            return {}
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _quiet():
    """The optimizer warns that the producer is not "pytorch" (edgeft names itself), that a tiny
    vocabulary is smaller than the position table, and logs each fusion; none of it says anything
    about the result, which is gated. Its modules log under their bare names (fusion_*, onnx_model_*)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _drop_unused_domains(model) -> None:
    """The optimizer declares every domain ORT knows (training, preview, aten...); keep the ones
    the graph's nodes use, so a consumer does not need to know the others."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def fuse(src: Path, dst: Path, config: dict | None = None) -> dict:
    """src (an fp32 BERT-family backbone) -> dst, fused. Returns what fused:
    {"optimizer": "onnxruntime.transformers bert", "num_heads", "hidden_size", "heads_from",
    "fused": {op type: count}, "nodes_before", "nodes_after"}. UsageError for a model family the
    optimizer has no fusions for."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    src, dst = Path(src), Path(dst)
    config = model_config(src) if config is None else config
    family = config.get("model_type", "bert")
    if family not in MODEL_TYPES:
        raise UsageError(f"{src}: no transformer fusions for model type {family!r} (fused: "
                         f"{', '.join(sorted(MODEL_TYPES))}); use the unfused mode.")
    heads, hidden = int(config.get("num_attention_heads") or 0), int(config.get("hidden_size") or 0)
    before = onnx.load(str(src))
    n_before = len(before.graph.node)
    meta = list(before.metadata_props)
    del before
    with _quiet():
        # num_heads 0 / hidden_size 0: the optimizer reads them from the graph's reshapes
        opt = optimize_model(str(src), model_type=MODEL_TYPES[family], num_heads=heads, hidden_size=hidden,
                             opt_level=OPT_LEVEL)
    model = opt.model
    _drop_unused_domains(model)
    del model.metadata_props[:]
    model.metadata_props.extend(meta)  # the export's metadata (labels, preprocessing) stays
    counts = Counter(n.op_type for n in model.graph.node if n.domain == CONTRIB)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return {"optimizer": f"onnxruntime.transformers {MODEL_TYPES[family]}", "model_type": family,
            "num_heads": heads or None, "hidden_size": hidden or None,
            "heads_from": "model config" if heads and hidden else "graph",
            "fused": {op: counts[op] for op in sorted(counts)}, "nodes_before": n_before,
            "nodes_after": len(model.graph.node)}


def is_fused(path: Path) -> bool:
    import onnx

    return any(n.domain == CONTRIB for n in onnx.load(str(path), load_external_data=False).graph.node)


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None, reduce_range=False) -> list[str]:
    """dynamic int8 of the fused graph (src fused here unless it is already)."""
    if modality != "text":
        raise UsageError(f"{src}: dynamic-fused fuses transformer text backbones; this is an {modality} model.")
    if is_fused(src):
        return dynamic.run(src, dst, modality=modality, calibration=calibration, per_channel=per_channel,
                           exclude=exclude, reduce_range=reduce_range)
    with tempfile.TemporaryDirectory(prefix="edgeft-fuse-") as tmp:
        fused = Path(tmp) / "fused.onnx"
        fuse(src, fused)
        return dynamic.run(fused, dst, modality=modality, calibration=calibration, per_channel=per_channel,
                           exclude=exclude, reduce_range=reduce_range)


MODE = register(Mode("dynamic-fused", "int8", run, calibrated=True, searchable=True, default_for=("int8",),
                     fuse="dynamic", modalities=("text",), batch_dependent=True,
                     takes_reduce_range=True,
                     help="ORT's transformer fusions, then int8 weights and activations (full ONNX Runtime only)"))
