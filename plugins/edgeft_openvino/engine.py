"""The `openvino` runtime engine: an OpenVINO backbone (IR: backbone.xml + backbone.bin) for
bundles of the `openvino` target.

Imported only for such bundles, so a device without OpenVINO runs every other bundle. The
head stays what it is on every target (numpy fit, ONNX file); only the features come from
OpenVINO.

Shapes: OpenVINO's CPU plugin runs a model compiled for one static shape about twice as
fast as the same model with dynamic shapes, and recompiles (tens to hundreds of ms) when a
dynamic shape changes. So texts are padded to a few bucket widths chosen at build time
(preprocessor.json "buckets") and each (batch, width) shape seen is compiled once, as a
static model, and kept. Images have one size already.

Precision: `inference_precision` is passed through as OpenVINO's INFERENCE_PRECISION_HINT.
"fp32" bundles ask for f32 explicitly: on CPUs with AMX or AVX512-BF16 OpenVINO would
otherwise run them in bf16 and change answers the parity gate measured in f32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.hookspecs import BundleError, MissingDependencyError

INSTALL = 'pip install -c constraints.txt "edgeft[openvino]" (on a device, pip install openvino is enough)'
MAX_SHAPES = 24  # compiled shapes kept (batches 1..32 in powers of two x 3 widths = 18); then LRU
PRECISION_HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}


def load_openvino():
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError(f"openvino is not installed: this bundle runs on OpenVINO. Install it with: {INSTALL}") from None
    return openvino


HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def compile_config(settings: dict) -> dict:
    """OpenVINO properties from a bundle's runtime.openvino settings (all optional); BundleError
    naming the key for a value OpenVINO would not take."""
    def count(key):
        v = settings.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1024):
            raise BundleError(f"runtime.openvino.{key}: expected a positive integer up to 1024, got {v!r}.")
        return v

    hint = str(settings.get("performance_hint") or "LATENCY").upper()
    if hint not in HINTS:
        raise BundleError(f"runtime.openvino.performance_hint: {settings.get('performance_hint')!r} is not one of "
                          f"{', '.join(HINTS)}.")
    config = {"PERFORMANCE_HINT": hint}
    if count("threads"):
        config["INFERENCE_NUM_THREADS"] = settings["threads"]
    if count("streams"):
        config["NUM_STREAMS"] = str(settings["streams"])
    precision = settings.get("inference_precision")
    if precision is not None:
        if precision not in set(PRECISION_HINTS.values()):
            raise BundleError(f"runtime.openvino.inference_precision: {precision!r} is not one of "
                              f"{', '.join(sorted(set(PRECISION_HINTS.values())))}.")
        config["INFERENCE_PRECISION_HINT"] = precision
    device = settings.get("device", "CPU")
    if not isinstance(device, str) or not device or len(device) > 100:
        raise BundleError(f"runtime.openvino.device: expected an OpenVINO device name such as CPU, got {device!r}.")
    return config


class OpenVinoModel:
    """`model(arrays)` -> {output name: array}, like edgeft.runtime.session.OnnxModel."""

    def __init__(self, path: str | Path, settings: dict | None = None):
        ov = load_openvino()
        self.path = Path(path)
        self.settings = dict(settings or {})
        try:
            self.config = compile_config(self.settings)
        except BundleError as e:
            raise BundleError(f"{self.path.parent / 'manifest.json'}: {e}") from None
        self.device = str(self.settings.get("device", "CPU"))
        self.core = ov.Core()
        plain = self.device.split(":")[0].split(".")[0].upper()
        if plain not in ("AUTO", "MULTI", "HETERO", "BATCH") and plain not in {
                d.split(".")[0] for d in self.core.available_devices}:
            self.requested, self.device = self.device, "CPU"  # as onnxruntime falls back to its CPU provider
        else:
            self.requested = self.device
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise BundleError(f"{self.path}: OpenVINO cannot read it ({_first_line(e)}).") from None
        self.inputs = [p.get_any_name() for p in self.model.inputs]
        self.outputs = [p.get_any_name() for p in self.model.outputs]
        self._compiled: dict[tuple, object] = {}
        self._ov = ov

    def _compiled_for(self, feed: dict[str, np.ndarray]):
        key = tuple(feed[n].shape for n in self.inputs)
        compiled = self._compiled.pop(key, None)
        if compiled is None:
            try:
                model = self.model.clone()
                model.reshape({n: self._ov.PartialShape(list(feed[n].shape)) for n in self.inputs})
                compiled = self.core.compile_model(model, self.device, self.config)
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"{self.path}: OpenVINO cannot compile it for {self.device} "
                                  f"({_first_line(e)}).") from None
            if len(self._compiled) >= MAX_SHAPES:
                self._compiled.pop(next(iter(self._compiled)))
        self._compiled[key] = compiled  # most recently used last
        return compiled

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in arrays]
        if missing:
            raise BundleError(f"{self.path}: the model needs inputs {missing}, the preprocessing gives {sorted(arrays)}.")
        feed = {n: np.ascontiguousarray(arrays[n]) for n in self.inputs}
        compiled = self._compiled_for(feed)
        try:
            result = compiled(feed)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"{self.path}: OpenVINO failed to run it ({_first_line(e)}).") from None
        return {name: np.asarray(result[compiled.output(name)]) for name in self.outputs}

    def inference_precision(self) -> str:
        """The precision OpenVINO computes in ("f32", "bf16", ...) once a shape has been compiled, else "?"."""
        compiled = next(iter(self._compiled.values()), None)
        if compiled is None:
            return "?"
        try:
            value = compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # noqa: BLE001 - not every device reports it
            return "?"
        return value.to_string() if hasattr(value, "to_string") else str(value)

    def describe(self) -> list[str]:
        """What runs it, for reports: the device and the precision OpenVINO actually uses."""
        fallback = f", {self.requested} not present" if self.requested != self.device else ""
        return [f"OpenVINO {self._ov.get_version().split('-')[0]} {self.device} ({self.inference_precision()}{fallback})"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
