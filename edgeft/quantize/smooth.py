"""SmoothQuant-style activation smoothing before dynamic int8 (Xiao et al., "SmoothQuant", ICML 2023).

Dynamic int8 takes one activation scale per tensor per call. A BERT's hidden states have a few
channels whose magnitude is tens of times the rest (after LayerNorm and after GELU): they set the
scale, and every other channel is left a handful of int8 steps, which is what flips low-margin
answers. Smoothing moves that range from the activation into the weight, where int8 has a scale
per output column: for a MatMul y = x W with a constant W, per input channel j

    s_j = max|x_j| ** alpha / max_k |W_jk| ** (1 - alpha)      (max|x_j| over calibration rows)
    y = (x / s) (diag(s) W)

which is the same product in exact arithmetic. The division is a Mul node inserted before the
MatMul (one per activation tensor, shared by the MatMuls that read it, e.g. Q, K and V), and the
weight rows are multiplied by s. SmoothQuant folds 1/s into the preceding LayerNorm's gamma and
beta instead; that is exact only where the LayerNorm's output feeds nothing but the MatMuls
(pre-LN models). In a BERT (post-LN) the same output is also the residual, so the scale cannot be
folded without changing it: the explicit Mul costs one element-wise op per smoothed tensor.

Works on the unfused export (MatMul) and on ONNX Runtime's fused graph (com.microsoft Attention,
whose input 1 is the packed Q/K/V weight): the float graph after smoothing computes what it did
before to float32 rounding (tests/test_smooth.py), and the quantized result is gated like any other.

Measured (AMD EPYC, AVX2, no VNNI; MiniLM LoRA on the maintenance example; 720 held-out rows: the
120 test texts and 600 entries of examples/maintenance/make_parity_inputs.py; calibrated on 300
training rows): dynamic int8 of the fused graph, per-channel, flipped 20 answers (97.2%); smoothed
it flipped 22 at alpha 0.5, 16 at alpha 0.8 (97.8%), and 113 at alpha 0.3 (the weights' rows then
take the range, and the fused Attention's weights, one scale per tensor, lose it). The largest channel of MiniLM's smoothed activations is 3-19 times the
median channel (after the attention output LayerNorm and after GELU): not the hundred-fold outliers
of larger BERTs, and no single activation is to blame (each group of int8 nodes alone, with the
rest in float, flipped 6-17 of the 720: the model's low-margin answers move with any int8 noise of
that size). So the smoothing modes are offered (`edgeft quantize --mode dynamic-smooth[-fused]`, a
target's own variant list) but are not among the build's default variants.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from . import dynamic
from .fuse import CONTRIB, is_fused
from .registry import Mode, register

ALPHA = 0.5  # migration strength (SmoothQuant's default for BERT-sized models)
MAX_ROWS = 64  # calibration rows whose per-channel maxima set s; the maxima of MiniLM's outliers settle early
S_MIN, S_MAX = 1e-4, 1e4
SMOOTH_SUFFIX = "_edgeft_smooth"


def _consumers(model) -> dict[str, list]:
    """activation tensor -> the nodes reading it as input 0 with a constant 2-D weight as input 1:
    MatMul, and ORT's fused Attention (packed Q/K/V weight)."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, list] = {}
    for node in model.graph.node:
        fused_attention = node.op_type == "Attention" and node.domain == CONTRIB
        if not (node.op_type == "MatMul" and (node.domain or "") == "") and not fused_attention:
            continue
        if len(node.input) < 2 or node.input[0] in inits or node.input[1] not in inits:
            continue
        if len(inits[node.input[1]].dims) != 2:
            continue
        out.setdefault(node.input[0], []).append(node)
    return out


def activation_max(model, names: list[str], rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each tensor in `names` over the calibration rows, from an
    unoptimised fp32 run of `model` (fused nodes would swallow the values)."""
    import onnx
    from onnx import helper

    from ..runtime.session import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_inputs = {i.name for i in probe.graph.input}
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have and n not in graph_inputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = make_session(probe.SerializeToString(), optimize=False)
    feeds = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    peak: dict[str, np.ndarray] = {}
    for row in rows:
        values = dict(zip(outs, sess.run(None, {k: row[k] for k in feeds}), strict=True))
        for n in names:
            v = row[n] if n in graph_inputs else values[n]
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0).astype(np.float64)
            peak[n] = m if n not in peak else np.maximum(peak[n], m)
    return peak


def scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1 - alpha); 1 where a channel is all zeros."""
    ok = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max, dtype=np.float64)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1 - alpha)
    return np.clip(s, S_MIN, S_MAX)


def smooth_model(model, rows: list[dict[str, np.ndarray]], alpha: float = ALPHA) -> dict:
    """Smooth `model` (an onnx ModelProto) in place on calibration `rows`; returns what it did:
    {"alpha", "tensors" (activations smoothed), "nodes", "max_scale", "outlier_ratio" (per
    tensor: largest channel max over the median channel max, before smoothing)}."""
    from onnx import helper, numpy_helper

    groups = _consumers(model)
    if not groups or not rows:
        return {"alpha": alpha, "tensors": 0, "nodes": 0}
    peak = activation_max(model, list(groups), rows[:MAX_ROWS])
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
    inserts, ratios, top = [], {}, 1.0
    for act, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes]
        if any(w.shape[0] != peak[act].shape[0] for w in weights):
            continue  # a weight whose rows are not the activation's channels (a transposed layout)
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = scales(peak[act], w_max, alpha)
        ratios[act] = round(float(peak[act].max() / max(np.median(peak[act]), 1e-12)), 2)
        top = max(top, float(s.max() / s.min()))
        smoothed = f"{act}{SMOOTH_SUFFIX}"
        inv = helper.make_tensor(f"{smoothed}_inv", 1, [len(s)], (1.0 / s).astype(np.float32).tolist())
        model.graph.initializer.append(inv)
        for node, w in zip(nodes, weights, strict=True):
            name = f"{node.input[1]}{SMOOTH_SUFFIX}_{node.name or len(model.graph.initializer)}"
            model.graph.initializer.append(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
            node.input[0], node.input[1] = smoothed, name
        mul = helper.make_node("Mul", [act, inv.name], [smoothed], name=f"{smoothed}_mul")
        inserts.append((producer.get(act, -1), mul))
    # each Mul right after its activation's producer: the graph stays topologically sorted
    for k, mul in sorted(inserts, key=lambda t: t[0], reverse=True):
        model.graph.node.insert(k + 1, mul)
    _drop_unused(model)
    return {"alpha": alpha, "tensors": len(inserts), "nodes": sum(len(groups[a]) for a in ratios),
            "max_scale_spread": round(top, 1), "outlier_ratio": ratios}


def _drop_unused(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def smooth(src: Path, dst: Path, rows: list[dict[str, np.ndarray]], alpha: float = ALPHA) -> dict:
    import onnx

    model = onnx.load(str(src))
    info = smooth_model(model, rows, alpha)
    onnx.save(model, str(dst))
    return info


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None, reduce_range=False,
        alpha: float = ALPHA) -> list[str]:
    """Smooth src on the calibration rows, then dynamic int8 of it (nodes named in `exclude` stay
    float; they are smoothed all the same, which is exact in float)."""
    from ..errors import UsageError

    if not calibration:
        raise UsageError(f"{src}: smoothing needs calibration rows (the activations' per-channel ranges); none were given.")
    with tempfile.TemporaryDirectory(prefix="edgeft-smooth-") as tmp:
        smoothed = Path(tmp) / "smoothed.onnx"
        smooth(src, smoothed, calibration, alpha)
        return dynamic.run(smoothed, dst, modality=modality, calibration=calibration, per_channel=per_channel,
                           exclude=exclude, reduce_range=reduce_range)


def run_fused(src, dst, *, modality, calibration=None, per_channel=True, exclude=None, reduce_range=False) -> list[str]:
    """ORT's transformer fusions (src fused here unless it is already), then `run` on the fused graph."""
    from ..errors import UsageError
    from .fuse import fuse

    if modality != "text":
        raise UsageError(f"{src}: dynamic-smooth-fused fuses transformer text backbones; this is an {modality} model.")
    if is_fused(src):
        return run(src, dst, modality=modality, calibration=calibration, per_channel=per_channel, exclude=exclude,
                   reduce_range=reduce_range)
    with tempfile.TemporaryDirectory(prefix="edgeft-fuse-") as tmp:
        fused = Path(tmp) / "fused.onnx"
        fuse(src, fused)
        return run(fused, dst, modality=modality, calibration=calibration, per_channel=per_channel, exclude=exclude,
                   reduce_range=reduce_range)


MODE = register(Mode("dynamic-smooth", "int8", run, calibrated=True, needs_calibration=True, searchable=True,
                     modalities=("text",), batch_dependent=True, takes_reduce_range=True,
                     help="SmoothQuant-style smoothing (activation outliers moved into the weights), then dynamic int8"))
FUSED = register(Mode("dynamic-smooth-fused", "int8", run_fused, calibrated=True, needs_calibration=True,
                      searchable=True, fuse="dynamic-smooth", modalities=("text",), batch_dependent=True,
                      takes_reduce_range=True,
                      help="ORT's transformer fusions, then smoothing and dynamic int8 (full ONNX Runtime only)"))
__all__ = ["ALPHA", "activation_max", "is_fused", "run", "scales", "smooth", "smooth_model"]
