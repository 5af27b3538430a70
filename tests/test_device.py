"""The device side: predict, retrain, guard, rollback, history, crash safety. Torch-free.

These tests also run in a second environment with the core dependencies only (no torch),
as a device is installed: there the bundles come prebuilt from EDGEFT_DEVICE_BUNDLES (see
tests/make_device_bundles.py and .ci/run); here they are built on the spot.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.errors import BundleError, DataError
from edgeft.runtime.bundle import Bundle
from edgeft.runtime.head import fit_softmax, head_logits, read_head_onnx, write_head_onnx
from edgeft.runtime.manifest import read_manifest
from edgeft.runtime.retrain import RetrainRefused, history, retrain
from edgeft.runtime.session import OnnxModel

sys.path.insert(0, str(Path(__file__).parent))
from kill import kill_at_random_moments  # noqa: E402
from tiny import NEW_CLASS_WORDS, new_class_rows, text_rows  # noqa: E402
from tolerance import EPS32, dot_tolerance, softmax_sum_tolerance  # noqa: E402


@pytest.fixture(scope="module")
def built(device_bundles):
    """{name: bundle path}: the text bundle and the image bundle, prebuilt or built once (conftest.py)."""
    return device_bundles


@pytest.fixture
def bundle(built, tmp_path):
    """A fresh copy of the text bundle per test."""
    dst = tmp_path / "bundle"
    shutil.copytree(built["text"], dst)
    return dst


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "cache" not in p.parts}


def write_csv(path: Path, rows) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_device_side_never_imports_torch(built, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(built["text"], dst)
    data = write_csv(tmp_path / "new.csv", new_class_rows(12, seed=3))
    code = f"""
import sys
from edgeft.cli import main
for args in (["device", "predict", {str(dst)!r}, "pump leak"], ["device", "check", {str(dst)!r}],
             ["device", "retrain", {str(dst)!r}, "--data", {str(data)!r}, "--add-classes"],
             ["device", "history", {str(dst)!r}], ["device", "rollback", {str(dst)!r}]):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
heavy = [m for m in ("torch", "transformers", "peft", "accelerate") if m in sys.modules]
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout


def test_numpy_head_writes_the_same_onnx(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12)).astype(np.float32)
    y = rng.integers(0, 4, 60)
    fit = fit_softmax(X, y, 4, max_iter=50)
    write_head_onnx(tmp_path / "h.onnx", fit.weight, fit.bias)
    out = OnnxModel(tmp_path / "h.onnx")({"features": X})
    # two float32 evaluations of one linear map: the a-priori dot-product bound (tests/tolerance.py)
    diff = np.abs(out["logits"].astype(np.float64) - head_logits(X, fit.weight, fit.bias))
    assert (diff <= dot_tolerance(X, fit.weight, fit.bias)).all(), diff.max()
    np.testing.assert_allclose(out["probs"].sum(1), 1, atol=softmax_sum_tolerance(4), rtol=0)
    w, b = read_head_onnx(tmp_path / "h.onnx")
    assert np.array_equal(w, fit.weight) and np.array_equal(b, fit.bias)


def test_numpy_fit_equals_pytorch_linear():
    """Same objective (class-weighted CE on standardised features + L2), same full-batch Adam."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 16)) * rng.uniform(0.5, 3, 16) + rng.normal(size=16)
    y = np.r_[np.zeros(50), np.ones(30), np.full(10, 2)].astype(np.int64)
    X[y == 1] += 0.8
    X[y == 2] -= 0.8
    l2, lr, steps = 1e-2, 0.05, 120
    fit = fit_softmax(X, y, 3, l2=l2, lr=lr, max_iter=steps)

    mean, std = X.mean(0), X.std(0)
    Z = torch.tensor((X - mean) / std)
    counts = np.bincount(y, minlength=3)
    cw = torch.tensor(counts.sum() / (3 * counts))
    lin = torch.nn.Linear(16, 3).double()
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    yt = torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(Z), yt, weight=cw) + 0.5 * l2 * (lin.weight ** 2).sum()
        loss.backward()
        opt.step()
    w = lin.weight.detach().numpy() / std  # fold the standardisation as the device does
    b = lin.bias.detach().numpy() - (mean / std) @ lin.weight.detach().numpy().T
    # both run in float64 (numpy; torch double), so they agree to ~1e-12; the fit is kept as
    # float32: its rounding, a few float32 ulps of the weights' scale, is what remains
    np.testing.assert_allclose(fit.weight, w, atol=4 * EPS32 * np.abs(w).max(), rtol=0)
    np.testing.assert_allclose(fit.bias, b, atol=4 * EPS32 * np.abs(b).max(), rtol=0)


def test_preprocessing_matches_the_training_side(built):
    pytest.importorskip("torch")
    from edgeft.runs import load_model

    b = Bundle(built["text"])
    run = load_model(b.manifest["source"])
    texts = ["pump leak at line 3", "motor", "belt conveyor roller tension pulley idler track sprocket"]
    ours, theirs = b.pre(texts), run.pre(texts)
    for k in theirs:
        assert np.array_equal(ours[k], theirs[k]), k


def test_add_a_class(bundle, tmp_path):
    before = Bundle(bundle)
    data = write_csv(tmp_path / "new.csv", new_class_rows(24, seed=1))
    r = CliRunner().invoke(main, ["device", "retrain", str(bundle), "--data", str(data), "--add-classes"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("retrain  ok") and "head v1 -> v2  added valve" in r.stdout
    after = Bundle(bundle)
    assert after.labels == before.labels + ["valve"] and after.head_version == 2
    test = new_class_rows(10, seed=9)
    got = [p["label"] for p in after.predict([t for t, _ in test])]
    assert sum(g == "valve" for g in got) >= 7
    m = read_manifest(bundle)
    entry = m["heads"][-1]
    assert entry["added_classes"] == ["valve"] and entry["data"]["rows"] == 24
    assert entry["metrics"]["new_holdout_accuracy"]["after"] > entry["metrics"]["new_holdout_accuracy"]["before"]
    assert Bundle(bundle).check()["passed"]  # device check holds with the retrained head


def test_new_label_needs_add_classes(bundle, tmp_path):
    data = write_csv(tmp_path / "new.csv", [("pump seal leak", "pumpp"), ("motor fuse", "motor")])
    before = snapshot(bundle)
    r = CliRunner().invoke(main, ["device", "retrain", str(bundle), "--data", str(data)])
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {data}: labels the model does not know: pumpp. Did you mean \"pump\"? "
                                "Pass --add-classes to add them as new classes.")
    assert snapshot(bundle) == before


def test_change_a_class(bundle, tmp_path):
    """A class drifts: 'pump' faults now read as valve-and-cavitation entries."""
    rng = random.Random(4)
    rows = [(" ".join(rng.sample(NEW_CLASS_WORDS, 4)), "pump") for _ in range(24)]
    data = write_csv(tmp_path / "drift.csv", rows)
    before = Bundle(bundle).predict([t for t, _ in rows[:10]])
    r = retrain(bundle, data)
    assert r.accepted and r.labels == Bundle(bundle).labels and not r.added_classes
    after = Bundle(bundle).predict([t for t, _ in rows[:10]])
    assert sum(p["label"] == "pump" for p in after) > sum(p["label"] == "pump" for p in before)


def test_guard_refuses_a_harmful_retrain(bundle, tmp_path):
    """Samples that teach the model to call every pump entry 'belt' must not be accepted."""
    rows = [(text, "belt") for text, label in text_rows(40, seed=11) if label == "pump"]
    data = write_csv(tmp_path / "bad.csv", rows)
    before = snapshot(bundle)
    with pytest.raises(RetrainRefused, match=r"retrain refused, head v1 stays: .*replay hold-out .* dropped"):
        retrain(bundle, data, margin=0.02)
    assert snapshot(bundle) == before
    r = CliRunner().invoke(main, ["device", "retrain", str(bundle), "--data", str(data)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.output


def test_rollback_restores_the_exact_head(bundle, tmp_path):
    b1 = Bundle(bundle)
    texts = ["pump leak seal", "motor relay fuse", "belt pulley", "the unit check"]
    logits1 = b1.logits(texts)
    head1 = (bundle / b1.manifest["head"]["file"]).read_bytes()
    retrain(bundle, write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2)), add_classes=True)
    assert Bundle(bundle).labels[-1] == "valve"
    r = CliRunner().invoke(main, ["device", "rollback", str(bundle)])
    assert r.exit_code == 0 and "head v2 -> v1" in r.stdout
    b = Bundle(bundle)
    assert b.head_version == 1 and b.labels == b1.labels
    assert (bundle / b.manifest["head"]["file"]).read_bytes() == head1
    assert np.array_equal(b.logits(texts), logits1)
    r = CliRunner().invoke(main, ["device", "rollback", str(bundle), "--to", "2"])
    assert r.exit_code == 0 and Bundle(bundle).labels[-1] == "valve"
    r = CliRunner().invoke(main, ["device", "rollback", str(bundle), "--to", "9"])
    assert r.exit_code == 2 and "no head version 9 (kept: v1, v2)" in r.stderr


def test_history_pruning_and_feature_cache(bundle, tmp_path):
    data = write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2))
    r1 = retrain(bundle, data, add_classes=True, keep=2)
    assert not r1.metrics["feature_cache_hit"]
    r2 = retrain(bundle, data, keep=2, margin=1.0)  # the same data again: features come from the cache
    assert r2.metrics["feature_cache_hit"] and r2.version == 3
    assert r2.pruned == ["heads/head-0001.onnx", "replay/replay-0001.npz"]
    assert not (bundle / "heads" / "head-0001.onnx").exists()
    Bundle(bundle)  # every file still listed is present and whole
    rows = history(bundle)
    assert [(h["version"], h["active"], h["pruned"]) for h in rows] == [(1, False, True), (2, False, False), (3, True, False)]
    r = CliRunner().invoke(main, ["device", "history", str(bundle)])
    assert r.exit_code == 0 and "* v3" in r.stdout and "x v1" in r.stdout


def test_device_features_run_by_length_and_come_back_in_file_order(built, tmp_path):
    """Texts are batched in order of length (less padding), yet row i of the result is row i of
    the file: each equals that text's features computed alone, to float rounding of the padding."""
    from edgeft.runtime.dataset import load_dataset
    from edgeft.runtime.retrain import device_features

    dst = tmp_path / "b"
    shutil.copytree(built["text"], dst, ignore=shutil.ignore_patterns("cache"))
    rows = text_rows(6, seed=21)
    rows = [(" ".join([t] * (1 + i % 4)), y) for i, (t, y) in enumerate(rows)]  # lengths out of order
    ds = load_dataset(write_csv(tmp_path / "n.csv", rows))
    b = Bundle(dst)
    feats, hit = device_features(b, ds)
    alone = np.concatenate([b.features([t], 1) for t, _ in rows])
    assert not hit and feats.shape == alone.shape
    scale = np.abs(alone).max()
    assert np.abs(feats - alone).max() <= 1e-5 * scale  # another row's features would be ~scale away
    assert np.array_equal(device_features(b, ds)[0], feats)  # the cache returns the same rows


def test_max_samples_limit(bundle, tmp_path):
    m = read_manifest(bundle)
    limit = m["retrain"]["max_samples"]
    data = write_csv(tmp_path / "big.csv", new_class_rows(limit + 1, seed=0))
    with pytest.raises(DataError, match=f"at most {limit}"):
        retrain(bundle, data, add_classes=True)


def test_image_bundle_predict_and_retrain(built, tmp_path):
    dst = tmp_path / "img"
    shutil.copytree(built["image"], dst)
    images = sorted((built["image"].parent / "image-data").rglob("*.png"))
    r = CliRunner().invoke(main, ["device", "predict", str(dst), *map(str, images[:3]), "--json"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 3
    res = retrain(dst, built["image"].parent / "image-new", add_classes=True, margin=1.0)
    assert res.added_classes == ["rust"]
    assert Bundle(dst).check()["passed"]


def test_mobile_bundle_ships_one_backbone_and_the_device_retrains_it(built, tmp_path):
    dst = tmp_path / "phone"
    shutil.copytree(built["mobile"], dst)
    m = read_manifest(dst)
    assert m["backbone"] == "mobile/backbone.ort" and "backbone.onnx" not in m["files"]
    assert not (dst / "backbone.onnx").exists()
    r = CliRunner().invoke(main, ["device", "check", str(dst)])
    assert r.exit_code == 0, r.output
    res = retrain(dst, write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2)), add_classes=True, margin=1.0)
    assert res.added_classes == ["valve"]
    b = Bundle(dst)
    assert b.check()["passed"] and b.labels[-1] == "valve"
    r = CliRunner().invoke(main, ["device", "predict", str(dst), "pump leak", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in b.labels


def _retrain_cmd(bundle: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "edgeft.cli", "device", "retrain", str(bundle), "--data", str(data), "--add-classes"]


@pytest.mark.slow  # 20 killed subprocesses, about 30 s: the full suite and the device env run it
def test_killed_retrain_never_leaves_a_broken_bundle(built, tmp_path):
    """SIGKILL at random moments: afterwards the bundle always loads, hashes match, head v1 or v2."""
    data = write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2))

    def check(b):
        loaded = Bundle(b)  # raises if any listed file is missing, partial or changed
        assert loaded.head_version in (1, 2)
        assert ("valve" in loaded.labels) == (loaded.head_version == 2)
        assert loaded.predict(["pump leak"])[0]["label"] in loaded.labels
        return loaded.head_version

    seen = kill_at_random_moments(built["text"], tmp_path, lambda b: _retrain_cmd(b, data), check, trials=20)
    assert len(seen) == 20  # trials landed before and/or after the commit point; each left a whole bundle


def test_bundle_refuses_a_half_written_head(bundle):
    m = read_manifest(bundle)
    head = bundle / m["head"]["file"]
    head.write_bytes(head.read_bytes()[: len(head.read_bytes()) // 2])
    with pytest.raises(BundleError, match="head-0001.onnx: content does not match"):
        Bundle(bundle)
    r = CliRunner().invoke(main, ["device", "predict", str(bundle), "x"])
    assert r.exit_code == 1 and "Traceback" not in r.output


def _strict_json(text: str):
    """json.loads refusing NaN and Infinity, which it accepts by default but strict JSON has not."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_folder_that_is_not_a_bundle_is_bad_input(tmp_path):
    for cmd in (["predict", str(tmp_path), "pump leak"], ["check", str(tmp_path)], ["history", str(tmp_path)]):
        r = CliRunner().invoke(main, ["device", *cmd])
        assert r.exit_code == 2 and r.stderr == f"error: {tmp_path}: not a bundle (no manifest.json).\n", r.output


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_an_empty_input_is_bad_input(bundle, text):
    r = CliRunner().invoke(main, ["device", "predict", str(bundle), "pump leak", text])
    assert r.exit_code == 2 and r.stderr == "error: input 2: empty text; give a text to classify.\n", r.output
    with pytest.raises(DataError, match="input 1: empty text"):
        Bundle(bundle).predict([text])


def test_retrain_options_are_validated_once(bundle, tmp_path):
    from edgeft.errors import ConfigError
    from edgeft.runtime.retrain import RetrainConfig

    data = write_csv(tmp_path / "n.csv", new_class_rows(20, seed=2))
    before = snapshot(bundle)
    for bad, match in (({"margin": 2}, "margin: expected a share from 0 to 1"), ({"keep": 0}, "keep: expected a positive"),
                       ({"margin": float("nan")}, "margin"), ({"holdout": 1.0}, "holdout"), ({"marign": 0.1}, "marign")):
        with pytest.raises(ConfigError, match=match):
            retrain(bundle, data, **bad)
    with pytest.raises(ConfigError, match="margin"):
        RetrainConfig(margin=-0.1)
    r = CliRunner().invoke(main, ["device", "retrain", str(bundle), "--data", str(data), "--margin", "2"])
    assert r.exit_code == 2 and r.stderr.startswith("error: margin: ") and r.stderr.count("\n") == 1
    assert snapshot(bundle) == before
    help_text = " ".join(CliRunner().invoke(main, ["device", "retrain", "--help"]).output.split())
    assert f"[default: {RetrainConfig.margin}]" in help_text and f"[default: {RetrainConfig.keep}]" in help_text


def test_manifest_json_is_strict_json(built, bundle, tmp_path):
    """As built, and after a retrain has added its metrics (a NaN there would slip through json.loads)."""
    with pytest.raises(ValueError, match="NaN is not JSON"):  # the check itself can fail
        _strict_json('{"accuracy": NaN}')
    data = write_csv(tmp_path / "new.csv", new_class_rows(24, seed=1))
    r = CliRunner().invoke(main, ["device", "retrain", str(bundle), "--data", str(data), "--add-classes"])
    assert r.exit_code == 0, r.output
    for path in [*built.values(), bundle]:
        _strict_json((path / "manifest.json").read_text())


# ---------------------------------------------------------------- sequence-length buckets

BUCKET_TEXTS = ["pump", "pump leak at the seal", "motor fuse relay " * 3, "belt roller noise " * 8,
                "a much longer report about the conveyor belt and its rollers and the motor " * 4]


def _text_pre(bundle, **kw):
    from edgeft.runtime.preprocess import TextPreprocessor

    return TextPreprocessor(bundle / "tokenizer.json", 64, **kw)


def test_buckets_pad_each_batch_to_the_smallest_bucket_that_holds_it(bundle):
    plain, bucketed = _text_pre(bundle), _text_pre(bundle, buckets=[8, 16, 32, 64])
    model = OnnxModel(bundle / read_manifest(bundle)["backbone"])
    seen = set()
    for i in range(len(BUCKET_TEXTS)):
        for batch in (BUCKET_TEXTS[i : i + 1], BUCKET_TEXTS[: i + 1]):
            a, b = plain(batch), bucketed(batch)
            longest = a["input_ids"].shape[1]
            width = b["input_ids"].shape[1]
            assert width == min(w for w in bucketed.buckets if w >= longest)  # the smallest bucket that fits
            seen.add(width)
            for k in a:  # the tokens are the same; only the padding grows (pad id, mask 0, type 0)
                assert np.array_equal(b[k][:, :longest], a[k])
            assert (b["input_ids"][:, longest:] == bucketed.pad_id).all()
            assert not b["attention_mask"][:, longest:].any() and not b["token_type_ids"][:, longest:].any()
            # and the model computes the same features from either, up to this int8 backbone's
            # dynamic quantization: its activation scales also see the padded positions, so an
            # int8 step (1/127 of a tensor's range) may move; the bound is one such step of the
            # features' own scale, relative, not one CPU's rounding (seen: <= 7e-4 at scale ~1)
            fa, fb = model(a)["features"], model({k: b[k] for k in a})["features"]
            np.testing.assert_allclose(fb, fa, rtol=0, atol=float(np.abs(fa).max()) / 127)
    assert len(seen) >= 3  # the texts reach several buckets, the longest truncated to max_length
    assert bucketed(BUCKET_TEXTS[-1:])["input_ids"].shape[1] == 64


def test_buckets_round_trip_through_the_spec_and_the_bundle(bundle):
    from edgeft.runtime.preprocess import load_preprocessor

    pre = _text_pre(bundle, buckets=[16, 64])
    assert pre.spec()["buckets"] == [16, 64] and "buckets" not in _text_pre(bundle).spec()
    assert load_preprocessor(bundle, pre.spec()).buckets == [16, 64]
    m = read_manifest(bundle)
    m["preprocessing"] = pre.spec()
    (bundle / "manifest.json").write_text(json.dumps(m))
    b = Bundle(bundle)
    assert b.pre.buckets == [16, 64] and b.pre(["pump leak"])["input_ids"].shape[1] == 16
    assert b.predict(["pump leak"])[0]["label"] in b.labels


@pytest.mark.parametrize("buckets", [[], [16, 8, 64], [8, 8, 64], [0, 64], [-8, 64], [8, 32], [8, 64, 128], "64",
                                     64, [8.0, 64], [True, 64], [None, 64]])
def test_invalid_buckets_are_refused(bundle, buckets):
    with pytest.raises(ValueError, match=r"^text buckets .*: expected strictly ascending") as info:
        _text_pre(bundle, buckets=buckets)
    assert len(str(info.value).splitlines()) == 1
    m = read_manifest(bundle)
    m["preprocessing"]["buckets"] = buckets
    (bundle / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["device", "predict", str(bundle), "pump leak"])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "text buckets" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.output


def test_buckets_and_pad_to_together_are_refused(bundle):
    with pytest.raises(ValueError, match="pad_to 64 and buckets .*: expected one of them, not both"):
        _text_pre(bundle, pad_to=64, buckets=[16, 64])
    assert _text_pre(bundle, pad_to=64)(["pump"])["input_ids"].shape[1] == 64  # pad_to alone as before


def test_choose_buckets():
    from edgeft.runtime.preprocess import choose_buckets

    lengths = [5, 7, 9, 12, 30, 31, 60, 100]
    assert choose_buckets(lengths, 128) == [32, 104, 128]  # 50th (30) and 90th (100) percentiles, up to a multiple of 8
    assert choose_buckets(lengths, 128, n=1) == [128]
    assert choose_buckets(lengths, 128, n=2) == [32, 128]
    assert choose_buckets([], 64) == [64]
    assert choose_buckets([3] * 10, 64) == [8, 64]  # both percentiles in one bucket: deduplicated
    assert choose_buckets([500, 900], 256) == [256]  # lengths over max_length are truncated to it
    assert choose_buckets([10], 5) == [5]
    for n in range(1, 6):
        rng = np.random.default_rng(n)
        got = choose_buckets(rng.integers(1, 300, 50).tolist(), 256, n)
        assert 1 <= len(got) <= n and got == sorted(set(got)) and got[-1] == 256
        assert all(w % 8 == 0 for w in got[:-1])
    with pytest.raises(ValueError):
        choose_buckets(lengths, 128, n=0)
