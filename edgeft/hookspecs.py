"""The hooks a device plugin implements. This is the one file a plugin author reads.

A plugin is a Python package registered in the `edgeft` entry-point group:

    [project.entry-points.edgeft]
    acme = "edgeft_acme"

and implements one or more of these hooks with `@edgeft.hookimpl`. The built-in cpu,
jetson and mobile plugins (under plugins/) use exactly the same hooks and registration.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("edgeft")
hookimpl = pluggy.HookimplMarker("edgeft")


@hookspec
def register_targets(register):
    """Register device targets: call `register(Target(...))` once per target.

    A target describes a device family: the ONNX opset, the default precision, the
    onnxruntime execution providers in order of preference, whether input shapes must be
    fixed, the limits of on-device retraining, and a `package(ctx)` function that adds the
    family's own files to a bundle (an ORT-format model, an engine build script...).
    See `edgeft.targets.Target` and `edgeft.targets.BuildContext`.
    """


@hookspec
def register_device_profiles(register):
    """Register folders of device profiles (TOML): call `register(path)` per folder.

    A profile names one real device: which target, and overrides (precision, threads,
    memory budget, input sizes). `edgeft build --device NAME` finds NAME.toml in them.
    """
