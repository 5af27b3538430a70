"""Device profiles: TOML files naming one real device (its target and overrides), and finding them.

Build side: `edgeft build --device NAME|FILE.toml` and `edgeft devices` read them; the device
never does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .config import read_toml
from .errors import ProfileError, did_you_mean
from .plugins import get_target, registry
from .targets import PRECISIONS, Target

HINTS = ("latency", "throughput", "cumulative_throughput")
ARCHES = ("arm64", "x86-64")
# the instruction-set features a profile's `isa` may name, per arch (edgeft.quantize.isa reads them)
FEATURES = {"x86-64": ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"),
            "arm64": ("neon", "dotprod", "i8mm", "sve", "bf16")}


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
    # the int8-relevant instruction-set extensions of the device's CPU (edgeft.quantize.isa):
    # x86-64 avx2, avx512f, avx512_vnni, avx_vnni, amx_int8; arm64 neon, dotprod, i8mm, sve.
    # Unset: an Arm `cpu` the isa module knows fills it in; otherwise any host of `arch` ranks alike
    isa: tuple[str, ...] | None = None
    # mobile: also ship backbone.onnx beside mobile/backbone.ort (by default only the .ort)
    keep_onnx: bool = False
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
        if self.isa is not None:
            known = FEATURES.get(self.arch or "", ())
            bad = [f for f in self.isa if f not in known]
            if self.arch is None or bad:
                raise ProfileError(f"{self.path or self.name}: isa: " + (
                    "needs arch" if self.arch is None else
                    f"{bad[0]!r} is not an {self.arch} feature edgeft knows ({', '.join(known)})."
                    f"{did_you_mean(str(bad[0]), known)}"))
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
            "keep_onnx": self.keep_onnx,
            "retrain": {
                "memory_mb": self.memory_mb or target.retrain_memory_mb,
                "max_samples": self.retrain_max_samples or target.retrain_max_samples,
            },
        }


PROFILE_KEYS = {f.name for f in fields(Profile)} - {"path"}


def read_profile(path: str | Path) -> Profile:
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
    if "isa" in flat:
        v = flat["isa"]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ProfileError(f"{path}: isa: expected a list of instruction-set features, got {v!r}.")
        flat["isa"] = tuple(v)
    if "providers" in flat:
        p = flat["providers"]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
            raise ProfileError(f"{path}: providers: expected a list of execution provider names, got {p!r}.")
        flat["providers"] = tuple(p)
    for key in ("name", "target", "description", "accelerator", "performance_hint", "arch", "cpu"):
        if key in flat and not isinstance(flat[key], str):
            raise ProfileError(f"{path}: {key}: expected a string, got {flat[key]!r}.")
    for key in ("static_shapes", "keep_onnx"):
        if key in flat and not isinstance(flat[key], bool):
            raise ProfileError(f"{path}: {key}: expected true or false, got {flat[key]!r}.")
    return Profile(**flat, path=str(path))


def all_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in registry().profile_dirs:
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def find_profile(device: str) -> tuple[Profile, Target]:
    """`--device NAME` (a profile in a devices folder) or `--device PATH/TO/FILE.toml`."""
    p = Path(device)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ProfileError(f"{p}: no such device profile file.")
        profile = read_profile(p)
    else:
        profiles = all_profiles()
        if device not in profiles:
            raise ProfileError(f"--device: no profile named {device!r}; known profiles: {', '.join(profiles)}."
                               f"{did_you_mean(device, profiles)} Or pass a path to your own .toml.")
        profile = read_profile(profiles[device])
    try:
        target = get_target(profile.target)
    except ProfileError as e:
        raise ProfileError(f"{profile.path}: target: {e}") from None
    return profile, target
