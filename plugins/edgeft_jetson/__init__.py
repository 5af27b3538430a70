"""Built-in target `jetson`: NVIDIA Jetson with JetPack; TensorRT, then CUDA, then CPU.

The bundle carries an fp16 (or int8 QDQ) ONNX backbone and `build_engine.sh`, which builds
the TensorRT engine with trtexec on the device itself (engines are specific to the GPU and
the TensorRT version, so they cannot be built here), with shape ranges that cover what the
preprocessing produces.
"""

import json
import shlex

from edgeft.hookspecs import BuildContext, Target, hookimpl


def _shapes(ctx: BuildContext) -> tuple[str, str, str, dict]:
    r = ctx.runtime
    batch = max(1, r["batch_size"])
    if ctx.modality == "text":
        longest = r.get("max_length") or ctx.preprocessing["max_length"]
        opt = min(64, longest)
        dims = lambda b, s: ",".join(f"{n}:{b}x{s}" for n in ctx.inputs)  # noqa: E731
        return dims(1, 1), dims(batch, opt), dims(batch, longest), {"batch": batch, "sequence": [1, opt, longest]}
    h, w = ctx.preprocessing["size"]
    dims = lambda b: ",".join(f"{n}:{b}x3x{h}x{w}" for n in ctx.inputs)  # noqa: E731
    return dims(1), dims(batch), dims(batch), {"batch": batch, "image": [h, w]}


def package(ctx: BuildContext) -> None:
    lo, opt, hi, ranges = _shapes(ctx)
    precision = ctx.precision
    flag = {"fp16": "--fp16", "int8-static": "--int8 --fp16", "fp32": ""}.get(precision, "")
    backbone = ctx.backbone.name
    script = ctx.add_file("jetson/build_engine.sh", "TensorRT engine build script (run on the device)")
    script.write_text(f"""#!/usr/bin/env bash
# Build the TensorRT engine for this bundle's backbone, on the Jetson itself.
# Engines depend on the GPU and TensorRT version, so they are built where they run.
# Requires JetPack (trtexec lives in /usr/src/tensorrt/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
TRTEXEC=${{TRTEXEC:-/usr/src/tensorrt/bin/trtexec}}
"$TRTEXEC" --onnx={shlex.quote(backbone)} --saveEngine=jetson/backbone.plan {flag} \\
    --minShapes={lo} \\
    --optShapes={opt} \\
    --maxShapes={hi}
echo "engine written to jetson/backbone.plan"
""")
    script.chmod(0o755)
    opts = ctx.add_file("jetson/tensorrt_provider_options.json", "ONNX Runtime TensorRT provider options")
    opts.write_text(json.dumps({
        "trt_fp16_enable": precision in ("fp16", "int8-static"),
        "trt_int8_enable": precision == "int8-static",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "jetson/trt_cache",
        "trt_profile_min_shapes": lo,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": hi,
    }, indent=2) + "\n")
    ctx.set_target_info({"tensorrt_shapes": ranges, "engine_script": "jetson/build_engine.sh"})


@hookimpl
def register_targets(register):
    register(Target(
        name="jetson",
        description="NVIDIA Jetson (Orin, Xavier) with JetPack: TensorRT, CUDA, then CPU",
        precision="fp16",
        precisions=("fp32", "fp16", "int8-static"),
        opset=17,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        retrain_memory_mb=1024,
        retrain_max_samples=20000,
        package=package,
    ))
