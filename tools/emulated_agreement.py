"""Agreement of a bundle's answers on emulated ARM64 cores with this (x86-64) host's.

    python tools/emulated_agreement.py ARTIFACT [ARTIFACT ...] --data FILE [--data FILE ...]
        [--cpu cortex-a72 --cpu cortex-a76] [--rows 16] [--json OUT.json]

An ARTIFACT is a bundle, or an `edgeft export` or `edgeft quantize` folder. For each, `--rows` rows of its --data file (the first --data goes with the first bundle,
and so on; one --data serves all) are drawn across classes (seeded: edgeft.runtime.stats.stratified,
never the head of the file) and answered one row per call, as a device answers them: here by
this host's onnxruntime, and under QEMU user-mode emulation by ONNX Runtime's real aarch64
kernels on each `--cpu` (edgeft.emulate.outputs; set up once with tools/arm64-emulator.sh).
The table gives, per bundle and core: the rows whose top-1 answer is the host's, the largest
|Δ logits| and |Δ features| against the host, and the features' own scale; the log line names
this host's logit margin (top-1 minus top-2) of each flipped row.

What it proves: the numbers the aarch64 kernels compute for this bundle on that core's
instruction set (as QEMU implements it) against the x86 build's. What it does not: speed
(emulation runs 150-400x slower than a device), memory, or a device's own ONNX Runtime build.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeft import emulate  # noqa: E402
from edgeft.quantize.isa import host  # noqa: E402
from edgeft.runtime.dataset import load_dataset  # noqa: E402
from edgeft.runtime.stats import margins as top_margins  # noqa: E402
from edgeft.runtime.stats import stratified  # noqa: E402


def rows_of(data: str, n: int, seed: int = 0) -> tuple[list, str]:
    ds = load_dataset(data, require_labels=False)
    return [ds.items[i] for i in stratified(list(ds.labels), n, seed)], ds.source


def describe(path: Path) -> dict:
    """What the artifact is: its device profile (a bundle) or "export", precision, quantization."""
    if (path / "manifest.json").exists():
        m = json.loads((path / "manifest.json").read_text())
        return {"device": m["device"]["profile"], "precision": m["precision"],
                "quantization": (m.get("quantization") or {}).get("mode")}
    info = json.loads((path / "export.json").read_text())
    q = json.loads((path / "quantize.json").read_text()) if (path / "quantize.json").exists() else {}
    return {"device": f"{path.name} (quantize folder)" if q else f"{path.name} (export)",
            "precision": info.get("precision", "fp32"), "quantization": q.get("mode")}


def compare(bundle_dir: Path, data: str, cpus: list[str], n: int) -> list[dict]:
    features, head = emulate.artifact_model(bundle_dir)
    items, source = rows_of(data, n)
    feats = np.concatenate([features(x) for x in items])
    logits = head(feats)
    out = []
    for cpu in cpus:
        got = emulate.outputs(bundle_dir, cpu, items)
        same = got["logits"].argmax(1) == logits.argmax(1)
        agree = int(same.sum())
        margins = top_margins(logits)  # this host's top-1 minus top-2 logit
        out.append({"bundle": str(bundle_dir), **describe(bundle_dir), "data": source, "rows": len(items), "cpu": cpu, "agree": agree,
                    "agreement": agree / len(items),
                    "max_abs_diff_logits": float(np.abs(got["logits"] - logits).max()),
                    "max_abs_diff_features": float(np.abs(got["features"] - feats).max()),
                    "features_max_abs": float(np.abs(feats).max()),
                    "flipped_host_margins": sorted(float(m) for m in margins[~same]),
                    "smallest_host_margin": float(margins.min()),
                    "emulated": got["emulated"]})
        flips = ", ".join(f"{m:.3g}" for m in out[-1]["flipped_host_margins"]) or "none"
        print(f"  {bundle_dir.name} on {cpu}: {agree}/{len(items)} answers as on this host "
              f"({got['emulated']['seconds']:.0f} s emulated); this host's logit margins of the flipped rows: {flips} "
              f"(smallest of all rows {margins.min():.3g})", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| bundle | precision | emulated core | rows | top-1 as on x86 | max abs diff logits | "
             "max abs diff features (features' scale) | emulated s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prec = r["precision"] + (f" ({r['quantization']})" if r["quantization"] else "")
        lines.append(f"| {r['device']} | {prec} | {r['cpu']} | {r['rows']} | {r['agree']}/{r['rows']} | "
                     f"{r['max_abs_diff_logits']:.2g} | {r['max_abs_diff_features']:.2g} "
                     f"({r['features_max_abs']:.3g}) | {r['emulated']['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--data", action="append", required=True, help="rows to answer (a file per bundle, or one)")
    ap.add_argument("--cpu", action="append", choices=sorted(emulate.CPUS), help="emulated core (repeatable)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if emulate.status() is None:
        print(f"error: {emulate.not_set_up()}", file=sys.stderr)
        return 2
    if len(args.data) not in (1, len(args.bundles)):
        ap.error("give one --data, or one per bundle")
    cpus = args.cpu or ["cortex-a72", "cortex-a76"]
    t0 = time.perf_counter()
    rows = []
    for i, bundle in enumerate(args.bundles):
        rows += compare(bundle, args.data[i if len(args.data) > 1 else 0], cpus, args.rows)
    h = host()
    print(table(rows))
    print(f"\nhost: {h['model']} ({platform.machine()}, {h['class']}); {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"host": h, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
