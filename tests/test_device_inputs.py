"""What the device side refuses: a bundle whose manifest, preprocessing spec or head history is
wrong, and an image that is a decompression bomb. Each case is an input the fuzzing in
tests/test_fuzz.py once found to crash, hang or load unchecked; each must now end in one clear
error (one line, starting with the bundle or the file) and leave the bundle as it was.

Torch-free: these run in the device environment too (.ci/run), on the tiny bundle of
tests/tiny.py (a Flatten backbone and a 3-class head, a few hundred bytes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import TINY_HEAD, TINY_LABELS, png_header

from edgeft.cli import main
from edgeft.errors import BundleError, DataError, EdgeftError
from edgeft.runtime.bundle import Bundle
from edgeft.runtime.manifest import MANIFEST
from edgeft.runtime.preprocess import ImagePreprocessor

BOMB = png_header(30000, 30000)  # 900 megapixels declared in a few bytes


@pytest.fixture(autouse=True)
def _no_device_policy(monkeypatch, tmp_path_factory):
    # a device policy in /etc would make bundles need signatures: not what these tests are about
    monkeypatch.setenv("EDGEFT_POLICY", str(tmp_path_factory.getbasetemp() / "no-policy.toml"))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _bundle_with(tmp_path, tiny_bundle, change) -> Path:
    """A copy of the tiny bundle whose manifest `change(manifest, bundle)` has edited."""
    base, m, _ = tiny_bundle
    b = tmp_path / "bundle"
    shutil.copytree(base, b)
    m = copy.deepcopy(m)
    change(m, b)
    (b / MANIFEST).write_text(json.dumps(m))
    return b


def _refused(kind, where, fn) -> str:
    """fn() raises `kind` with a one-line message that starts with `where`; the message."""
    with pytest.raises(kind) as info:
        fn()
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(str(where)), msg
    return msg


def _one_error_line(r, code: int | None = None) -> None:
    """The command failed cleanly: exit `code` (1 or 2), one `error:` line on stderr, no traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code if code is not None else r.exit_code in (1, 2), (r.exit_code, r.output)
    assert "Traceback" not in r.output
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


# ---------------------------------------------------------------- the manifest, at load


@pytest.mark.parametrize("text", ['{"schema": ' + "1" * 5000 + "}", "[" * 100_000],
                         ids=["integer-of-5000-digits", "nested-100000-deep"])
def test_manifest_beyond_json_limits_is_refused(tmp_path, text):
    (tmp_path / MANIFEST).write_text(text)
    _refused(BundleError, tmp_path, lambda: Bundle(tmp_path))


def _outside_backbone(m, b):
    shutil.copy(b / "backbone.onnx", b.parent / "other.onnx")
    m["backbone"] = "../other.onnx"


@pytest.mark.parametrize("change", [
    lambda m, b: m["head"].update(file=5),
    _outside_backbone,  # a model outside the bundle, loaded with no hash check
    lambda m, b: m["files"].pop("backbone.onnx"),  # the backbone is loaded unhashed
], ids=["head-file-int", "backbone-outside", "backbone-not-hashed"])
def test_model_paths_must_be_hashed_files_inside_the_bundle(tmp_path, tiny_bundle, change):
    b = _bundle_with(tmp_path, tiny_bundle, change)
    _refused(BundleError, b, lambda: Bundle(b))


@pytest.mark.parametrize("change", [
    lambda m, b: m.update(preprocessing={}),
    lambda m, b: m["preprocessing"].update(size="ab"),
    lambda m, b: m["preprocessing"].update(kind="text"),  # no tokenizer.json: tokenizers' own Exception
    lambda m, b: m["runtime"].update(providers=5),
    lambda m, b: m["runtime"].update(threads="x"),
    # accepted at load once, then predict padded every batch to 10**9 rows / resized to 10**10 pixels
    lambda m, b: m["runtime"].update(static_shapes=True, batch_size=10**9),
    lambda m, b: m["preprocessing"].update(size=[100_000, 100_000], resize_to=[100_000, 100_000]),
], ids=["preprocessing-empty", "size-str", "text-no-tokenizer", "providers-int", "threads-str", "batch-huge",
        "size-huge"])
def test_manifest_runtime_and_preprocessing_are_checked_at_load(tmp_path, tiny_bundle, change):
    b = _bundle_with(tmp_path, tiny_bundle, change)
    _refused(BundleError, b, lambda: Bundle(b))


def test_file_name_with_nul_is_refused(tmp_path, tiny_bundle):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["files"].update({"a\x00b": {"sha256": "0" * 64}}))
    _refused(BundleError, b, lambda: Bundle(b))


# ---------------------------------------------------------------- the manifest, at predict


@pytest.mark.parametrize("labels", [["crack"], [*TINY_LABELS, "extra"], [[1], [2], [3]]],
                         ids=["fewer", "more", "lists"])
def test_labels_must_match_the_head(tmp_path, tiny_bundle, labels):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m.update(labels=labels))
    _refused(BundleError, b, lambda: Bundle(b).predict([str(tiny_bundle[2])]))


@pytest.mark.parametrize("change", [{"resize_to": "x"}, {"resize_to": [4]}, {"resize_to": 0}, {"resize_to": None},
                                    {"mean": []}, {"std": [0, 0, 0]}, {"scale": float("nan")}],
                         ids=["resize-str", "resize-one", "resize-zero", "resize-null", "mean-empty", "std-zero",
                              "scale-nan"])
def test_image_spec_is_checked(tmp_path, tiny_bundle, change):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["preprocessing"].update(change))
    _refused(EdgeftError, b, lambda: Bundle(b).predict([str(tiny_bundle[2])]))


def test_a_huge_resize_is_refused_at_load(tmp_path, tiny_bundle):
    """A predict would allocate 30 GB."""
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["preprocessing"].update(resize_to=[100_000, 100_000]))
    _refused(BundleError, b, lambda: Bundle(b))


def test_preprocessing_must_fit_the_backbone(tmp_path, tiny_bundle):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["preprocessing"].update(size=[8, 8], resize_to=[8, 8]))
    _refused(EdgeftError, b, lambda: Bundle(b).predict([str(tiny_bundle[2])]))


# ---------------------------------------------------------------- head history: history and rollback


@pytest.mark.parametrize("change, cmd", [
    (lambda m, b: m["head"].update(version=None), "rollback"),
    (lambda m, b: m.update(heads=[5]), "history"),
    (lambda m, b: m.update(heads=[5]), "rollback"),
    (lambda m, b: m.update(heads=[{}]), "history"),
    (lambda m, b: m["heads"][0].update(labels=5), "history"),
    (lambda m, b: m["heads"][0].update(metrics=5), "history"),
], ids=["version-null-rollback", "heads-int-history", "heads-int-rollback", "heads-empty-entry-history",
        "heads-labels-int-history", "heads-metrics-int-history"])
def test_history_and_rollback_refuse_bad_head_entries(tmp_path, tiny_bundle, change, cmd):
    b = _bundle_with(tmp_path, tiny_bundle, change)
    before = snapshot(b)
    _one_error_line(CliRunner().invoke(main, ["device", cmd, str(b)]))
    assert snapshot(b) == before


@pytest.mark.parametrize("entry, words", [
    ({"version": 0, "file": "../../etc/passwd"}, "'heads[1].version' must be an integer above 0"),
    ({"version": 0, "file": TINY_HEAD, "labels": ["a"]}, "'heads[1].version' must be an integer above 0"),
    ({"version": 2, "file": "../../etc/passwd"}, "'heads[1].file' must name a file listed (and hashed)"),
    ({"version": 2, "file": TINY_HEAD, "labels": ["a"]}, "rollback to head v2 refused, the bundle would not load"),
], ids=["file-outside", "labels-do-not-fit", "file-outside-v2", "labels-do-not-fit-v2"])
def test_rollback_to_a_bad_entry_is_refused(tmp_path, tiny_bundle, entry, words):
    """A head entry that points outside the bundle, or whose labels do not fit the head: the
    rollback is refused and the bundle is as it was (a rollback once made such an entry current)."""
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["heads"].append(entry))
    before = snapshot(b)
    r = CliRunner().invoke(main, ["device", "rollback", str(b), "--to", str(entry["version"])])
    _one_error_line(r, 1)
    assert words in r.stderr, r.stderr
    assert snapshot(b) == before


# ---------------------------------------------------------------- images


def test_preprocessor_refuses_a_decompression_bomb(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(BOMB)
    _refused(DataError, f, lambda: ImagePreprocessor({"size": [4, 4]}).load(str(f)))


# ---------------------------------------------------------------- the same, from the command line


def test_cli_predict_with_labels_that_do_not_fit_the_head(tmp_path, tiny_bundle):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m.update(labels=["crack"]))
    _one_error_line(CliRunner().invoke(main, ["device", "predict", str(b), str(tiny_bundle[2])]), 1)


def test_cli_predict_with_preprocessing_that_does_not_fit_the_backbone(tmp_path, tiny_bundle):
    b = _bundle_with(tmp_path, tiny_bundle, lambda m, b: m["preprocessing"].update(size=[8, 8], resize_to=[8, 8]))
    _one_error_line(CliRunner().invoke(main, ["device", "predict", str(b), str(tiny_bundle[2])]), 1)


def test_cli_predict_of_a_decompression_bomb(tmp_path, tiny_bundle):
    f = tmp_path / "bomb.png"
    f.write_bytes(BOMB)
    _one_error_line(CliRunner().invoke(main, ["device", "predict", str(tiny_bundle[0]), str(f)]), 2)
