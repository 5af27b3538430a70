"""merge, export and verify on tiny models: merged == unmerged, ONNX == PyTorch, the CI gate."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tolerance import EPS32, K, assert_float32_close, float32_tolerance, logits64

from edgeft.cli import main
from edgeft.config import TrainConfig
from edgeft.errors import ParityError, UsageError
from edgeft.export import FILES, export
from edgeft.merge import merge
from edgeft.runs import load_model, predict_logits, validation_data
from edgeft.runtime.session import OnnxModel
from edgeft.train import train


def _train(model, data, out, method, **kw):
    kw.setdefault("epochs", 2)
    train(TrainConfig(model=str(model), data=str(data), output=str(out), method=method, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def text_model_dir(lora_text_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "text"
    merge(lora_text_run, out)
    return out


@pytest.fixture(scope="module")
def merged_text_export(text_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "text"
    export(text_model_dir, out)
    return out


def test_merged_equals_unmerged(lora_text_run, text_model_dir, tiny_bert, text_data):
    run, merged = load_model(lora_text_run), load_model(text_model_dir)
    ds = validation_data(run.info["validation"])
    a = predict_logits(run.model, run.pre, ds.items).numpy()
    b = predict_logits(merged.model, merged.pre, ds.items).numpy()
    # the unmerged model (base + adapters) in float64 is the exact answer; merged float32 must be as
    # close to it as float32 arithmetic allows (tests/tolerance.py), whatever the CPU
    exact = logits64(run.model, run.pre, ds.items)
    assert_float32_close(b, exact, float32_tolerance(exact, a), "merged")
    # the adapters did change the backbone: merging is not a no-op
    from edgeft.models import build_backbone, load_spec

    base, _ = build_backbone(load_spec(str(tiny_bert), "mean"))
    q = "encoder.layer.0.attention.self.query.weight"
    # (allclose's default rtol 1e-5: trained adapters move weights by far more than rounding)
    assert not torch.allclose(base.model.state_dict()[q], merged.model.backbone.model.state_dict()[q])
    info = json.loads((text_model_dir / "edgeft.json").read_text())
    # merge's own report: merged against unmerged float32, on these rows: one PyTorch error more
    assert info["merge"]["rows"] == len(ds.items)
    assert info["merge"]["max_abs_diff"] <= float32_tolerance(exact, a, k=K + 1) and info["merge"]["merged_lora"]
    assert info["labels"] == ["belt", "motor", "pump"] and info["pooling"] == "mean"
    cfg = json.loads((text_model_dir / "config.json").read_text())
    assert cfg["id2label"] == {"0": "belt", "1": "motor", "2": "pump"}
    assert not any("lora" in k for k in load_file(str(text_model_dir / "model.safetensors")))


# the image case trains and runs a float64 MobileNetV2 reference (17-100 s on 2 cores): full suite only
@pytest.mark.parametrize("model,data", [("tiny_bert", "text"),
                                        pytest.param("tiny_mobilenet", "image", marks=pytest.mark.slow)])
def test_ia3_merges_and_exports_like_lora(model, data, text_data, image_data, tmp_path, request):
    """(IA)3's scaling vectors fold into the weights: the merged model answers as the unmerged one
    (within float32's reach against its float64 run), holds no ia3 weights, and exports with parity."""
    path = request.getfixturevalue(model)
    train_data = text_data["train"] if data == "text" else image_data
    run = tmp_path / "run"
    train(TrainConfig(model=str(path), data=str(train_data), output=str(run), method="ia3", epochs=2,
                      batch_size=8, lr=5e-2, progress=False, **({"pooling": "mean"} if data == "text" else {})))
    loaded = load_model(run)
    items = validation_data(loaded.info["validation"]).items
    a = predict_logits(loaded.model, loaded.pre, items).numpy()
    exact = logits64(loaded.model, loaded.pre, items)
    merge(run, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    b = predict_logits(merged.model, merged.pre, items).numpy()
    assert_float32_close(b, exact, float32_tolerance(exact, a), "ia3 merged")
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("ia3" in k for k in weights)
    info = json.loads((tmp_path / "merged" / "edgeft.json").read_text())
    assert info["merge"]["merged_lora"]  # the adapters were folded (the key predates (IA)3)
    out = export(tmp_path / "merged", tmp_path / "export").to_json()
    assert all(c["passed"] for c in out["parity"]["checks"]) and out["parity"]["agreement"] == 1.0


def test_merged_dir_loads_with_transformers(text_model_dir):
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(text_model_dir)
    tok = AutoTokenizer.from_pretrained(text_model_dir)
    assert tok("pump leak")["input_ids"][0] == tok.cls_token_id


def test_merge_refuses_existing_output(lora_text_run, text_model_dir):
    with pytest.raises(UsageError, match="already exists"):
        merge(lora_text_run, text_model_dir)


def _exact_and_tolerance(loaded, items, k=K):
    """The float64 logits of `items` and how far float32 may be from them (tests/tolerance.py)."""
    exact = logits64(loaded.model, loaded.pre, items)
    return exact, float32_tolerance(exact, predict_logits(loaded.model, loaded.pre, items).numpy(), k=k)


def test_export_files_and_metadata(merged_text_export, text_model_dir):
    for f in FILES:
        m = onnx.load(str(merged_text_export / f))
        onnx.checker.check_model(m)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
        meta = json.loads({p.key: p.value for p in m.metadata_props}["edgeft"])
        assert meta["labels"] == ["belt", "motor", "pump"] and meta["precision"] == "fp32"
    info = json.loads((merged_text_export / "export.json").read_text())
    ref = load_model(text_model_dir)
    rows = validation_data(ref.info["validation"]).items  # the rows export judged (all 18)
    _, tol = _exact_and_tolerance(ref, rows, k=K + 1)  # ONNX against float32 PyTorch
    assert info["parity"]["rows"] == len(rows)
    assert info["parity"]["max_abs_diff"] <= tol and info["parity"]["agreement"] == 1.0, (info["parity"], tol)
    # the library's own gate is the same rule (edgeft.float32), measured on the same rows
    limit = info["parity"]["max_abs_diff_limit"]
    assert 0.5 * tol < limit < 2 * tol, (limit, tol)
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    fused = OnnxModel(merged_text_export / "model.onnx")
    assert fused.outputs == ["logits", "probs"]
    dims = [d.dim_param for d in onnx.load(str(merged_text_export / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_onnx_equals_pytorch_with_padding_and_batch_sizes(merged_text_export, text_model_dir):
    ref = load_model(text_model_dir)
    fused, backbone, head = (OnnxModel(merged_text_export / f) for f in ("model.onnx", "backbone.onnx", "head.onnx"))
    texts = ["pump", "motor winding breaker fuse voltage current phase relay noted again today",
             "belt conveyor roller", "seal leak", "the unit at line check", "sprocket"]
    # every float32 answer (fused, split, alone or padded in any batch) within float32's reach of the
    # float64 logits (tests/tolerance.py); in exact arithmetic padding changes nothing
    exact, tol = _exact_and_tolerance(ref, texts)
    for size in (1, 2, 5, 6):
        for i in range(0, len(texts), size):
            arrays = ref.pre(texts[i : i + size])
            out = fused(arrays)
            assert_float32_close(out["logits"], exact[i : i + size], tol, f"fused, batch of {size}")
            # three float32 probabilities: their sum is 1 within a few float32 ulps each
            np.testing.assert_allclose(out["probs"].sum(-1), 1.0, atol=3 * 8 * EPS32, rtol=0)
            split = head({"features": backbone(arrays)["features"]})["logits"]
            assert_float32_close(split, exact[i : i + size], tol, f"backbone then head, batch of {size}")
    # a text alone gives the same logits as inside a padded batch
    assert_float32_close(fused(ref.pre([texts[0]]))["logits"], exact[:1], tol, "alone")
    assert_float32_close(fused(ref.pre(texts[:2]))["logits"][:1], exact[:1], tol, "beside a longer text")


@pytest.mark.parametrize("model,method", [  # the two deep CNNs train and export slowest: full suite only
    pytest.param("tiny_effnet", "lora", marks=pytest.mark.slow), ("tiny_vit", "head"),
    pytest.param("tiny_mobilenet", "bitfit", marks=pytest.mark.slow), ("tiny_resnet", "full")])
def test_image_export_equals_pytorch(model, method, image_data, tmp_path, request):
    run = _train(request.getfixturevalue(model), image_data, tmp_path / "run", method, epochs=1)
    merge(run, tmp_path / "model")
    info = export(tmp_path / "model", tmp_path / "export").to_json()
    assert json.loads((tmp_path / "export" / "export.json").read_text()) == info  # the result is the file
    ref = load_model(tmp_path / "model")
    fused = OnnxModel(tmp_path / "export" / "model.onnx")
    items = sorted(str(p) for p in image_data.rglob("*.png"))  # every image: the export's rows are among them
    exact = logits64(ref.model, ref.pre, items)
    torch32 = predict_logits(ref.model, ref.pre, items).numpy()
    # tolerances from float32 PyTorch's own distance to float64 on these images (tests/tolerance.py):
    # a random deep CNN (the tiny MobileNetV2) amplifies rounding far more than the tiny ViT does
    tol = float32_tolerance(exact, torch32)
    # the export's report compares ONNX with float32 PyTorch (one PyTorch error more), and fused with
    # split ONNX (two float32 computations, each within tol of float64)
    assert info["parity"]["max_abs_diff"] <= float32_tolerance(exact, torch32, k=K + 1), (info["parity"], tol)
    assert info["parity"]["fused_vs_split_max_abs_diff"] <= 2 * tol, (info["parity"], tol)
    for size in (1, 5):
        arrays = ref.pre(items[:size])
        assert_float32_close(fused(arrays)["logits"], exact[:size], tol, f"{model} ONNX batch {size}")


def test_export_straight_from_a_run_and_opset(lora_text_run, tmp_path):
    info = export(lora_text_run, tmp_path / "e", opset=14).to_json()
    run = load_model(lora_text_run)
    _, tol = _exact_and_tolerance(run, validation_data(run.info["validation"]).items, k=K + 1)
    assert info["parity"]["max_abs_diff"] <= tol, (info["parity"], tol)
    assert onnx.load(str(tmp_path / "e" / "model.onnx")).opset_import[0].version == 14
    with pytest.raises(UsageError, match="--opset"):
        export(lora_text_run, tmp_path / "bad", opset=3)


def _verify(*args):
    r = CliRunner().invoke(main, ["verify", *map(str, args)])
    return r


def test_verify_passes_a_good_export(merged_text_export, text_model_dir, text_data, tmp_path):
    r = _verify(merged_text_export, "--reference", text_model_dir, "--data", text_data["val"],
                "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert r.exit_code == 0, r.output
    assert "verify  ok" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("max_abs_diff", "mean_abs_diff", "agreement", "accuracy", "reference_accuracy", "passed"):
        assert key in rep
    assert rep["passed"] and rep["rows"] == 18
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == ["labels", "max_abs_diff", "agreement"]
    # `--json FILE` is the old spelling of `--json-file FILE`: it still writes the file, with a notice
    assert r.stderr.splitlines()[0] == (f"notice: --json {tmp_path / 'r.json'} is the old spelling; write the file "
                                        f"with --json-file {tmp_path / 'r.json'} (--json alone prints the report).")


def test_verify_json_convention(merged_text_export, text_model_dir, text_data, tmp_path):
    args = (merged_text_export, "--reference", text_model_dir, "--data", text_data["val"])
    r = _verify(*args, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]  # stdout holds the JSON and nothing else
    assert r.stderr.strip().startswith("verify  ok")
    r = _verify(*args, "--json-file", tmp_path / "v.json", "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1].startswith("verify  ok") and r.stderr == ""
    assert json.loads((tmp_path / "v.json").read_text())["rows"] == 18


def test_verify_fails_a_damaged_model(merged_text_export, text_model_dir, text_data, tmp_path):
    """Perturbed head weights: the gate exits 1 and JUnit names the failed checks."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    m = onnx.load(str(merged_text_export / "model.onnx"))
    for init in m.graph.initializer:
        if init.name.startswith("head/") and len(init.dims) == 2:
            w = onnx.numpy_helper.to_array(init).copy()
            w += np.random.default_rng(0).normal(0, 0.5, w.shape).astype(w.dtype)
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(m, str(damaged / "model.onnx"))
    r = _verify(damaged / "model.onnx", "--reference", text_model_dir, "--data", text_data["val"],
                "--junit", tmp_path / "r.xml")
    assert r.exit_code == 1, r.output
    assert "verify  FAILED" in r.stderr and "max |Δ logits|" in r.stderr
    suite = ET.parse(tmp_path / "r.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert "max_abs_diff" in failed
    # a loose enough threshold lets the same model through: the thresholds are real
    r = _verify(damaged / "model.onnx", "--reference", text_model_dir, "--data", text_data["val"],
                "--max-abs-diff", "100", "--min-agreement", "0")
    assert r.exit_code == 0, r.output


def test_verify_bad_input_exits_2(merged_text_export, text_model_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\npump leak,pump\nbelt,unknown-label\n")
    r = _verify(merged_text_export, "--reference", text_model_dir, "--data", bad)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {bad}: line 3: unknown label 'unknown-label'")
    assert "Traceback" not in r.output
    r = _verify(tmp_path, "--reference", text_model_dir, "--data", bad)
    assert r.exit_code == 2 and "no model.onnx or manifest.json here" in r.stderr


def test_export_parity_gate_catches_a_broken_exporter(text_model_dir, tmp_path, monkeypatch):
    """If the exported head were wrong, export itself fails loudly and leaves nothing behind."""
    import edgeft.export as E

    real = E._Head.forward

    def wrong(self, features):
        logits, probs = real(self, features)
        return logits * 1.5, probs

    monkeypatch.setattr(E._Head, "forward", wrong)
    with pytest.raises(ParityError, match="ONNX differs from PyTorch"):
        export(text_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_merge_and_export_cli(lora_text_run, tmp_path):
    r = CliRunner().invoke(main, ["merge", str(lora_text_run), "--output", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("merge  ok")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "m"), "--output", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("export  ok") and "agreement 100.00%" in r.stdout
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "nope"), "--output", str(tmp_path / "m2")])
    assert r.exit_code == 2


def test_head_run_merges_to_the_same_layout(tiny_bert, text_data, tmp_path):
    run = _train(tiny_bert, text_data["train"], tmp_path / "run", "head")
    info = merge(run, tmp_path / "model").to_json()
    # nothing to merge: the same float32 model on the same rows, so the same bits on any CPU
    assert info["max_abs_diff"] == 0.0 and not info["merged_lora"]
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"config.json", "model.safetensors",
                                                                "head.safetensors", "edgeft.json", "tokenizer.json"}
    head = load_file(str(tmp_path / "model" / "head.safetensors"))
    trained = load_file(str(run / "trained.safetensors"))
    assert torch.equal(head["weight"], trained["head.weight"])
    save_file(head, str(tmp_path / "copy.safetensors"))  # plain safetensors, nothing pickled
