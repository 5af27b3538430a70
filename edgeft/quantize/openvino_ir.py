"""Build side of the `openvino` target: the fp32 ONNX backbone -> an OpenVINO IR, gated.

openvino-fp32 / -bf16  the converted graph, f32 weights; the runtime hint picks f32 or bf16
openvino-fp16          weights stored as fp16 (half the size); computed in f16 on GPU/NPU,
                       in f32 on CPUs
openvino-int8-weights  NNCF weight compression: int8 weights (asymmetric, per output channel),
                       activations in float. On MiniLM (LoRA, maintenance) it kept all 120 test
                       answers at 0.83 ms against 1.8 ms for the f32 IR and 2.2 ms for ONNX
                       Runtime fp32, where full int8 changed 1-2% of them.
openvino-int8          NNCF post-training quantization with the recipe for the model type
                       (ModelType.TRANSFORMER for text, the CNN default for images),
                       calibrated on real rows. When it misses the budget, NNCF's accuracy
                       control reverts the quantizers that cost most, until top-1 agreement
                       with PyTorch is back within the budget; the gate then judges again.

STACK.md, on all-MiniLM-L6-v2: NNCF's transformer recipe kept about 99% of answers where
ONNX Runtime's dynamic int8 kept 95-98%, and OpenVINO runs its IR about twice as fast with
static shapes as with dynamic ones (the runtime compiles each bucket shape once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError, require
from ..plugins import import_builtin
from .gate import VERDICT
from .nncf import accuracy_control, load_nncf, model_type, progress_to_stderr
from .registry import Mode, names, register

# the runtime engine lives in the openvino plugin (a device needs no build side)
ENGINE = import_builtin("edgeft_openvino.engine")
PRECISION_HINTS = ENGINE.PRECISION_HINTS

log = logging.getLogger(__name__)

# the IR variants the openvino plugin's target tries per precision; ir_variant converts them
register(Mode("openvino-fp32", "fp32", None, engine="openvino"))
register(Mode("openvino-fp16", "fp16", None, engine="openvino"))
register(Mode("openvino-bf16", "bf16", None, engine="openvino"))
register(Mode("openvino-int8", "int8", None, engine="openvino", calibrated=True, needs_calibration=True,
              accuracy_control=True))
register(Mode("openvino-int8-weights", "int8", None, engine="openvino"))


def runtime_settings(settings: dict, precision: str) -> dict:
    """runtime.openvino in the manifest: device, threads, streams, hint and inference precision."""
    device = settings.get("accelerator") or "CPU"
    hint = PRECISION_HINTS[precision]
    if precision == "fp16" and device.upper().startswith("CPU"):
        hint = "f32"  # weights stored fp16; x86 CPUs compute them in f32
    return {"device": device, "threads": settings.get("threads"), "streams": settings.get("streams"),
            "performance_hint": (settings.get("performance_hint") or "latency").upper(),
            "inference_precision": hint}


def open_ir(path: Path, settings: dict, build: bool = False):
    """The IR as a model(arrays) -> {"features"}; at build time on this machine's CPU."""
    s = dict(settings)
    if build:  # the build host checks the IR on its own CPU
        s["device"] = "CPU"
        if s.get("inference_precision") not in ("f32", "bf16"):
            s["inference_precision"] = "f32"
    return ENGINE.OpenVinoModel(path, s)


def _quantizers(model) -> set[str]:
    return {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}


def ir_variant(src: Path, work: Path, mode: str, *, modality: str, gate, calibration: list[dict[str, np.ndarray]],
               settings: dict, search: bool = True) -> dict:
    """Convert (and for int8 quantize) `src` into work/backbone.xml; gate it. Same result keys
    as edgeft.quantize.quantize_to_budget."""
    if mode not in names("openvino"):
        raise UsageError(f"unknown OpenVINO variant {mode!r}; one of {', '.join(names('openvino'))}.")
    ov = require("openvino", "openvino")
    work.mkdir(parents=True, exist_ok=True)
    xml = work / "backbone.xml"
    model = ov.convert_model(str(src))
    out = {"mode": mode, "op_types": [], "per_channel": False, "kept_float": []}
    if mode not in ("openvino-int8", "openvino-int8-weights"):
        ov.save_model(model, str(xml), compress_to_fp16=(mode == "openvino-fp16"))
        out.update(op_types=["(all)"], **gate(xml), path=xml)
        return out

    nncf = load_nncf()
    if mode == "openvino-int8-weights":
        with progress_to_stderr():
            compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(compressed, str(xml), compress_to_fp16=False)
        out.update(op_types=["MatMul", "Gather"] if modality == "text" else ["MatMul", "Convolution"],
                   per_channel=True, **gate(xml), path=xml)
        return out
    if not calibration:
        raise UsageError("openvino-int8 needs calibration rows; none were given.")
    t0 = time.perf_counter()
    with progress_to_stderr():
        quantized = nncf.quantize(model, nncf.Dataset(calibration), model_type=model_type(nncf, modality),
                                  subset_size=len(calibration))
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    plain_fq = _quantizers(quantized)
    out.update(op_types=["FakeQuantize"], per_channel=True, **gate(xml, mode), path=xml,
               calibration_rows=len(calibration), seconds=round(time.perf_counter() - t0, 2))
    if out["passed"] or not search:
        return out

    controlled, info = accuracy_control(model, calibration, gate, modality, src)
    xml_ac = work / "backbone.ac.xml"
    ov.save_model(controlled, str(xml_ac), compress_to_fp16=False)
    verdict = gate(xml_ac)
    kept = sorted(plain_fq - _quantizers(controlled))
    out["plain"] = {k: out[k] for k in VERDICT}
    out["search"] = {**info, "quantizers": len(plain_fq), "reverted": len(kept)}
    out.update(verdict, path=xml_ac, kept_float=kept, plain_path=xml)
    return out
