"""Run `device check` with ONNX Runtime's aarch64 kernels under QEMU user-mode emulation.

A bundle for an ARM64 profile (a Raspberry Pi 4 is Cortex-A72: NEON without the dot-product
instructions; a Pi 5 is Cortex-A76: NEON with UDOT/SDOT; an Armv9 phone adds the int8 matrix
multiply, I8MM) runs on ARM kernels that the x86 build host never executed: int8 matrix products
in particular take different code paths. A profile's `cpu` names the emulated core of its class
(devices/*.toml say which real core each stands for, and why).
`tools/arm64-emulator.sh` sets up, once, QEMU, an arm64 Python 3.11 and aarch64 wheels of
onnxruntime, numpy, tokenizers and Pillow under ~/.cache/edgeft/arm64; this module runs the
bundle's own device check inside it, with `-cpu` set to the profile's core, and reports its
answers against the outputs the x86 build recorded.

What it proves: the numbers ONNX Runtime's aarch64 kernels compute for this bundle on that
core's instruction set (as QEMU implements it). What it does not: speed (emulation runs
150-400x slower than the device), memory, the device's OS, or its ONNX Runtime build if that
differs from the PyPI wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import BundleError, UsageError

CPUS = {
    "cortex-a72": "Cortex-A72 (Raspberry Pi 4): NEON, no dot-product instructions",
    "cortex-a76": "Cortex-A76 (Raspberry Pi 5): NEON with dot-product (UDOT/SDOT) instructions",
    "armv9-i8mm": "Armv9 with SVE2, the int8 matrix multiply (I8MM: SMMLA/UMMLA) and BF16 (QEMU's max core, SME off)",
}
# QEMU's -cpu for each (tools/arm64-emulator.sh has the same table): QEMU 7.2 has no Armv9 core
# model, so its `max` core stands in, with SME off (ORT's SME kernels compute wrongly under it)
QEMU_CPU = {"armv9-i8mm": "max,sme=off"}
SETUP = "tools/arm64-emulator.sh"
TIMEOUT = 3600  # seconds; emulation is slow, a large image bundle takes minutes

GUEST = r"""
import json, platform, sys
import numpy as np
import onnxruntime
from edgeft.runtime.bundle import Bundle

if len(sys.argv) > 2:  # a bundle being built: its manifest still in memory, passed as a file (no hashes yet)
    b = Bundle(sys.argv[1], providers=["CPUExecutionProvider"], check_hashes=False,
               manifest=json.load(open(sys.argv[2], encoding="utf-8")))
else:
    b = Bundle(sys.argv[1], providers=["CPUExecutionProvider"])
r = b.check()
expected = np.load(b.path / "reference" / "outputs.npz")
if "bundle_features" in expected.files:
    r["x86_features_max_abs_diff"] = float(np.abs(b.reference_features() - expected["bundle_features"]).max())
    r["x86_features_max_abs"] = float(np.abs(expected["bundle_features"]).max())
r["machine"] = platform.machine()
r["onnxruntime"] = onnxruntime.__version__
print("EDGEFT-JSON " + json.dumps(r))
"""


def cache_dir() -> Path:
    if os.environ.get("EDGEFT_ARM64"):
        return Path(os.environ["EDGEFT_ARM64"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeft" / "arm64"


def status() -> dict | None:
    """The set-up's description ({"qemu", "root", "cpus"}) when it is ready, else None."""
    ready = cache_dir() / "ready"
    if not ready.is_file():
        return None
    try:
        info = json.loads(ready.read_text())
    except (OSError, ValueError):
        return None
    return info if Path(info.get("qemu", "")).is_file() else None


def not_set_up() -> str:
    return (f"the ARM64 emulator is not set up (no {cache_dir() / 'ready'}); run {SETUP} once "
            "(about 3 minutes and 230 MB: QEMU, an arm64 Python and aarch64 wheels, all cached)")


def profile_cpu(manifest: dict) -> str | None:
    """The emulated core for a bundle: its profile's `cpu` when its `arch` is arm64."""
    dev = manifest.get("device") or {}
    arch, cpu = dev.get("arch"), dev.get("cpu")
    if arch is None and dev.get("profile"):
        try:
            from .profiles import find_profile

            profile, _ = find_profile(dev["profile"])
            arch, cpu = getattr(profile, "arch", None), getattr(profile, "cpu", None)
        except Exception:  # a profile this host does not know: the caller says so
            return None
    return cpu if arch == "arm64" else None


OUTPUTS_GUEST = r"""
import json, platform, sys
from pathlib import Path
import numpy as np
from edgeft.emulate import artifact_model

features, logits = artifact_model(Path(sys.argv[1]))
items = json.load(open(sys.argv[2], encoding="utf-8"))
feats = np.concatenate([features(x) for x in items])
np.savez(sys.argv[3], features=feats, logits=logits(feats))
print("EDGEFT-JSON " + json.dumps({"machine": platform.machine(), "rows": len(items)}))
"""


def artifact_model(path: Path):
    """(item -> features of that one row, features -> logits) of a bundle or of an export or
    quantize folder, on CPUExecutionProvider, one row per call as a device answers. Torch-free:
    the arm64 guest runs it too."""
    import numpy as np

    from .runtime.preprocess import load_preprocessor
    from .runtime.session import OnnxModel

    path = Path(path)
    if (path / "manifest.json").exists():
        from .runtime.bundle import Bundle

        b = Bundle(path, providers=["CPUExecutionProvider"])
        return (lambda x: b.features([x], batch_size=1)), (lambda f: b.head_outputs(f)["logits"])
    info = json.loads((path / "export.json").read_text(encoding="utf-8"))
    pre = load_preprocessor(path, info["preprocessing"])
    backbone = OnnxModel(path / "backbone.onnx", ["CPUExecutionProvider"])
    head = OnnxModel(path / "head.onnx", ["CPUExecutionProvider"])
    return ((lambda x: backbone(pre([x]))["features"].astype(np.float32)),
            (lambda f: head({"features": f.astype(np.float32)})["logits"]))


def _guest(cpu: str, script: str, args: list[str], what: str, timeout: int) -> tuple[dict, dict]:
    """Run `script` with `args` by the arm64 Python on an emulated `cpu`: (its EDGEFT-JSON line,
    the record of the emulation)."""
    if cpu not in CPUS:
        raise UsageError(f"--emulate: unknown CPU {cpu!r}; choose one of {', '.join(CPUS)}.")
    info = status()
    if info is None:
        raise UsageError(not_set_up() + ".")
    root = cache_dir() / "cpu" / cpu
    python = root / "usr" / "bin" / "python3.11"
    if not python.exists():
        raise UsageError(f"{root}: no arm64 root for {cpu}; run {SETUP} again.")
    repo = Path(__file__).resolve().parent.parent  # edgeft's own source, run by the arm64 Python
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1",
           "EDGEFT_EMULATED_CPU": cpu, "HOME": os.environ.get("HOME", "/tmp"),
           "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    cmd = [info["qemu"], "-cpu", QEMU_CPU.get(cpu, cpu), "-L", str(root), str(python), "-c", script, *args]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{what} on {cpu} took over {timeout} s.") from None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("EDGEFT-JSON ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise BundleError(f"{what} on {cpu} failed ({tail}).")
    return json.loads(line[len("EDGEFT-JSON "):]), {
        "cpu": cpu, "describes": CPUS[cpu], "qemu": Path(info["qemu"]).name, "qemu_cpu": QEMU_CPU.get(cpu, cpu),
        "seconds": round(time.perf_counter() - t0, 1),
        "proves": "the aarch64 kernels' numbers on this core's instruction set, not its speed"}


def check(bundle: str | Path, cpu: str, timeout: int = TIMEOUT, manifest: dict | None = None) -> dict:
    """`Bundle(bundle).check()` computed by aarch64 onnxruntime on an emulated `cpu`.

    `manifest`: the manifest of a bundle still being built (edgeft build), used instead of its
    manifest.json (which is written last)."""
    bundle = Path(bundle).resolve()
    with tempfile.TemporaryDirectory(prefix="edgeft-emulate-") as d:
        args = [str(bundle)]
        if manifest is not None:
            (Path(d) / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
            args.append(str(Path(d) / "manifest.json"))
        report, emulated = _guest(cpu, GUEST, args, f"{bundle}: the emulated check", timeout)
    report["emulated"] = emulated
    return report


def outputs(bundle: str | Path, cpu: str, items: list, timeout: int = TIMEOUT) -> dict:
    """The features and logits of `items` (texts, or image paths) by a bundle, or an export or
    quantize folder (artifact_model), one row per call as a device answers, computed by aarch64
    onnxruntime on an emulated `cpu`:
    {"features", "logits", "emulated"}. tools/emulated_agreement.py compares them with this host's."""
    import numpy as np

    bundle = Path(bundle).resolve()
    with tempfile.TemporaryDirectory(prefix="edgeft-emulate-") as d:
        (Path(d) / "items.json").write_text(json.dumps([str(x) for x in items]), encoding="utf-8")
        out = Path(d) / "outputs.npz"
        _, emulated = _guest(cpu, OUTPUTS_GUEST, [str(bundle), str(Path(d) / "items.json"), str(out)],
                             f"{bundle}: the emulated run", timeout)
        got = np.load(out)
        return {"features": got["features"], "logits": got["logits"], "emulated": emulated}


def build_check(bundle: Path, manifest: dict, arch: str | None, cpu: str | None, wanted: bool | None) -> dict | None:
    """The emulated check `edgeft build` runs for an ARM64 profile, as a record for the manifest
    and parity.json: {"cpu", "passed", "rows", "agreement", ...} when it ran; {"status": why not}
    when it did not (never downloads: the set-up is tools/arm64-emulator.sh's). None for other
    profiles, or when the caller turned it off (wanted=False)."""
    if arch != "arm64" or wanted is False:
        return None
    if cpu is None:
        return {"status": f"not run: the profile names no ARM core (cpu = one of {', '.join(CPUS)})"}
    if cpu not in CPUS:
        return {"status": f"not run: no emulation of {cpu!r} (known: {', '.join(CPUS)})"}
    if status() is None:
        if wanted:
            raise UsageError(f"--emulate: {not_set_up()}.")
        return {"status": f"not run: {not_set_up()}"}
    try:
        r = check(bundle, cpu, manifest=manifest)
    except BundleError as e:
        return {"status": f"not run: {e}"}
    keep = ("passed", "rows", "agreement", "disagreements", "max_abs_diff", "features_max_abs_diff",
            "x86_features_max_abs_diff", "x86_features_max_abs", "machine", "onnxruntime", "against")
    return {"cpu": cpu, "status": "ran", **{k: r.get(k) for k in keep}, **r["emulated"],
            "failed": [c["message"] for c in r.get("checks", []) if not c["passed"]]}
