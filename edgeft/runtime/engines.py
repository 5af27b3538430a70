"""The built-in runtime engine, onnxruntime, registered as a default plugin like any plugin's
engine. Other engines (OpenVINO) come from their plugins; runtime/bundle.py asks the plugin
registry for the one a bundle's manifest names."""

from __future__ import annotations

from pathlib import Path

from ..hookspecs import Engine, hookimpl
from .session import OnnxModel


def _load_onnx(bundle: Path, manifest: dict, providers: list[str] | None, threads: int | None) -> OnnxModel:
    return OnnxModel(bundle / manifest["backbone"], providers, threads)


ONNXRUNTIME = Engine("onnxruntime", _load_onnx, "ONNX Runtime: an ONNX (or ORT-format) backbone with the "
                     "bundle's execution providers")


@hookimpl
def register_engines(register):
    register(ONNXRUNTIME)
