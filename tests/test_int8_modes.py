"""The int8 modes beside dynamic on the tiny BERT: SmoothQuant-style smoothing (edgeft.quantize.smooth)
is exact in float and quantizes; weight-only int8 of the fused graph; what the cpu target tries."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tolerance import assert_float32_close, float32_tolerance, logits64

from edgeft.export import export
from edgeft.quantize import quantize, variants_for
from edgeft.quantize.smooth import scales, smooth_model
from edgeft.runs import load_model, predict_logits, validation_data
from edgeft.runtime.session import OnnxModel


@pytest.fixture(scope="module")
def text_export(full_text_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("smooth-export") / "text"
    export(full_text_run, out)
    return out


def _rows(loaded, items):
    return [loaded.pre(items[i : i + 1]) for i in range(len(items))]


@pytest.mark.parametrize("fused", [False, True])
def test_smoothing_is_exact_in_float(full_text_run, text_export, tmp_path, fused):
    """The smoothed fp32 graph (Mul by 1/s before each MatMul, weight rows times s) gives the
    model's logits within float32's reach of the float64 model, like the graph it came from;
    and it really rescaled (the scales differ across channels)."""
    from edgeft.quantize.fuse import fuse

    loaded = load_model(full_text_run)
    items = validation_data(loaded.info["validation"]).items
    src = text_export / "backbone.onnx"
    if fused:
        fuse(src, tmp_path / "fused.onnx")
        src = tmp_path / "fused.onnx"
    model = onnx.load(str(src))
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    info = smooth_model(model, _rows(loaded, items), alpha=0.5)
    # 2 layers; unfused: Q/K/V input (one tensor, three MatMuls), attention output, FFN in, FFN out
    # per layer; fused: the Attention node's input instead of the three MatMuls
    assert (info["tensors"], info["nodes"]) == ((8, 8) if fused else (8, 12))
    assert info["max_scale_spread"] > 2  # s really varies across channels (1.0 everywhere: nothing done)
    assert sum(n.op_type == "Mul" and n.name.endswith("_mul") for n in model.graph.node) == info["tensors"]
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "smoothed.onnx"))
    after = {i.name for i in model.graph.initializer}
    assert len(set(before) - after) >= info["nodes"]  # the original weights are replaced, not kept beside

    exact = logits64(loaded.model, loaded.pre, items)
    tol = float32_tolerance(exact, predict_logits(loaded.model, loaded.pre, items).numpy())
    backbone, head = OnnxModel(tmp_path / "smoothed.onnx"), OnnxModel(text_export / "head.onnx")
    for size in (1, 5):  # padded batches too: the mask path is untouched
        got = np.concatenate([head({"features": backbone(loaded.pre(items[i : i + size]))["features"]})["logits"]
                              for i in range(0, len(items), size)])
        assert_float32_close(got, exact, tol, f"smoothed fp32 ({'fused' if fused else 'unfused'}), batch {size}")


def test_scales_follow_the_formula():
    x, w = np.array([8.0, 1.0, 0.0, 4.0]), np.array([2.0, 1.0, 3.0, 0.0])
    s = scales(x, w, 0.5)
    assert np.allclose(s, [2.0, 1.0, 1.0, 1.0])  # sqrt(8)/sqrt(2); zero channels are left alone
    assert np.allclose(scales(x, w, 1.0)[:2], [8.0, 1.0])


@pytest.mark.parametrize("mode", ["dynamic-smooth", "dynamic-smooth-fused"])
def test_smooth_modes_register_and_quantize(text_export, tmp_path, mode):
    """`edgeft quantize --mode dynamic-smooth[-fused]`: calibrated, int8 kernels in the graph, the
    smoothing Muls in front of them, within the int8 budget on the tiny BERT. Not a default build
    variant: it measured no better than dynamic int8 on the maintenance example (smooth.py)."""
    from edgeft.plugins import get_target

    info = quantize(text_export, mode, tmp_path / "q", uncertified=True)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q" / "backbone.onnx")).graph.node]
    assert "MatMulInteger" in ops and ops.count("Mul") >= 8
    assert ("QAttention" in ops) == (mode == "dynamic-smooth-fused")
    assert info.parity["agreement"] >= 0.99
    assert mode not in variants_for(get_target("cpu"), "int8", "text")


def test_weight_only_of_the_fused_graph(text_export, tmp_path):
    """`--mode weight-only-fused`: the fused graph gated as fp32, then its MatMuls as MatMulNBits;
    the fused Attention and EmbedLayerNormalization stay float. The cpu target (fused operators)
    tries it for text, the mobile target (reduced-operator build) does not, nor any image build."""
    from edgeft.plugins import get_target

    info = quantize(text_export, "weight-only-fused", tmp_path / "q", uncertified=True)
    assert info.fusion["passed"] and info.fusion["fused"]["Attention"] == 2
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q" / "backbone.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 6 and "MatMul" not in ops  # per layer: attention output, FFN in, FFN out
    assert {"Attention", "EmbedLayerNormalization"} <= set(ops)
    assert info.parity["agreement"] >= 0.99
    assert "weight-only-fused" in variants_for(get_target("cpu"), "int8", "text")
    assert "weight-only-fused" not in variants_for(get_target("mobile"), "int8", "text")
    assert "weight-only-fused" not in variants_for(get_target("cpu"), "int8", "image")


@pytest.mark.parametrize("mode", ["dynamic-fused", "weight-only-fused"])
def test_the_search_ranks_the_fused_graphs_nodes(full_text_run, text_export, tmp_path, mode):
    """The node search's candidates in the fused graph include the MatMuls after the fused
    operators: onnx's shape inference does not know com.microsoft operators and leaves every value
    computed from them untyped, which once dropped them (dynamic-fused ranked only the Attention and
    EmbedLayerNormalization nodes, weight-only-fused nothing)."""
    from edgeft.quantize import registry
    from edgeft.quantize.fuse import fuse
    from edgeft.quantize.search import candidates

    loaded = load_model(full_text_run)
    items = validation_data(loaded.info["validation"]).items
    fuse(text_export / "backbone.onnx", tmp_path / "fused.onnx")
    model = onnx.load(str(tmp_path / "fused.onnx"))
    base = registry.get(mode).fuse
    op_types = registry.get(base).run(tmp_path / "fused.onnx", tmp_path / "q.onnx", modality="text")
    found = [n.op_type for n in candidates(model, op_types, _rows(loaded, items[:1])[0])]
    # 2 layers, per layer: attention output, FFN in, FFN out
    assert found.count("MatMul") == 6
    if mode == "dynamic-fused":
        assert found.count("Attention") == 2 and found.count("EmbedLayerNormalization") == 1
    assert len(found) == (9 if mode == "dynamic-fused" else 6)
