"""`edgeft build`: a run or model directory -> a verified bundle for one device profile.

merge (in memory) -> export (fp32, parity checked) -> quantize per the profile's precision ->
the target plugin's packaging -> reference inputs with their PyTorch outputs -> parity of the
finished bundle against PyTorch -> manifest with every file's sha256. The bundle folder is
renamed into place only when all of that passed: an interrupted build leaves no bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ParityError, UsageError
from .parity import Thresholds, checks, compare
from .plugins import find_profile
from .runtime import atomic
from .runtime.bundle import MANIFEST, SCHEMA, Bundle, sha256
from .targets import BuildContext

log = logging.getLogger(__name__)

REFERENCE_ROWS = 16
CALIBRATION_ROWS = 128
REPLAY_PER_CLASS = 100  # training features kept per class, so a device retrain does not forget
REPLAY_HOLDOUT = 0.25  # validation rows per class for the retrain guard, as a share of per_class (at least 5)
PARITY_ROWS = 512
# Quantization variants per precision, fastest first. Dynamic int8 is ~2.5x faster than fp32
# on CPU but flips 2-5% of a text model's low-margin answers; weight-only int8 (8-bit blocks,
# float activations) keeps >99% of them at a quarter of the size, ~1.5x faster than fp32.
QUANT_MODES = {"int8": ("dynamic", "weight-only"), "int8-static": ("static",), "fp16": ("fp16",)}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rows(ds, n):
    return ds.items[:n], ds.labels[:n]


def build(source: str | Path, device: str, output: str | Path, *, calibration: str | Path | None = None,
          data: str | Path | None = None, archive: bool = False, overwrite: bool = False,
          thresholds: Thresholds | None = None, replay: int = REPLAY_PER_CLASS, sign_key: str | Path | None = None) -> dict:
    """Build the bundle; return its manifest. Fails (ParityError) without writing if parity breaks."""
    from .data import load_dataset
    from .export import export
    from .runs import (
        load_labelled,
        load_model,
        predict_logits,
        training_data,
        training_source,
        validation_data,
    )
    from .runtime.preprocess import load_preprocessor

    t0 = time.perf_counter()
    output = Path(output)
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: already exists. Choose another --output or pass --overwrite.")
    profile, target = find_profile(device)
    settings = profile.resolved(target)
    precision = settings["precision"]
    loaded = load_model(source)
    if loaded.kind == "run" and loaded.info["method"] == "lora":
        loaded.model.backbone = loaded.model.backbone.merge_and_unload()
    ds = load_labelled(data, loaded) if data else validation_data(loaded.info.get("validation"))
    if ds is None:
        raise UsageError(f"{source}: its validation data is gone; pass --data with labelled rows for the parity check.")
    modality = loaded.spec.modality

    with tempfile.TemporaryDirectory(prefix="edgeft-build-") as work:
        work = Path(work)
        exported = export(source, work / "export", opset=settings["opset"], data=data)
        spec = dict(exported["preprocessing"])
        if modality == "text":
            if settings["max_length"]:
                spec["max_length"] = min(spec["max_length"], settings["max_length"])
            if settings["static_shapes"]:
                spec["pad_to"] = spec["max_length"]
        pre = load_preprocessor(work / "export", spec)

        backbone_src = work / "export" / "backbone.onnx"
        # PyTorch's answers on the parity rows, computed once for every candidate and the bundle
        items, labels = _rows(ds, PARITY_ROWS)
        ref = predict_logits(loaded.model, loaded.pre, items).numpy()
        index = {n: i for i, n in enumerate(loaded.labels)}
        y = [index[v] for v in labels]
        t = thresholds or Thresholds.for_precision(precision)

        quant = None
        if precision != "fp32":
            from .quantize import quantize_model
            from .runtime.session import OnnxModel

            calib_items = (load_dataset(calibration, require_labels=False).items if calibration else ds.items)
            calib = [pre(calib_items[i : i + 1]) for i in range(min(CALIBRATION_ROWS, len(calib_items)))]
            head = OnnxModel(work / "export" / "head.onnx")
            tried = []
            for mode in QUANT_MODES[precision]:  # fastest first; the first that keeps parity wins
                dst = work / f"backbone.{mode}.onnx"
                info = quantize_model(backbone_src, dst, mode, modality=modality, calibration=calib)
                if not info.get("op_types"):  # e.g. weight-only on a CNN: nothing it can quantize
                    tried.append({**info, "passed": False, "failed": ["no operator of this model to quantize"]})
                    continue
                candidate = OnnxModel(dst)
                got = np.concatenate([head({"features": candidate(pre(items[i : i + 16]))["features"]})["logits"]
                                      for i in range(0, len(items), 16)])
                rep = compare(ref, got, y, loaded.labels)
                found = checks(rep, t)
                tried.append({**info, "agreement": rep["agreement"], "accuracy_drop": rep["accuracy_drop"],
                              "passed": all(c["passed"] for c in found),
                              "failed": [c["message"] for c in found if not c["passed"]]})
                log.info("%s: agreement %.2f%%, accuracy drop %.2f points%s", mode, 100 * rep["agreement"],
                         100 * rep["accuracy_drop"], "" if tried[-1]["passed"] else " (refused)")
                if tried[-1]["passed"]:
                    quant = {**info, "fp32_bytes": backbone_src.stat().st_size, "tried": tried}
                    backbone_src = dst
                    break
            if quant is None:
                detail = "; ".join(f"{q['mode']}: " + ", ".join(q["failed"]) for q in tried)
                raise ParityError(f"{output}: no {precision} variant for {profile.name} keeps parity with PyTorch "
                                  f"on {len(items)} rows ({detail}). Pass more held-out rows with --data, loosen "
                                  "the gate knowingly with --min-agreement/--max-drop, or choose fp16/fp32.")

        with atomic.directory(output, replace=overwrite) as tmp:
            shutil.copy2(backbone_src, tmp / "backbone.onnx")
            (tmp / "heads").mkdir()
            head_file = "heads/head-0001.onnx"
            shutil.copy2(work / "export" / "head.onnx", tmp / head_file)
            if modality == "text":
                shutil.copy2(work / "export" / "tokenizer.json", tmp / "tokenizer.json")
            (tmp / "preprocessor.json").write_text(json.dumps(spec, indent=2) + "\n")

            # reference rows: the device re-runs them with `edgeft device check`
            ref_items, _ = _rows(ds, REFERENCE_ROWS)
            (tmp / "reference").mkdir()
            arrays = pre(ref_items)
            np.savez(tmp / "reference" / "inputs.npz", **arrays)
            import torch

            with torch.no_grad():
                tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
                feats = loaded.model.features(**tensors)
                logits = loaded.model.head(feats)
            np.savez(tmp / "reference" / "outputs.npz", logits=logits.numpy(), features=feats.numpy())
            (tmp / "reference" / "items.json").write_text(json.dumps([str(x) for x in ref_items], indent=1))

            manifest = {
                "schema": SCHEMA,
                "edgeft_version": __version__,
                "created": now(),
                "task": "classification",
                "source": str(Path(source).resolve()),
                "modality": modality,
                "labels": loaded.labels,
                "preprocessing": spec,
                "inputs": exported["inputs"],
                "outputs": {"backbone": ["features"], "head": ["logits", "probs"]},
                "feature_dim": exported["feature_dim"],
                "precision": precision,
                "quantization": quant,
                "device": {"profile": profile.name, "description": profile.description,
                           "profile_file": Path(profile.path).name},
                "target": {"name": target.name, "plugin": target.plugin},
                "runtime": {k: settings[k] for k in ("providers", "threads", "static_shapes", "batch_size", "max_length")},
                "retrain": settings["retrain"],
                "backbone": "backbone.onnx",
                "head": {"version": 1, "file": head_file},
                "heads": [{"version": 1, "file": head_file, "labels": loaded.labels, "created": now(), "source": "build",
                           "base_model": loaded.spec.source, "method": loaded.info.get("method")}],
                "files": {},
            }
            if target.package is not None:
                ctx = BuildContext(tmp, profile, target, manifest, tmp / "backbone.onnx", exported["inputs"],
                                   modality, spec)
                target.package(ctx)

            manifest["files"] = {
                str(p.relative_to(tmp)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            # replay memory: training features from the bundle's own backbone (what the device computes)
            if replay:
                source_info = loaded.info.get("training") or (
                    training_source(loaded.info["config"]) if "config" in loaded.info else None)
                train_ds = training_data(source_info)
                if train_ds is None:
                    raise UsageError(f"{source}: its training data is gone, and the replay memory needs it; "
                                     "pass --replay 0 to build without one (the device then cannot retrain).")
                rel = write_replay(tmp, train_ds, ds, loaded.labels, replay)
                manifest["replay"] = {"per_class": replay, "holdout": REPLAY_HOLDOUT}
                manifest["head"]["replay"] = rel
                manifest["heads"][0]["replay"] = rel
                manifest["files"][rel] = {"sha256": sha256(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

            # the finished bundle, loaded as a device loads it, against PyTorch on validation rows
            bundle = Bundle(tmp, providers=["CPUExecutionProvider"])
            got = bundle.logits(items)
            parity = compare(ref, got, y, loaded.labels, items)
            parity["checks"] = checks(parity, t)
            parity["passed"] = all(c["passed"] for c in parity["checks"])
            parity["precision"] = precision
            if not parity["passed"]:
                raise ParityError(f"{output}: the {precision} bundle for {profile.name} fails parity with PyTorch: "
                                  + "; ".join(c["message"] for c in parity["checks"] if not c["passed"]))
            parity["export_fp32"] = {k: exported["parity"][k] for k in ("max_abs_diff", "agreement")} if exported["parity"] else None
            (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
            manifest["parity"] = {k: parity.get(k) for k in ("rows", "max_abs_diff", "mean_abs_diff", "agreement",
                                                            "accuracy", "reference_accuracy", "accuracy_drop")}
            manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
            # parity.json is written after the hashes: hash it too, then the manifest is final
            manifest["files"]["parity.json"] = {"sha256": sha256(tmp / "parity.json"),
                                                "bytes": (tmp / "parity.json").stat().st_size}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if sign_key:
        from .runtime.trust import sign

        try:
            sign(output, sign_key)
        except BaseException:  # a bundle that was to be signed and is not must not stay behind
            shutil.rmtree(output, ignore_errors=True)
            raise
    if archive:
        write_archive(output)
    log.info("built %s for %s (%s, %s) in %.1f s", output, profile.name, target.name, precision,
             time.perf_counter() - t0)
    return manifest


def write_replay(bundle: Path, train_ds, val_ds, labels: list[str], per_class: int) -> str:
    """replay/replay-0001.npz: the bundle's own features of up to `per_class` training rows per
    class, plus held-out rows from the validation data (rows the head never trained on, so the
    retrain guard compares old and new heads fairly)."""
    rng = np.random.default_rng(0)
    index = {n: i for i, n in enumerate(labels)}
    items, ys, hold = [], [], []
    n_hold = max(5, round(per_class * REPLAY_HOLDOUT))
    for ds, limit, is_hold in ((train_ds, per_class, False), (val_ds, n_hold, True)):
        y = np.array([index[v] for v in ds.labels])
        for c in range(len(labels)):
            for i in rng.permutation(np.flatnonzero(y == c))[:limit]:
                items.append(ds.items[i]), ys.append(c), hold.append(is_hold)
    feats = Bundle(bundle, providers=["CPUExecutionProvider"], check_hashes=False).features(items)
    rel = "replay/replay-0001.npz"
    (bundle / "replay").mkdir(exist_ok=True)
    np.savez(bundle / rel, features=feats.astype(np.float32), labels=np.array(ys, dtype=np.int64),
             holdout=np.array(hold, dtype=bool))
    return rel


def write_archive(bundle: Path) -> Path:
    """BUNDLE.tar.gz beside the bundle, written under a temporary name and renamed."""
    dest = bundle.with_name(bundle.name + ".tar.gz")
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(bundle.rglob("*")):
            tar.add(p, arcname=str(Path(bundle.name) / p.relative_to(bundle)), recursive=False)
    tmp.replace(dest)
    return dest
