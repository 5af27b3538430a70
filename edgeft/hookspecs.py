"""The plugin contract: the hooks a device plugin implements, and everything a plugin may touch.

This is the one file a plugin author reads, and the one module a plugin imports:

    from edgeft.hookspecs import BuildContext, Target, hookimpl

A third-party plugin is a Python package registered in the `edgeft` entry-point group:

    [project.entry-points.edgeft]
    acme = "edgeft_acme"

and implements one or more of these hooks with `@hookimpl`. The built-in plugins (cpu,
jetson, mobile, openvino under plugins/, and edgeft.runtime.engines for onnxruntime) use
exactly the same hooks; edgeft registers them in code, as default plugins.

What a plugin may use, all exported here:
- `Target`: a device family (opset, precisions, execution providers, shape policy, retrain
  limits, the engine that runs its backbone, a `package(ctx)` step);
- `BuildContext`: what `package(ctx)` gets: the bundle's settings (`ctx.runtime`,
  `ctx.precision`, `ctx.backbone`, `ctx.head`, `ctx.inputs`, `ctx.preprocessing`) and
  methods that change the bundle (`ctx.add_file`, `ctx.set_target_info`, `ctx.set_backbone`);
- `Engine`: what runs a bundle's backbone on the device;
- `PRECISIONS`, and the errors a plugin raises: `BundleError` (a file or step that failed),
  `ProfileError` (a target or profile that cannot be used), `MissingDependencyError` (say
  what to install).
"""

from __future__ import annotations

import pluggy

from .errors import BundleError, MissingDependencyError, ProfileError
from .targets import PRECISIONS, BuildContext, Engine, Target

hookspec = pluggy.HookspecMarker("edgeft")
hookimpl = pluggy.HookimplMarker("edgeft")

__all__ = ["PRECISIONS", "BuildContext", "BundleError", "Engine", "MissingDependencyError", "ProfileError",
           "Target", "hookimpl", "hookspec"]


@hookspec
def register_targets(register):
    """Register device targets: call `register(Target(...))` once per target.

    A target describes a device family: the ONNX opset, the default precision, the
    onnxruntime execution providers in order of preference, whether input shapes must be
    fixed, the limits of on-device retraining, the engine that runs the backbone, and a
    `package(ctx)` function that adds the family's own files to a bundle (an ORT-format
    model, an engine build script...) through the `BuildContext` methods.
    """


@hookspec
def register_engines(register):
    """Register runtime engines: call `register(Engine(...))` once per engine.

    An engine runs a bundle's backbone on the device; the bundle's manifest names it
    (runtime.engine) and a target says which one its bundles use. `Engine.load` must stay
    torch-free: `edgeft device ...` runs it with numpy and the engine's own runtime only.
    """


@hookspec
def register_device_profiles(register):
    """Register folders of device profiles (TOML): call `register(path)` per folder.

    A profile names one real device: which target, and overrides (precision, threads,
    memory budget, input sizes). `edgeft build --device NAME` finds NAME.toml in them.
    """
