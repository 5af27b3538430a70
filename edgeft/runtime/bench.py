"""`edgeft device bench`: the device measures itself on a bundle. numpy + onnxruntime only.

Load time (manifest, hashes, sessions), then batch-1 latency over real inputs, cycling through
them: the bundle's reference inputs (already preprocessed: backbone + head) or the user's
inputs from a file (one per line: preprocessing + backbone + head, as `device predict`
runs). Peak RSS is the process's high-water mark (getrusage), imports included. The report is
JSON under BUNDLE/bench/, beside the manifest's head history, so a fleet can collect and
compare the devices that run the same bundle.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import BundleError, UsageError
from . import atomic

SCHEMA = "edgeft.bench/1"
RUNS, WARMUP = 100, 5


def cpu_model() -> str:
    """The CPU's name as the OS reports it (x86 'model name'; ARM 'CPU part' mapped to a core name)."""
    parts = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2"}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model"):
            return value.strip()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "CPU part":
            return parts.get(value.strip().lower(), f"ARM part {value.strip()}")
    return platform.processor() or platform.machine()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB on Linux


def _reference_rows(bundle) -> list[dict[str, np.ndarray]]:
    """The bundled reference inputs, one row per call as `device predict` would feed them."""
    path = bundle.path / "reference" / "inputs.npz"
    if not path.is_file():
        raise BundleError(f"{path}: missing; give real inputs with --file.")
    data = np.load(path)
    arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    rows = []
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in arrays.items()}
        if "attention_mask" in row and not bundle.fixed_batch and not bundle.pre.spec().get("pad_to"):
            width = max(1, int(row["attention_mask"].sum()))  # without its batch-mates' padding
            row = {k: v[:, :width] for k, v in row.items()}
        if bundle.fixed_batch and bundle.fixed_batch > 1:  # a fixed-shape runtime takes its whole batch
            row = {k: np.repeat(v, bundle.fixed_batch, axis=0) for k, v in row.items()}
        rows.append(row)
    return rows


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the value a run actually took, never interpolated)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(np.ceil(q / 100 * len(s))) - 1))]


def _caller(bundle, items: list[str] | None):
    """One timed call (its argument picks the row) and what it measures: the bundle's reference
    inputs through backbone and head, or the given inputs as `device predict` runs them."""
    if items is None:
        rows = _reference_rows(bundle)

        def call(k):
            return bundle.head_outputs(bundle.features_from_arrays(rows[k % len(rows)]))

        return call, {"kind": "reference", "rows": len(rows), "measures": "backbone + head (inputs preprocessed at build)"}

    def call(k):
        return bundle.predict([items[k % len(items)]], batch_size=1)

    return call, {"kind": "file", "rows": len(items), "measures": "preprocessing + backbone + head, as device predict"}


def _time(call, warmup: int, runs: int) -> tuple[float, list[float]]:
    """The first call's milliseconds, then `warmup` untimed calls, then `runs` timed ones."""
    t = time.perf_counter()
    call(0)
    first_ms = 1000 * (time.perf_counter() - t)
    for k in range(1, warmup + 1):
        call(k)
    times = []
    for k in range(runs):
        t = time.perf_counter()
        call(k)
        times.append(1000 * (time.perf_counter() - t))
    return first_ms, times


def bench(path: str | Path, *, items: list[str] | None = None, runs: int = RUNS, warmup: int = WARMUP,
          threads: int | None = None, providers: list[str] | None = None, write: bool = True,
          public_key=None) -> dict:
    """Measure the bundle at `path`; return the report (and write it under BUNDLE/bench/)."""
    from .bundle import Bundle

    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be at least 1 and --warmup at least 0 (got {runs}, {warmup}).")
    if items is not None and not items:
        raise UsageError("--file: no inputs in it (one per line).")
    path = Path(path)
    t0 = time.perf_counter()
    bundle = Bundle(path, providers=providers, threads=threads, public_key=public_key)
    load_ms = 1000 * (time.perf_counter() - t0)

    call, source = _caller(bundle, items)
    first_ms, times = _time(call, warmup, runs)

    import onnxruntime as ort

    m = bundle.manifest
    sess = getattr(bundle.backbone, "session", None)
    report = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": {"path": str(path), "profile": (m.get("device") or {}).get("profile"), "precision": m["precision"],
                   "backbone": m["backbone"], "backbone_sha256": m["files"][m["backbone"]]["sha256"],
                   "head_version": bundle.head_version, "modality": m["modality"]},
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(),
                 "emulated_cpu": os.environ.get("EDGEFT_EMULATED_CPU") or None,
                 "python": platform.python_version(), "onnxruntime": ort.__version__,
                 "providers": sess.get_providers() if sess is not None else None,
                 "threads": threads or m["runtime"].get("threads")},
        "inputs": source,
        "batch": bundle.fixed_batch or 1,
        "load_ms": round(load_ms, 3),
        "first_call_ms": round(first_ms, 3),
        "latency_ms": {"p50": round(percentile(times, 50), 3), "p90": round(percentile(times, 90), 3),
                       "p99": round(percentile(times, 99), 3), "mean": round(float(np.mean(times)), 3),
                       "min": round(min(times), 3), "max": round(max(times), 3)},
        "runs": runs, "warmup": warmup,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if write:
        out = path / "bench" / f"bench-{report['created'].replace(':', '').replace('-', '')}.json"
        out.parent.mkdir(exist_ok=True)
        atomic.write_json(out, report)
        report["written"] = str(out)
    return report


def summary(r: dict) -> str:
    lat = r["latency_ms"]
    emulated = f" (emulated {r['host']['emulated_cpu']})" if r["host"].get("emulated_cpu") else ""
    return (f"bench  {r['bundle']['profile'] or '-'} {r['bundle']['precision']}  on {r['host']['cpu']}{emulated}, "
            f"{r['host']['cores']} cores\n"
            f"load {r['load_ms']:.1f} ms  first call {r['first_call_ms']:.1f} ms  batch {r['batch']}  "
            f"p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  ({r['runs']} runs over {r['inputs']['rows']} "
            f"{r['inputs']['kind']} inputs)  peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f"\nwritten {r['written']}" if r.get("written") else ""))
