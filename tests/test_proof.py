"""Confidence bounds, row selection, device bench and ARM emulation (edgeft.runtime.stats, .bench)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeft.runtime import stats

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy comes with scikit-learn in the dev extra")

GRID = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (1, 221), (219, 221), (220, 221), (221, 221),
        (50, 100), (297, 300), (0, 5000), (4990, 5000), (12345, 20000)]


@pytest.mark.parametrize("k,n", GRID)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy_beta(k, n, confidence):
    alpha = 1 - confidence
    lo = 0.0 if k == 0 else scipy_stats.beta.ppf(alpha, k, n - k + 1)
    hi = 1.0 if k == n else scipy_stats.beta.ppf(1 - alpha, k + 1, n - k)
    # both sides are computed in float64; the bisection stops at adjacent doubles
    assert stats.lower_bound(k, n, confidence) == pytest.approx(lo, rel=1e-9, abs=1e-12)
    assert stats.upper_bound(k, n, confidence) == pytest.approx(hi, rel=1e-9, abs=1e-12)


def test_bounds_hold_their_coverage_by_definition():
    # at the lower bound, seeing k or more successes has probability alpha (exactness)
    k, n = 217, 221
    p = stats.lower_bound(k, n)
    assert scipy_stats.binom.sf(k - 1, n, p) == pytest.approx(0.05, rel=1e-6)
    p = stats.upper_bound(4, n)
    assert scipy_stats.binom.cdf(4, n, p) == pytest.approx(0.05, rel=1e-6)


def test_rows_needed_for_99_percent_with_no_flips_is_299():
    assert stats.rows_needed(0.99) == math.ceil(math.log(0.05) / math.log(0.99)) == 299
    assert stats.lower_bound(299, 299) >= 0.99 > stats.lower_bound(298, 298)
    # one flip already seen: more rows needed, and the answer is the first n that certifies
    n = stats.rows_needed(0.99, failures=1)
    assert stats.lower_bound(n - 1, n) >= 0.99 > stats.lower_bound(n - 2, n - 1)
    # the accuracy drop: zero harmful flips certify half a point from 598 rows
    n = stats.rows_needed(0.005, upper=True)
    assert stats.upper_bound(0, n) <= 0.005 < stats.upper_bound(0, n - 1)
    assert n == 598


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        stats.lower_bound(5, 3)
    with pytest.raises(ValueError):
        stats.upper_bound(-1, 3)
    with pytest.raises(ValueError):
        stats.lower_bound(1, 3, confidence=1.0)


def test_parity_bounds_count_paired_flips():
    ref = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    cand = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = [0, 0, 0, 1, None]
    b = stats.parity_bounds(ref, cand, y)
    # row 1: reference right, candidate wrong (harmful); row 2: the reverse (helpful)
    assert (b["rows"], b["agree"], b["flips"]) == (5, 3, 2)
    assert (b["labelled_rows"], b["harmful_flips"], b["helpful_flips"]) == (4, 1, 1)
    assert b["accuracy_drop_upper"] == pytest.approx(scipy_stats.beta.ppf(0.95, 2, 3))
    assert b["agreement_lower"] == pytest.approx(scipy_stats.beta.ppf(0.05, 3, 3))
    masked = stats.parity_bounds(ref, cand, y, labelled=[True, False, True, True, True])
    assert (masked["labelled_rows"], masked["harmful_flips"]) == (3, 0)


def test_stratified_draws_every_class_in_proportion_and_not_the_head():
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 12  # sorted by class, as files often are
    idx = stats.stratified(labels, 100, seed=0)
    assert len(idx) == len(set(idx)) == 100 and idx == sorted(idx)
    got = {c: sum(labels[i] == c for i in idx) for c in "abc"}
    assert got["a"] in (65, 66, 67) and got["b"] in (32, 33, 34) and got["c"] >= 1
    assert idx != list(range(100))
    assert stats.stratified(labels, 100, seed=0) == idx != stats.stratified(labels, 100, seed=1)
    assert stats.stratified(labels, 5000) == list(range(len(labels)))
    # fewer rows than classes: still n rows, none repeated
    assert len(set(stats.stratified(labels, 2))) == 2


def test_calibration_rows_are_drawn_across_classes_and_a_shared_file_is_split_in_half():
    """quantize and build calibrate on certify.calibration_items: up to 300 rows drawn across
    classes (seeded), never the head of a file; where the same file must also judge, at most half
    of it calibrates and judging_rows leaves those rows out, so the two halves are disjoint."""
    from edgeft.certify import calibration_items, describe_calibration, judging_rows
    from edgeft.runtime.dataset import Dataset

    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 30  # sorted by class, as files often are
    ds = Dataset("text", [f"row {i}" for i in range(len(labels))], labels, "train.csv")
    items = calibration_items(ds)
    assert len(items) == len(set(items)) == 300 and items != ds.items[:300]
    got = {c: sum(labels[int(x.split()[1])] == c for x in items) for c in "abc"}
    assert (got["a"], got["b"], got["c"]) in {(193, 97, 10), (194, 96, 10), (193, 96, 11)}, got
    assert calibration_items(ds) == items != calibration_items(ds, seed=1)
    unlabelled = Dataset("text", ds.items, [None] * len(labels), "inputs.csv")
    assert len(calibration_items(unlabelled)) == 300 and calibration_items(unlabelled) != ds.items[:300]
    # one file that must calibrate and judge: half each, disjoint, every class on both sides
    val = Dataset("text", ds.items[:40] + ds.items[600:620], labels[:40] + labels[600:620], "val.csv")
    half = calibration_items(val, shared=True)
    assert len(half) == 30 and {labels[int(x.split()[1])] for x in half} == {"a", "b"}
    rows = judging_rows(["a", "b", "c"], held_out=[("validation", val)], calibrated=set(half), modality="text")
    assert len(rows) == 30 and not set(rows.items) & set(half) and set(rows.items) | set(half) == set(val.items)
    assert {rows.y[i] for i in range(len(rows))} == {0, 1}
    assert describe_calibration(half, val, True) == {"data": "val.csv", "rows": 30, "of": 60,
                                                     "drawn": "stratified across classes, seed 0",
                                                     "shared": "the other rows of this file judge"}
    assert calibration_items(None) == [] and calibration_items(Dataset("text", ["x"], ["a"], "one"), shared=True) == []


def test_cover_classes_puts_first_rows_first_and_reaches_every_class():
    labels = ["a"] * 50 + ["b"] * 3 + ["c"] * 1
    out = stats.cover_classes(labels, 6, first=[7, 7, 9])
    assert out[:2] == [7, 9] and len(out) == len(set(out)) == 6
    assert {labels[i] for i in out} == {"a", "b", "c"}


def test_smallest_margin_rows_say_whether_they_flipped():
    ref = np.array([[1.0, 0.9], [5.0, 0.0], [0.0, 0.2]])
    cand = np.array([[0.8, 1.0], [5.0, 0.0], [0.0, 0.3]])
    rows = stats.smallest_margin_rows(ref, cand, n=2)
    assert [r["row"] for r in rows] == [0, 2] and [r["flipped"] for r in rows] == [True, False]


def test_row_id_hashes_text_and_image_bytes(tmp_path):
    assert stats.row_id("hose weeping at press 4") == stats.row_id("hose weeping at press 4")
    assert "hose" not in stats.row_id("hose weeping at press 4")
    p = tmp_path / "secret-name.png"
    p.write_bytes(b"\x89PNG fake")
    assert stats.row_id(str(p)) == stats.row_id(str(tmp_path / "secret-name.png"))
    assert stats.row_id(str(p)) != stats.row_id("secret-name.png")


# ---- device bench -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "image"])
def test_device_bench_reports_and_writes_json_beside_the_history(device_bundles, kind, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.runtime.bundle import Bundle

    b = tmp_path / kind
    shutil.copytree(device_bundles[kind], b)
    r = CliRunner().invoke(main, ["device", "bench", str(b), "--runs", "7", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["schema"] == "edgeft.bench/1" and rep["runs"] == 7 and rep["batch"] == 1
    assert rep["inputs"]["kind"] == "reference" and rep["inputs"]["rows"] > 0
    lat = rep["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert rep["load_ms"] > 0 and rep["peak_rss_mb"] > 10 and rep["host"]["cpu"]
    written = list((b / "bench").glob("bench-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["latency_ms"] == lat
    Bundle(b)  # the report sits beside the hashed files and does not break them


def test_device_bench_on_a_file_of_inputs(device_bundles, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgeft.cli import main

    b = tmp_path / "text"
    shutil.copytree(device_bundles["text"], b)
    texts = tmp_path / "inputs.txt"
    texts.write_text("pump seal leaking oil\nconveyor belt torn at the joint\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["device", "bench", str(b), "--file", str(texts), "--runs", "4"])
    assert r.exit_code == 0, r.output
    assert "p50" in r.output and "4 runs over 2 file inputs" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["device", "bench", str(b), "--file", str(empty)])
    assert r.exit_code == 2 and "no inputs" in r.output


# ---- ARM64 under emulation ----------------------------------------------------------------

def test_profiles_say_their_isa_and_arm_ones_name_the_emulated_core():
    from edgeft.emulate import CPUS, profile_cpu
    from edgeft.errors import ProfileError
    from edgeft.profiles import find_profile, read_profile

    pi4, _ = find_profile("raspberry-pi-4")
    pi5, _ = find_profile("raspberry-pi-5")
    server, _ = find_profile("x86-64-server")
    assert (pi4.arch, pi4.cpu, pi5.cpu, server.arch) == ("arm64", "cortex-a72", "cortex-a76", "x86-64")
    assert pi4.cpu in CPUS and pi5.cpu in CPUS
    # every ARM profile names an emulated core of its own int8 class (the real core's, README)
    from edgeft.quantize.isa import profile_isa

    want = {"jetson-orin-nano": ("cortex-a76", "arm64/dotprod"), "jetson-xavier-nx": ("cortex-a72", "arm64/neon"),
            "android-arm64": ("armv9-i8mm", "arm64/i8mm"), "raspberry-pi-4": ("cortex-a72", "arm64/neon"),
            "raspberry-pi-5": ("cortex-a76", "arm64/dotprod")}
    for name, (cpu, cls) in want.items():
        p, _ = find_profile(name)
        assert (p.arch, p.cpu, profile_isa(p)["class"]) == ("arm64", cpu, cls), name
        assert p.cpu in CPUS and profile_cpu({"device": {"profile": name}}) == cpu
    from edgeft.emulate import QEMU_CPU

    assert QEMU_CPU["armv9-i8mm"] == "max,sme=off"  # QEMU 7.2's SME kernels path computes wrongly
    assert profile_cpu({"device": {"profile": "raspberry-pi-5"}}) == "cortex-a76"
    assert profile_cpu({"device": {"profile": "x86-64-server"}}) is None
    with pytest.raises(ProfileError, match="arch"):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "bad.toml"
            p.write_text('target = "cpu"\narch = "arm"\n')
            read_profile(p)


def test_emulated_check_says_plainly_when_not_set_up(device_bundles, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgeft.cli import main

    monkeypatch.setenv("EDGEFT_ARM64", str(tmp_path / "no-emulator"))
    r = CliRunner().invoke(main, ["device", "check", str(device_bundles["text"]), "--emulate", "cortex-a72"])
    assert r.exit_code == 2 and "not set up" in r.output and "tools/arm64-emulator.sh" in r.output
    r = CliRunner().invoke(main, ["device", "check", str(device_bundles["text"]), "--emulate", "pentium"])
    assert r.exit_code == 2 and "cortex-a72" in r.output
    # an x86 profile has no ARM core to default to
    r = CliRunner().invoke(main, ["device", "check", str(device_bundles["text"]), "--emulate"])
    assert r.exit_code == 2 and "no ARM64 cpu" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])
def test_emulated_arm_check_of_an_int8_bundle(device_bundles, cpu):
    from edgeft import emulate

    if emulate.status() is None:
        pytest.skip(emulate.not_set_up())
    r = emulate.check(device_bundles["text"], cpu)
    assert r["machine"] == "aarch64" and r["emulated"]["cpu"] == cpu
    assert r["precision"] == "int8" and r["rows"] > 0
    # the check itself judges the ARM answers against the x86 build's recorded outputs
    assert r["against"] == "the bundle's outputs at build time" and r["passed"], r["checks"]
    # int8 kernels differ in rounding, never by much against the features' own scale
    assert r["x86_features_max_abs_diff"] <= 0.05 * r["x86_features_max_abs"]


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])
def test_emulated_arm_check_of_an_image_bundle(device_bundles, cpu):
    """`edgeft device check BUNDLE --emulate CPU` on the tiny image bundle (fp32; its reference
    inputs are preprocessed image tensors): aarch64 kernels against the PyTorch outputs stored at
    build, within the build's own float32 limit, as on any device."""
    import json

    from click.testing import CliRunner

    from edgeft import emulate
    from edgeft.cli import main

    if emulate.status() is None:
        pytest.skip(emulate.not_set_up())
    r = CliRunner().invoke(main, ["device", "check", str(device_bundles["image"]), "--emulate", cpu, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["machine"] == "aarch64" and rep["emulated"]["cpu"] == cpu and rep["passed"], rep["checks"]
    assert rep["precision"] == "fp32" and rep["rows"] > 0 and rep["agreement"] == 1.0
    assert "not its speed" in rep["emulated"]["proves"]
    r = CliRunner().invoke(main, ["device", "check", str(device_bundles["image"]), "--emulate", cpu])
    assert r.exit_code == 0 and f"emulated {emulate.CPUS[cpu]}" in r.output and "not the device's speed" in r.output


# ---- a gate that certifies ------------------------------------------------------------------

def test_verify_refuses_on_the_bound_with_too_few_rows_and_passes_with_parity_data(device_bundles, tmp_path):
    """The tiny int8 bundle keeps every answer on its 24 validation rows (point estimate 100%),
    but 24 rows cannot certify 98% at 95% confidence (149 without a flip could); 900 unlabelled
    inputs can (the tiny int8 model flips about 0.5% of them)."""
    import json
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from edgeft.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import text_rows

    root = device_bundles["text"].parent
    args = ["verify", str(device_bundles["text"]), "--reference", str(root / "text-run"), "--certify",
            "--data", str(root / "text-data" / "val.csv"), "--min-agreement", "0.98", "--max-drop", "1"]
    point = [a for a in args if a != "--certify"]
    r = CliRunner().invoke(main, point)  # the point estimate alone passes
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "few.json"), "--junit", str(tmp_path / "few.xml")])
    rep = json.loads((tmp_path / "few.json").read_text())
    agreement = next(c for c in rep["checks"] if c["name"] == "agreement")
    assert rep["agreement"] == 1.0 and rep["rows"] == 24
    assert r.exit_code == 1 and not agreement["passed"], r.output
    assert agreement["bound"] == pytest.approx(0.05 ** (1 / 24)) and agreement["rows_needed"] == 149
    assert "149 rows" in r.output and "--parity-data" in r.output
    assert 'name="agreement_lower"' in (tmp_path / "few.xml").read_text()

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(t for t, _ in text_rows(300, 11)) + "\n", encoding="utf-8")
    r = CliRunner().invoke(main, [*args, "--parity-data", str(inputs), "--json", str(tmp_path / "many.json")])
    rep = json.loads((tmp_path / "many.json").read_text())
    assert rep["sources"] == {"data": 24, "parity-data": 900} and rep["rows"] == 924
    assert rep["labelled_rows"] == 24  # the unlabelled inputs judge agreement, not accuracy
    assert r.exit_code == 0, r.output
    assert rep["bounds"]["agreement_lower"] >= 0.98


def test_build_refuses_on_the_bound_with_too_few_rows_and_passes_with_parity_data(lora_text_run, tmp_path,
                                                                                 monkeypatch):
    """The tiny LoRA run has 18 validation rows to judge (its 48 training rows calibrate int8):
    its int8 bundle passes on the point estimate, but 18 rows cannot certify 98% at 95%
    confidence (149 without a flip could), so the default build refuses before any work, exit 1,
    nothing on disk; 900 unlabelled inputs (--parity-data) bring enough rows to pass on the bound."""
    import json
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from edgeft.build import build
    from edgeft.cli import main
    from edgeft.errors import ParityError

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import text_rows

    monkeypatch.setenv("EDGEFT_ARM64", str(tmp_path / "no-emulator"))  # an ARM profile says plainly it is not set up
    args = ["build", str(lora_text_run), "--device", "raspberry-pi-5", "--min-agreement", "0.98", "--replay", "0"]
    with pytest.raises(ParityError, match=r"18 rows to judge \(18 validation\) cannot certify 98.00% agreement at "
                                          r"95% confidence: that takes at least 149 rows.*--parity-data"):
        build(lora_text_run, "raspberry-pi-5", tmp_path / "few", min_agreement=0.98, replay=0)
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "few")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "149 rows" in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []

    # the point estimate alone passes: named as such, on the bundle and in the summary line
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "point"), "--uncertified"])
    assert r.exit_code == 0, r.output
    assert "on 18 rows (18 validation)" in r.output and "(uncertified)" in r.output
    assert "arm64 check not run: the ARM64 emulator is not set up" in r.output
    point = json.loads((tmp_path / "point" / "manifest.json").read_text())["parity"]
    assert point["agreement"] >= 0.98 and point["bounds"]["agreement_lower"] < 0.98
    assert point["judged_on"].startswith("point estimates") and point["emulated"]["status"].startswith("not run")

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(t for t, _ in text_rows(300, 11)) + "\n", encoding="utf-8")
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "many"), "--parity-data", str(inputs)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "many" / "manifest.json").read_text())["parity"]
    assert m["sources"] == {"validation": 18, "parity-data": 900} and m["rows"] == 918
    assert m["bounds"]["labelled_rows"] == 18  # the unlabelled inputs judge agreement, not accuracy
    assert m["bounds"]["agreement_lower"] >= 0.98 and m["judged_on"].endswith("(certified)")
    assert "on 918 rows (18 validation + 900 parity-data)" in r.output
    parity = json.loads((tmp_path / "many" / "parity.json").read_text())
    assert parity["sources"] == m["sources"] and all(c["passed"] for c in parity["checks"])


@pytest.mark.slow
@pytest.mark.parametrize("device,cpu,precision", [("jetson-orin-nano", "cortex-a76", "fp16"),
                                                  ("android-arm64", "armv9-i8mm", "int8")])
def test_jetson_fp16_and_android_int8_builds_run_their_emulated_check(lora_text_run, tmp_path, device, cpu,
                                                                      precision):
    """A build for the profile runs `device check` on the profile's emulated core: the Jetson's fp16
    kernels on a Cortex-A76 (the Orin's A78AE class), the phone's int8 ones (an .ort backbone) on an
    Armv9 core with I8MM (QEMU max, SME off); judged against the x86 build's outputs."""
    from edgeft import emulate
    from edgeft.build import build

    if emulate.status() is None or cpu not in emulate.status().get("cpus", []):
        pytest.skip(emulate.not_set_up())
    m = build(lora_text_run, device, tmp_path / "b", uncertified=True, replay=0).manifest
    e = m["parity"]["emulated"]
    assert m["precision"] == precision and e["status"] == "ran", e
    assert e["cpu"] == cpu and e["machine"] == "aarch64" and e["rows"] == 16 and e["passed"], e
    assert e["describes"] == emulate.CPUS[cpu]
    if precision == "int8":  # rounding differs between kernels, never by much against the features' scale
        assert e["x86_features_max_abs_diff"] <= 0.05 * e["x86_features_max_abs"]


def test_a_build_without_training_rows_calibrates_on_half_the_parity_rows_and_judges_the_other_half(
        lora_text_run, tmp_path):
    """Its training rows gone, a build calibrates on half of the validation rows (drawn across
    classes) and judges on the other half: the rows that calibrate never judge (it used to
    calibrate on every parity row, leaving none unseen to judge)."""
    import json
    import shutil

    from edgeft.build import build

    run = tmp_path / "run"
    shutil.copytree(lora_text_run, run)
    info = json.loads((run / "run.json").read_text())
    info["training"]["path"] = str(tmp_path / "gone.csv")
    (run / "run.json").write_text(json.dumps(info))
    m = build(run, "x86-64-server", tmp_path / "b", uncertified=True, replay=0).manifest
    c = m["quantization"]["calibration"]
    assert (c["rows"], c["of"]) == (9, 18) and c["data"].endswith("val.csv") and "shared" in c
    assert m["parity"]["sources"] == {"validation": 9} and m["parity"]["rows"] == 9


@pytest.mark.slow
def test_an_arm_build_runs_the_emulated_check(lora_text_run, tmp_path):
    from edgeft import emulate
    from edgeft.build import build

    if emulate.status() is None:
        pytest.skip(emulate.not_set_up())
    m = build(lora_text_run, "raspberry-pi-5", tmp_path / "b", uncertified=True, replay=0).manifest
    e = m["parity"]["emulated"]
    assert e["status"] == "ran" and e["cpu"] == "cortex-a76" and e["machine"] == "aarch64" and e["rows"] == 16, e
    # int8 kernels differ in rounding, never by much against the features' own scale (the build's refusal line)
    assert e["x86_features_max_abs_diff"] <= 0.05 * e["x86_features_max_abs"]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_default_reference_inputs_are_synthetic_and_cover_the_classes_the_pool_answers(device_bundles, kind):
    """A default bundle's `device check` inputs are made by edgeft (random token ids over the
    vocabulary, noise images), not the owner's rows; of a pool of them the build keeps every
    class PyTorch answered and the smallest margins. Token ids stay inside the vocabulary."""
    import json

    b = device_bundles[kind]
    m = json.loads((b / "manifest.json").read_text())
    ref = m["reference"]
    assert ref["kind"] == "synthetic" and ref["rows"] == 16 and ref["pool"] > 16
    assert ref["classes"] == ref["pool_classes"] and len(ref["classes"]) >= 2, ref
    out = np.load(b / "reference" / "outputs.npz")
    assert sorted({m["labels"][i] for i in out["logits"].argmax(1).tolist()}) == ref["classes"]
    assert json.loads((b / "reference" / "items.json").read_text()) == [{"synthetic": i} for i in range(16)]
    inputs = np.load(b / "reference" / "inputs.npz")
    if kind == "text":
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(b / "tokenizer.json")).get_vocab_size()
        ids = inputs["input_ids"][inputs["attention_mask"] == 1]
        assert ids.min() >= 0 and ids.max() < vocab and len(set(ids.tolist())) > 10
    else:
        assert np.isfinite(inputs["pixel_values"]).all() and inputs["pixel_values"].std() > 0.1


def test_kept_examples_are_real_rows_with_the_smallest_margins(lora_text_run, tmp_path):
    """--keep-examples: the reference inputs are the gate's own rows: every class PyTorch answers,
    the rows closest to flipping first (certify.reference_rows); the manifest says so."""
    import json

    from edgeft.build import build

    profile = tmp_path / "box.toml"
    profile.write_text('description = "test box"\ntarget = "cpu"\nprecision = "fp32"\n')
    m = build(lora_text_run, str(profile), tmp_path / "b", keep_examples=True, replay=0).manifest
    assert m["reference"]["kind"] == "examples" and len(m["reference"]["classes"]) == 3
    assert m["files"]["reference/inputs.npz"]["holds"].startswith("examples: preprocessed rows of the owner's data")
    texts = json.loads((tmp_path / "b" / "reference" / "items.json").read_text())
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert len(texts) == 16 and {r["input"] for r in parity["smallest_margin"][:4]} <= set(texts)


# ---- what a bundle reveals ------------------------------------------------------------------

def test_a_default_bundle_holds_none_of_its_validation_texts_or_image_names(device_bundles):
    import csv

    root = device_bundles["text"].parent
    texts = [r["text"] for r in csv.DictReader(open(root / "text-data" / "val.csv", encoding="utf-8"))]
    names = [p.name for p in (root / "image-data").rglob("*.png")]
    assert texts and names
    for kind, needles in (("text", texts), ("image", names)):
        blob = b"".join(p.read_bytes() for p in sorted(device_bundles[kind].rglob("*")) if p.is_file())
        found = [n for n in needles if n.encode("utf-8") in blob]
        assert not found, (kind, found[:3])
        import json

        m = json.loads((device_bundles[kind] / "manifest.json").read_text())
        assert all("holds" in e for e in m["files"].values())
        assert m["files"]["reference/items.json"]["holds"] == "the synthetic reference inputs' numbers only"
        assert m["files"]["reference/inputs.npz"]["holds"].startswith("synthetic inputs made by edgeft")
        assert m["reference"]["kind"] == "synthetic"
