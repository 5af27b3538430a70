"""One ONNX backbone -> a quantized file (quantize_model), and -> one that meets the gate's
budget (quantize_to_budget: the node search, or NNCF's accuracy control, where the plain
attempt misses)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UsageError
from ..runtime.session import read_meta, write_meta
from . import registry
from .gate import VERDICT, Gate

IMAGE_SENSITIVITY_ROWS = 4  # a CNN's activations are large: 4 images x every node's inputs, held at once


def quantize_model(src: Path, dst: Path, mode: str, *, modality: str,
                   calibration: list[dict[str, np.ndarray]] | None = None, per_channel: bool = True,
                   exclude: list[str] | None = None, reduce_range: bool = False) -> dict:
    """Quantize one ONNX file (a backbone) `src` -> `dst`, self-contained, by the registered `mode`.

    `calibration`: input dicts of real preprocessed samples (static and nncf need them);
    `modality` ("text" or "image") picks the op types static quantizes; `exclude` names nodes
    to keep in float (dynamic, static, weight-only, nncf). Returns {"mode", "op_types",
    "per_channel", "bytes"}.
    """
    import onnx

    m = registry.get(mode)
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    rr = bool(reduce_range and m.takes_reduce_range)  # 7-bit weights: for x86-64 CPUs without VNNI
    op_types = m.run(src, dst, modality=modality, calibration=calibration, per_channel=per_channel, exclude=exclude,
                     **({"reduce_range": True} if rr else {}))
    out = onnx.load(str(dst), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer):
        raise UsageError(f"{dst}: the quantizer wrote external data; edgeft ships single-file models.")
    meta = read_meta(out)
    if meta:  # the quantizers keep the export's metadata, precision "fp32" included
        write_meta(out, {**meta, "precision": m.precision}, __version__)
        onnx.save(out, str(dst))
    return {"mode": mode, "op_types": op_types, "per_channel": bool(per_channel and m.per_channel),
            "bytes": dst.stat().st_size, **({"reduce_range": True} if rr else {})}


def quantize_to_budget(src: Path, work: Path, mode: str, *, modality: str, gate: Gate,
                       calibration: list[dict[str, np.ndarray]] | None = None, per_channel: bool = True,
                       search: bool = True, reduce_range: bool = False) -> dict:
    """Quantize `src` with `mode` into `work`; when the result misses the gate, keep the nodes
    int8 hurts most in float until it passes (searchable modes, quantize.search) or let NNCF's
    accuracy control revert quantizers (nncf).

    Returns quantize_model's info plus the gate's verdict ("passed", "agreement",
    "accuracy_drop", "failed"), "path" (the file that passed, or the plain attempt), and for a
    search: "kept_float" (node names), "plain" (the all-int8 attempt) and "search" (ranking,
    attempts). Nothing raises for a missed budget: the caller decides.
    """
    import onnx

    from .search import name_nodes

    m = registry.get(mode)
    work.mkdir(parents=True, exist_ok=True)
    if modality not in m.modalities:
        return {"mode": mode, "op_types": [], "per_channel": bool(per_channel), "bytes": 0, "path": None,
                "passed": False, "failed": [f"{mode} applies to {' and '.join(m.modalities)} models only"]}
    fusion = None
    if m.fuse:  # fuse the fp32 graph, gate it as fp32, then quantize the fused graph with the base mode
        fusion, src = _fuse_gated(src, work, gate)
        if not fusion["passed"]:
            return {"mode": mode, "op_types": [], "per_channel": bool(per_channel), "bytes": 0, "path": None,
                    "passed": False, "failed": fusion["failed"], "fusion": fusion}
        result = quantize_to_budget(src, work / "fused", m.fuse, modality=modality, gate=gate,
                                    calibration=calibration, per_channel=per_channel, search=search,
                                    reduce_range=reduce_range)
        return {**result, "mode": mode, "fusion": fusion}
    model = onnx.load(str(src))
    if m.searchable and name_nodes(model):  # keeping nodes in float goes by name
        src = work / f"{Path(src).stem}.named.onnx"
        onnx.save(model, str(src))
    del model
    plain = work / f"backbone.{mode}.onnx"
    info = quantize_model(src, plain, mode, modality=modality, calibration=calibration, per_channel=per_channel,
                          reduce_range=reduce_range)
    if not info["op_types"]:  # e.g. weight-only on a CNN: nothing it can quantize
        return {**info, "path": None, "passed": False, "failed": ["no operator of this model to quantize"]}
    out = {**info, **gate(plain, mode), "path": plain, "kept_float": []}
    if out["passed"] or not search or not calibration:
        return out
    if m.accuracy_control:
        return _accuracy_control(out, src, work, modality=modality, gate=gate, calibration=calibration)
    if m.searchable:
        return _node_search(out, src, work, mode, modality=modality, gate=gate, calibration=calibration,
                            per_channel=per_channel, reduce_range=reduce_range)
    return out


def _fuse_gated(src: Path, work: Path, gate: Gate) -> tuple[dict, Path]:
    """ONNX Runtime's transformer fusions on the fp32 backbone `src` (quantize.fuse), checked like
    any other float32 step: the fused and the unfused graph, head on top, on the gate's rows, must
    give the same top-1 answers and logits within twice float32's reach for this model (each is a
    float32 computation within the export's limit of PyTorch: export.json's max_abs_diff_limit,
    edgeft.float32), before anything is quantized. Returns (what fused with the verdict, the fused file)."""
    import json

    from ..runtime.compare import Thresholds, checks, compare
    from ..runtime.session import OnnxModel
    from .fuse import fuse

    fused = work / "backbone.fused.onnx"
    info = fuse(src, fused)
    if not info["fused"]:
        return {**info, "passed": False, "failed": ["the transformer optimizer fused nothing in this graph"]}, fused
    export_info = Path(src).parent / "export.json"
    try:
        reach = json.loads(export_info.read_text())["parity"]["max_abs_diff_limit"]
    except (OSError, ValueError, KeyError, TypeError):
        reach = Thresholds().max_abs_diff  # no export report beside it: the fp32 default
    unfused, got = gate.logits(OnnxModel(src)), gate.logits(OnnxModel(fused))
    rep = compare(unfused, got, gate.y, gate.labels)
    found = checks(rep, Thresholds(max_abs_diff=2 * reach))
    info.update(passed=all(c["passed"] for c in found), rows=rep["rows"], agreement=rep["agreement"],
                max_abs_diff_vs_unfused=rep["max_abs_diff"], limit=2 * reach,
                max_abs_diff_vs_reference=float(np.abs(got - gate.reference).max()),
                failed=[f"fused fp32 graph against the unfused one: {c['message']}" for c in found if not c["passed"]])
    return info, fused


def _accuracy_control(out: dict, src: Path, work: Path, *, modality, gate, calibration) -> dict:
    """The plain nncf attempt missed: NNCF's accuracy control on the fp32 ONNX model, gated again."""
    import onnx

    from .nncf import accuracy_control, qdq_nodes

    plain, plain_verdict = out["path"], {k: out[k] for k in VERDICT}
    controlled, info_ac = accuracy_control(onnx.load(str(src)), calibration, gate, modality, src)
    path = work / "backbone.nncf.ac.onnx"
    onnx.save(controlled, str(path))
    out.update(gate(path), path=path, plain=plain_verdict, search=info_ac, plain_path=plain)
    before = qdq_nodes(plain)
    out["search"].update(quantizers=len(before), reverted=len(before - qdq_nodes(path)))
    return out


def _node_search(out: dict, src: Path, work: Path, mode: str, *, modality, gate, calibration, per_channel,
                 reduce_range=False) -> dict:
    """The plain attempt missed: rank the nodes by what int8 costs downstream, keep the fewest
    worst ones in float that make it pass (or report the closest miss)."""
    from .search import SENSITIVITY_ROWS, max_float, node_errors
    from .search import search as search_nodes

    def quantize_one(a: Path, b: Path, rows: list[dict]) -> None:
        quantize_model(a, b, mode, modality=modality, calibration=rows, per_channel=per_channel,
                       reduce_range=reduce_range)

    t0 = time.perf_counter()
    ranking = node_errors(src, quantize_one, out["op_types"], calibration,
                          max_rows=IMAGE_SENSITIVITY_ROWS if modality == "image" else SENSITIVITY_ROWS)

    def attempt(names: list[str]) -> dict:
        path = work / f"backbone.{mode}.float{len(names)}.onnx"
        quantize_model(src, path, mode, modality=modality, calibration=calibration, per_channel=per_channel,
                       exclude=names, reduce_range=reduce_range)
        return {**gate(path, f"{mode} with {len(names)} node(s) in float"), "path": path}

    best, tried = search_nodes(ranking, attempt)
    plain_verdict = {k: out[k] for k in VERDICT}
    out["search"] = {
        "nodes": len(ranking), "max_float": max_float(ranking),
        "ranking": [e.as_dict() for e in ranking[:20]],
        "tried": [{"kept_float": len(t["kept_float"]), "passed": t["passed"], "agreement": t["agreement"],
                   "accuracy_drop": t["accuracy_drop"], "bytes": t["bytes"]} for t in tried],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out["plain"], out["plain_path"] = plain_verdict, out["path"]
    if best is not None:
        out.update({k: best[k] for k in ("passed", "agreement", "accuracy_drop", "bytes", "failed", "path",
                                         "kept_float")})
    elif tried:  # report the closest miss: the attempt with the most nodes in float
        last = max(tried, key=lambda t: len(t["kept_float"]))
        out.update({k: last[k] for k in ("agreement", "accuracy_drop", "bytes", "failed", "kept_float")})
    return out
