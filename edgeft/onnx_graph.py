"""Graph surgery shared by export and quantize (onnx only, no torch)."""

from __future__ import annotations


def fuse(backbone, head):
    """backbone then head as one graph, keeping the public output names (as export does).

    Clears both models' metadata (merge_models refuses differing values; the caller sets it).
    """
    import onnx
    from onnx import compose, version_converter

    for m in (backbone, head):
        del m.metadata_props[:]
    opset = {o.domain or "ai.onnx": o.version for o in backbone.opset_import}.get("ai.onnx")
    if opset and {o.domain or "ai.onnx": o.version for o in head.opset_import}.get("ai.onnx") != opset:
        # the quantizer may raise the opset (per-channel QDQ needs 13); the head follows
        head = version_converter.convert_version(head, opset)
    ir_version = head.ir_version
    head.ir_version = backbone.ir_version
    try:
        fused = compose.merge_models(backbone, head, io_map=[("features", "features")], prefix2="head/")
    finally:
        head.ir_version = ir_version
    # merge_models lists the shared default-domain opset twice; one entry per domain is enough
    seen = {}
    for o in fused.opset_import:
        seen.setdefault(o.domain, o.version)
    del fused.opset_import[:]
    fused.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in seen.items())
    rename = {o.name: o.name.removeprefix("head/") for o in fused.graph.output}
    for out in fused.graph.output:
        out.name = rename[out.name]
    for node in fused.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    onnx.checker.check_model(fused)
    return fused
