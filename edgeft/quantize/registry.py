"""What a quantization mode is, in one place: each mode's module registers one `Mode`.

`edgeft quantize --mode`, `edgeft build` (the variants it tries per precision) and the
plugins read this registry; nothing else lists modes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError, did_you_mean


@dataclass(frozen=True)
class Mode:
    name: str
    precision: str  # what the backbone becomes: int8, fp16, fp32, bf16
    # ONNX modes: run(src, dst, *, modality, calibration, per_channel, exclude) -> the op types
    # it quantized, writing dst; None for the OpenVINO IR variants (quantize.openvino_ir converts)
    run: Callable[..., list[str]] | None
    calibrated: bool = False  # reads real rows: to calibrate, or (dynamic, weight-only) to rank nodes for the search
    needs_calibration: bool = False  # refuses to run without calibration rows
    searchable: bool = False  # its nodes can be kept in float one by one (quantize.search)
    accuracy_control: bool = False  # on a miss, NNCF's accuracy control reverts the quantizers that cost most
    per_channel: bool = True  # honours per_channel (fp16 has no scales)
    engine: str = "onnxruntime"  # what runs the result: "openvino" for the IR variants of the openvino target
    default_for: tuple[str, ...] = ()  # target precisions whose default build variants include it
    help: str = ""


_MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    _MODES[mode.name] = mode
    return mode


def names(engine: str | None = "onnxruntime") -> tuple[str, ...]:
    """Registered modes, in registration order; engine None: every one (OpenVINO IR variants too)."""
    return tuple(n for n, m in _MODES.items() if engine is None or m.engine == engine)


def get(name: str, engine: str | None = "onnxruntime") -> Mode:
    """The mode called `name`; UsageError naming the choices otherwise."""
    choices = names(engine)
    if name not in choices:
        where = "--mode" if engine == "onnxruntime" else "quantization variant"
        raise UsageError(f"{where}: unknown mode {name!r}; choose one of {', '.join(choices)}.{did_you_mean(name, choices)}")
    return _MODES[name]


def default_variants(precision: str) -> tuple[str, ...]:
    """What `edgeft build` tries for a target precision unless the target names its own variants."""
    return tuple(n for n, m in _MODES.items() if precision in m.default_for)
