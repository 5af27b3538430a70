"""fp16: half-precision weights and compute, float32 inputs and outputs."""

from __future__ import annotations

import warnings

from ..errors import require
from .registry import Mode, register


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None) -> list[str]:
    import onnx

    float16 = require("onnxconverter_common.float16")
    model = onnx.load(str(src))
    present = {n.op_type for n in model.graph.node}
    with warnings.catch_warnings():
        # it warns once per constant it clamps to fp16's range, e.g. the -3.4e38 of a masked mean
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    _fix_float_casts(half)
    onnx.save(half, str(dst))
    return sorted(present - set(float16.DEFAULT_OP_BLOCK_LIST))


def _fix_float_casts(model) -> None:
    """Cast(to=float) nodes inside an fp16 graph: make them cast to fp16, as their outputs are typed.

    The converter retypes every float tensor to float16 but leaves Cast's `to` attribute, so
    e.g. a masked mean's `mask.float()` yields float where float16 is declared and
    onnxruntime refuses to load the model.
    """
    import onnx

    half = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in half:
            for a in node.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                    a.i = onnx.TensorProto.FLOAT16


MODE = register(Mode("fp16", "fp16", run, per_channel=False, default_for=("fp16",), help="half precision"))
