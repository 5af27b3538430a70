"""All benchmarks in one run: `python -m bench [--quick]`.

Runs bench/train.py, bench/latency.py and bench/device_retrain.py one after the other (each
in its own process, so one's memory and threads do not disturb the next), collects their
JSON into bench/results/results.json, prints one table, and draws latency.png and
retrain.png beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCRIPTS = ("train", "latency", "device_retrain")


def run(name: str, quick: bool) -> dict:
    out = RESULTS / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(["--quick"] if quick else [])]
    t0 = time.perf_counter()
    print(f"== bench/{name}.py {'--quick' if quick else ''}", flush=True)
    r = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    if r.returncode != 0:
        return {"error": f"bench/{name}.py exited {r.returncode}", "seconds": time.perf_counter() - t0}
    return json.loads(out.read_text())


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, measurement, value, target, ok) for the combined table."""
    out = []
    t = results.get("train", {})
    for r in t.get("table", []):
        out.append(("train", r["name"], f"{r['edgeft']:.3g} vs {r['plain']:.3g} ({r['ratio']:.2f}x)",
                    f">= {r['target']:g}" if r["target"] else "-", "yes" if r["ok"] else "NO"))
    lat = results.get("latency", {})
    base = next((v for v in lat.get("variants", []) if v["key"] == "pytorch"), None)
    for v in lat.get("variants", []):
        speed = f"{base['median_ms'] / v['median_ms']:.1f}x" if base and v.get("median_ms") else "-"
        out.append(("latency", v["name"], f"{v['median_ms']:.2f} ms, {v['bytes'] / 1e6:.1f} MB, {speed} vs PyTorch, "
                    f"agreement {100 * v['agreement']:.1f}%, accuracy {100 * v['accuracy']:.1f}%", "-", ""))
    for r in results.get("device_retrain", {}).get("table", []):
        out.append(("device retrain", r["measurement"].strip(), str(r["value"]), str(r["target"] or "-"), str(r["ok"])))
    return out


def plots(results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=110)
        plt.close(fig)
        return RESULTS / name

    made = []
    lat = results.get("latency", {}).get("variants", [])
    if lat:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
        names = [v["key"] for v in lat]
        a.barh(names, [v["median_ms"] for v in lat], color="#4c72b0")
        a.set_xlabel("ms per text, batch 1 (median)")
        a.invert_yaxis()
        b.barh(names, [100 * v["accuracy"] for v in lat], color="#55a868")
        for i, v in enumerate(lat):
            b.text(100 * v["accuracy"] + 0.3, i, f"agree {100 * v['agreement']:.0f}%", va="center", fontsize=8)
        b.set_xlabel("test accuracy (%)")
        b.set_xlim(0, 105)
        b.invert_yaxis()
        fig.suptitle("all-MiniLM-L6-v2 maintenance router: latency and accuracy per variant")
        made.append(save(fig, "latency.png"))
    dr = results.get("device_retrain", {})
    if dr.get("before") and dr.get("after"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        groups = ["old classes", "new classes"]
        before = [dr["before"]["old_accuracy"], dr["before"]["new_accuracy"]]
        after = [dr["after"]["old_accuracy"], dr["after"]["new_accuracy"]]
        x = range(len(groups))
        ax.bar([i - 0.2 for i in x], [100 * v for v in before], 0.4, label="before retrain")
        ax.bar([i + 0.2 for i in x], [100 * v for v in after], 0.4, label="after retrain")
        ax.set_xticks(list(x), groups)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title("on-device head retrain (numpy + onnxruntime)")
        made.append(save(fig, "retrain.png"))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's quick mode (a few minutes in all)")
    ap.add_argument("--only", choices=SCRIPTS, action="append", help="run only these (repeatable)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()}, "quick": args.quick}
    for name in args.only or SCRIPTS:
        results[name] = run(name, args.quick)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = rows(results)
    widths = [max(len(r[i]) for r in table + [("benchmark", "measurement", "value", "target", "ok")]) for i in range(5)]
    print()
    for r in [("benchmark", "measurement", "value", "target", "ok"), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for name in SCRIPTS:
        if results.get(name, {}).get("error"):
            print(f"{name}: {results[name]['error']}")
    made = plots(results)
    print(f"wrote {RESULTS / 'results.json'}" + "".join(f", {p.name}" for p in made) + f" ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
