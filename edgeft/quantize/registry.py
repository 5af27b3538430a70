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
    # the mode it runs after ONNX Runtime's transformer fusions (quantize.fuse), e.g. "dynamic";
    # None: no fusion. Fused graphs hold com.microsoft operators: only targets with fused_ops take them
    fuse: str | None = None
    modalities: tuple[str, ...] = ("text", "image")  # the models it applies to
    # activation scales computed per call over the whole batch (dynamic int8): a row's answer
    # depends on its batch-mates, so the device answers one row per call (runtime.max_batch 1)
    batch_dependent: bool = False
    # honours reduce_range (7-bit weights): what x86-64 CPUs without VNNI need so that u8 x s8
    # multiply-adds cannot saturate their 16-bit sums (edgeft.quantize.isa.reduce_range)
    takes_reduce_range: bool = False
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


def default_variants(precision: str, *, fused_ops: bool = False, modality: str | None = None) -> tuple[str, ...]:
    """What `edgeft build` tries for a target precision unless the target names its own variants:
    fused modes only for a target whose runtime has ONNX Runtime's contrib operators, and only the
    modes that apply to `modality` (None: any)."""
    return tuple(n for n, m in _MODES.items() if precision in m.default_for and (fused_ops or m.fuse is None)
                 and (modality is None or modality in m.modalities))


def variants_for(target, precision: str, modality: str) -> tuple[str, ...]:
    """The variants `edgeft build` tries for `target` at `precision` on a `modality` model: the
    target's own list (a "precision:modality" key before a "precision" one), else the registry's
    defaults for the precision. Modes that do not apply to the modality, and fused modes on a target without
    fused_ops, are left out either way."""
    fused_ops = bool(getattr(target, "fused_ops", False))
    own = target.variants or {}
    key = next((k for k in (f"{precision}:{modality}", precision) if k in own), None)
    if key is None:
        return default_variants(precision, fused_ops=fused_ops, modality=modality)
    listed = own[key]
    out = []
    for name in listed:
        m = _MODES.get(name)
        if m is not None and (modality not in m.modalities or (m.fuse and not fused_ops)):
            continue
        out.append(name)
    return tuple(out)
