"""The closed-form ridge head (edgeft/runtime/ridge.py): the solve, its exact updates, its ONNX file."""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.runtime import ridge as R
from edgeft.runtime.bundle import Bundle, read_manifest
from edgeft.runtime.dataset import load_dataset
from edgeft.runtime.retrain import RetrainRefused, retrain
from edgeft.runtime.ridge_bundle import add_ridge_head, load_lineage

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from kill import kill_at_random_moments  # noqa: E402


def blobs(n_per_class, n_classes, dim=24, seed=0, shift=0.0):
    """Gaussian classes around random centres (what frozen features of C classes look like, small)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * 1.5
    X = np.concatenate([centres[c] + shift + rng.normal(size=(n_per_class, dim)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X.astype(np.float32), y


def reference_solve(H, y, n_classes, lam):
    """Class-balanced ridge by plain float64 least squares on the weighted, augmented rows."""
    H = H.astype(np.float64)
    counts = np.bincount(y, minlength=n_classes)
    w = np.sqrt(1.0 / counts[y])[:, None]
    Z = np.hstack([H, np.ones((len(H), 1))]) * w
    Y = np.eye(n_classes)[y] * w
    D = H.shape[1]
    reg = np.hstack([np.sqrt(lam) * np.eye(D), np.zeros((D, 1))])
    sol = np.linalg.lstsq(np.vstack([Z, reg]), np.vstack([Y, np.zeros((D, n_classes))]), rcond=None)[0]
    return sol[:D], sol[D]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("width", [16, 64])  # 16 < rows per class: Gram form; 64: rows form
def test_fit_equals_a_float64_reference_solve(width):
    X, y = blobs(40, 3)
    P = R.make_projection(X, width, seed=1)
    H = rows_of(P, X)
    stats = R.Statistics.empty(P, ["a", "b", "c"])
    stats.add(H[:50], y[:50])
    stats.add(H[50:], y[50:])  # class b crosses from rows to a Gram matrix at width 16
    assert [c.gram is not None for c in stats.classes] == ([True, True, True] if width == 16 else [False] * 3)
    # rows added on the fly (a cross-validation fold) equal rows added to the statistics, in either
    # form; a `base` of the untouched classes plus the touched ones equals the whole system
    first = R.Statistics.empty(P, ["a", "b", "c"])
    first.add(H[:70], y[:70])
    rest = {c: H[70:][y[70:] == c] for c in (1, 2)}  # class a has all its rows already
    A, T = stats.system()
    for A2, T2 in (first.system(rest), first.system(rest, base=first.system(skip=[1, 2]))):
        assert rel(A2, A) < 1e-12 and rel(T2, T) < 1e-12
    for lam in (0.1, 3.0):
        W_ref, b_ref = reference_solve(H, y, 3, lam)
        W, b = R.solve(*stats.system(), lam)
        assert rel(W, W_ref) < 1e-6 and rel(b, b_ref) < 1e-6
        W2, b2 = R.Solver(*stats.system())(lam)  # the eigendecomposition path the lambda search uses
        assert rel(W2, W_ref) < 1e-6 and rel(b2, b_ref) < 1e-6
        head = R.fit(stats, P, lam)
        assert rel(head.weight, W_ref) < 1e-6


def test_onnx_head_equals_the_numpy_head(tmp_path):
    X, y = blobs(30, 4, seed=2)
    head, stats, choice = R.fit_features(X, y, list("abcd"), width=200, holdout=blobs(10, 4, seed=3))
    assert choice["rows"] == 40 and choice["lambda"] in R.LAMBDAS
    assert head.temperature > 1.0  # ridge scores are near 0..1: the softmax needs a temperature
    path = tmp_path / "head.onnx"
    R.write_onnx(path, head, metadata={"labels": list("abcd")})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["features"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]
    Xt, _ = blobs(25, 4, seed=4)
    logits, probs = sess.run(None, {"features": Xt})
    want = head.logits(Xt)
    assert rel(logits, want) < 1e-5
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and np.abs(probs - head.probs(Xt)).max() < 1e-5
    back = R.read_onnx(path)
    assert back.projection.sha256 == head.projection.sha256 == R.read_projection(path).sha256
    assert rel(back.logits(Xt), want) < 1e-5


def rows_of(P, X):
    """P(X) one row at a time: float32 MatMul rounds a row differently with the batch's shape (the
    BLAS kernel depends on it), so only row-wise projections make a row's bits the same in any subset,
    and these tests are about the statistics' algebra, not about one BLAS's blocking."""
    return np.concatenate([P(X[i:i + 1]) for i in range(len(X))]) if len(X) else P(X)


def stats_of(P, X, y, labels):
    s = R.Statistics.empty(P, labels)
    s.add(rows_of(P, X), y, X)
    return s


def same_stats(a: R.Statistics, b: R.Statistics):
    assert a.labels == b.labels and a.counts == b.counts and a.projection_sha256 == b.projection_sha256
    for ca, cb in zip(a.classes, b.classes, strict=True):
        Ga, sa = ca.moments(a.width)
        Gb, sb = cb.moments(b.width)
        assert np.allclose(Ga, Gb, rtol=1e-12, atol=1e-9) and np.allclose(sa, sb, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("width", [16, 64])
def test_two_updates_equal_one_and_survive_the_file(tmp_path, width):
    X, y = blobs(30, 3, seed=5)
    P = R.make_projection(X, width)
    once = stats_of(P, X, y, list("abc"))
    twice = stats_of(P, X[::2], y[::2], list("abc"))
    twice.add(rows_of(P, X[1::2]), y[1::2])
    same_stats(once, twice)
    path = tmp_path / "stats.npz"
    path.write_bytes(twice.to_bytes())
    back = R.Statistics.from_file(path)
    same_stats(once, back)
    lam = 1.0
    assert rel(R.fit(back, P, lam).weight, R.fit(once, P, lam).weight) < 1e-6


def test_pooled_devices_equal_one_device():
    X, y = blobs(30, 3, seed=6)
    P = R.make_projection(X, 16)
    device_a = stats_of(P, X[y != 2], y[y != 2], ["a", "b"])
    Xb = X[(y == 1) | (y == 2)]
    yb = y[(y == 1) | (y == 2)]
    device_b = stats_of(P, Xb, yb - 1, ["b", "c"])  # a device that knows b and learned c
    pooled = device_a.merge(device_b)
    all_rows = np.concatenate([X[y != 2], Xb])
    all_y = np.concatenate([y[y != 2], yb])
    same_stats(pooled, stats_of(P, all_rows, all_y, ["a", "b", "c"]))
    other = R.make_projection(X, 16, seed=9)
    with pytest.raises(ValueError, match="different projections"):
        device_a.merge(R.Statistics.empty(other, ["a"]))


def test_adding_a_class_and_changing_a_class():
    X, y = blobs(40, 3, seed=7)
    P = R.make_projection(X[y < 2], 64)
    stats = stats_of(P, X[y < 2], y[y < 2], ["a", "b"])
    before = R.fit(stats, P, 1.0)
    # a new class: its statistics only; the solve equals one from scratch on all rows
    stats.ensure_labels(["a", "b", "c"])
    stats.add(rows_of(P, X[y == 2]), y[y == 2])
    scratch = stats_of(P, X, y, ["a", "b", "c"])
    same_stats(stats, scratch)
    after = R.fit(stats, P, 1.0)
    Xt, yt = blobs(30, 3, seed=8)
    assert (after.logits(Xt).argmax(1) == yt)[yt == 2].mean() > 0.9
    assert before.weight.shape[1] == 2 and after.weight.shape[1] == 3
    # a changed class: b's new rows come from elsewhere; after adding them b is recognised there
    rng = np.random.default_rng(9)
    moved = (X[y == 1][:40] - 2 * X[y == 1].mean(0) + 0.5 * rng.normal(size=24)).astype(np.float32)  # b moved
    old_recall = (after.logits(moved).argmax(1) == 1).mean()
    stats.add(P(moved[:30]), np.ones(30, dtype=np.int64))
    changed = R.fit(stats, P, 1.0)
    assert old_recall < 0.5 < 0.8 < (changed.logits(moved[30:]).argmax(1) == 1).mean()
    with pytest.raises(ValueError, match="do not extend"):
        stats.ensure_labels(["b", "a", "c"])


def test_statistics_size_per_class():
    """Rows while a class has at most D of them (n x D float32), then the Gram triangle (float64)."""
    X, y = blobs(20, 2, seed=10)
    P = R.make_projection(X, 32)
    s = stats_of(P, X, y, ["a", "b"])
    assert s.nbytes_per_class() == [20 * 32 * 4] * 2
    s.add(P(X[:20]), np.zeros(20, dtype=np.int64))  # class a: 40 rows > 32: a Gram matrix now
    assert s.nbytes_per_class()[0] == 32 * 33 // 2 * 8 + 32 * 8


def test_lambda_choice_is_out_of_fold_and_honours_the_margin():
    """choose(): each new row and each old row the statistics keep is predicted by a solve without
    its fold (checked by brute force), the old head too (at its own lambda); the setting kept is
    the best out-of-fold one among those within the margin on all those old rows."""
    X, y = blobs(40, 3, seed=12)
    old = y < 2
    P = R.make_projection(X[old], 64)
    Xh, yh = blobs(10, 2, seed=13)
    base = stats_of(P, X[old][::2], y[old][::2], ["a", "b"])  # 20 rows per class, kept as rows
    lam0 = 1.0
    hold_before = R.fit(base, P, lam0).logits(Xh).argmax(1)
    base.ensure_labels(["a", "b", "c"])
    Xn, yn = X[~old][:12], y[~old][:12]
    c = R.choose(base, P, Xn, yn, Xh, yh, margin=0.02, hold_before=hold_before, current_lambda=lam0, folds=4)
    assert c["folds"] == 4 and c["new_rows"] == 12 and c["replay_holdout_rows"] == 20
    assert c["stored_rows_out_of_fold"] == 40 and c["old_rows"] == 60
    fold = R.folds_of(yn, 4)
    stored_y = np.repeat([0, 1], 20)  # the statistics' rows, class by class
    stored_H = np.concatenate([base.classes[0].rows, base.classes[1].rows])
    stored_fold = R.folds_of(stored_y, 4, 1)  # seed + 1: the stored rows' own folds
    Hn = P(Xn)  # as choose() projects them (one batch)

    def fold_stats(f, with_new=True):
        s = R.Statistics.empty(P, ["a", "b", "c"])
        s.add(stored_H[stored_fold != f], stored_y[stored_fold != f])
        if with_new:
            s.add(Hn[fold != f], yn[fold != f])
        return s

    right_before = 0
    for f in range(4):  # the old head, out-of-fold at its own lambda
        s = fold_stats(f, with_new=False)
        W, b = R.solve(*s.system(), lam0)
        z = stored_H[stored_fold == f] @ W + b
        z[:, 2] = -np.inf  # a class the old head does not have is never its answer
        right_before += int((z.argmax(1) == stored_y[stored_fold == f]).sum())
    assert c["old_before"] == pytest.approx((right_before + int((hold_before == yh).sum())) / 60)
    for row in c["grid"][::4]:
        right_new = right_old = 0
        for f in range(4):
            W, b = R.solve(*fold_stats(f).system(), row["lambda"])
            right_new += int(((Hn[fold == f] @ W + b).argmax(1) == yn[fold == f]).sum())
            right_old += int(((stored_H[stored_fold == f] @ W + b).argmax(1) == stored_y[stored_fold == f]).sum())
        W, b = R.solve(*stats_of(P, np.zeros((0, 24)), np.zeros(0, int), ["a", "b", "c"]).system(
            {0: base.classes[0].rows, 1: base.classes[1].rows, 2: Hn}), row["lambda"])
        right_hold = int(((P(Xh) @ W + b).argmax(1) == yh).sum())
        assert right_new / 12 == row["new_oof_accuracy"] and right_old == row["stored_oof_right"]
        assert row["old_accuracy"] == pytest.approx((right_old + right_hold) / 60)
    ok = [r for r in c["grid"] if c["old_before"] - r["old_accuracy"] <= 0.02 + 1e-12]
    assert c["within_margin"] == bool(ok)
    if ok:  # within the margin the best new recall out-of-fold, then the most old rows kept right
        top = max(r["new_oof_accuracy"] for r in ok)
        assert c["recall_tolerance"] == pytest.approx(np.sqrt(max(top * (1 - top), 1 / 12) / 12))
        assert c["new_oof_accuracy"] == top
        assert c["old_accuracy"] == max(r["old_accuracy"] for r in ok if r["new_oof_accuracy"] == top)
    assert base.counts == [20, 20, 0]  # choose() leaves the statistics as they were
    # a hold-out row the statistics already keep is judged once, out-of-fold; without the old
    # head's lambda only the hold-out judges the old classes
    seen = np.arange(20) % 4 == 0
    assert R.choose(base, P, Xn, yn, Xh, yh, margin=0.02, hold_before=hold_before, current_lambda=lam0, folds=4,
                    hold_in_stats=seen)["replay_holdout_rows"] == 15
    alone = R.choose(base, P, Xn, yn, Xh, yh, margin=0.02, hold_before=hold_before, folds=4)
    assert alone["stored_rows_out_of_fold"] == 0 and alone["old_rows"] == 20
    assert alone["old_before"] == pytest.approx(float((hold_before == yh).mean()))


def _tmp_stats(stats):
    path = Path(tempfile.mkdtemp()) / "s.npz"
    path.write_bytes(stats.to_bytes())
    return path


# ---------------------------------------------------------------- in a bundle (device side)


@pytest.fixture(scope="module")
def built(device_bundles):
    """The device tests' text bundle (softmax head, as every bundle before head families) and its
    data: conftest.py's session bundles, prebuilt or built once for the whole run (read-only)."""
    return device_bundles


@pytest.fixture(scope="module")
def ridge_built(built, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ridge") / "bundle"
    shutil.copytree(built["text"], dst, ignore=shutil.ignore_patterns("cache"))
    add_ridge_head(dst, load_dataset(built["text"].parent / "text-data" / "train.csv"), width=256)
    return dst


@pytest.fixture
def ridge_bundle(ridge_built, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(ridge_built, dst)
    return dst


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_ridge_bundle_predicts_checks_and_keeps_its_family(ridge_built):
    m = read_manifest(ridge_built)
    assert m["schema"] == 3 and m["head"]["family"] == "ridge" and m["head"]["version"] == 2
    assert m["heads"][0].get("family", "softmax") == "softmax"  # the trained head, one rollback away
    stats, projection = load_lineage(ridge_built, m)
    assert stats.counts == [24, 24, 24] and projection.width == 256
    b = Bundle(ridge_built)
    assert b.check()["passed"]
    r = CliRunner().invoke(main, ["device", "predict", str(ridge_built), "pump seal leak", "--json"])
    assert r.exit_code == 0, r.output
    fit = m["heads"][-1]["metrics"]["fit"]
    assert fit["lambda"] in R.LAMBDAS and fit["lambda_chosen_on_rows"] == m["heads"][-1]["metrics"]["replay_holdout_accuracy"]["rows"] > 0


def test_ridge_retrain_adds_a_class_exactly_and_rolls_back_bitwise(ridge_bundle, tmp_path):
    texts = ["pump leak seal", "motor relay fuse", "belt pulley", "the unit check"]
    b2 = Bundle(ridge_bundle)
    logits2, head2 = b2.logits(texts), (ridge_bundle / b2.manifest["head"]["file"]).read_bytes()
    stats2, P = load_lineage(ridge_bundle, b2.manifest)
    rows = tiny.new_class_rows(24, seed=1)
    data = _csv(tmp_path / "new.csv", rows)
    r = CliRunner().invoke(main, ["device", "retrain", str(ridge_bundle), "--data", str(data), "--add-classes"])
    assert r.exit_code == 0, r.output
    m = read_manifest(ridge_bundle)
    assert m["head"]["family"] == "ridge" and m["labels"][-1] == "valve" and m["head"]["version"] == 3
    metrics = m["heads"][-1]["metrics"]
    assert metrics["new_holdout_accuracy"]["rows"] == 24  # k-fold: every new sample judged once
    # the earlier classes: all 72 rows the statistics keep, out-of-fold, beside the replay hold-out
    judged, hold = metrics["old_classes_accuracy"], metrics["replay_holdout_accuracy"]
    assert judged["stored_rows_out_of_fold"] == 72 and judged["rows"] == 72 + hold["rows"] == 72 + judged["replay_holdout_rows"]
    assert metrics["fit"]["decided_on"]["old_rows"] == judged["rows"] and 0 <= judged["after"] <= 1
    # the report and the history show the figure the guard judged, and the rows it rests on
    assert (f"earlier classes {100 * judged['before']:.1f}% -> {100 * judged['after']:.1f}% ({judged['rows']} rows)"
            in r.stdout), r.stdout
    line = next(x for x in CliRunner().invoke(main, ["device", "history", str(ridge_bundle)]).stdout.splitlines()
                if x.startswith("* v3"))
    assert f"{100 * judged['after']:.1f}% {judged['rows']:>8}" in line, line
    stats3, P3 = load_lineage(ridge_bundle, m)
    assert P3.sha256 == P.sha256 and stats3.counts == stats2.counts + [24]
    # exact: the statistics are the old ones plus the new rows' own
    X = Bundle(ridge_bundle).features([t for t, _ in rows])
    stats2.ensure_labels(m["labels"])
    stats2.add(P(X), np.full(len(rows), 3))
    for a, b in zip(stats2.classes, stats3.classes, strict=True):
        assert np.allclose(a.moments(256)[0], b.moments(256)[0], rtol=1e-12, atol=1e-9)
    test = tiny.new_class_rows(10, seed=9)
    assert sum(p["label"] == "valve" for p in Bundle(ridge_bundle).predict([t for t, _ in test])) >= 7
    assert Bundle(ridge_bundle).check()["passed"]
    r = CliRunner().invoke(main, ["device", "rollback", str(ridge_bundle)])
    assert r.exit_code == 0 and "head v3 -> v2" in r.stdout
    b = Bundle(ridge_bundle)
    assert b.manifest["head"]["family"] == "ridge" and b.manifest["head"]["statistics"] == "heads/stats-0002.npz"
    assert (ridge_bundle / b.manifest["head"]["file"]).read_bytes() == head2
    assert np.array_equal(b.logits(texts), logits2)
    r = CliRunner().invoke(main, ["device", "rollback", str(ridge_bundle), "--to", "1"])  # the trained softmax head
    assert r.exit_code == 0
    assert read_manifest(ridge_bundle)["head"].get("family", "softmax") == "softmax"

    assert retrain(ridge_bundle, data, add_classes=True, margin=1.0).accepted  # a softmax retrain from v1
    assert read_manifest(ridge_bundle)["head"].get("family", "softmax") == "softmax"


def test_two_ridge_retrains_equal_one_and_each_row_counts_once(built, ridge_built, tmp_path):
    """Rows in two retrains equal the same rows in one; a row given again (in a later file, twice
    in one file, or from the build's training data) is skipped and reported, never counted twice."""
    rows = tiny.new_class_rows(24, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(ridge_built, a)
    shutil.copytree(ridge_built, b)
    r1 = retrain(a, _csv(tmp_path / "1.csv", rows[:12] + rows[:1]), add_classes=True, margin=1.0)
    assert r1.metrics["rows"] == {"in_file": 13, "added": 12, "skipped_already_in_statistics": 0,
                                     "skipped_repeated_in_file": 1}
    r2 = retrain(a, _csv(tmp_path / "2.csv", rows), margin=1.0)  # its first 12 rows are in the statistics
    # r1 marked a quarter of its new rows hold-out: they are in the statistics too, so r2 judges
    # them once, out-of-fold with their class's rows, not again as hold-out rows
    j1, j2 = r1.metrics["old_classes_accuracy"], r2.metrics["old_classes_accuracy"]
    assert j2["stored_rows_out_of_fold"] == 72 + 12 and j2["replay_holdout_rows"] == j1["replay_holdout_rows"]
    assert r2.metrics["replay_holdout_accuracy"]["rows"] == j1["replay_holdout_rows"] + 3
    assert r2.skipped_rows == 12 and r2.metrics["rows"]["skipped_already_in_statistics"] == 12
    retrain(b, _csv(tmp_path / "all.csv", rows), add_classes=True, margin=1.0)
    sa, Pa = load_lineage(a, read_manifest(a))
    sb, Pb = load_lineage(b, read_manifest(b))
    assert Pa.sha256 == Pb.sha256 and sa.counts == sb.counts and sa.labels == sb.labels
    assert sa.counts[-1] == 24 and len(sa.digests) == len(sb.digests) == 3 * 24 + 24
    assert sorted(map(bytes, sa.digests)) == sorted(map(bytes, sb.digests))
    for ca, cb in zip(sa.classes, sb.classes, strict=True):
        for x, y in zip(ca.moments(256), cb.moments(256), strict=True):
            assert np.allclose(x, y, rtol=1e-12, atol=1e-9)
    wa, wb = R.fit(sa, Pa, 1.0).weight, R.fit(sb, Pb, 1.0).weight
    assert rel(wa, wb) < 1e-6
    # the same file again, or the build's own training rows: nothing new, one line, exit 2, unchanged
    before = (a / "manifest.json").read_bytes()
    train = built["text"].parent / "text-data" / "train.csv"
    for data in (tmp_path / "2.csv", train):
        r = CliRunner().invoke(main, ["device", "retrain", str(a), "--data", str(data)])
        assert r.exit_code == 2 and "rows are already in head v4's statistics" in r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert (a / "manifest.json").read_bytes() == before
    # digests survive the file and pooling: a row two devices both learned is known once
    back = R.Statistics.from_file(_tmp_stats(sa))
    assert back.known(sa.digests).all() and len(back.merge(sb).digests) == len(sa.digests)


def test_ridge_guard_refusal_reports_the_trade_off(ridge_bundle, tmp_path):
    rows = [(text, "belt") for text, label in tiny.text_rows(40, seed=11) if label == "pump"]
    data = _csv(tmp_path / "bad.csv", rows)

    def snap():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ridge_bundle.rglob("*"))
                if p.is_file() and "cache" not in p.parts}

    before = snap()
    with pytest.raises(RetrainRefused, match=r"retrain refused, head v2 stays: .*dropped.*measured trade-off .*lambda"):
        retrain(ridge_bundle, data, margin=0.02)
    assert snap() == before


def test_softmax_bundle_from_before_head_families_still_retrains(built, tmp_path):
    dst = tmp_path / "old"
    shutil.copytree(built["text"], dst)
    m = read_manifest(dst)
    assert "family" not in m["head"] and m["schema"] <= 2
    r = retrain(dst, _csv(tmp_path / "n.csv", tiny.new_class_rows(20, seed=2)), add_classes=True)
    assert r.accepted and "family" not in read_manifest(dst)["head"]
    assert r.metrics["fit"].get("family", "softmax") == "softmax"


def test_unit_sums_are_additive_and_calibrate_leave_one_out(tmp_path):
    """The statistics' per-class sums of normalised features: a float64 reference, exact over two
    updates, the file and pooling; an OOD threshold from them, calibrated on rows inside the sums
    (each scored without itself), keeps false alarms at the stated rate on fresh rows, where
    scoring a row with itself in its prototype would double them."""
    from edgeft.runtime.ood import OOD

    X, y = blobs(30, 3)
    P = R.make_projection(X, 16)
    one = stats_of(P, X, y, ["a", "b", "c"])
    U = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    assert rel(one.unit_sums, np.stack([U[y == c].sum(0) for c in range(3)])) < 1e-12
    two = R.Statistics.empty(P, ["a", "b"])
    first = y < 2
    two.add(P(X[first][:20]), y[first][:20], X[first][:20])
    two.add(P(X[first][20:]), y[first][20:], X[first][20:])
    two.ensure_labels(["a", "b", "c"])
    two.add(P(X[~first]), y[~first], X[~first])
    back = R.Statistics.from_file(_tmp_stats(two))
    assert rel(back.unit_sums, one.unit_sums) < 1e-12
    assert R.read_unit_sums(_tmp_stats(two))[1].tolist() == [30, 30, 30]
    half = R.Statistics.empty(P, ["a", "b", "c"])
    half.add(P(X[::2]), y[::2], X[::2])
    other = R.Statistics.empty(P, ["a", "b", "c"])
    other.add(P(X[1::2]), y[1::2], X[1::2])
    assert rel(half.merge(other).unit_sums, one.unit_sums) < 1e-12
    other.add(P(X[:3]), y[:3])  # rows without their features: the sums would be wrong, so none
    assert other.unit_sums is None and R.Statistics.from_file(_tmp_stats(other)).unit_sums is None

    def false_alarms(seed, loo):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((4, 24))

        def draw(k):
            labels = np.repeat(np.arange(4), k)
            return centres[labels] + rng.standard_normal((len(labels), 24)), labels

        Xc, yc = draw(12)
        Uc = Xc / np.linalg.norm(Xc, axis=1, keepdims=True)
        sums = np.zeros((4, 24))
        np.add.at(sums, yc, Uc)
        ood = OOD.from_sums(sums, np.bincount(yc), Xc, yc, np.full(len(yc), loo), 0.1)
        return ood.flags(draw(100)[0])[1].mean()

    assert 0.04 <= np.mean([false_alarms(s, True) for s in range(100)]) <= 0.11
    assert np.mean([false_alarms(s, False) for s in range(100)]) > 0.15  # the test can tell


def test_ridge_ood_prototypes_rest_on_every_learned_row(built, ridge_bundle, tmp_path):
    """After a ridge retrain the replay keeps few hold-out rows; the OOD prototypes are the
    statistics' sums over every learned row (the build's training rows + the new ones), and the
    threshold is calibrated on every replay row, not on the hold-out alone."""
    rows = tiny.new_class_rows(24, seed=1)
    retrain(ridge_bundle, _csv(tmp_path / "new.csv", rows), add_classes=True, margin=1.0)
    b = Bundle(ridge_bundle)
    ood = b.ood()
    stats, _ = load_lineage(ridge_bundle, b.manifest)
    described = ood.describe(b.labels)
    assert ood.mode == "statistics" and described["prototype_rows"] == sum(stats.counts) == 3 * 24 + 24
    with np.load(ridge_bundle / b.manifest["head"]["replay"]) as z:
        replay_rows, hold_rows = len(z["labels"]), int(z["holdout"].sum())
        assert z["seen"][~z["holdout"]].all()  # every calibration row outside the hold-out is learned
    assert described["calibration_rows"] == replay_rows > hold_rows
    train = load_dataset(built["text"].parent / "text-data" / "train.csv")
    X = np.concatenate([b.features(train.items), b.features([t for t, _ in rows])])
    y = np.r_[[b.labels.index(v) for v in train.labels], np.full(len(rows), 3)]
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    expect = np.stack([U[y == c].sum(0) for c in range(4)])
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    assert np.abs(ood.prototypes - expect).max() < 1e-5
    flagged = b.predict(["valve stem packing gland", "pump seal leak"])
    assert all("unknown" in r and 0 <= r["ood_score"] <= 2 for r in flagged)


def test_device_features_on_parallel_threads_are_the_same_bits(built):
    """The retrain's features on worker threads (one single-threaded session each) are the bits
    of the bundle's own sequential batches, for batched and one-row-per-call (dynamic int8) bundles;
    a batch made otherwise (another composition) gives other bits, which this test would see."""
    from edgeft.runtime import features as F

    texts = [t for t, _ in tiny.text_rows(9, seed=5)] + ["pump", "motor relay fuse " * 6]
    b = Bundle(built["text"])
    for max_batch in (None, 1):  # whatever the build chose, both ways of batching
        b.max_batch = max_batch
        sequential = b.features(texts, 4)
        for workers in (2, 3):
            assert F.workers_for(b, len(list(b._chunks(texts, 4))), workers) == workers
            parallel = F.features(b, texts, 4, workers=workers)
            assert parallel.dtype == sequential.dtype and parallel.tobytes() == sequential.tobytes()
    b.max_batch = None
    per_row = np.concatenate([b.features([t], 1) for t in texts])
    assert per_row.tobytes() != b.features(texts, 4).tobytes()  # batch composition shows in the bits
    ds = load_dataset(built["text"].parent / "text-data" / "train.csv")
    b = Bundle(built["text"])
    from edgeft.runtime.retrain import _features_by_length

    order = np.argsort([len(t) for t in ds.items], kind="stable")
    expect = np.empty((len(ds), b.features(ds.items[:1]).shape[1]), np.float32)
    expect[order] = b.features([ds.items[i] for i in order], 32)
    assert _features_by_length(b, ds, 32).tobytes() == expect.tobytes()


@pytest.mark.slow  # a dozen retrain processes
def test_killed_ridge_retrain_never_leaves_a_broken_bundle(ridge_built, tmp_path):
    """SIGKILL at random moments of a ridge retrain: the bundle always loads, head, statistics and
    replay files whole, v2 or v3."""
    data = _csv(tmp_path / "n.csv", tiny.new_class_rows(20, seed=2))

    def cmd(b):
        return [sys.executable, "-m", "edgeft.cli", "device", "retrain", str(b), "--data", str(data), "--add-classes"]

    def check(b):
        loaded = Bundle(b)  # raises if any listed file is missing, partial or changed
        assert loaded.head_version in (2, 3)
        assert ("valve" in loaded.labels) == (loaded.head_version == 3)
        stats, _ = load_lineage(b, loaded.manifest)
        assert len(stats.labels) == len(loaded.labels)

    kill_at_random_moments(ridge_built, tmp_path, cmd, check, trials=12)


@pytest.mark.slow  # a training run and two builds
def test_train_and_build_with_the_ridge_head(tmp_path):
    """`edgeft train --method head --head ridge` fits it from the cached features in one solve and
    records the family; `edgeft build` of that run makes the ridge head the bundle's active head."""
    from edgeft.build import build
    from edgeft.config import TrainConfig
    from edgeft.train import train

    bert = tiny.make_tiny_bert(tmp_path / "bert")
    data = tiny.write_csv(tmp_path / "data" / "train.csv", tiny.text_rows(16, 1))
    val = tiny.write_csv(tmp_path / "data" / "val.csv", tiny.text_rows(6, 2))
    summary = train(TrainConfig(model=str(bert), data=str(data), val=str(val), output=str(tmp_path / "run"),
                                method="head", head="ridge", epochs=5, progress=False))
    fit = summary.ridge
    assert fit["family"] == "ridge" and fit["train_rows"] == 48 and fit["lambda_chosen_on_rows"] == 18
    assert 0.0 <= fit["accuracy"] <= 1.0
    profile = tmp_path / "box.toml"
    profile.write_text('description = "test box"\ntarget = "cpu"\nprecision = "fp32"\n')
    m = build(tmp_path / "run", str(profile), tmp_path / "bundle").manifest
    assert m["head"]["family"] == "ridge" and m["schema"] == 3 and m == read_manifest(tmp_path / "bundle")
    b = Bundle(tmp_path / "bundle")
    assert b.check()["passed"] and b.predict(["pump seal leak"])[0]["label"] in b.labels
    r = CliRunner().invoke(main, ["build", str(tmp_path / "run"), "--device", str(profile), "--output",
                                  str(tmp_path / "soft"), "--head", "softmax"])
    assert r.exit_code == 0, r.output
    assert "family" not in read_manifest(tmp_path / "soft")["head"]
