"""ONNX Runtime sessions for a classifier: feed only the inputs the graph declares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BundleError

META_KEY = "edgeft"  # the one ONNX metadata entry edgeft writes: a JSON object


def read_meta(model) -> dict:
    """The edgeft metadata of an onnx ModelProto ({} when it has none)."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[META_KEY]) if META_KEY in props else {}


def write_meta(model, meta: dict, version: str | None = None) -> None:
    """Make `meta` the ModelProto's only metadata entry; edgeft (`version`) its producer."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    model.producer_name = "edgeft"
    if version is not None:
        model.producer_version = version


def make_session(path: str | Path | bytes, providers: list[str] | None = None, threads: int | None = None,
                 optimize: bool = True):
    """An onnxruntime session for a model file (or a serialized model); `optimize=False` keeps
    every node as it is, so intermediate values stay visible."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are about its own internals
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    available = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types
        where = "the model" if isinstance(path, bytes) else path
        raise BundleError(f"{where}: onnxruntime cannot load it ({str(e).splitlines()[0]}).") from None


class OnnxModel:
    """One ONNX file: `model(arrays)` -> {output name: array}."""

    def __init__(self, path: str | Path, providers=None, threads=None):
        self.path = Path(path)
        self.session = make_session(path, providers, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._float16 = {n for n, t in types.items() if t == "tensor(float16)"}

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in arrays]
        if missing:
            raise BundleError(f"{self.path}: the model needs inputs {missing}, the preprocessing gives {sorted(arrays)}.")
        feed = {n: arrays[n].astype(np.float16) if n in self._float16 else arrays[n] for n in self.inputs}
        try:
            results = self.session.run(None, feed)
        except MemoryError:
            raise
        except Exception as e:  # onnxruntime raises its own types (InvalidArgument, Fail, RuntimeException)
            lines = str(e).strip().splitlines() or [type(e).__name__]
            given = ", ".join(f"{n} {list(np.shape(a))}" for n, a in feed.items())
            declared = ", ".join(f"{i.name} {list(i.shape)}" for i in self.session.get_inputs())
            raise BundleError(f"{self.path}: onnxruntime cannot run it ({lines[0].strip()}); inputs given: {given}; "
                              f"the model declares: {declared}. Does the preprocessing fit this model?") from None
        return dict(zip(self.outputs, results, strict=True))

    def describe(self) -> list[str]:
        """What runs it, for reports: the execution providers of its session."""
        return self.session.get_providers()

    def metadata(self) -> dict:
        meta = self.session.get_modelmeta().custom_metadata_map
        return json.loads(meta["edgeft"]) if "edgeft" in meta else {}
