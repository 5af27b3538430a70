"""Signed bundles and the device's policy. No torch. (Installing an archive: runtime/install.py.)

What the owner signs (OpenSSF model-signing, Sigstore bundle format, an EC key, offline):
every file of the bundle as built, including `owner-manifest.json`, a frozen copy of the
build's manifest. What the owner does not sign: `manifest.json` itself, which the device
rewrites when it retrains (new head versions, history), and the files a retrain adds. So:

- a changed backbone, build-time head, tokenizer, replay memory or owner manifest fails the
  signature check: the device refuses the bundle before loading any model;
- the live manifest must agree with the signed owner manifest on everything the owner
  decided (backbone and its hash, preprocessing, precision, inputs, the build-time heads);
  device heads are listed after them with their data hashes, and each file is sha256-checked.
A device retrain therefore never breaks the owner's signature, and nobody without the
owner's key can ship a new backbone to a device that requires signatures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BundleError, MissingDependencyError, UsageError
from . import atomic
from .manifest import MANIFEST, check_files, read_manifest

SIGNATURE = "owner.sig"
OWNER_MANIFEST = "owner-manifest.json"
UNSIGNED = ("manifest.json", SIGNATURE, "cache")  # what the device may change
POLICY_ENV = "EDGEFT_POLICY"
DEFAULT_POLICY = Path("/etc/edgeft/policy.toml")
OWNER_KEYS = ("backbone", "preprocessing", "precision", "inputs", "modality", "task", "target", "device")


def _model_signing():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError:
        raise MissingDependencyError(
            "signing needs OpenSSF model-signing: pip install -c constraints.txt \"edgeft[sign]\""
        ) from None
    return hashing, signing, verifying


def generate_keys(output: str | Path) -> tuple[Path, Path]:
    """An EC P-256 key pair: owner.key (private, mode 0600) and owner.pub."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise MissingDependencyError('key generation needs cryptography: pip install "edgeft[sign]"') from None
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / "owner.key", out / "owner.pub"
    for p in (priv, pub):
        if p.exists():
            raise UsageError(f"{p}: already exists; keys are never overwritten.")
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _hashing_config(hashing, bundle: Path):
    # absolute paths: model-signing matches ignored paths against resolved file paths
    return hashing.Config().set_ignored_paths(paths=[bundle.resolve() / p for p in UNSIGNED])


def sign(bundle: str | Path, key: str | Path) -> Path:
    """Freeze the owner manifest and sign the bundle's files with `key` (PEM, EC)."""
    bundle = Path(bundle)
    m = read_manifest(bundle)
    check_files(bundle, m)
    if any(h.get("source") == "device retrain" for h in m["heads"]):
        raise UsageError(f"{bundle}: holds heads retrained on a device; sign bundles as built, before they ship.")
    if not Path(key).is_file():
        raise UsageError(f"{key}: no such key file.")
    hashing, signing, _ = _model_signing()
    atomic.write_text(bundle / OWNER_MANIFEST, (bundle / MANIFEST).read_text())
    sig = bundle / SIGNATURE
    tmp = bundle / f".{SIGNATURE}.tmp"
    try:
        (signing.Config().use_elliptic_key_signer(private_key=Path(key))
         .set_hashing_config(_hashing_config(hashing, bundle)).sign(bundle.resolve(), tmp))
    except Exception as e:  # model-signing raises several types for bad keys
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{key}: cannot sign with it ({type(e).__name__}: {e}).") from None
    tmp.replace(sig)
    return sig


def verify_signature(bundle: str | Path, public_key: str | Path) -> None:
    """Raise BundleError (one line, naming the file) unless the owner's signature holds."""
    bundle = Path(bundle)
    sig = bundle / SIGNATURE
    if not sig.is_file():
        raise BundleError(f"{bundle}: not signed ({SIGNATURE} is missing) and a signature is required.")
    if not Path(public_key).is_file():
        raise UsageError(f"{public_key}: no such public key file.")
    hashing, _, verifying = _model_signing()
    try:
        (verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
         .set_hashing_config(_hashing_config(hashing, bundle)).set_ignore_unsigned_files(True)
         .verify(bundle.resolve(), sig))
    except Exception as e:
        import re

        text = str(e)
        changed = re.search(r"Hash mismatch for '([^']+)'", text)
        if changed:
            raise BundleError(f"{bundle / changed.group(1)}: changed since the owner signed the bundle; refused.") from None
        gone = re.search(r"Cannot use '([^']+)'", text)
        if gone:
            raise BundleError(f"{gone.group(1)}: signed by the owner but missing or unreadable; refused.") from None
        msg = " ".join(text.split())[:200]
        raise BundleError(f"{bundle / SIGNATURE}: the owner's signature does not verify with this key ({msg}).") from None
    _check_against_owner(bundle)


def _check_against_owner(bundle: Path) -> None:
    """The live manifest keeps what the owner decided; only device heads may follow."""
    owner = json.loads((bundle / OWNER_MANIFEST).read_text())
    live = json.loads((bundle / MANIFEST).read_text())
    for key in OWNER_KEYS:
        if owner.get(key) != live.get(key):
            raise BundleError(f"{bundle / MANIFEST}: '{key}' differs from the signed {OWNER_MANIFEST}.")
    owned = owner["files"]
    for rel, entry in owned.items():
        if rel in live["files"] and live["files"][rel] != entry:
            raise BundleError(f"{bundle / MANIFEST}: the hash of '{rel}' differs from the signed {OWNER_MANIFEST}.")
    n = len(owner["heads"])
    if [h["version"] for h in live["heads"][:n]] != [h["version"] for h in owner["heads"]]:
        raise BundleError(f"{bundle / MANIFEST}: the build-time head versions differ from the signed {OWNER_MANIFEST}.")
    for h in live["heads"][n:]:
        if h.get("source") != "device retrain":
            raise BundleError(f"{bundle / MANIFEST}: head v{h['version']} did not come from a device retrain "
                              "and is not signed.")


def load_policy() -> dict:
    """The device's policy (TOML the technician installs once): require_signature, public_key."""
    import tomllib

    path = Path(os.environ.get(POLICY_ENV) or DEFAULT_POLICY)
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None
    unknown = set(doc) - {"require_signature", "public_key", "max_archive_mb"}
    if unknown:
        raise UsageError(f"{path}: unknown key '{sorted(unknown)[0]}'. Known: require_signature, public_key, max_archive_mb.")
    if doc.get("require_signature") and not doc.get("public_key"):
        raise UsageError(f"{path}: require_signature needs public_key.")
    if doc.get("public_key") and not Path(doc["public_key"]).is_absolute():
        doc["public_key"] = str(path.parent / doc["public_key"])
    return doc


def enforce(bundle: str | Path, public_key: str | Path | None = None) -> None:
    """Check the signature when a key is given or the device policy requires one."""
    policy = load_policy()
    key = public_key or (policy.get("public_key") if policy.get("require_signature") else None)
    if key:
        verify_signature(bundle, key)
