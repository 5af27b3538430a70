"""static: int8 QDQ, activation scales fixed by calibration on real preprocessed samples."""

from __future__ import annotations

from ..errors import UsageError
from .ort import Reader, extra_options, no_preprocess_nag, onnx_inputs
from .registry import Mode, register

# Static QDQ over every op type can put infinite scales on a BERT's attention-mask path
# ((1 - mask) * float32 min) and break it (33% agreement on MiniLM, STACK.md); the weights
# live in these op types. The parity gate, not this list, is what catches a broken model.
STATIC_OP_TYPES = {"text": ["MatMul"], "image": ["Conv", "MatMul", "Gemm"]}


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None) -> list[str]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    model = onnx.load(str(src))
    inputs, present = onnx_inputs(model), {n.op_type for n in model.graph.node}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    del model  # the quantizer reads the file itself (given a ModelProto, it rewrites it in place)
    if not calibration:
        raise UsageError(f"{src}: static quantization needs calibration samples; none were given.")
    if per_channel and opset < 13:  # onnxruntime writes DequantizeLinear(axis=) regardless
        raise UsageError(f"{src}: static per-channel int8 needs opset 13 or newer (this is opset "
                         f"{opset}). Re-export with --opset 13 or later, or pass --no-per-channel.")
    wanted = STATIC_OP_TYPES.get(modality)
    op_types = sorted(present & set(QDQRegistry if wanted is None else wanted))
    # MinMax keeps only each tensor's min and max per sample, so 300 samples cost little
    # memory. (Not CalibMaxIntermediateOutputs: onnxruntime 1.32 discards the samples it
    # clears with it instead of folding them into the ranges.)
    # U8S8 (uint8 activations, int8 weights): onnxruntime's recommended pairing on x86
    with no_preprocess_nag():
        quantize_static(str(src), str(dst), Reader(calibration, inputs), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude or None, extra_options=extra_options())
    return op_types


MODE = register(Mode("static", "int8", run, calibrated=True, needs_calibration=True, searchable=True,
                     default_for=("int8-static",), help="int8 QDQ calibrated on real samples"))
