"""Built-in target `cpu`: x86-64 and ARM64 Linux CPUs with onnxruntime's CPU provider.

Variants: text int8 tries the registry's defaults (dynamic int8, dynamic int8 of the
transformer-fused graph, weight-only int8 of the unfused and of the fused graph); image int8 tries static QDQ int8 (calibrated on
real images, per-channel weights: QLinearConv kernels).

Which passing variant ships: when the build host is of the profile's ISA class
(edgeft.quantize.isa), the fastest measured there; otherwise the first in VARIANT_ORDER for the
profile's class, whose reasons and sources are in ORDER_NOTES. An order is written down only
where something backs it; a class without one is ranked by the host's timings, and the build
says so.
"""

from edgeft.hookspecs import Target, hookimpl

VARIANT_ORDER = {
    # Raspberry Pi 4 (Cortex-A72: NEON, no dot product) and Pi 5 (Cortex-A76: SDOT/UDOT)
    "arm64": ("static", "dynamic-fused", "dynamic", "weight-only-fused", "weight-only"),
    # Intel Xeon with AVX-512 VNNI and AMX (STACK.md, issue 16)
    "x86-64/amx": ("dynamic-fused", "dynamic", "weight-only-fused", "weight-only", "static"),
    # x86-64 without VNNI (AVX2): AMD EPYC development host, bench/latency.py (README)
    "x86-64/avx2": ("dynamic-fused", "weight-only-fused", "dynamic", "weight-only", "static"),
}
ORDER_NOTES = {
    "arm64": (
        "Not timed on an Arm device (QEMU proves numbers, never speed: STACK.md). From which ONNX "
        "Runtime MLAS kernels exist for Arm64: QLinearConv (static QDQ) runs MLAS's symmetric int8 "
        "convolution (onnxruntime/core/mlas/lib/convsym.cpp, convsym_kernel_neon.cpp; ORT PR #9772: "
        "'With DOT-CPUs, 32 deep conv is already faster'), while ConvInteger (dynamic int8 of a CNN) has "
        "no such kernel and ran EfficientNet-Lite0 about 18x slower than fp32 on x86 "
        "(examples/solar-cells/README.md). MatMulInteger and QAttention run MLAS's int8 GEMM "
        "(NEON, UDOT/SDOT on dot-product cores); the fused graph runs fewer, larger kernels than the "
        "unfused one (faster on both x86 hosts measured). Weight-only int8 (MatMulNBits, "
        "accuracy_level 4) computes in int8 only with the dot product; on a Cortex-A72 it computes "
        "in float. weight-only-fused (the same weights on the fused graph) sits before weight-only for "
        "the fused graph's fewer kernels, like dynamic-fused before dynamic."),
    "x86-64/amx": (
        "Measured on an Intel Xeon with AVX-512 VNNI and AMX, 2 cores, batch 1, MiniLM (STACK.md and "
        "issue 16): dynamic int8 per-channel 1.02 ms unfused, 0.84 ms fused; ORT dynamic int8 1.51 ms "
        "against weight-only int8 2.29 ms in one `python -m bench --quick` run. weight-only-fused not "
        "measured there: placed after the modes that were."),
    "x86-64/avx2": (
        "Measured on an AMD EPYC without VNNI (AVX2; 2 cores, shared, load 10-12), MiniLM LoRA on the maintenance "
        "example, batch 1, backbone only, interleaved rounds (2026-12-02): ORT fp32 25.5 ms, fused fp32 23.8, "
        "dynamic int8 of the fused graph 14.2 (1.8x fp32, but 97.2% agreement on 720 held-out rows), weight-only "
        "int8 of the fused graph 24.4 (99.4%), unfused weight-only 27.1 (99.0%). Without VNNI ONNX Runtime's "
        "MatMulNBits (accuracy level 4) has no faster int8 kernel than the float GEMM, so weight-only int8 buys "
        "size, and the fused graph buys the speed; dynamic int8 first where it passes, as it is the faster. "
        "2026-12-03, same host, the search ranking every node of the fused graph: dynamic-fused still missed the "
        "certifying gate with 12 of 25 nodes in float (7 of 666 rows changed); weight-only-fused passed with 9 of "
        "18 MatMuls in float (2 changed)."),
}


@hookimpl
def register_targets(register):
    register(Target(
        name="cpu",
        description="x86-64 and ARM64 Linux boards and servers (Raspberry Pi, industrial PCs): ONNX Runtime CPU",
        precision="int8",  # dynamic int8, per-channel: about 2x faster than fp32 at a quarter of the size
        precisions=("fp32", "int8", "int8-static", "fp16"),
        opset=17,
        providers=("CPUExecutionProvider",),
        retrain_memory_mb=400,
        retrain_max_samples=5000,
        fused_ops=True,  # the full onnxruntime wheel: ORT's fused transformer operators run
        # images: static QDQ (a CNN's usual int8: QLinearConv). Not dynamic: ConvInteger has no fast
        # kernel and ran EfficientNet-Lite0 about 18x slower than fp32 (examples/solar-cells/README.md),
        # so it could only win by failing to be faster. Text: the registry's defaults
        variants={"int8:image": ("static",)},
        variant_order=VARIANT_ORDER,
        variant_order_notes=ORDER_NOTES,
    ))
