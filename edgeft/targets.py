"""Device targets and runtime engines, registered by plugins; what a target's package step gets.

Device profiles (TOML files naming one real device) are read in edgeft/profiles.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProfileError

PRECISIONS = ("fp32", "int8", "int8-static", "fp16", "bf16")


@dataclass(frozen=True)
class BuildContext:
    """What a target's `package(ctx)` gets while a bundle is being built: read the settings,
    add files, record target info. The bundle's manifest itself is edgeft's to write."""

    bundle: Path  # the bundle folder being written (a temporary name until it is complete)
    profile: Any  # the edgeft.profiles.Profile being built for
    target: Target
    _manifest: dict = field(repr=False)  # the manifest being built; plugins use the methods below
    inputs: list[str]
    modality: str
    preprocessing: dict

    @property
    def backbone(self) -> Path:
        """The backbone file in the bundle (what the device loads)."""
        return self.bundle / self._manifest["backbone"]

    @property
    def head(self) -> Path:
        """The build-time head file in the bundle."""
        return self.bundle / self._manifest["head"]["file"]

    @property
    def settings(self) -> dict:
        """The profile's settings over the target's defaults (a copy): precision, providers,
        threads, static_shapes, batch_size, max_length, keep_onnx, retrain limits..."""
        return self.profile.resolved(self.target)

    @property
    def precision(self) -> str:
        return self._manifest["precision"]

    @property
    def runtime(self) -> dict:
        """The bundle's runtime settings (a copy): providers, threads, static_shapes, batch_size,
        max_length, engine, and the engine's own settings (e.g. "openvino")."""
        return copy.deepcopy(self._manifest["runtime"])

    def add_file(self, relpath: str, role: str) -> Path:
        """Declare a file the package step writes (return its path; write it there); it is hashed
        into the manifest with the rest of the bundle."""
        self._manifest.setdefault("extras", {})[relpath] = {"role": role}
        path = self.bundle / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def set_target_info(self, info: dict) -> None:
        """What the target records about its files for the device or a person (manifest
        "target_info"); JSON values only."""
        try:
            json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"target {self.target.name}: target info must be JSON ({e}).") from None
        self._manifest["target_info"] = copy.deepcopy(info)

    def set_backbone(self, relpath: str) -> None:
        """Make a file the package step added the backbone the device loads; the previous
        backbone file leaves the bundle."""
        if relpath not in self._manifest.get("extras", {}) or not (self.bundle / relpath).is_file():
            raise ProfileError(f"target {self.target.name}: set_backbone({relpath!r}) needs a file added with add_file.")
        old = self.backbone
        self._manifest["backbone"] = relpath
        old.unlink()


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
    # what runs the backbone on the device: an Engine some plugin registers (onnxruntime is built in)
    engine: str = "onnxruntime"
    # quantization variants tried per precision (each gated, the fastest passing one kept);
    # None: edgeft's defaults (edgeft.quantize.default_variants)
    # a "precision:modality" key ("int8:image") is read before the plain precision key
    variants: dict[str, tuple[str, ...]] | None = None
    # True: the device runs a full ONNX Runtime build, with its contrib (com.microsoft) operators,
    # so the build may try transformer-fused graphs (Attention, SkipLayerNormalization: quantize.fuse).
    # False for a reduced-operator build (ONNX Runtime Mobile), TensorRT or any plain ONNX consumer.
    fused_ops: bool = False
    # variant names in order of preference per ISA class ("arm64/dotprod") or arch ("arm64"):
    # what the build ships when the build host is of another class than the profile's, so its
    # timings say nothing about the device (edgeft.quantize.isa). variant_order_notes: per key,
    # the measured facts behind the order and their source.
    variant_order: dict[str, tuple[str, ...]] | None = None
    variant_order_notes: dict[str, str] | None = None

    def __post_init__(self):
        if self.precision not in self.precisions:
            raise ProfileError(f"target {self.name}: default precision {self.precision!r} is not among {self.precisions}.")


@dataclass(frozen=True)
class Engine:
    """What runs a bundle's backbone on the device; a bundle's manifest names it (runtime.engine).

    `load(bundle, manifest, providers, threads)` returns the backbone as a callable
    `model(arrays) -> {"features": array, ...}`, optionally with `describe() -> list[str]` (what
    runs it, for reports). It may raise BundleError (one line naming the file) or
    MissingDependencyError (saying what to install). Keep its imports torch-free: devices run it.
    """

    name: str
    load: Callable[[Path, dict, list[str] | None, int | None], Any]
    description: str = ""
    # True: pad each batch to a power of two, for an engine that compiles every input shape
    # once (a last batch of 13 runs as 16, so new counts never compile again)
    pow2_batches: bool = False
    plugin: str = ""  # filled in by the plugin manager


@dataclass
class Registry:
    targets: dict[str, Target] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    profile_dirs: list[Path] = field(default_factory=list)
