"""Signed bundles, the device policy, safe archive installs, and builds killed mid-way."""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import new_class_rows, write_csv

from edgeft.cli import main
from edgeft.config import BuildConfig
from edgeft.errors import BundleError, UsageError
from edgeft.runtime.bundle import Bundle
from edgeft.runtime.install import install
from edgeft.runtime.trust import OWNER_MANIFEST, SIGNATURE, generate_keys, sign

pytest.importorskip("model_signing")


@pytest.fixture(scope="module")
def built(device_bundles):
    return device_bundles["text"]  # prebuilt or built once (conftest.py)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    owner = generate_keys(d / "owner")
    other = generate_keys(d / "other")
    return {"key": owner[0], "pub": owner[1], "other_key": other[0], "other_pub": other[1]}


@pytest.fixture
def signed(built, keys, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(built, b)
    sign(b, keys["key"])
    return b


def run(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    return lines[0]


def test_private_key_is_private(keys):
    assert oct(keys["key"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Exception, match="never overwritten"):
        generate_keys(keys["key"].parent)


def test_signed_bundle_passes_and_survives_a_device_retrain(signed, keys, tmp_path):
    assert (signed / SIGNATURE).exists() and (signed / OWNER_MANIFEST).exists()
    assert run("device", "check", signed, "--public-key", keys["pub"]).exit_code == 0
    data = write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2))
    r = run("device", "retrain", signed, "--data", data, "--add-classes", "--public-key", keys["pub"])
    assert r.exit_code == 0, r.output
    # the owner's signature still holds; the new head is recorded with its data hash
    assert run("device", "check", signed, "--public-key", keys["pub"]).exit_code == 0
    m = json.loads((signed / "manifest.json").read_text())
    assert m["heads"][-1]["source"] == "device retrain" and m["heads"][-1]["data"]["fingerprint"]
    assert run("device", "rollback", signed, "--public-key", keys["pub"]).exit_code == 0


@pytest.mark.parametrize("victim", ["backbone.onnx", "heads/head-0001.onnx", "tokenizer.json",
                                    "replay/replay-0001.npz", OWNER_MANIFEST])
def test_changed_file_is_refused_before_loading(signed, keys, victim, monkeypatch):
    path = signed / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    import edgeft.runtime.session as S

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the signature check")

    monkeypatch.setattr(S, "make_session", no_model)
    r = run("device", "predict", signed, "pump", "--public-key", keys["pub"])
    assert r.exit_code == 1
    assert victim.split("/")[-1] in one_error_line(r)


def test_unsigned_and_resigned_bundles_are_refused(built, signed, keys, tmp_path):
    unsigned = tmp_path / "unsigned"
    shutil.copytree(built, unsigned)
    r = run("device", "check", unsigned, "--public-key", keys["pub"])
    assert r.exit_code == 1 and "not signed" in one_error_line(r)
    sign(signed, keys["other_key"])  # someone else re-signs the owner's bundle
    r = run("device", "check", signed, "--public-key", keys["pub"])
    assert r.exit_code == 1 and "does not verify" in one_error_line(r)


def test_live_manifest_must_keep_what_the_owner_signed(signed, keys):
    m = json.loads((signed / "manifest.json").read_text())
    (signed / "manifest.json").write_text(json.dumps({**m, "precision": "fp32"}))
    r = run("device", "check", signed, "--public-key", keys["pub"])
    assert r.exit_code == 1 and "'precision' differs from the signed" in one_error_line(r)


def test_policy_requires_a_signature(built, signed, keys, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(f'require_signature = true\npublic_key = "{keys["pub"]}"\n')
    env = {"EDGEFT_POLICY": str(policy)}
    assert run("device", "predict", signed, "pump leak", env=env).exit_code == 0
    unsigned = tmp_path / "unsigned"
    shutil.copytree(built, unsigned)
    r = run("device", "predict", unsigned, "pump leak", env=env)
    assert r.exit_code == 1 and "not signed" in one_error_line(r)
    policy.write_text("require_signatur = true\n")
    r = run("device", "predict", unsigned, "pump", env=env)
    assert r.exit_code == 2 and "unknown key 'require_signatur'" in one_error_line(r)


def test_relative_paths_sign_and_verify(built, keys, tmp_path, monkeypatch):
    """Signing `bundles/x` from the current folder and installing its archive elsewhere."""
    from edgeft.build import write_archive

    monkeypatch.chdir(tmp_path)
    shutil.copytree(built, tmp_path / "rel")
    sign(Path("rel"), keys["key"])
    archive = write_archive(Path("rel"))
    install(archive, tmp_path / "installed", public_key=keys["pub"])
    assert Bundle(tmp_path / "installed", public_key=keys["pub"]).labels


def test_build_sign_and_verify(keys, tmp_path, built):
    run_dir = built.parent / "text-run"
    r = run("build", run_dir, "--device", "x86-64-server", "-o", tmp_path / "b", "--sign", keys["key"], "--uncertified")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / SIGNATURE).exists()
    data = built.parent / "text-data" / "val.csv"
    r = run("verify", tmp_path / "b", "--reference", run_dir, "--data", data, "--public-key", keys["pub"])
    assert r.exit_code == 0, r.output
    r = run("verify", tmp_path / "b", "--reference", run_dir, "--data", data, "--public-key", keys["other_pub"])
    assert r.exit_code == 1


def test_build_overwrite_with_a_key_that_cannot_sign_keeps_the_old_bundle(keys, tmp_path, built):
    """Signing happens before the new bundle replaces the old one: a key that exists but cannot
    sign (here a public key) fails the build with one line and leaves the old bundle as it was."""
    run_dir, out = built.parent / "text-run", tmp_path / "b"
    shutil.copytree(built, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run("build", run_dir, "--device", "x86-64-server", "-o", out, "--overwrite", "--sign", keys["pub"], "--uncertified")
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "cannot sign" in r.stderr
    assert "Traceback" not in r.output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left beside it
    with pytest.raises(UsageError, match="no such key file"):  # the library refuses before building, like the CLI
        BuildConfig(run_dir, "x86-64-server", tmp_path / "c", sign_key=tmp_path / "nokey.pem")


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_install_a_signed_archive(signed, keys, tmp_path):
    from edgeft.build import write_archive

    archive = write_archive(signed)
    target = tmp_path / "device" / "bundle"
    target.parent.mkdir()
    r = run("device", "install", archive, target, "--public-key", keys["pub"])
    assert r.exit_code == 0, r.output
    assert Bundle(target, public_key=keys["pub"]).predict(["pump"])
    assert [p.name for p in target.parent.iterdir()] == ["bundle"]  # no temporary folders left
    r = run("device", "install", archive, target)
    assert r.exit_code == 2 and "already exists" in one_error_line(r)


@pytest.mark.parametrize("evil,why", [
    ("dotdot", "would write outside"), ("absolute", "would write outside"), ("symlink", "is a link"),
    ("hardlink", "is a link"), ("device", "special file"), ("huge", "unpacks to more than"),
])
def test_install_refuses_unsafe_archives(evil, why, tmp_path):
    members = [_file("b/manifest.json", b"{}")]
    if evil == "dotdot":
        members.append(_file("b/../../escape.txt"))
    elif evil == "absolute":
        members.append(_file("/tmp/escape.txt"))
    elif evil in ("symlink", "hardlink"):
        info = tarfile.TarInfo("b/link")
        info.type = tarfile.SYMTYPE if evil == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        members.append((info, None))
    elif evil == "device":
        info = tarfile.TarInfo("b/null")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        members.append((info, None))
    else:
        members.append(_file("b/big.bin", b"0" * (2 << 20)))
    archive = _archive(tmp_path / "evil.tar.gz", members)
    target = tmp_path / "dest" / "bundle"
    target.parent.mkdir()
    with pytest.raises(BundleError, match=why):
        install(archive, target, max_bytes=1 << 20)
    assert list(target.parent.iterdir()) == [] and not (tmp_path / "escape.txt").exists()
    r = run("device", "install", archive, target, "--max-size-mb", "1")
    assert r.exit_code == 1 and why in one_error_line(r)


def test_install_refuses_a_broken_bundle(built, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(built, b)
    (b / "backbone.onnx").write_bytes(b"not a model")
    from edgeft.build import write_archive

    archive = write_archive(b)
    with pytest.raises(BundleError, match="backbone.onnx: content does not match"):
        install(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.slow
def test_killed_builds_and_retrains_leave_whole_bundles_or_none(built, tmp_path):
    """SIGKILL at random moments: 15 builds and 35 retrains (50 in all, with 20 more in test_device)."""
    rng = random.Random(1)
    run_dir = built.parent / "text-run"
    cmd = [sys.executable, "-m", "edgeft.cli", "build", str(run_dir), "--device", "x86-64-server", "--uncertified", "-o"]
    t0 = time.perf_counter()
    subprocess.run(cmd + [str(tmp_path / "timing")], check=True, capture_output=True)
    full = time.perf_counter() - t0
    for trial in range(15):
        out = tmp_path / f"build{trial}"
        p = subprocess.Popen(cmd + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.1) * full)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # the rename happened: then the bundle is whole
            Bundle(out)
    data = write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2))
    rcmd = [sys.executable, "-m", "edgeft.cli", "device", "retrain"]
    for trial in range(35):
        b = tmp_path / f"r{trial}"
        shutil.copytree(built, b)
        p = subprocess.Popen(rcmd + [str(b), "--data", str(data), "--add-classes"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        loaded = Bundle(b)
        assert ("valve" in loaded.labels) == (loaded.head_version == 2)
        shutil.rmtree(b)
