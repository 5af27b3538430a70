"""quantize on tiny models: each mode keeps parity with the fp32 export, breakage is refused."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from tolerance import dot_tolerance, softmax_sum_tolerance

import edgeft.quantize.budget as Q
from edgeft.cli import main
from edgeft.errors import ParityError, UsageError
from edgeft.export import export
from edgeft.quantize import quantize, quantize_model
from edgeft.runtime.session import OnnxModel

ONNX_FILES = ("backbone.onnx", "head.onnx", "model.onnx")
PRECISION = {"dynamic": "int8", "static": "int8", "fp16": "fp16"}


def _weights(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _weight_bytes(path) -> int:
    return sum(a.nbytes for a in _weights(path).values())


def _meta(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["edgeft"])


@pytest.fixture(scope="module")
def text_export(full_text_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qexports") / "text"
    export(full_text_run, out)
    return out


@pytest.fixture(scope="module")
def text_quantized(text_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {m: (root / m, quantize(text_export, m, root / m, uncertified=True)) for m in ("dynamic", "static", "fp16")}


@pytest.fixture(scope="module")
def image_export(full_image_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qimage") / "export"
    export(full_image_run, out)
    return out


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_text_modes_keep_parity_and_layout(mode, text_quantized, text_export, full_text_run):
    out, info = text_quantized[mode]
    assert {p.name for p in out.iterdir()} == {*ONNX_FILES, "tokenizer.json", "preprocessor.json", "labels.json",
                                               "quantize.json", "export.json"}
    for f in ONNX_FILES:
        m = onnx.load(str(out / f))
        onnx.checker.check_model(m)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
        meta = _meta(out / f)
        assert meta["precision"] == PRECISION[mode] and meta["part"] == f.removesuffix(".onnx")
        assert meta["labels"] == ["belt", "motor", "pump"] and meta["quantization"]["head"] == "fp32"
    # the head is the fp32 export's, untouched: the device retrains it in fp32
    fp32_head, head = _weights(text_export / "head.onnx"), _weights(out / "head.onnx")
    assert fp32_head.keys() == head.keys()
    assert all(np.array_equal(fp32_head[k], head[k]) for k in head)
    # the backbone's weights are int8 (or fp16) and smaller
    dtypes = {a.dtype for a in _weights(out / "backbone.onnx").values()}
    assert np.dtype(np.int8 if mode != "fp16" else np.float16) in dtypes
    ratio = _weight_bytes(out / "backbone.onnx") / _weight_bytes(text_export / "backbone.onnx")
    assert ratio < (0.55 if mode == "fp16" else 0.9), ratio  # static leaves the embeddings fp32
    if mode != "static":  # a tiny graph's Q/DQ nodes outweigh what static saves; MiniLM: 91 -> 59 MB
        assert info.files["backbone.onnx"]["bytes"] < info.files["backbone.onnx"]["fp32_bytes"]
    p = info.parity
    assert all(c["passed"] for c in p["checks"]) and [c["name"] for c in p["checks"]] == ["agreement", "accuracy_drop"]
    assert p["agreement"] >= 0.99 and p["accuracy_drop"] <= 0.005 and p["labelled_rows"] == 18
    # every row calibration did not use judges: the 18 validation rows, and fp16 (uncalibrated) the 48 training rows
    assert p["sources"] == ({"validation": 18, "training": 48} if mode == "fp16" else {"validation": 18})
    assert p["rows"] == sum(p["sources"].values()) and p["certified"] is False
    # the same quantized backbone in both graphs: only the float32 head's rounding differs, within
    # the a priori bound of two float32 evaluations of X @ W.T + b (tests/tolerance.py), X the
    # backbone's features of the validation rows judged
    from edgeft.runs import read_run, validation_data
    from edgeft.runtime.head import read_head_onnx
    from edgeft.runtime.preprocess import load_preprocessor

    pre = load_preprocessor(out, json.loads((out / "preprocessor.json").read_text()))
    rows = validation_data(read_run(full_text_run)["validation"]).items
    feats = np.concatenate([OnnxModel(out / "backbone.onnx")(pre(rows[i : i + 1]))["features"] for i in range(len(rows))])
    assert p["fused_vs_split_max_abs_diff"] <= dot_tolerance(feats, *read_head_onnx(out / "head.onnx")).max()
    assert info.latency["fp32_ms"] > 0 and info.latency["quantized_ms"] > 0 and info.latency["batch"] == 1
    assert json.loads((out / "quantize.json").read_text()) == info.to_json()
    assert json.loads((out / "export.json").read_text())["precision"] == PRECISION[mode]
    assert "MatMul" in info.op_types and (mode != "static" or info.op_types == ["MatMul"])
    # dynamic and static draw training rows (the search ranks nodes on them; static calibrates on
    # them), stratified across classes; fp16 reads none, so all 48 training rows judge
    if mode == "fp16":
        assert info.calibration is None
    else:
        c = info.calibration
        assert c["rows"] == c["of"] == 48 and c["data"].endswith("train.csv") and "stratified" in c["drawn"]
        assert c["used"] == ("calibrates" if mode == "static" else
                             "set aside for the search's ranking (no search was needed)")


def test_quantized_model_has_dynamic_axes_and_probs(text_quantized, text_export):
    from edgeft.runtime.preprocess import load_preprocessor

    out, _ = text_quantized["dynamic"]
    pre = load_preprocessor(out, json.loads((out / "preprocessor.json").read_text()))
    texts = ["pump seal leak", "motor winding breaker fuse voltage noted again today", "belt"]
    q, ref = OnnxModel(out / "model.onnx"), OnnxModel(text_export / "model.onnx")
    got, want = q(pre(texts)), ref(pre(texts))
    assert got["logits"].shape == (3, 3) and q.outputs == ["logits", "probs"]
    np.testing.assert_allclose(got["probs"].sum(-1), 1.0, atol=softmax_sum_tolerance(3), rtol=0)  # a float32 head
    assert (got["logits"].argmax(1) == want["logits"].argmax(1)).all()


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_verify_passes_with_quantized_thresholds(mode, text_quantized, full_text_run, text_data, tmp_path):
    out, _ = text_quantized[mode]
    r = CliRunner().invoke(main, ["verify", str(out), "--reference", str(full_text_run), "--data",
                                  str(text_data["val"]), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["precision"] == PRECISION[mode]
    assert rep["thresholds"] == {"max_abs_diff": None, "min_agreement": 0.99, "max_accuracy_drop": 0.005}
    assert [c["name"] for c in rep["checks"]] == ["labels", "agreement", "accuracy_drop"]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_image_int8(mode, image_export, tmp_path):
    info = quantize(image_export, mode, tmp_path / "q", uncertified=True)
    # dynamic: the convolutions; static also the activations after them and the residual Adds, so
    # each Conv output is quantized with its activation's range (quantize.static)
    assert info.op_types == (["Conv"] if mode == "dynamic" else ["Add", "Conv", "Relu"])
    assert all(c["passed"] for c in info.parity["checks"]) and info.parity["agreement"] >= 0.99
    assert _meta(tmp_path / "q" / "model.onnx")["precision"] == "int8"
    assert {p.name for p in (tmp_path / "q").iterdir()} >= {*ONNX_FILES, "preprocessor.json", "labels.json"}
    # 3 kB of conv weights: int8 shrinks them, though per-channel scales and node names outweigh it on disk
    assert _weight_bytes(tmp_path / "q" / "backbone.onnx") < 0.6 * _weight_bytes(image_export / "backbone.onnx")


def _corrupting(real, only: str | None = None, loud: bool = False):
    """A quantizer that writes garbage int8 weights (all, or those of weight `only`): what the
    gate must catch, whatever the cause. `only` or `loud`: at 100 times their scale, too."""

    def run(src, dst, mode, **kw):
        result = real(src, dst, mode, **kw)
        m = onnx.load(str(dst))
        rng = np.random.default_rng(0)
        for init in m.graph.initializer:  # int8 matrices and uint8 embedding tables
            if only is not None and not init.name.startswith(only):
                continue
            w = numpy_helper.to_array(init)
            if (only is not None or loud) and init.name.endswith("_scale"):  # and 100 times their scale
                init.CopyFrom(numpy_helper.from_array((w * 100).astype(w.dtype), init.name))
            if w.dtype in (np.int8, np.uint8) and w.ndim == 2:
                info = np.iinfo(w.dtype)
                init.CopyFrom(numpy_helper.from_array(rng.integers(info.min, info.max + 1, w.shape).astype(w.dtype),
                                                      init.name))
        onnx.save(m, str(dst))
        return result

    return run


def test_broken_quantization_is_refused_and_nothing_written(text_export, tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "quantize_model", _corrupting(Q.quantize_model))
    with pytest.raises(ParityError, match=r"dynamic quantization misses the budget .* top-1 agreement") as e:
        quantize(text_export, "dynamic", tmp_path / "q", search=False, uncertified=True)
    assert "Nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
    # the CLI: one line, exit 1
    r = CliRunner().invoke(main, ["-q", "quantize", "--uncertified", str(text_export), "--mode", "dynamic", "--no-search", "-o", str(tmp_path / "q")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output and not (tmp_path / "q").exists()


def _weight_nodes(path) -> list[tuple[str, str]]:
    """(node name, weight initializer name) of every MatMul with a weight, in graph order."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    return [(n.name, i) for n in m.graph.node if n.op_type == "MatMul" for i in n.input if i in inits]


def test_search_keeps_exactly_the_harmful_node_in_float(text_export, tmp_path, monkeypatch):
    """One node's int8 weights are garbage (a stand-in for a node int8 cannot hold): the plain
    variant misses the budget; the sensitivity ranking puts that node first and the search
    keeps it, and only it, in float."""
    node, weight = _weight_nodes(text_export / "backbone.onnx")[3]
    monkeypatch.setattr(Q, "quantize_model", _corrupting(Q.quantize_model, only=weight))
    info = quantize(text_export, "dynamic", tmp_path / "q", uncertified=True)
    assert info.kept_float == [node]
    assert info.search["ranking"][0]["name"] == node
    assert info.all_int8["agreement"] < 0.99 and info.parity["agreement"] >= 0.99
    assert info.search["cost"]["extra_bytes"] > 0  # what the float node costs, reported
    meta = json.loads(onnx.load(str(tmp_path / "q" / "model.onnx")).metadata_props[0].value)
    assert meta["quantization"]["kept_float"] == [node]
    # the shipped backbone really has that node in float and the others in int8
    q = onnx.load(str(tmp_path / "q" / "backbone.onnx"))
    names = {n.name: n.op_type for n in q.graph.node}
    assert names.get(node) == "MatMul" and "MatMulInteger" in names.values()
    r = CliRunner().invoke(main, ["quantize", "--uncertified", str(text_export), "--mode", "dynamic", "-o", str(tmp_path / "q2")])
    assert r.exit_code == 0, r.output
    assert f"kept in float: 1 of {info.search['nodes']} nodes" in r.output and node in r.output


def test_a_budget_that_cannot_be_met_fails_with_the_numbers(text_export, tmp_path, monkeypatch):
    import edgeft.quantize.search as S

    monkeypatch.setattr(Q, "quantize_model", _corrupting(Q.quantize_model, loud=True))  # every int8 matrix is garbage
    monkeypatch.setattr(S, "MAX_FLOAT_SHARE", 0.01)  # and the search may keep only one node in float
    with pytest.raises(ParityError) as e:
        quantize(text_export, "dynamic", tmp_path / "q", uncertified=True)
    msg = str(e.value)
    assert "top-1 agreement" in msg and re.search(r"even with 1 of \d+ nodes kept in float \(the search stops at 1\)", msg)
    assert "\n" not in msg and list(tmp_path.iterdir()) == []


def test_static_over_every_op_type_is_still_judged(text_export, tmp_path, monkeypatch):
    """The op-type restriction is a default, not the safety net: the parity gate is.

    Over every op type, static QDQ broke MiniLM's attention mask in older exports; this
    tiny BERT's Where-based mask survives it, so either outcome is judged by the numbers.
    """
    from edgeft.quantize.static import STATIC_OP_TYPES

    monkeypatch.setitem(STATIC_OP_TYPES, "text", None)
    try:
        info = quantize(text_export, "static", tmp_path / "q", uncertified=True)
    except ParityError as e:
        assert "agreement" in str(e) and not (tmp_path / "q").exists()
        return
    assert len(info.op_types) > 1 and all(c["passed"] for c in info.parity["checks"])


def test_calibration_file_and_fallback_parity_rows(text_export, text_data, tmp_path):
    unlabelled = tmp_path / "calib.csv"
    unlabelled.write_text("text\n" + "\n".join(t for t, _ in
                                                 [r.split(",") for r in text_data["train"].read_text().splitlines()[1:]]))
    info = quantize(text_export, "static", tmp_path / "q", calibration=unlabelled, uncertified=True)
    assert {k: info.calibration[k] for k in ("data", "rows", "of")} == {"data": str(unlabelled), "rows": 48, "of": 48}
    assert info.parity["data"].endswith("val.csv")  # parity stays on held-out rows
    # an export whose validation rows are gone: the calibration rows check parity instead
    orphan = tmp_path / "orphan"
    shutil.copytree(text_export, orphan)
    meta = json.loads((orphan / "export.json").read_text())
    (orphan / "export.json").write_text(json.dumps({**meta, "validation": None}))
    with pytest.raises(UsageError, match="validation data is gone"):
        quantize(orphan, "dynamic", tmp_path / "q2", uncertified=True)
    info = quantize(orphan, "dynamic", tmp_path / "q2", calibration=text_data["val"], uncertified=True)
    assert info.parity["data"] == str(text_data["val"]) and "accuracy_drop" in info.parity
    # that one file both calibrates and judges: half of it each, disjoint (the training rows judge too)
    c = info.calibration
    assert (c["rows"], c["of"]) == (9, 18) and "shared" in c
    assert info.parity["sources"] == {"calibration": 9, "training": 48}
    # the training rows gone too: half the validation rows calibrate, the other half judge
    alone = tmp_path / "alone"
    shutil.copytree(text_export, alone)
    (alone / "export.json").write_text(json.dumps({**json.loads((text_export / "export.json").read_text()),
                                                   "source": str(tmp_path / "gone")}))
    info = quantize(alone, "static", tmp_path / "q4", uncertified=True)
    assert (info.calibration["rows"], info.calibration["of"]) == (9, 18)
    assert info.parity["sources"] == {"validation": 9} and info.parity["labelled_rows"] == 9
    info = quantize(orphan, "fp16", tmp_path / "q3", calibration=unlabelled, uncertified=True)
    assert "accuracy_drop" not in info.parity and info.parity["rows"] == 48


def test_quantize_model_api_and_bad_requests(full_text_run, text_export, text_quantized, tmp_path):
    r = quantize_model(text_export / "backbone.onnx", tmp_path / "b.onnx", "dynamic", modality="text")
    assert r["mode"] == "dynamic" and r["per_channel"] and r["bytes"] == (tmp_path / "b.onnx").stat().st_size
    assert "MatMul" in r["op_types"] and _meta(tmp_path / "b.onnx")["precision"] == "int8"
    with pytest.raises(UsageError, match='Did you mean "dynamic"'):
        quantize_model(text_export / "backbone.onnx", tmp_path / "c.onnx", "dynamc", modality="text")
    with pytest.raises(UsageError, match="needs calibration"):
        quantize_model(text_export / "backbone.onnx", tmp_path / "c.onnx", "static", modality="text")
    old = tmp_path / "opset11"
    export(full_text_run, old, opset=11)
    with pytest.raises(UsageError, match="opset 13 or newer"):
        quantize_model(old / "backbone.onnx", tmp_path / "c.onnx", "static", modality="text", calibration=[{}])
    info = quantize(old, "static", tmp_path / "q11", per_channel=False, uncertified=True)
    assert not info.per_channel and onnx.load(str(tmp_path / "q11" / "model.onnx")).opset_import[0].version == 11
    with pytest.raises(UsageError, match="already int8"):
        quantize(text_quantized["dynamic"][0], "dynamic", tmp_path / "again", uncertified=True)
    with pytest.raises(UsageError, match="already exists"):
        quantize(text_export, "dynamic", text_quantized["dynamic"][0], uncertified=True)


def test_cli_happy_path_and_bad_input(text_export, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", "--uncertified", str(text_export), "--mode", "dynamic", "--output", str(out)])
    assert r.exit_code == 0, r.output
    line = r.stdout.strip()
    assert line.startswith("quantize  ok  ") and "  dynamic  backbone.onnx " in line and "(fp32 " in line
    assert "agreement 100.0%" in line and "accuracy drop 0.0 pt" in line and line.endswith(f"-> {out}")
    assert (out / "quantize.json").exists()

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\npump leak,pump\nbelt,unknown-label\n")
    r = CliRunner().invoke(main, ["quantize", "--uncertified", str(text_export), "--mode", "static", "--calibration", str(bad),
                                  "-o", str(tmp_path / "q2")])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {bad}: line 3: unknown label 'unknown-label'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "q2").exists()
    r = CliRunner().invoke(main, ["quantize", "--uncertified", str(tmp_path), "--mode", "fp16", "-o", str(tmp_path / "q3")])
    assert r.exit_code == 2 and "not a folder from edgeft export" in r.stderr



def test_weight_only_keeps_excluded_nodes_in_float(text_export, tmp_path):
    """The search keeps nodes in float by name in weight-only mode too (MatMulNBits and the int8
    embedding tables alike)."""
    from edgeft.quantize import quantize_model

    node, _ = _weight_nodes(text_export / "backbone.onnx")[2]
    m = onnx.load(str(text_export / "backbone.onnx"))
    gather = next(n.name for n in m.graph.node if n.op_type == "Gather" and "word_embeddings" in n.name)
    quantize_model(text_export / "backbone.onnx", tmp_path / "w.onnx", "weight-only", modality="text",
                   exclude=[node, gather])
    q = onnx.load(str(tmp_path / "w.onnx"))
    ops = {n.name: n.op_type for n in q.graph.node}
    assert ops[node] == "MatMul" and "MatMulNBits" in ops.values()
    # the excluded embedding table stays float; the position table is int8
    inits = {i.name: i.data_type for i in q.graph.initializer}
    table = {n.name: n.input[0] for n in q.graph.node if n.op_type == "Gather"}
    position = next(n for n in table if "position_embeddings" in n)
    assert inits[table[gather]] == onnx.TensorProto.FLOAT
    assert inits.get(table[position]) in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def test_the_cli_offers_exactly_the_registered_modes():
    """`edgeft quantize --mode` lists its choices without importing the quantizers (a fast
    --help); they must be the registry's, in its order."""
    from edgeft.quantize import names

    option = next(p for p in main.commands["quantize"].params if p.name == "mode")
    assert tuple(option.type.choices) == names() == ("dynamic", "dynamic-fused", "dynamic-smooth",
                                                     "dynamic-smooth-fused", "static", "nncf", "fp16", "weight-only",
                                                     "weight-only-fused")
    with pytest.raises(UsageError, match=r"--mode: unknown mode 'dynamc'.*dynamic"):
        quantize_model("x.onnx", "y.onnx", "dynamc", modality="text")


# ---------------------------------------------------------------- fused transformer graphs


def test_fused_graph_has_the_fused_ops_and_the_fp32_answers(full_text_run, text_export, tmp_path):
    """ONNX Runtime's BERT fusions on the tiny BERT's export: what fused, and the fused fp32 graph
    as close to the float64 model as float32 PyTorch allows (tests/tolerance.py), unpadded and padded."""
    from tolerance import assert_float32_close, float32_tolerance, logits64

    from edgeft.quantize.fuse import fuse
    from edgeft.runs import load_model, predict_logits, validation_data

    info = fuse(text_export / "backbone.onnx", tmp_path / "fused.onnx")
    # 2 layers: the embeddings' layer norm, per layer one attention, two skip layer norms, one bias GELU
    assert info["fused"] == {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}
    assert (info["num_heads"], info["hidden_size"], info["heads_from"]) == (2, 32, "model config")
    m = onnx.load(str(tmp_path / "fused.onnx"))
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx", "com.microsoft"}  # no training/aten domains
    assert not {"Softmax", "Erf", "LayerNormalization"} & {n.op_type for n in m.graph.node}
    assert _meta(tmp_path / "fused.onnx")["labels"] == ["belt", "motor", "pump"]  # the export's metadata stays

    loaded = load_model(full_text_run)
    items = validation_data(loaded.info["validation"]).items
    exact = logits64(loaded.model, loaded.pre, items)
    tol = float32_tolerance(exact, predict_logits(loaded.model, loaded.pre, items).numpy())
    backbone, head = OnnxModel(tmp_path / "fused.onnx"), OnnxModel(text_export / "head.onnx")
    for size in (1, 5):  # batch 5: texts of different lengths, so padding and the attention mask count
        got = np.concatenate([head({"features": backbone(loaded.pre(items[i : i + size]))["features"]})["logits"]
                              for i in range(0, len(items), size)])
        assert_float32_close(got, exact, tol, f"fused fp32, batch {size}")


def test_dynamic_fused_quantizes_the_fused_graph(text_export, tmp_path):
    """`edgeft quantize --mode dynamic-fused`: the fused graph gated as fp32, then dynamic int8 of
    it (QAttention, QEmbedLayerNormalization), within the int8 budget; quantize.json says what fused."""
    info = quantize(text_export, "dynamic-fused", tmp_path / "q", uncertified=True)
    fusion = info.fusion
    assert fusion["passed"] and fusion["fused"]["Attention"] == 2 and fusion["rows"] == info.parity["rows"]
    # judged as a float32 step: against the unfused graph, within twice the export's float32 limit
    limit = json.loads((text_export / "export.json").read_text())["parity"].get("max_abs_diff_limit", 1e-4)
    assert fusion["limit"] == 2 * limit and fusion["max_abs_diff_vs_unfused"] <= fusion["limit"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "backbone.onnx")).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization", "MatMulInteger"} <= ops and "Attention" not in ops
    assert info.parity["agreement"] >= 0.99
    assert _meta(tmp_path / "q" / "model.onnx")["quantization"]["fused"] == fusion["fused"]


def test_fused_mode_refuses_an_image_model(image_export, tmp_path):
    from edgeft.quantize import quantize_model

    with pytest.raises(UsageError, match="fuses transformer text backbones"):
        quantize_model(image_export / "backbone.onnx", tmp_path / "q.onnx", "dynamic-fused", modality="image")


def test_cli_quantize_certifies_on_the_bound_and_parity_data_brings_the_rows(text_export, tmp_path):
    """`edgeft quantize` judges on every row calibration did not draw: here the 18 validation rows
    (the 48 training rows are drawn for the search's ranking). The point estimate passes with
    --uncertified; on the bound, 18 rows cannot certify 99% at 95% confidence (299 with no flip
    could), so it is refused, exit 1, nothing written; 900 unlabelled inputs (--parity-data) pass."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import text_rows

    args = ["quantize", str(text_export), "--mode", "dynamic", "--no-search"]
    r = CliRunner().invoke(main, [*args, "--uncertified", "-o", str(tmp_path / "point")])
    assert r.exit_code == 0, r.output
    assert "on 18 rows (18 validation)" in r.stdout and "(uncertified)" in r.stdout
    assert "48 of 48 rows of " in r.stdout and "drawn to calibrate" in r.stdout
    point = json.loads((tmp_path / "point" / "quantize.json").read_text())
    assert point["parity"]["certified"] is False and point["parity"]["agreement"] == 1.0
    assert point["parity"]["bounds"]["agreement_lower"] < 0.99 and point["calibration"]["rows"] == 48

    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "few")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert re.search(r"18 rows to judge \(18 validation\) cannot certify 99.00% agreement at 95% confidence: "
                     r"that takes at least 299 rows with no flip \(281 more\).*--parity-data", r.stderr), r.stderr
    assert "Nothing was written" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "few").exists() and {p.name for p in tmp_path.iterdir()} == {"point"}

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(t for t, _ in text_rows(300, 11)) + "\n", encoding="utf-8")
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "many"), "--parity-data", str(inputs)])
    assert r.exit_code == 0, r.output
    assert "on 918 rows (18 validation + 900 parity-data)" in r.stdout and "(uncertified)" not in r.stdout
    many = json.loads((tmp_path / "many" / "quantize.json").read_text())
    p = many["parity"]
    assert p["certified"] is True and p["sources"] == {"validation": 18, "parity-data": 900} and p["rows"] == 918
    assert p["bounds"]["agreement_lower"] >= 0.99 and p["bounds"]["labelled_rows"] == 18
    assert all(c["passed"] for c in p["checks"])
