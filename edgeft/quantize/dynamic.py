"""dynamic: int8 weights, activation scales computed per call (onnxruntime quantize_dynamic).

About 2.5x faster than fp32 on CPU, but it flips 2-5% of a text model's low-margin answers
(the search then keeps the nodes it hurts most in float).
"""

from __future__ import annotations

from .ort import extra_options, no_preprocess_nag, present_ops
from .registry import Mode, register


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None, reduce_range=False) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    op_types = sorted(present_ops(src) & set(IntegerOpsRegistry))
    with no_preprocess_nag():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=op_types, per_channel=per_channel,
                         reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None, extra_options=extra_options())
    return op_types


# calibrated: dynamic needs no calibration, but the search ranks nodes on real rows
MODE = register(Mode("dynamic", "int8", run, calibrated=True, searchable=True, default_for=("int8",), batch_dependent=True,
                     takes_reduce_range=True,
                     help="int8 weights and activations"))
