"""Built-in target `openvino`: Intel CPUs, integrated GPUs and NPUs with OpenVINO.

The bundle's backbone is an OpenVINO IR (backbone.xml + backbone.bin): int8 by NNCF's
post-training recipe for the model type (with NNCF's accuracy control when it misses the
budget) or NNCF's int8 weight compression, whichever is faster of those within the budget;
or fp16/bf16/fp32. Texts are padded to a few bucket widths chosen from the
calibration rows, so the runtime compiles each shape once and never again. Threads,
streams, the performance hint and the OpenVINO device (CPU, GPU, NPU, AUTO) come from the
device profile; "fp32" runs as f32 even on CPUs where OpenVINO would pick bf16. The head
stays the numpy-trained ONNX head of every bundle, so `edgeft device retrain` works alike.

Needs the `openvino` extra to build (openvino + nncf); a device needs only openvino.
"""

import json
import shlex
from pathlib import Path

from edgeft.hookspecs import BuildContext, BundleError, Engine, Target, hookimpl


def package(ctx: BuildContext) -> None:
    """A benchmark_app command for the device, with the bundle's own shapes and settings."""
    ov = ctx.runtime.get("openvino", {})
    shapes = ""
    if ctx.modality == "text":
        widths = ctx.preprocessing.get("buckets") or [ctx.preprocessing["max_length"]]
        shapes = ",".join(f"{n}[1,{widths[-1]}]" for n in ctx.inputs)
    else:
        h, w = ctx.preprocessing["size"]
        shapes = ",".join(f"{n}[1,3,{h},{w}]" for n in ctx.inputs)
    args = ["benchmark_app", "-m", ctx.backbone.name, "-d", ov.get("device", "CPU"),
            "-hint", ov.get("performance_hint", "LATENCY").lower(), "-shape", shapes,
            "-infer_precision", ov.get("inference_precision", "f32")]
    if ov.get("threads"):
        args += ["-nthreads", str(ov["threads"])]
    if ov.get("streams"):
        args += ["-nstreams", str(ov["streams"])]
    script = ctx.add_file("openvino/benchmark.sh", "OpenVINO benchmark_app command with this bundle's settings")
    script.write_text("#!/usr/bin/env bash\n# Measure the backbone on this device with OpenVINO's own tool "
                      "(pip install openvino-dev or the OpenVINO runtime's samples).\nset -euo pipefail\n"
                      'cd "$(dirname "$0")/.."\n' + " ".join(shlex.quote(a) for a in args) + "\n")
    script.chmod(0o755)
    ctx.set_target_info({"openvino": ov, "buckets": ctx.preprocessing.get("buckets"),
                         "benchmark": "openvino/benchmark.sh"})
    ctx.add_file("openvino/settings.json", "OpenVINO compile settings").write_text(json.dumps(ov, indent=2) + "\n")


def load_backbone(bundle: Path, manifest: dict, providers: list[str] | None, threads: int | None):
    """The bundle's IR as an OpenVINO model with the manifest's runtime.openvino settings."""
    from .engine import OpenVinoModel

    settings = manifest["runtime"].get("openvino")
    if not isinstance(settings, dict):
        raise BundleError(f"{bundle / 'manifest.json'}: runtime.openvino must be an object of OpenVINO settings.")
    return OpenVinoModel(bundle / manifest["backbone"], {**settings, **({"threads": threads} if threads else {})})


@hookimpl
def register_engines(register):
    # OpenVINO compiles each input shape once: batches padded to powers of two never compile again
    register(Engine("openvino", load_backbone, "OpenVINO: an IR backbone (backbone.xml + .bin)", pow2_batches=True))


@hookimpl
def register_targets(register):
    register(Target(
        name="openvino",
        description="Intel CPUs, integrated GPUs and NPUs: OpenVINO IR (int8 by NNCF), bucketed static shapes",
        precision="int8",
        precisions=("fp32", "fp16", "bf16", "int8"),
        opset=17,
        providers=("CPUExecutionProvider",),  # the head's onnxruntime session
        retrain_memory_mb=1024,
        retrain_max_samples=20000,
        package=package,
        engine="openvino",
        variants={"fp32": ("openvino-fp32",), "fp16": ("openvino-fp16",), "bf16": ("openvino-bf16",),
                  "int8": ("openvino-int8", "openvino-int8-weights")},
    ))
