"""Which instruction-set class a CPU is in, for int8: the build host's, and a device profile's.

An int8 variant's speed depends on the integer dot-product instructions the CPU has, not only on
its architecture: ONNX Runtime's MLAS kernels take VNNI (x86-64, vpdpbusd), AMX (x86-64 tiles),
the Armv8.2 dot product (SDOT/UDOT) or the Armv8.6 matrix multiply (SMMLA/UMMLA) where they
exist, and otherwise emulate them with wider multiply-adds. The same two variants can trade
places from one class to the next (STACK.md: a weight-only bundle ran 2.29 ms on an Intel AMX
host and 1.19 ms on the AMD development host). So `edgeft build` times candidates on the build
host only when the host is of the profile's class; otherwise it follows the target's documented
order for the profile's class (Target.variant_order, with the measurements behind it).

A class is "ARCH/TIER": x86-64/avx2 (no VNNI), x86-64/vnni (AVX-512 VNNI or AVX-VNNI),
x86-64/amx, arm64/neon (no dot product, e.g. Cortex-A72), arm64/dotprod (Cortex-A76, A78),
arm64/i8mm (Armv8.6+: Cortex-A710, X2, Neoverse V1).
"""

from __future__ import annotations

import platform
from pathlib import Path

from ..profiles import FEATURES

# /proc/cpuinfo flag -> feature name used in profiles ("isa = [...]")
X86_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
             "amx_int8": "amx_int8", "avx512_bf16": "avx512_bf16"}
ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "bf16": "bf16"}
assert set(X86_FLAGS.values()) == set(FEATURES["x86-64"]) and set(ARM_FLAGS.values()) == set(FEATURES["arm64"])
# what each Arm core a profile may name has (Arm's technical reference manuals): `cpu` fills in `isa`
CORES = {
    "cortex-a53": ("neon",), "cortex-a55": ("neon", "dotprod"), "cortex-a72": ("neon",),
    "cortex-a73": ("neon",), "cortex-a76": ("neon", "dotprod"), "cortex-a78": ("neon", "dotprod"),
    "cortex-a78ae": ("neon", "dotprod"), "cortex-a710": ("neon", "dotprod", "i8mm", "sve", "bf16"),
    "neoverse-n1": ("neon", "dotprod"), "neoverse-v1": ("neon", "dotprod", "i8mm", "sve", "bf16"),
}


def tier(arch: str, features) -> str:
    """The int8 tier of a feature set: the best integer dot-product instructions it has."""
    f = set(features or ())
    if arch == "x86-64":
        return "amx" if "amx_int8" in f else "vnni" if f & {"avx512_vnni", "avx_vnni"} else "avx2"
    return "i8mm" if "i8mm" in f else "dotprod" if "dotprod" in f else "neon"


def isa_class(arch: str, features) -> str:
    return f"{arch}/{tier(arch, features)}"


def _arch(machine: str) -> str | None:
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86-64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    return None


def host(cpuinfo: str | None = None, machine: str | None = None) -> dict:
    """The build host: {"arch", "model", "features", "class"} from /proc/cpuinfo (its model name,
    as lscpu prints it, and the int8-relevant flags)."""
    arch = _arch(machine or platform.machine())
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    table = X86_FLAGS if arch == "x86-64" else ARM_FLAGS
    features = sorted(name for flag, name in table.items() if flag in flags)
    return {"arch": arch, "model": model or platform.processor() or "unknown", "features": features,
            "class": isa_class(arch, features) if arch else None}


def profile_isa(profile) -> dict | None:
    """The profile's {"arch", "features", "class", "from"}: its `isa` list, else what its Arm
    `cpu` has (CORES); None when the profile names no arch, or names an arch but not the
    features (a generic "x86-64 AVX2 or newer" server: any host of that arch is its class)."""
    arch = getattr(profile, "arch", None)
    if arch is None:
        return None
    features = getattr(profile, "isa", None)
    source = "profile isa"
    if features is None and getattr(profile, "cpu", None) in CORES:
        features, source = CORES[profile.cpu], f"cpu {profile.cpu}"
    if features is None:
        return {"arch": arch, "features": None, "class": None, "from": "profile arch only"}
    return {"arch": arch, "features": sorted(features), "class": isa_class(arch, features), "from": source}


def same_class(target_isa: dict | None, host_info: dict) -> bool:
    """Is a ranking measured on this host a ranking for the device? Yes when the profile names
    no ISA, or its arch alone and the host has that arch, or its class is the host's."""
    if target_isa is None:
        return True
    if target_isa["arch"] != host_info["arch"]:
        return False
    return target_isa["class"] is None or target_isa["class"] == host_info["class"]


def choose(passing: list[dict], profile, target, host_info: dict | None = None) -> tuple[dict, dict]:
    """The variant to ship among `passing` (each gated, each with its host "latency_ms"), and how it
    was chosen: the fastest measured when the build host is of the profile's ISA class, else the
    first in the target's documented order for that class (Target.variant_order; fewer nodes in
    float first within a mode), else the fastest measured, saying the ranking is the host's."""
    h = host_info or host()
    want = profile_isa(profile)
    fastest = min(passing, key=lambda r: r["latency_ms"])
    how = {"host": h, "target_isa": want, "fastest_on_host": fastest["mode"]}
    if same_class(want, h):
        return fastest, {**how, "method": "timed", "said": f"fastest measured on the build host ({h['class']}, "
                                                            f"{h['model']}), of the device's class"}
    orders = getattr(target, "variant_order", None) or {}
    key = next((k for k in (want["class"], want["arch"]) if k in orders), None)
    if key is None:
        return fastest, {**how, "method": "timed, host of another class",
                         "said": f"fastest on the build host ({h['class']}); target {target.name} documents no "
                                 f"order for {want['class'] or want['arch']}, so the ranking is the host's"}
    order = list(orders[key])
    rank = {m: i for i, m in enumerate(order)}
    best = min(passing, key=lambda r: (rank.get(r["mode"], len(rank)), len(r.get("kept_float") or []),
                                       r["latency_ms"]))
    notes = getattr(target, "variant_order_notes", None) or {}
    return best, {**how, "method": "documented order", "order": order, "order_for": key,
                  "source": notes.get(key, ""),
                  "said": f"documented order for {key} (target {target.name}); the build host is "
                          f"{h['class']}, so its timings do not rank variants for this device"}


def reduce_range(profile) -> bool:
    """Quantize weights to 7 bits for this device? Yes for an x86-64 profile that names its ISA and
    has no VNNI: there ONNX Runtime's u8 x s8 kernels (vpmaddubsw) sum pairs of products into 16
    bits, which saturate with full 8-bit weights (ONNX Runtime's quantization docs: reduce_range
    "may improve the accuracy ... on non-VNNI machines"), so the device would not compute what the
    VNNI or Arm build host gated. A host of that class computes the same 7-bit model the same way."""
    want = profile_isa(profile)
    return bool(want and want["class"] == "x86-64/avx2")
