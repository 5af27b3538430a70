"""`edgeft run RECIPE.toml`: train -> merge -> export -> build per device -> verify -> device retrain.

A recipe is one reproducible file. Each step writes into its own folder under `output`
and records a fingerprint of what it was made from (its options and its inputs' contents);
a step whose folder exists with the same fingerprint is skipped, so a rerun after editing
the [build] table rebuilds the bundles and nothing before them. A failing step stops the
chain with its error. The end is a summary table and summary.json.

    output = "out"                 # folders: run/, model/, export/, bundles/<device>/, retrain/
    [train]                        # the options of edgeft train (model, data, method, ...)
    [export]     opset = 17        # optional
    [build]      devices = ["raspberry-pi-5"], data = "test.csv", calibration = "...",
                 parity_data = "inputs.txt" (or a script writing them), uncertified = false
    [verify]     data = "test.csv"  (+ min_agreement, max_drop, max_abs_diff)
    [retrain]    device = "raspberry-pi-5", data = "new.csv", add_classes = true,
                 margin = 0.02, test = ["test.csv", "new_test.csv"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import ExportConfig, load_train_config, read_toml
from .errors import ConfigError, EdgeftError, did_you_mean
from .runtime import atomic

log = logging.getLogger(__name__)

TABLES = {
    "train": None,  # checked by TrainConfig
    "export": {"opset"},
    "build": {"devices", "data", "calibration", "replay", "min_agreement", "max_drop", "parity_data", "uncertified"},
    "verify": {"data", "min_agreement", "max_drop", "max_abs_diff"},
    "retrain": {"device", "data", "add_classes", "margin", "keep", "test"},
}
STEP_FILE = "edgeft-step.json"


def _fingerprint(obj, own: Path | None = None) -> str:
    """Options plus the size and mtime of every file they name (and of files in folders they
    name), except the step's own output folder."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    own = own.resolve() if own else None

    def visit(v):
        if isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, list):
            for x in v:
                visit(x)
        elif isinstance(v, str) and len(v) < 4096:
            p = Path(v)
            try:
                if own is not None and (p.resolve() == own or own in p.resolve().parents):
                    return
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
                elif p.is_dir():
                    for f in sorted(p.rglob("*")):
                        if f.is_file() and f.name != STEP_FILE:
                            st = f.stat()
                            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                pass

    visit(obj)
    return h.hexdigest()[:16]


def _current(folder: Path, fp: str) -> bool:
    marker = folder / STEP_FILE
    return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp


def _mark(folder: Path, step: str, fp: str, result: dict | None = None) -> None:
    atomic.write_json(folder / STEP_FILE, {"step": step, "fingerprint": fp, "result": result or {}})


def load_recipe(path: str | Path, output: str | Path | None = None) -> dict:  # noqa: C901, PLR0912 -- one flat check per rule of the recipe format, in the order a reader meets them
    path = Path(path)
    doc = read_toml(path)
    for key, value in doc.items():
        if key == "output":
            continue
        if key not in TABLES:
            raise ConfigError(f"{path}: unknown table or key '{key}'.{did_you_mean(key, [*TABLES, 'output'])} "
                              f"Known: output, {', '.join(f'[{t}]' for t in TABLES)}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{key}' must be a table ([{key}]).")
        allowed = TABLES[key]
        for k in value:
            if allowed is not None and k.replace("-", "_") not in allowed:
                raise ConfigError(f"{path}: unknown key '{k}' in [{key}].{did_you_mean(k, allowed)} "
                                  f"Known: {', '.join(sorted(allowed))}.")
    if "train" not in doc:
        raise ConfigError(f"{path}: a recipe needs a [train] table.")
    base = path.parent
    if not isinstance(doc.get("output", "out"), str):
        raise ConfigError(f"{path}: output: expected a folder name, got {doc['output']!r}.")
    devs = doc.get("build", {}).get("devices", [])
    if not (isinstance(devs, str) or (isinstance(devs, list) and all(isinstance(d, str) for d in devs))):
        raise ConfigError(f"{path}: [build] devices: expected a list of profile names or .toml paths, got {devs!r}.")
    if "retrain" in doc and not isinstance(doc["retrain"].get("device"), str):
        raise ConfigError(f"{path}: [retrain] device: expected a profile name.")

    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except (OSError, ValueError):
            return False

    def rel(v):
        if isinstance(v, list):
            return [rel(x) for x in v]
        return str(base / v) if isinstance(v, str) and not Path(v).is_absolute() and exists(base / v) else v

    recipe = {"path": str(path), "output": str(Path(output).resolve() if output else base / doc.get("output", "out"))}
    for table in ("export", "build", "verify", "retrain"):
        t = {k.replace("-", "_"): v for k, v in doc.get(table, {}).items()}
        for k in ("data", "calibration", "test", "parity_data"):
            if k in t:
                t[k] = rel(t[k])
        recipe[table] = t
    devices = recipe["build"].get("devices", [])
    if isinstance(devices, str):
        devices = [devices]
    recipe["build"]["devices"] = [rel(d) if str(d).endswith(".toml") else d for d in devices]
    if recipe["retrain"] and str(recipe["retrain"].get("device", "")).endswith(".toml"):
        recipe["retrain"]["device"] = rel(recipe["retrain"]["device"])
    if recipe["retrain"] and recipe["retrain"].get("device") not in recipe["build"]["devices"]:
        raise ConfigError(f"{path}: [retrain] device must be one of [build] devices "
                          f"({', '.join(recipe['build']['devices']) or 'none'}).")
    recipe["train_config"] = load_train_config(path, {"output": str(Path(recipe["output"]) / "run")})
    return recipe


class _Steps:
    """Runs the recipe's steps in order; skips a step whose folder is current; records each."""

    def __init__(self, out: Path, force: bool, summary: dict):
        self.out, self.force, self.summary = out, force, summary
        self.steps: list[dict] = summary["steps"]

    def __call__(self, name: str, folder: Path, fp_input, fn):
        fp = _fingerprint(fp_input, folder)
        t = time.perf_counter()
        if not self.force and _current(folder, fp):
            self.steps.append({"step": name, "status": "skipped (current)", "seconds": 0.0, "folder": str(folder)})
            log.info("%-8s current, skipped", name)
            return json.loads((folder / STEP_FILE).read_text())["result"]
        if folder.exists():  # an out-of-date or interrupted output of this recipe: redo it
            shutil.rmtree(folder)
        try:
            result = fn(folder)
        except EdgeftError as e:
            self.steps.append({"step": name, "status": "failed", "error": str(e)})
            atomic.write_json(self.out / "summary.json", self.summary)
            raise type(e)(f"{name}: {e}") from None
        _mark(folder, name, fp, result)
        self.steps.append({"step": name, "status": "ok", "seconds": round(time.perf_counter() - t, 2),
                           "folder": str(folder)})
        log.info("%-8s ok  %.1f s", name, time.perf_counter() - t)
        return result


def run_recipe(path: str | Path, force: bool = False, output: str | Path | None = None) -> dict:
    """Run every step of the recipe; return the summary (also summary.json in the output)."""
    t0 = time.perf_counter()
    r = load_recipe(path, output)
    out = Path(r["output"])
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"recipe": r["path"], "output": str(out), "steps": [], "devices": {}}
    step = _Steps(out, force, summary)
    trained = _train_to_export(step, r, out)
    for device in r["build"].get("devices", []):
        name = Path(device).stem if str(device).endswith(".toml") else device
        summary["devices"][name] = _device_steps(step, r, out, device, name, trained)
    rt = r["retrain"]
    if rt:
        bundle = out / "bundles" / Path(rt["device"]).stem
        summary["retrain"] = step("retrain", out / "retrain", {"retrain": rt, "bundle": str(bundle)},
                                  lambda f: _retrain_step(bundle, f, rt))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic.write_json(out / "summary.json", summary)
    return summary


def _parity_data(source: str, out: Path) -> str:
    """[build] parity_data: a file of inputs, or a Python script that writes one (`python SCRIPT
    FILE`, e.g. examples/maintenance/make_parity_inputs.py): run into OUT/parity-data/ when the
    file is missing or older than the script, so generated inputs never land beside the recipe."""
    if not str(source).endswith(".py"):
        return source
    script = Path(source)
    if not script.is_file():
        raise ConfigError(f"[build] parity_data: {script}: no such script.")
    dest = out / "parity-data" / (script.stem.removeprefix("make_") + ".txt")
    if dest.exists() and dest.stat().st_mtime_ns >= script.stat().st_mtime_ns:
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    done = subprocess.run([sys.executable, str(script), str(tmp)], capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ConfigError(f"[build] parity_data: {script} failed ({tail}).")
    tmp.replace(dest)
    log.info("parity data: %s (from %s)", dest, script.name)
    return str(dest)


def _train_to_export(step: _Steps, r: dict, out: Path) -> dict:
    """train -> merge -> export; returns the train step's result (what later steps depend on)."""
    from .export import export
    from .merge import merge
    from .train import train

    cfg = r["train_config"]
    run_dir, model_dir, export_dir = out / "run", out / "model", out / "export"

    def do_train(folder):
        s = train(cfg)
        return {"accuracy": s.accuracy, "macro_f1": s.macro_f1, "best_epoch": s.best["epoch"]}

    trained = step("train", run_dir, cfg.to_dict() | {"resume": False, "progress": False}, do_train)
    step.summary["train"] = trained
    merged = step("merge", model_dir, {"run": trained, "from": str(run_dir)},
                  lambda f: merge(run_dir, f).to_json())
    opset = ExportConfig(**r["export"]).opset
    exported = step("export", export_dir, {"model": merged, "opset": opset, "from": str(model_dir)},
                    lambda f: {k: v for k, v in export(model_dir, f, opset=opset).to_json().items()
                               if k in ("parity", "files", "seconds")})
    step.summary["export"] = {"max_abs_diff": (exported.get("parity") or {}).get("max_abs_diff")}
    return trained


def _device_steps(step: _Steps, r: dict, out: Path, device: str, name: str, trained: dict) -> dict:
    """build (and verify, when the recipe has a [verify] table) one device; its summary row."""
    from .build import build
    from .config import BuildConfig
    from .profiles import find_profile

    b, verify_cfg, run_dir = r["build"], r["verify"], out / "run"
    bundle_dir = out / "bundles" / name
    profile, _ = find_profile(device)
    given = {k: b[k] for k in ("data", "calibration", "replay", "min_agreement", "max_drop", "uncertified") if k in b}
    if b.get("parity_data"):
        given["parity_data"] = _parity_data(b["parity_data"], out)

    def do_build(folder):
        m = build(BuildConfig(run_dir, device, folder, **given))
        return {"precision": m.precision, "parity": m.parity,
                "bytes": m.bytes,
                "quantization": (m.quantization or {}).get("mode")}

    built = step(f"build {name}", bundle_dir, {"device": device, "build": b, "run": trained,
                                              "profile": str(profile.path)}, do_build)
    row = {"precision": built["precision"], "size_mb": round(built["bytes"] / 1e6, 1),
           "quantization": built.get("quantization"), "build_agreement": built["parity"]["agreement"]}
    if verify_cfg.get("data"):
        v = step(f"verify {name}", out / "verify" / name, {"bundle": built, "verify": verify_cfg},
                 lambda f: _verify_step(bundle_dir, run_dir, f, verify_cfg))
        row.update({"accuracy": v["accuracy"], "reference_accuracy": v["reference_accuracy"],
                    "agreement": v["agreement"]})
    row["ms_per_input"] = _latency(bundle_dir, verify_cfg.get("data") or b.get("data"))
    return row


def _verify_step(bundle_dir: Path, run_dir: Path, folder: Path, verify_cfg: dict) -> dict:
    from .errors import ParityError
    from .verify import verify, write_junit

    rep = verify(bundle_dir, run_dir, verify_cfg["data"], max_abs_diff=verify_cfg.get("max_abs_diff"),
                 min_agreement=verify_cfg.get("min_agreement"), max_accuracy_drop=verify_cfg.get("max_drop"))
    folder.mkdir(parents=True, exist_ok=True)
    report = rep.to_json()
    atomic.write_json(folder / "verify.json", report)
    write_junit(rep, folder / "junit.xml")
    if not rep.passed:
        raise ParityError("; ".join(c["message"] for c in rep.checks if not c["passed"]))
    return {k: report[k] for k in ("accuracy", "reference_accuracy", "agreement", "max_abs_diff", "rows")}


def _latency(bundle_dir: Path, data) -> float | None:
    """Median ms per input, batch 1, on this machine (a stand-in for the device; same runtime)."""
    if not data:
        return None
    import statistics

    from .data import load_dataset
    from .runtime.bundle import Bundle

    items = load_dataset(data, require_labels=False).items[:30]
    threads = min(os.cpu_count() or 1, json.loads((bundle_dir / "manifest.json").read_text())["runtime"].get("threads") or 64)
    b = Bundle(bundle_dir, providers=["CPUExecutionProvider"], threads=threads)
    b.predict(items[:3])
    times = []
    for item in items:
        t = time.perf_counter()
        b.predict([item])
        times.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(times), 2)


def _retrain_step(bundle: Path, folder: Path, rt: dict) -> dict:
    """Retrain a copy of the device's bundle (the built bundle stays as built), then test it."""
    from .data import load_dataset
    from .runtime.bundle import Bundle
    from .runtime.retrain import RetrainConfig, retrain

    copy = folder / "bundle"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, copy)
    tests = rt.get("test", [])
    tests = [tests] if isinstance(tests, str) else tests

    def accuracy(b: Bundle):
        out = {}
        for t in tests:
            ds = load_dataset(t)
            known = [(x, y) for x, y in zip(ds.items, ds.labels, strict=True) if y in b.labels]
            pred = b.predict([x for x, _ in known]) if known else []
            out[Path(t).name] = {"accuracy": sum(p["label"] == y for p, (_, y) in zip(pred, known, strict=True))
                                 / max(len(ds), 1), "rows": len(ds)}
        return out

    before = accuracy(Bundle(copy))
    config = RetrainConfig(add_classes=bool(rt.get("add_classes")),
                           **{k: rt[k] for k in ("margin", "keep") if k in rt})
    rep = retrain(copy, rt["data"], config)
    after = accuracy(Bundle(copy))
    return {"version": rep.version, "added_classes": rep.added_classes, "metrics": rep.metrics,
            "test_before": before, "test_after": after, "bundle": str(copy)}


def summary_table(s: dict) -> str:
    w = max([24] + [len(st["step"]) + 1 for st in s["steps"]])
    lines = [f"{'step':<{w}} {'status':<18} {'seconds':>8}"]
    for st in s["steps"]:
        lines.append(f"{st['step']:<{w}} {st['status']:<18} {st.get('seconds', 0):>8.1f}")
    lines.append("")
    lines.append(f"{'device':<20} {'precision':<18} {'size MB':>8} {'agreement':>10} {'accuracy':>9} {'PyTorch':>8} {'ms/input':>9}")
    for name, d in s["devices"].items():
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
        lines.append(f"{name:<20} {d['precision'] + ('/' + d['quantization'] if d.get('quantization') else ''):<18} "
                     f"{d['size_mb']:>8.1f} {pct(d.get('agreement', d['build_agreement'])):>10} "
                     f"{pct(d.get('accuracy')):>9} {pct(d.get('reference_accuracy')):>8} "
                     f"{d['ms_per_input'] if d['ms_per_input'] is not None else '-':>9}")
    if s.get("retrain"):
        rt = s["retrain"]
        m = rt["metrics"]
        lines.append("")
        lines.append(f"device retrain: head v{rt['version']}, added {', '.join(rt['added_classes']) or 'no class'}; "
                     f"held-out new samples {100 * m['new_holdout_accuracy']['before']:.1f}% -> "
                     f"{100 * m['new_holdout_accuracy']['after']:.1f}%, earlier classes "
                     f"{100 * m['replay_holdout_accuracy']['before']:.1f}% -> {100 * m['replay_holdout_accuracy']['after']:.1f}%")
        for t, v in rt["test_after"].items():
            lines.append(f"  {t}: accuracy {100 * rt['test_before'][t]['accuracy']:.1f}% -> {100 * v['accuracy']:.1f}% "
                         f"({v['rows']} rows)")
    return "\n".join(lines)
