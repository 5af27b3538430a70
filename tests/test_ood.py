"""Out-of-distribution flags on the device (runtime/ood.py): prototypes, a conformal threshold,
`device predict`'s score and unknown flag. numpy and bundles only: runs in the torch-free env."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.errors import DataError
from edgeft.runtime.bundle import Bundle
from edgeft.runtime.ood import OOD


def _clusters(rng, n_per_class, centres, spread=0.35):
    X = np.concatenate([c + spread * rng.standard_normal((n_per_class, centres.shape[1])) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return X, y


def test_leave_one_out_scores_equal_a_brute_force_recomputation():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 2
    X, y = _clusters(rng, 7, centres)
    hold = np.ones(len(y), bool)  # a replay of hold-out rows only (the ridge family's): leave-one-out
    ood = OOD(X, y, hold, 3)
    assert ood.mode == "leave-one-out"
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    want = []
    for i in np.flatnonzero(hold):
        keep = np.ones(len(y), bool)
        keep[i] = False
        protos = [U[keep & (y == c)].sum(0) for c in range(3)]
        want.append(1 - max(U[i] @ p / np.linalg.norm(p) for p in protos))
    got = ood._leave_one_out(U[hold], y[hold])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # float64 throughout: the same sums


def test_threshold_keeps_false_alarms_near_the_target_and_flags_another_domain():
    rng = np.random.default_rng(1)
    d = 32
    centres = rng.standard_normal((4, d)) * 1.5
    X, y = _clusters(rng, 60, centres)
    hold = np.zeros(len(y), bool)
    hold[rng.permutation(len(y))[:200]] = True
    ood = OOD(X, y, hold, 4, false_alarm=0.05)
    assert ood.mode == "split" and math.isfinite(ood.threshold) and ood.calibration_rows == 200
    assert ood.counts.sum() == 40  # the prototypes come from the 40 rows not held out
    fresh, _ = _clusters(rng, 1000, centres)  # new inputs drawn like the hold-out rows
    _, unknown = ood.flags(fresh)
    assert unknown.mean() <= 0.09, unknown.mean()  # conformal: at most 5% in expectation
    other = rng.standard_normal((500, d)) * 1.5  # another domain: directions no class has
    _, flagged = ood.flags(other)
    assert flagged.mean() >= 0.8, flagged.mean()


def test_too_few_holdout_rows_flag_nothing_and_say_so():
    rng = np.random.default_rng(2)
    X, y = _clusters(rng, 5, rng.standard_normal((2, 4)))
    hold = np.zeros(len(y), bool)
    hold[:10] = True
    ood = OOD(X, y, hold, 3)  # class 2 has no rows
    assert math.isinf(ood.threshold)
    assert not ood.flags(rng.standard_normal((20, 4)) * 10)[1].any()
    info = ood.describe(["a", "b", "c"])
    assert info["threshold"] is None and "at least 19 are needed" in info["note"]
    assert info["classes_without_prototype"] == ["c"]


def test_device_predict_reports_the_score_and_flag(device_bundles):
    bundle = device_bundles["text"]
    b = Bundle(bundle)
    ood = b.ood()
    assert ood is not None and math.isfinite(ood.threshold)  # 24 hold-out rows: enough for 5%
    texts = ["pump leak at the seal", "belt roller noise", "motor fuse relay"]
    r = CliRunner().invoke(main, ["device", "predict", str(bundle), *texts, "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    scores, unknown = ood.flags(b.features(texts))
    assert [x["ood_score"] for x in rows] == pytest.approx(scores.tolist(), abs=1e-6)
    assert [x["unknown"] for x in rows] == unknown.tolist()
    # a looser false-alarm rate can only lower the threshold
    assert b.ood(0.5).threshold <= ood.threshold


def test_image_bundle_with_few_holdout_rows_answers_without_flags(device_bundles):
    """The tiny image bundle holds 3-4 validation rows per class: too few to promise 5%."""
    b = Bundle(device_bundles["image"])
    ood = b.ood()
    assert ood is not None and ood.calibration_rows < 19 and math.isinf(ood.threshold)
    images = sorted(str(p) for p in (device_bundles["image"].parent / "image-new").rglob("*.png"))[:3]
    answers = b.predict(images)
    assert len(answers) == 3 and all(a["unknown"] is False and a["ood_score"] >= 0 for a in answers)


def test_collect_keeps_flagged_inputs_for_labelling_once(device_bundles, tmp_path):
    """--collect writes the flagged inputs where `device retrain --data` reads them: once each,
    with an empty label to fill in; images are copied in under their content hash."""
    from edgeft.runtime.collect import FILE, collect
    from edgeft.runtime.dataset import load_dataset

    bundle, d = device_bundles["text"], tmp_path / "to-label"
    texts = ["pump leak at the seal", "zzz qqq xxx", "belt roller noise"]
    args = ["device", "predict", str(bundle), *texts, "--json", "--false-alarm", "0.9", "--collect", str(d)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    flagged = [a["input"] for a in map(json.loads, r.stdout.splitlines()) if a["unknown"]]
    assert flagged, "a 90% false-alarm rate flags some of three inputs"
    assert f"{len(flagged)} new in" in r.stderr
    lines = (d / FILE).read_text().splitlines()
    assert lines[0] == "text,label,predicted,ood_score,collected" and [ln.split(",")[0] for ln in lines[1:]] == flagged
    assert CliRunner().invoke(main, args).exit_code == 0 and (d / FILE).read_text().splitlines() == lines  # once each
    (d / FILE).write_text("\n".join([lines[0]] + [ln.replace(",,", ",valve,", 1) for ln in lines[1:]]) + "\n")
    ds = load_dataset(d / FILE)
    assert ds.items == flagged and set(ds.labels) == {"valve"}

    images = sorted((device_bundles["image"].parent / "image-new").rglob("*.png"))[:2]
    answers = [{"input": str(p), "label": "ok", "ood_score": 0.5, "unknown": True} for p in [*images, images[0]]]
    assert collect(tmp_path / "img", "image", answers) == 2  # the repeated image is kept once
    rows = (tmp_path / "img" / FILE).read_text().splitlines()[1:]
    kept = [tmp_path / "img" / row.split(",")[0] for row in rows]
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in images]
    with pytest.raises(DataError, match="expected the columns"):  # one folder, one modality
        collect(tmp_path / "img", "text", [{"input": "x", "label": "ok", "ood_score": 0.9, "unknown": True}])
