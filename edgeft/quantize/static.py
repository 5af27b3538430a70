"""static: int8 QDQ, activation scales fixed by calibration on real preprocessed samples."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .ort import Reader, extra_options, no_preprocess_nag, onnx_inputs
from .registry import Mode, register

# Static QDQ over every op type can put infinite scales on a BERT's attention-mask path
# ((1 - mask) * float32 min) and break it (33% agreement on MiniLM, STACK.md); the weights
# live in these op types. The parity gate, not this list, is what catches a broken model.
# Images: the activations after each convolution too (Clip is ReLU6, Relu), so a Conv's output
# is quantized with its activation's range ([0, 6]) and not with the pre-activation's (on
# EfficientNet-Lite0 up to +-83: about nine int8 steps left for [0, 6]); and the residual Adds.
# Measured on the solar-cell cells (160 held out): agreement with PyTorch 90.6% -> 94.4%, max
# |logit difference| 1.25 -> 0.55.
STATIC_OP_TYPES = {"text": ["MatMul"], "image": ["Conv", "Clip", "Relu", "Add", "MatMul", "Gemm"]}


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None, reduce_range=False) -> list[str]:
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
    # the ranges depend on the model and the rows only (never on the nodes kept in float), so the
    # search's attempts on the same model reuse the first calibration instead of running it again
    with no_preprocess_nag():
        quantize_static(str(src), str(dst), Reader(calibration, inputs), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude or None, extra_options=extra_options(),
                        calibration_cache_path=_cache_path(src, calibration, op_types))
    return op_types


_CACHE: list[str] = []


def _cache_path(src, calibration, op_types) -> Path:
    """A calibration-range cache for this model file, these rows and op types, in a folder of this
    process's that is removed at exit."""
    import atexit
    import shutil
    import tempfile

    if not _CACHE:
        _CACHE.append(tempfile.mkdtemp(prefix="edgeft-calibration-"))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    h = hashlib.sha256()
    st = Path(src).stat()
    h.update(f"{Path(src).resolve()}|{st.st_size}|{st.st_mtime_ns}|{','.join(op_types)}".encode())
    for row in calibration:
        for k in sorted(row):
            h.update(k.encode())
            h.update(np.ascontiguousarray(row[k]).tobytes())
    return Path(_CACHE[0]) / f"{h.hexdigest()[:24]}.json"


MODE = register(Mode("static", "int8", run, calibrated=True, needs_calibration=True, searchable=True,
                     default_for=("int8-static",), takes_reduce_range=True, help="int8 QDQ calibrated on real samples"))
