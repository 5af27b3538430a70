"""`edgeft quantize`: an export dir -> the same layout with a smaller backbone, checked against fp32.

One module per mode, each registering a `registry.Mode` (precision, whether it reads real
rows, whether its nodes can be searched, the function that runs it):

dynamic      int8 weights, activation scales computed per call (onnxruntime quantize_dynamic)
dynamic-fused  ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, ...; fuse.py),
             then dynamic int8 of the fused graph; for targets whose runtime has those operators
dynamic-smooth  SmoothQuant-style smoothing (activation outliers moved into the weights: smooth.py),
             then dynamic int8; dynamic-smooth-fused: the same on the fused graph
static       int8 QDQ, activation scales fixed by calibration on real preprocessed samples
nncf         int8 QDQ by NNCF's post-training recipe for the model type, calibrated on real
             samples; needs the openvino extra
fp16         half-precision weights and compute, float32 inputs and outputs
weight-only  int8 weights in blocks of 32 (MatMulNBits), activations stay float
weight-only-fused  the same on ONNX Runtime's fused graph (the fused Attention keeps float weights)

openvino_ir.py registers the OpenVINO IR variants `edgeft build` tries for the openvino
target (openvino-fp32, -fp16, -bf16, -int8, -int8-weights) and converts them.

search.py keeps the nodes int8 hurts most in float when a mode misses the budget; gate.py is
the budget. Only the backbone is quantized: the head stays fp32, since the device retrains it
in fp32, and model.onnx is the two joined again, as export does it. The quantized model.onnx
runs against the fp32 one on the same real rows; a result outside the quantized thresholds
(top-1 agreement >= 99%, accuracy drop <= 0.5 point) is a ParityError and nothing is written.
"""

from __future__ import annotations

# isort: off
# each module registers its mode; this order is the order modes are listed and build tries them
from . import dynamic, fuse, smooth, static, nncf, fp16, weight_only, openvino_ir  # noqa: F401
# isort: on
from .budget import quantize_model, quantize_to_budget
from .folder import quantize
from .gate import Gate, describe_miss, prepare_gate
from .registry import Mode, default_variants, get, names, variants_for

__all__ = ["Gate", "Mode", "default_variants", "describe_miss", "get", "names", "prepare_gate", "quantize",
           "quantize_model", "quantize_to_budget", "variants_for"]
