"""Prompt and prefix tuning (peft prompt learning) through the chain, on the tiny BERT.

They cannot fold into the weights: merge keeps the learned table beside the weights and the
export carries it inside the backbone graph as a constant, which takes the same inputs as any
text backbone. Model families that cannot take them are refused in one line before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.torch import load_file
from tolerance import assert_float32_close, float32_tolerance, logits64

from edgeft.build import build
from edgeft.cli import main
from edgeft.config import TrainConfig
from edgeft.export import export
from edgeft.merge import merge
from edgeft.models import PROMPT_FILE
from edgeft.names import VIRTUAL_TOKENS
from edgeft.runs import load_model, predict_logits, validation_data
from edgeft.runtime.session import OnnxModel
from edgeft.train import train

KINDS = ("prompt", "prefix")
TOKENS = {"prompt": None, "prefix": 6}  # None: the default (names.VIRTUAL_TOKENS); prefix runs --virtual-tokens 6


def _cfg(model, text_data, out, method, **kw) -> TrainConfig:
    kw = {"epochs": 3, "batch_size": 8, "lr": 3e-2, "head_lr": 3e-2, "patience": 10, "pooling": "mean",
          "progress": False, **kw}
    return TrainConfig(model=str(model), data=str(text_data["train"]), val=str(text_data["val"]), output=str(out),
                       method=method, **kw)


# the quick loop keeps prompt tuning's whole chain; prefix tuning's (its run, bundle and resume,
# about 40 s on 2 cores) runs in the full suite
@pytest.fixture(scope="module", params=["prompt", pytest.param("prefix", marks=pytest.mark.slow)])
def prompt_run(request, tiny_bert, text_data, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"{request.param}-run") / "run"
    tokens = TOKENS[request.param]
    train(_cfg(tiny_bert, text_data, out, request.param, **({"virtual_tokens": tokens} if tokens else {})))
    return request.param, out


def test_only_the_learned_tokens_and_the_head_train(prompt_run, tiny_bert):
    kind, run = prompt_run
    info = json.loads((run / "run.json").read_text())
    body = [k for k in info["trained_keys"] if not k.startswith("head.")]
    assert body and all("prompt_encoder" in k for k in body), body
    table = load_file(str(run / "trained.safetensors"))[body[0]]
    hidden, layers, tokens = 32, 2, TOKENS[kind] or VIRTUAL_TOKENS  # tests/tiny.py
    assert info["config"]["virtual_tokens"] == tokens
    assert table.shape == (tokens, hidden if kind == "prompt" else layers * 2 * hidden)
    assert (run / "adapter" / "adapter_config.json").exists()  # peft's own format, beside edgeft's
    # the virtual tokens take positions: the texts are cut shorter so both fit the tiny model's 64
    assert info["model"]["preprocessing"]["max_length"] == 64 - tokens


def test_merge_keeps_the_tokens_and_answers_as_peft(prompt_run, tmp_path):
    """The merged backbone computes the prepending itself; it must answer as peft's forward did."""
    kind, run = prompt_run
    loaded = load_model(run)
    items = validation_data(loaded.info["validation"]).items
    a = predict_logits(loaded.model, loaded.pre, items).numpy()
    exact = logits64(loaded.model, loaded.pre, items)
    merge(run, tmp_path / "merged")
    assert (tmp_path / "merged" / PROMPT_FILE).exists()
    merged = load_model(tmp_path / "merged")
    assert type(merged.model.backbone).__name__ == "PromptedTextBackbone" and merged.model.backbone.kind == kind
    b = predict_logits(merged.model, merged.pre, items).numpy()
    assert_float32_close(b, exact, float32_tolerance(exact, a), f"{kind} merged")
    # without its table the same weights answer otherwise: the tokens are not decoration
    merged.model.backbone.table.zero_()
    c = predict_logits(merged.model, merged.pre, items).numpy()
    assert np.abs(c - a).max() > 100 * float32_tolerance(exact, a)


def test_export_carries_the_tokens_in_the_graph(prompt_run, tmp_path):
    kind, run = prompt_run
    out = export(run, tmp_path / "export")
    assert all(c["passed"] for c in out.parity["checks"]), out.parity["checks"]
    graph = onnx.load(str(tmp_path / "export" / "backbone.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    # the learned table is a constant of the graph (in whatever layout constant folding left it)
    table = load_file(str(run / "trained.safetensors"))
    table = next(v for k, v in table.items() if "prompt_encoder" in k).numpy()
    consts = [numpy_helper.to_array(i) for i in graph.initializer]
    assert any(c.size == table.size and np.array_equal(np.sort(c, axis=None), np.sort(table, axis=None))
               for c in consts), "the learned tokens are not a constant of backbone.onnx"
    # an independent check of the graph against PyTorch's peft forward, in float64's terms
    loaded = load_model(run)
    items = validation_data(loaded.info["validation"]).items
    a = predict_logits(loaded.model, loaded.pre, items).numpy()
    exact = logits64(loaded.model, loaded.pre, items)
    onnx_model = OnnxModel(tmp_path / "export" / "model.onnx")
    got = np.concatenate([onnx_model(loaded.pre(items[i:i + 5]))["logits"] for i in range(0, len(items), 5)])
    assert_float32_close(got, exact, float32_tolerance(exact, a, k=5.0), f"{kind} onnx")


def test_cpu_bundle_builds_and_verifies(prompt_run, text_data, tmp_path):
    kind, run = prompt_run
    build(run, "x86-64-server", tmp_path / "bundle", uncertified=True, emulate=False)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "bundle"), "--reference", str(run),
                                  "--data", str(text_data["val"]), "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "v.json").read_text())["kind"] == "bundle"
    r = CliRunner().invoke(main, ["device", "predict", str(tmp_path / "bundle"), "pump seal leak", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["label"] in {"pump", "motor", "belt"}


@pytest.mark.parametrize("kind", KINDS)
def test_resume_equals_uninterrupted(kind, tiny_bert, text_data, tmp_path, crash_after_epoch):
    from edgeft.errors import UsageError

    kw = dict(epochs=3, seed=7, backbone_dropout=0.0)
    train(_cfg(tiny_bert, text_data, tmp_path / "whole", kind, **kw))
    with crash_after_epoch(0):
        train(_cfg(tiny_bert, text_data, tmp_path / "cut", kind, **kw))
    with pytest.raises(UsageError, match="did not finish"):
        load_model(tmp_path / "cut")
    s = train(_cfg(tiny_bert, text_data, tmp_path / "cut", kind, resume=True, **kw))
    assert len(s.epochs) == 3
    whole = load_file(str(tmp_path / "whole" / "trained.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "trained.safetensors"))
    assert whole.keys() == cut.keys()
    for k in whole:  # same ops in the same order from restored state: equal up to a kernel's order
        torch.testing.assert_close(cut[k], whole[k], atol=1e-6, rtol=1e-5, msg=k)


def _tiny_distilbert(d: Path, bert: Path) -> Path:
    from transformers import DistilBertConfig, DistilBertModel

    d.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.txt", "tokenizer_config.json"):
        (d / f).write_text((bert / f).read_text())
    torch.manual_seed(0)
    vocab = len((bert / "vocab.txt").read_text().split())
    DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(d)
    return d


def _refused(args: list[str]):
    r = CliRunner().invoke(main, ["train", *args, "--epochs", "1"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    return lines[0]


def test_prefix_refused_where_the_model_ignores_past_keys(tiny_bert, text_data, tmp_path):
    """DistilBERT's forward takes past_key_values among its keyword arguments and ignores them: prefix
    tuning would train nothing, so it is refused in one line, nothing written; prompt tuning (input
    embeddings) works on it."""
    model = _tiny_distilbert(tmp_path / "distilbert", tiny_bert)
    out = tmp_path / "run"
    line = _refused(["--model", str(model), "--data", str(text_data["train"]), "--method", "prefix", "-o", str(out)])
    assert "--method prefix" in line and "distilbert" in line and "ignores them" in line, line
    assert not out.exists()
    s = train(_cfg(model, text_data, tmp_path / "prompt", "prompt", epochs=1))
    assert s.accuracy >= 0


@pytest.mark.parametrize("kind", KINDS)
def test_image_models_refused_in_one_line(kind, tiny_resnet, image_data, tmp_path):
    out = tmp_path / "run"
    line = _refused(["--model", str(tiny_resnet), "--data", str(image_data), "--method", kind, "-o", str(out)])
    assert f"--method {kind}" in line and "resnet" in line and "text models only" in line, line
    assert not out.exists()
