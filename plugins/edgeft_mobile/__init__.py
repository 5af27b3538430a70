"""Built-in target `mobile`: Android (arm64) and iOS with ONNX Runtime Mobile.

Adds ORT-format models (`.ort`, what a reduced, minimal ONNX Runtime build loads) and
`required_operators.config` (pass it to ONNX Runtime's build with --include_ops_by_config
to compile only the operators this model needs). The bundle's backbone is then
`mobile/backbone.ort` alone (ONNX Runtime loads either format; the build's parity check runs
the .ort); a profile with `keep_onnx = true` ships `backbone.onnx` beside it. With fixed shapes the backbone takes
batch 1 and sequences padded to the profile's max_length, which NNAPI and CoreML prefer.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeft.hookspecs import BuildContext, BundleError, Target, hookimpl


def fix_shapes(ctx: BuildContext) -> None:
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    r = ctx.runtime
    model = onnx.load(str(ctx.backbone))
    make_dim_param_fixed(model.graph, "batch", r["batch_size"])
    if ctx.modality == "text":
        make_dim_param_fixed(model.graph, "sequence", r["max_length"] or ctx.preprocessing["max_length"])
    onnx.save(model, str(ctx.backbone))


def package(ctx: BuildContext) -> None:
    if ctx.runtime["static_shapes"]:
        fix_shapes(ctx)
    head = ctx.head
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(ctx.backbone, src / "backbone.onnx")
        shutil.copy2(head, src / "head.onnx")
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
               "--output_dir", str(out), "--optimization_style", "Fixed"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BundleError(f"mobile: ORT format conversion failed: {last[0]}")
        for name, role in (("backbone.ort", "ORT-format backbone for ONNX Runtime Mobile"),
                           ("head.ort", "ORT-format head for ONNX Runtime Mobile")):
            shutil.copy2(out / name, ctx.add_file(f"mobile/{name}", role))
        config = next(out.glob("*.config"))
        shutil.copy2(config, ctx.add_file("mobile/required_operators.config",
                                          "operators for a reduced ONNX Runtime build (--include_ops_by_config)"))
    ctx.set_target_info({"ort_format": "mobile/backbone.ort", "static_shapes": ctx.runtime["static_shapes"]})
    if not ctx.settings["keep_onnx"]:  # one backbone format: the phone loads the .ort
        ctx.set_backbone("mobile/backbone.ort")


@hookimpl
def register_targets(register):
    register(Target(
        name="mobile",
        description="Android arm64 and iOS phones: ONNX Runtime Mobile (ORT format), NNAPI / CoreML / XNNPACK",
        precision="int8",
        precisions=("fp32", "int8", "int8-static"),
        opset=17,
        providers=("NnapiExecutionProvider", "CoreMLExecutionProvider", "XnnpackExecutionProvider",
                   "CPUExecutionProvider"),
        static_shapes=True,
        retrain_memory_mb=256,
        retrain_max_samples=2000,
        package=package,
    ))
