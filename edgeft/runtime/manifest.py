"""A bundle's manifest: its schema, the checks every reader and writer runs, and file hashes.

Layout (see edgeft/build.py for how it is built):
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

from ..errors import BundleError

MANIFEST = "manifest.json"
SCHEMA = 3  # the newest this edgeft reads. 2: runtime.engine (openvino) and runtime.max_batch, which
# an edgeft that reads only 1 would ignore (it would run backbone.xml with onnxruntime, or batch a
# dynamic-int8 backbone), so bundles that use them say 2 and older devices ask for an upgrade.
# 3: head families (a head version with "family": "ridge" and its "statistics" file): an edgeft
# that reads only 2 would retrain such a head as softmax from a replay memory of hold-out rows
FAMILIES = ("softmax", "ridge")
REQUIRED = {  # key: type; a manifest missing one, or with the wrong type, is refused
    "schema": int, "edgeft_version": str, "task": str, "modality": str, "labels": list,
    "preprocessing": dict, "inputs": list, "precision": str, "runtime": dict, "files": dict,
    "backbone": str, "head": dict, "heads": list,
}


class NotABundleError(BundleError):
    """A folder that is no bundle at all: bad input (exit 2), not a bundle that failed a check."""

    exit_code = 2


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise NotABundleError(f"{bundle}: not a bundle (no {MANIFEST}).")
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


def _check_head_files(h: dict, key: str, files: dict, path) -> None:
    """One 'heads' entry's files (head, replay, and a closed-form family's statistics): hashed unless pruned."""
    pruned = h.get("pruned", False)
    if not isinstance(pruned, bool):
        raise BundleError(f"{path}: '{key}.pruned' must be true or false, got {pruned!r}.")
    family = h.get("family", "softmax")
    if family not in FAMILIES:
        raise BundleError(f"{path}: '{key}.family' must be one of {', '.join(FAMILIES)}, got {family!r}.")
    if family != "softmax" and "statistics" not in h:
        raise BundleError(f"{path}: '{key}' is a {family} head and must name its 'statistics' file.")
    for name in ("file", "replay", "statistics"):
        rel = h.get(name)
        if rel is None and name != "file":
            continue
        if not isinstance(rel, str) or (not pruned and rel not in files):
            raise BundleError(f"{path}: '{key}.{name}' must name a file listed (and hashed) in 'files'.")


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
        _check_head_files(h, key, files, path)
        for name in ("labels", "added_classes"):
            if name in h and (not isinstance(h[name], list) or not all(isinstance(x, str) for x in h[name])):
                raise BundleError(f"{path}: '{key}.{name}' must be a list of strings.")
        if "metrics" in h and not isinstance(h["metrics"], dict):
            raise BundleError(f"{path}: '{key}.metrics' must be an object, got {type(h['metrics']).__name__}.")
    v = m["head"]["version"]
    if not _is_version(v) or v not in versions:
        raise BundleError(f"{path}: 'head.version' must be the version of one entry of 'heads' "
                          f"({', '.join(map(str, sorted(versions))) or 'none listed'}), got {v!r}.")
    for name in ("replay", "statistics"):
        rel = m["head"].get(name)
        if rel is not None and (not isinstance(rel, str) or rel not in files):
            raise BundleError(f"{path}: 'head.{name}' must name a file listed (and hashed) in 'files'.")
    if m["head"].get("family", "softmax") != next(h for h in m["heads"] if h["version"] == v).get("family", "softmax"):
        raise BundleError(f"{path}: 'head.family' differs from the family of head version {v} in 'heads'.")


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


def file_entry(path: Path) -> dict:
    """What the manifest's 'files' holds for one file."""
    return {"sha256": sha256(path), "bytes": Path(path).stat().st_size}
