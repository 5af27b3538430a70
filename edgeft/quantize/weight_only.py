"""weight-only: int8 weights in blocks of 32 (MatMulNBits), activations stay float.

The answers of fp32 at a quarter of the size (measured on MiniLM: 100% top-1 agreement where
dynamic int8 kept 96-98%), about 1.5-2x faster than fp32 on CPU; the embedding table int8 too.
"""

from __future__ import annotations

import logging

from ..errors import require
from .ort import extra_options, no_preprocess_nag, present_ops
from .registry import Mode, register

WEIGHT_ONLY_BLOCK = 32  # int8 scales per 32 weights: block 128 flipped 2.5% of MiniLM's answers, 32 none


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None) -> list[str]:
    """MatMul weights to 8-bit blocks (MatMulNBits, int8 compute where the CPU has it), then the
    embedding tables (Gather) to int8 with dynamic quantization."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    require("onnx_ir")  # onnxruntime's MatMulNBits quantizer imports it; say how to install it
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    present = present_ops(src)
    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)  # it logs every node it skips at INFO
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                                accuracy_level=4, bits=8)
    with no_preprocess_nag():
        q = nbits.MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                       accuracy_level=4, algo_config=config, nodes_to_exclude=list(exclude or []))
        q.process()
        mid = dst.with_name(f".{dst.name}.matmul.onnx")
        try:
            q.model.save_model_to_file(str(mid), use_external_data_format=False)
            if "Gather" in present:
                quantize_dynamic(str(mid), str(dst), op_types_to_quantize=["Gather"], per_channel=False,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None,
                                 extra_options=extra_options())
            else:
                mid.replace(dst)
        finally:
            mid.unlink(missing_ok=True)
    return sorted({"MatMul", "Gather"} & present)


def run_fused(src, dst, *, modality, calibration=None, per_channel=True, exclude=None) -> list[str]:
    """Weight-only int8 of the transformer-fused graph (src fused here unless it is already): the
    MatMuls (attention output, FFN) become MatMulNBits; the fused Attention keeps its float Q/K/V
    weight and the embedding tables stay float (QEmbedLayerNormalization alone flipped 6 of 720
    held-out answers on the maintenance example, bench/latency.py)."""
    import tempfile
    from pathlib import Path

    from ..errors import UsageError
    from .fuse import fuse, is_fused

    if modality != "text":
        raise UsageError(f"{src}: weight-only-fused fuses transformer text backbones; this is an {modality} model.")
    if is_fused(src):
        return run(src, dst, modality=modality, calibration=calibration, per_channel=per_channel, exclude=exclude)
    with tempfile.TemporaryDirectory(prefix="edgeft-fuse-") as tmp:
        fused = Path(tmp) / "fused.onnx"
        fuse(src, fused)
        return run(fused, dst, modality=modality, calibration=calibration, per_channel=per_channel, exclude=exclude)


# after dynamic in the registry: build tries int8 variants in this order
MODE = register(Mode("weight-only", "int8", run, calibrated=True, searchable=True, default_for=("int8",),
                     help="int8 weights, float activations"))
# On an x86-64 host without VNNI (AMD EPYC, AVX2; maintenance example, 720 held-out rows) the
# fused graph's weight-only int8 kept 99.4% of the answers at the fused fp32 graph's speed, where
# dynamic int8 of it was 1.8x faster but kept 97.2% (bench/latency.py, README)
FUSED = register(Mode("weight-only-fused", "int8", run_fused, calibrated=True, searchable=True, default_for=("int8",),
                      fuse="weight-only", modalities=("text",),
                      help="ORT's transformer fusions, then int8 weights with float activations (full ONNX Runtime only)"))
