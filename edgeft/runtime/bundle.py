"""A bundle on the device: manifest checks, hash checks, then the models. numpy + onnxruntime only.

Layout (see edgeft/bundle.py for how it is built):
    manifest.json          schema, labels, preprocessing, runtime settings, files with sha256,
                           the active head version and the history of heads
    backbone.onnx          inputs -> features
    heads/head-NNNN.onnx   features -> logits, probs (one file per head version)
    tokenizer.json | preprocessor.json
    reference/             inputs.npz, outputs.npz (PyTorch logits), items.json
    parity.json            the build-time parity report
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import BundleError
from .preprocess import load_preprocessor
from .session import OnnxModel

MANIFEST = "manifest.json"
SCHEMA = 2  # the newest this edgeft reads. 2: runtime.engine (openvino) and runtime.max_batch, which
# an edgeft that reads only 1 would ignore (it would run backbone.xml with onnxruntime, or batch a
# dynamic-int8 backbone), so bundles that use them say 2 and older devices ask for an upgrade
REQUIRED = {  # key: type; a manifest missing one, or with the wrong type, is refused
    "schema": int, "edgeft_version": str, "task": str, "modality": str, "labels": list,
    "preprocessing": dict, "inputs": list, "precision": str, "runtime": dict, "files": dict,
    "backbone": str, "head": dict, "heads": list,
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """A file as a manifest lists it."""
    return {"sha256": sha256(path), "bytes": Path(path).stat().st_size}


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST}).")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}).") from None
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path}: JSON beyond what edgeft reads ({type(e).__name__}).") from None
    check_manifest(m, path)
    return m


def check_manifest(m, path: str | Path) -> None:
    """What read_manifest checks, for a manifest in memory (`path` names it in messages): BundleError or None.

    Whoever writes a manifest (retrain, rollback) runs this first, so it never commits one
    the device then refuses to read."""
    if not isinstance(m, dict):
        raise BundleError(f"{path}: expected a JSON object.")
    schema = m.get("schema")
    if isinstance(schema, int) and schema > SCHEMA:
        raise BundleError(f"{path}: schema {schema} is newer than this edgeft reads ({SCHEMA}). Upgrade edgeft on the device.")
    for key, kind in REQUIRED.items():
        if key not in m:
            raise BundleError(f"{path}: missing key '{key}'.")
        if not isinstance(m[key], kind) or (kind is int and isinstance(m[key], bool)):
            raise BundleError(f"{path}: key '{key}' must be {kind.__name__}, got {type(m[key]).__name__}.")
    for key in ("version", "file"):
        if key not in m["head"]:
            raise BundleError(f"{path}: missing key 'head.{key}'.")
    for key, value in (("backbone", m["backbone"]), ("head.file", m["head"]["file"])):
        # the models a device loads must be files the manifest hashes
        if not isinstance(value, str) or value not in m["files"]:
            raise BundleError(f"{path}: '{key}' must name a file listed (and hashed) in 'files'.")
    if not all(isinstance(x, str) for x in m["labels"]) or not m["labels"]:
        raise BundleError(f"{path}: 'labels' must be a non-empty list of strings.")
    _check_heads(m, path)


def _is_version(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_heads(m: dict, path) -> None:
    """'heads': one object per head version (unique integer above 0, a hashed file unless pruned,
    string labels); 'head' names one of them."""
    files = m["files"]
    versions = set()
    for i, h in enumerate(m["heads"]):
        key = f"heads[{i}]"
        if not isinstance(h, dict):
            raise BundleError(f"{path}: '{key}' must be an object with 'version' and 'file', got {type(h).__name__}.")
        v = h.get("version")
        if not _is_version(v):
            raise BundleError(f"{path}: '{key}.version' must be an integer above 0, got {v!r}.")
        if v in versions:
            raise BundleError(f"{path}: head version {v} is listed twice in 'heads'.")
        versions.add(v)
        pruned = h.get("pruned", False)
        if not isinstance(pruned, bool):
            raise BundleError(f"{path}: '{key}.pruned' must be true or false, got {pruned!r}.")
        for name in ("file", "replay"):
            rel = h.get(name)
            if rel is None and name == "replay":
                continue
            if not isinstance(rel, str) or (not pruned and rel not in files):
                raise BundleError(f"{path}: '{key}.{name}' must name a file listed (and hashed) in 'files'.")
        for name in ("labels", "added_classes"):
            if name in h and (not isinstance(h[name], list) or not all(isinstance(x, str) for x in h[name])):
                raise BundleError(f"{path}: '{key}.{name}' must be a list of strings.")
        if "metrics" in h and not isinstance(h["metrics"], dict):
            raise BundleError(f"{path}: '{key}.metrics' must be an object, got {type(h['metrics']).__name__}.")
    v = m["head"]["version"]
    if not _is_version(v) or v not in versions:
        raise BundleError(f"{path}: 'head.version' must be the version of one entry of 'heads' "
                          f"({', '.join(map(str, sorted(versions))) or 'none listed'}), got {v!r}.")
    rel = m["head"].get("replay")
    if rel is not None and (not isinstance(rel, str) or rel not in files):
        raise BundleError(f"{path}: 'head.replay' must name a file listed (and hashed) in 'files'.")


def check_files(bundle: str | Path, manifest: dict, only: list[str] | None = None) -> None:
    """Every file the manifest lists exists, stays inside the bundle and has its sha256."""
    bundle = Path(bundle)
    root = bundle.resolve()
    for rel, entry in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        try:
            path = (bundle / rel).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long
            raise BundleError(f"{bundle / MANIFEST}: unusable file name {rel!r}.") from None
        if root not in path.parents:
            raise BundleError(f"{bundle / MANIFEST}: file '{rel}' points outside the bundle.")
        if not path.is_file():
            raise BundleError(f"{bundle / rel}: missing (listed in the manifest).")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise BundleError(f"{bundle / MANIFEST}: files['{rel}'] has no sha256.")
        if sha256(path) != entry["sha256"]:
            raise BundleError(f"{bundle / rel}: content does not match its sha256 in the manifest; the bundle was changed or damaged.")


class Bundle:
    """Load a bundle after its hashes match; run it: features, logits, predictions, self-check."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 check_hashes: bool = True, public_key: str | Path | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if check_hashes:
            from .trust import enforce

            enforce(self.path, public_key)  # the owner's signature, when given a key or the policy says so
            check_files(self.path, self.manifest)
        m = self.manifest
        runtime = m["runtime"]
        self.labels = list(m["labels"])
        try:
            self.pre = load_preprocessor(self.path, m["preprocessing"])
            providers = providers or runtime.get("providers")
            threads = threads or runtime.get("threads")
            if providers is not None and (not isinstance(providers, list) or not all(isinstance(p, str) for p in providers)):
                raise TypeError("runtime.providers must be a list of names")
            if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 0 < threads <= 1024):
                raise TypeError("runtime.threads must be a small positive integer")
            batch = runtime.get("batch_size", 1)
            if not isinstance(batch, int) or isinstance(batch, bool) or not 0 < batch <= 4096:
                raise TypeError("runtime.batch_size must be a positive integer up to 4096")
            self.fixed_batch = batch if runtime.get("static_shapes") else None
            self.pow2_batches = runtime.get("engine") == "openvino"
            # dynamic int8 takes its activation scales from the whole batch, padding included:
            # such a bundle answers one row per call, or batch-mates would change its answers
            self.max_batch = runtime.get("max_batch")
            if self.max_batch is not None and (not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool)
                                               or not 0 < self.max_batch <= 4096):
                raise TypeError("runtime.max_batch must be a positive integer up to 4096")
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise BundleError(f"{self.path / MANIFEST}: unusable preprocessing or runtime settings ({type(e).__name__}: {e}).") from None
        if runtime.get("engine", "onnxruntime") == "openvino":
            from .openvino import OpenVinoModel

            settings = runtime.get("openvino")
            if not isinstance(settings, dict):
                raise BundleError(f"{self.path / MANIFEST}: runtime.openvino must be an object of OpenVINO settings.")
            self.backbone = OpenVinoModel(self.path / m["backbone"], {**settings, **({"threads": threads} if threads else {})})
        elif runtime.get("engine", "onnxruntime") != "onnxruntime":
            raise BundleError(f"{self.path / MANIFEST}: runtime.engine {runtime.get('engine')!r} is not one this edgeft "
                              "runs (onnxruntime, openvino).")
        else:
            self.backbone = OnnxModel(self.path / m["backbone"], providers, threads)
        self.head_version = m["head"]["version"]
        self.head = OnnxModel(self.path / m["head"]["file"], providers, threads)
        dims = self.head.session.get_outputs()[0].shape
        if isinstance(dims[-1], int) and dims[-1] != len(self.labels):
            raise BundleError(f"{self.path / MANIFEST}: {len(self.labels)} labels, but the head "
                              f"{m['head']['file']} has {dims[-1]} outputs.")

    def _chunks(self, items, batch_size):
        step = self.fixed_batch or min(batch_size, self.max_batch or batch_size)
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            if self.fixed_batch and len(chunk) < self.fixed_batch:
                chunk = chunk + [chunk[-1]] * (self.fixed_batch - len(chunk))  # pad the last batch
            elif self.pow2_batches and len(chunk) & (len(chunk) - 1):
                # OpenVINO compiles each input shape once: a last batch of 13 runs as 16, so the
                # batch sizes seen stay 1, 2, 4, ... and nothing compiles twice for a new count
                chunk = chunk + [chunk[-1]] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))
            yield chunk, min(step, len(items) - i)

    def features(self, items: list, batch_size: int = 32) -> np.ndarray:
        out = []
        for chunk, n in self._chunks(items, batch_size):
            out.append(self.backbone(self.pre(chunk))["features"][:n])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def features_from_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self.backbone(arrays)["features"]

    def head_outputs(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return self.head({"features": features.astype(np.float32)})

    def logits(self, items: list, batch_size: int = 32) -> np.ndarray:
        return self.head_outputs(self.features(items, batch_size))["logits"]

    def predict(self, items: list, batch_size: int = 32) -> list[dict]:
        probs = self.head_outputs(self.features(items, batch_size))["probs"]
        return [{"label": self.labels[int(p.argmax())], "confidence": float(p.max()),
                 "probs": {n: float(v) for n, v in zip(self.labels, p, strict=True)}} for p in probs]

    def reference_features(self) -> np.ndarray:
        """The backbone's features of the bundled reference inputs, run as predict runs them."""
        inputs = np.load(self.path / "reference" / "inputs.npz")
        arrays = {k: inputs[k] for k in inputs.files}
        n = len(next(iter(arrays.values())))
        if self.max_batch == 1 and "attention_mask" in arrays and not self.fixed_batch:
            # one text per call, without the padding its batch-mates gave it, as predict runs it
            rows = []
            for i in range(n):
                width = max(1, int(arrays["attention_mask"][i].sum()))
                rows.append(self.features_from_arrays({k: v[i : i + 1, :width] for k, v in arrays.items()}))
            return np.concatenate(rows)
        step = self.fixed_batch or min(n, self.max_batch or n)
        return np.concatenate([self.features_from_arrays({k: v[i : i + step] for k, v in arrays.items()})
                               for i in range(0, n, step)])

    def check(self, thresholds=None) -> dict:
        """Run the bundled reference inputs here and compare with what the build recorded.

        fp32: against PyTorch's outputs (they must match to 1e-4). int8/fp16: a quantized
        bundle differs from PyTorch by design, and the build measured by how much on all its
        parity rows (parity.json); 16 reference rows cannot re-judge that (one changed answer
        is 6%). So the question here is whether this device runs the bundle as the build did:
        its answers against the bundle's own outputs recorded at build time, all equal.
        Agreement with PyTorch on these rows is reported beside it.
        """
        from .compare import Thresholds, checks, compare

        expected = np.load(self.path / "reference" / "outputs.npz")
        feats = self.reference_features()
        got = self.head_outputs(feats)["logits"]
        quantized = self.manifest["precision"] != "fp32" and "bundle_features" in expected.files
        build_head = self.head_version == self.manifest["heads"][0]["version"]
        if quantized:
            ref = self.head_outputs(expected["bundle_features"])["logits"]
            t = thresholds or Thresholds(max_abs_diff=None, min_agreement=1.0)
        else:
            ref = expected["logits"]
            if not build_head:
                # a head retrained on the device is not the one PyTorch computed at build time:
                # check the backbone's features, and the head against its own recorded outputs
                ref = self.head_outputs(expected["features"])["logits"]
            t = thresholds or Thresholds.for_precision(self.manifest["precision"])
        report = compare(ref, got, labels=self.labels)
        report["against"] = "the bundle's outputs at build time" if quantized else "PyTorch's outputs at build time"
        if quantized and build_head:
            report["pytorch_agreement"] = float((expected["logits"].argmax(1) == got.argmax(1)).mean())
        report["checks"] = checks(report, t)
        report["passed"] = all(c["passed"] for c in report["checks"])
        report["providers"] = (self.backbone.describe() if hasattr(self.backbone, "describe")
                               else self.backbone.session.get_providers())
        report["precision"] = self.manifest["precision"]
        report["head_version"] = self.head_version
        if "features" in expected.files:
            report["features_max_abs_diff"] = float(np.abs(feats - expected["features"]).max())
        return report
