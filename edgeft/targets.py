"""Device targets (registered by plugins) and device profiles (TOML files naming a device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ProfileError, did_you_mean

PRECISIONS = ("fp32", "int8", "int8-static", "fp16", "bf16")
ENGINES = ("onnxruntime", "openvino")
HINTS = ("latency", "throughput", "cumulative_throughput")


@dataclass(frozen=True)
class BuildContext:
    """What a target's `package` function gets while a bundle is being built."""

    bundle: Path  # the bundle folder being written (a temporary name until it is complete)
    profile: Profile
    target: Target
    manifest: dict  # add keys under manifest["target_files"] / manifest["extras"]
    backbone: Path  # the backbone ONNX file in the bundle
    inputs: list[str]
    modality: str
    preprocessing: dict

    def add_file(self, relpath: str, role: str) -> Path:
        """Declare a file the package step writes; it is hashed into the manifest."""
        self.manifest.setdefault("extras", {})[relpath] = {"role": role}
        path = self.bundle / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    plugin: str = ""  # filled in by the plugin manager
    precision: str = "fp32"  # the default when the profile does not say
    precisions: tuple[str, ...] = PRECISIONS  # what the family can run
    opset: int = 17
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    static_shapes: bool = False  # True: the runtime needs fixed input shapes
    retrain_memory_mb: int = 512
    retrain_max_samples: int = 5000
    package: Callable[[BuildContext], None] | None = None
    # what runs the backbone on the device: onnxruntime (backbone.onnx) or openvino (IR)
    engine: str = "onnxruntime"
    # quantization variants tried per precision (each gated, the fastest passing one kept);
    # None: edgeft's defaults (edgeft.quantize.default_variants)
    variants: dict[str, tuple[str, ...]] | None = None

    def __post_init__(self):
        if self.precision not in self.precisions:
            raise ProfileError(f"target {self.name}: default precision {self.precision!r} is not among {self.precisions}.")
        if self.engine not in ENGINES:
            raise ProfileError(f"target {self.name}: engine {self.engine!r} is not one of {', '.join(ENGINES)}.")


ARCHES = ("arm64", "x86-64")


@dataclass(frozen=True)
class Profile:
    """A real device. Unknown keys are errors: a person writes these files."""

    name: str
    target: str
    description: str = ""
    precision: str | None = None  # None: the target's default
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    memory_mb: int | None = None  # budget for on-device retraining
    max_length: int | None = None  # text: longest sequence the device runs
    image_size: int | None = None
    static_shapes: bool | None = None  # None: the target's choice
    batch_size: int = 1
    retrain_max_samples: int | None = None
    # OpenVINO: the device plugin (CPU, GPU, NPU, AUTO:GPU,CPU), streams and performance hint
    accelerator: str | None = None
    streams: int | None = None
    performance_hint: str | None = None
    # the instruction set: arch "arm64" or "x86-64"; cpu the core QEMU emulates for `device check --emulate`
    arch: str | None = None
    cpu: str | None = None
    path: str = ""

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ProfileError(f"{self.path or self.name}: precision: {self.precision!r} is not one of "
                               f"{', '.join(PRECISIONS)}.{did_you_mean(self.precision, PRECISIONS)}")
        if self.performance_hint is not None and self.performance_hint not in HINTS:
            raise ProfileError(f"{self.path or self.name}: performance_hint: {self.performance_hint!r} is not one of "
                               f"{', '.join(HINTS)}.{did_you_mean(str(self.performance_hint), HINTS)}")
        if self.arch is not None and self.arch not in ARCHES:
            raise ProfileError(f"{self.path or self.name}: arch: {self.arch!r} is not one of {', '.join(ARCHES)}."
                               f"{did_you_mean(str(self.arch), ARCHES)}")
        for key in ("threads", "memory_mb", "max_length", "image_size", "batch_size", "retrain_max_samples", "streams"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ProfileError(f"{self.path or self.name}: {key}: expected a positive integer, got {v!r}.")

    def resolved(self, target: Target) -> dict:
        """The settings a build uses: profile overrides over target defaults."""
        precision = self.precision or target.precision
        if precision not in target.precisions:
            raise ProfileError(f"{self.path}: precision {precision!r} is not supported by target {target.name} "
                               f"({', '.join(target.precisions)}).")
        return {
            "precision": precision,
            "providers": list(self.providers or target.providers),
            "threads": self.threads,
            "static_shapes": target.static_shapes if self.static_shapes is None else self.static_shapes,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "image_size": self.image_size,
            "opset": target.opset,
            "engine": target.engine,
            "accelerator": self.accelerator or "CPU",
            "streams": self.streams,
            "performance_hint": self.performance_hint or "latency",
            "retrain": {
                "memory_mb": self.memory_mb or target.retrain_memory_mb,
                "max_samples": self.retrain_max_samples or target.retrain_max_samples,
            },
        }


PROFILE_KEYS = {f.name for f in fields(Profile)} - {"path"}


def read_profile(path: str | Path) -> Profile:
    from .config import read_toml

    path = Path(path)
    doc = read_toml(path)
    flat: dict = {}
    for key, value in doc.items():
        if isinstance(value, dict):  # tables only group keys: [runtime], [limits]
            for k, v in value.items():
                flat[k] = v
        else:
            flat[key] = value
    for key in flat:
        if key.replace("-", "_") not in PROFILE_KEYS:
            raise ProfileError(f"{path}: unknown key '{key}'.{did_you_mean(key, sorted(PROFILE_KEYS))} "
                               f"Known keys: {', '.join(sorted(PROFILE_KEYS))}.")
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    flat.setdefault("name", path.stem)
    if "target" not in flat:
        raise ProfileError(f"{path}: missing key 'target' (the plugin target, e.g. \"cpu\").")
    if "providers" in flat:
        p = flat["providers"]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
            raise ProfileError(f"{path}: providers: expected a list of execution provider names, got {p!r}.")
        flat["providers"] = tuple(p)
    for key in ("name", "target", "description", "accelerator", "performance_hint", "arch", "cpu"):
        if key in flat and not isinstance(flat[key], str):
            raise ProfileError(f"{path}: {key}: expected a string, got {flat[key]!r}.")
    if "static_shapes" in flat and not isinstance(flat["static_shapes"], bool):
        raise ProfileError(f"{path}: static_shapes: expected true or false, got {flat['static_shapes']!r}.")
    return Profile(**flat, path=str(path))


@dataclass
class Registry:
    targets: dict[str, Target] = field(default_factory=dict)
    profile_dirs: list[Path] = field(default_factory=list)
