"""Training: every method on text and image models, resume, early stopping, the feature cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgeft import methods
from edgeft.config import TrainConfig, load_train_config
from edgeft.errors import ConfigError, UsageError
from edgeft.models import build_task_model, layer_groups, load_spec
from edgeft.results import TrainResult
from edgeft.runs import evaluate, load_run
from edgeft.train import batches, train

RUN_FILES = ("trained.safetensors", "labels.json", "metrics.json", "curves.png", "confusion.png",
             "README.md", "run.json", "preprocessor.json")


def cfg_for(model, data, out, **kw) -> TrainConfig:
    kw.setdefault("epochs", 2)
    kw.setdefault("progress", False)
    return TrainConfig(model=str(model), data=str(data), output=str(out), **kw)


# the quick loop trains the cheap methods and one that trains the backbone's layers by group
# (gradual); full, partial and bitfit (each a backward pass through every layer, 4 s apiece) are in
# the full suite. A method added to methods.METHODS joins the full suite until it is listed here.
QUICK_TEXT_METHODS = ("head", "lora", "ia3", "gradual")


@pytest.mark.parametrize("method", [m if m in QUICK_TEXT_METHODS else pytest.param(m, marks=pytest.mark.slow)
                                    for m in methods.METHODS])
def test_every_method_on_text(method, tiny_bert, text_data, tmp_path):
    s = train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]),
                      method=method, pooling="mean", batch_size=8))
    run = tmp_path / "run"
    for f in RUN_FILES + ("tokenizer.json",):
        assert (run / f).exists(), f
    m = json.loads((run / "metrics.json").read_text())
    assert m == s.to_json() and isinstance(s, TrainResult)  # the typed result is the file it wrote
    assert len(m["epochs"]) == 2
    assert {"accuracy", "macro_f1", "train_loss", "val_loss"} <= set(m["epochs"][0])
    assert set(m["best"]["per_class"]) == {"belt", "motor", "pump"}
    assert sum(map(sum, m["best"]["confusion"])) == 18
    p = s.parameters
    # the ratio is reported rounded to 6 places (methods.py): within 5e-7 of the exact quotient
    assert 0 < p["trainable"] <= p["total"] and p["ratio"] == pytest.approx(p["trainable"] / p["total"], abs=1e-6)
    expected_ratio = {"head": (0, 0.02), "lora": (0.02, 0.3), "ia3": (0, 0.05), "bitfit": (0.01, 0.1),
                      "partial": (0.3, 0.99), "full": (1, 1), "gradual": (1, 1),
                      "prompt": (0, 0.05), "prefix": (0, 0.1)}[method]
    assert expected_ratio[0] <= p["ratio"] <= expected_ratio[1]
    card = (run / "README.md").read_text()
    assert method in card and "accuracy" in card
    if method in ("lora", "ia3"):
        assert (run / "adapter" / "adapter_config.json").exists()
    if method == "ia3":  # a scaling vector per adapted layer, nothing else of the backbone
        trained = load_file(run / "trained.safetensors")
        body = [k for k in trained if not k.startswith("head.")]
        assert body and all("ia3_" in k for k in body)


IMAGE_MODELS = ("tiny_vit", "tiny_mobilenet", "tiny_resnet", "tiny_effnet")
IMAGE_METHODS = ("head", "lora", "ia3", "partial")
# the quick loop trains a diagonal of the grid (each model once, each method once); the full
# suite trains all 16 pairs
QUICK_IMAGE_PAIRS = set(zip(IMAGE_MODELS, IMAGE_METHODS, strict=True))


@pytest.mark.parametrize("model,method", [
    (m, k) if (m, k) in QUICK_IMAGE_PAIRS else pytest.param(m, k, marks=pytest.mark.slow)
    for k in IMAGE_METHODS for m in IMAGE_MODELS])
def test_image_models(model, method, image_data, tmp_path, request):
    path = request.getfixturevalue(model)
    s = train(cfg_for(path, image_data, tmp_path / "run", method=method, batch_size=8, epochs=1,
                      augment=method != "head"))
    assert s.labels == ["clean", "crack", "stain"]
    assert 0 < s.parameters["trainable"] < s.parameters["total"]
    pre = json.loads((tmp_path / "run" / "preprocessor.json").read_text())
    assert pre["kind"] == "image" and pre["size"] == [32, 32]


def test_image_model_learns(tiny_resnet, image_data, tmp_path):
    """Colour is enough to tell the classes apart: a head on a random CNN's features learns it."""
    s = train(cfg_for(tiny_resnet, image_data, tmp_path / "run", method="head", epochs=40,
                      head_lr=0.05, val_fraction=0.3, patience=40))
    assert s.accuracy >= 0.8


def test_text_model_learns(tiny_bert, text_data, tmp_path):
    s = train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]),
                      method="lora", pooling="mean", epochs=15, batch_size=8, patience=15))
    assert s.accuracy >= 0.6
    report = evaluate(tmp_path / "run", text_data["val"])
    assert report["accuracy"] == pytest.approx(s.accuracy)


def test_head_cache_equals_frozen_backbone_loop(tiny_bert, text_data, tmp_path):
    """Training on cached features gives the head a loop over the live, frozen backbone gives."""
    cfg = cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]),
                  method="head", pooling="mean", epochs=4, batch_size=8, patience=10, seed=3)
    train(cfg)
    cached = load_file(str(tmp_path / "run" / "trained.safetensors"))
    assert set(cached) == {"head.weight", "head.bias"}

    # The reference: the same head trained while the backbone runs on every batch.
    from edgeft.data import load_dataset
    from edgeft.models import build_preprocessor
    from edgeft.train import Inputs, make_optimizer, make_scheduler

    c = cfg.with_method_defaults()
    torch.manual_seed(c.seed)
    import random

    import numpy as np

    random.seed(c.seed), np.random.seed(c.seed)
    spec = load_spec(c.model, c.pooling)
    model = build_task_model(spec, 3, c.dropout)
    plan = methods.apply(model, "head")
    ds = load_dataset(c.data)
    inputs = Inputs.build(ds, build_preprocessor(spec), ["belt", "motor", "pump"])
    opt = make_optimizer(model, plan, c)
    sched = make_scheduler(opt, c.epochs * -(-len(ds) // c.batch_size), c.warmup)
    best, best_state = None, None
    val = Inputs.build(load_dataset(c.val), build_preprocessor(spec), ["belt", "motor", "pump"])
    for epoch in range(c.epochs):
        model.train()
        model.backbone.eval()
        for idx in batches(len(ds), c.batch_size, c.seed, epoch):
            with torch.no_grad():
                f = model.backbone(**inputs.batch(idx))
            loss = torch.nn.functional.cross_entropy(model.head(model.dropout(f)), inputs.y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            opt.step(), sched.step(), opt.zero_grad()
        model.eval()
        with torch.no_grad():
            acc = (model(**val.batch(list(range(len(val.ds))))).argmax(-1) == val.y).float().mean().item()
        if best is None or acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.head.state_dict().items()}
    # cached features were computed in other batches (other padding) than the live ones: float32
    # rounding of order 1e-7 relative, which 4 epochs of Adam (steps of lr * m / sqrt(v)) carry into
    # the weights at about lr * 1e-7 per step; the tolerance is ~100 times that, relative to the weights
    torch.testing.assert_close(cached["head.weight"], best_state["weight"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached["head.bias"], best_state["bias"], atol=1e-5, rtol=1e-4)


def test_feature_cache_is_reused(tiny_bert, text_data, tmp_path):
    a = train(cfg_for(tiny_bert, text_data["train"], tmp_path / "a", val=str(text_data["val"]), method="head"))
    b = train(cfg_for(tiny_bert, text_data["train"], tmp_path / "b", val=str(text_data["val"]), method="head"))
    assert b.timing["feature_cache_hits"] == [True, True]
    assert a.accuracy == b.accuracy
    wa, wb = (load_file(str(tmp_path / d / "trained.safetensors")) for d in "ab")
    assert torch.equal(wa["head.weight"], wb["head.weight"])


@pytest.mark.parametrize("method,model,data", [
    ("lora", "tiny_bert", "text"), ("full", "tiny_bert", "text"), ("gradual", "tiny_bert", "text"),
    pytest.param("partial", "tiny_effnet", "image", marks=pytest.mark.slow),  # the slowest of the quick loop
])
def test_resume_equals_uninterrupted(method, model, data, tmp_path, request, text_data, image_data, crash_after_epoch):
    path = request.getfixturevalue(model)
    kw = dict(method=method, epochs=4, batch_size=8, patience=10, lr=1e-3, seed=7)
    if data == "text":
        kw.update(val=str(text_data["val"]), pooling="mean")
        train_data = text_data["train"]
    else:
        kw.update(augment=True)
        train_data = image_data
    train(cfg_for(path, train_data, tmp_path / "whole", **kw))

    with crash_after_epoch(1):
        train(cfg_for(path, train_data, tmp_path / "cut", **kw))
    assert not (tmp_path / "cut" / "run.json").exists()
    with pytest.raises(UsageError, match="did not finish"):
        load_run(tmp_path / "cut")
    s = train(cfg_for(path, train_data, tmp_path / "cut", resume=True, **kw))
    assert len(s.epochs) == 4
    whole = load_file(str(tmp_path / "whole" / "trained.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "trained.safetensors"))
    assert whole.keys() == cut.keys()
    for k in whole:
        # the same float32 ops in the same order, state restored bit for bit: equal in principle; the
        # tolerance (tens of float32 ulps) only allows a kernel that picks another order on reload
        torch.testing.assert_close(cut[k], whole[k], atol=1e-6, rtol=1e-5, msg=k)
    hw = json.loads((tmp_path / "whole" / "metrics.json").read_text())["epochs"]
    assert [round(e["train_loss"], 5) for e in s.epochs] == [round(e["train_loss"], 5) for e in hw]


def test_resume_refuses_other_data(tiny_bert, text_data, tmp_path):
    train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]), epochs=1))
    with pytest.raises(UsageError, match="different training data than the interrupted run"):
        train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", epochs=2, resume=True))


def test_resume_without_checkpoint(tiny_bert, text_data, tmp_path):
    with pytest.raises(UsageError, match="no checkpoint to resume"):
        train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", resume=True))


def test_early_stopping_and_checkpoint_pruning(tiny_bert, text_data, tmp_path):
    # lr 0: nothing improves after the first epoch, so patience 2 stops after epoch 3
    s = train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]),
                      method="head", head_lr=0.0, epochs=20, patience=2, keep_checkpoints=1))
    assert s.stopped_early and len(s.epochs) == 3 and s.best["epoch"] == 1
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["best", "epoch-002"]


def test_best_epoch_is_what_is_saved(tiny_bert, text_data, tmp_path):
    train(cfg_for(tiny_bert, text_data["train"], tmp_path / "run", val=str(text_data["val"]),
                  method="head", epochs=6, metric="loss", patience=10))
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "weights.safetensors"))
    final = load_file(str(tmp_path / "run" / "trained.safetensors"))
    assert torch.equal(best["head.weight"], final["head.weight"])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [e["val_loss"] for e in m["epochs"]]
    assert m["best"]["epoch"] == losses.index(min(losses)) + 1


def test_seeded_runs_are_reproducible(tiny_bert, text_data, tmp_path):
    for d in ("a", "b"):
        train(cfg_for(tiny_bert, text_data["train"], tmp_path / d, method="lora", batch_size=8, seed=5))
    wa, wb = (load_file(str(tmp_path / d / "trained.safetensors")) for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_minilm_pooling_comes_from_its_sentence_transformers_config():
    spec = load_spec("minilm")
    assert spec.pooling == "mean" and spec.modality == "text"
    assert load_spec("minilm", pooling="cls").pooling == "cls"
    assert load_spec("efficientnet-lite0").preprocessing["mean"] == [127.0] * 3


def test_layer_groups_find_the_stack(tiny_bert, tiny_effnet):
    for path, n in ((tiny_bert, 2), (tiny_effnet, 16)):
        model = build_task_model(load_spec(str(path)), 2)
        above, groups = layer_groups(model.backbone)
        assert len(groups) == n
    assert any("pooler" in a for a in layer_groups(build_task_model(load_spec(str(tiny_bert)), 2).backbone)[0])


def test_gradual_unfreezes_from_the_top(tiny_bert):
    model = build_task_model(load_spec(str(tiny_bert), "mean"), 2)
    plan = methods.apply(model, "gradual", unfreeze_every=2)
    s0, s2, s4 = plan.trainable_at(0), plan.trainable_at(2), plan.trainable_at(4)
    assert all(n.startswith(("head.", "backbone.model.pooler")) for n in s0)
    assert any("encoder.layer.1." in n for n in s2) and not any("encoder.layer.0." in n for n in s2)
    assert any("encoder.layer.0." in n for n in s4) and plan.trainable_at(0) == plan.trainable_at(1)


def test_lora_targets_override_and_typo(tiny_bert):
    model = build_task_model(load_spec(str(tiny_bert)), 2)
    plan = methods.apply(model, "lora", lora_targets=["query", "key", "value"])
    assert sum("lora_A" in n for n in plan.trainable) == 2 * 3  # 2 layers x 3 projections
    with pytest.raises(UsageError, match='no Linear or Conv2d layer named \'quer\'.*Did you mean "query"'):
        methods.apply(build_task_model(load_spec(str(tiny_bert)), 2), "lora", lora_targets=["quer"])


def test_config_file_and_flags(tmp_path, text_data, tiny_bert):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[train]\nmodel = "{tiny_bert}"\ndata = "{text_data["train"]}"\noutput = "out"\n'
                      'method = "lora"\nepochs = 7\nlora-r = 4\n')
    cfg = load_train_config(recipe, {"epochs": 3, "lr": None})
    assert (cfg.method, cfg.epochs, cfg.lora_r) == ("lora", 3, 4)
    assert cfg.output == str(tmp_path / "out")
    recipe.write_text('[train]\nmodel = "m"\ndata = "d"\noutput = "o"\nepoch = 3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' in \[train\]\. Did you mean \"epochs\"\?"):
        load_train_config(recipe, {})
    recipe.write_text('[train]\nmodel = "m"\ndata = "d"\noutput = "o"\nmethod = "lorra"\n')
    with pytest.raises(ConfigError, match='unknown method'):
        load_train_config(recipe, {})


def test_cli_train_and_evaluate(tiny_bert, text_data, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--model", str(tiny_bert), "--data", str(text_data["train"]),
                                  "--val", str(text_data["val"]), "--method", "head", "--epochs", "2",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].startswith("train  ok")
    r = CliRunner().invoke(main, ["evaluate", str(out), "--data", str(text_data["val"]), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 18
    assert Path(out / "run.json").exists()


# ---------------------------------------------------------------- inputs the fuzzing found (tests/test_fuzz.py)


@pytest.mark.parametrize("line", ["data = 5", "model = [1]", "output = true", 'lr = "fast"', 'val_fraction = "x"',
                                  "epochs = true", "keep_checkpoints = nan"])
def test_config_file_values_of_the_wrong_type(tmp_path, line):
    values = {"model": '"m"', "data": '"d.csv"', "output": '"o"'}
    key = line.split(" =")[0]
    values[key] = line.split("= ", 1)[1]
    f = tmp_path / "t.toml"
    f.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    with pytest.raises(ConfigError) as info:
        load_train_config(f, {})
    assert str(info.value).startswith(f"{f}: ") and key in str(info.value), str(info.value)


def test_config_file_message_names_the_file(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[train]\nmodel = "m"\ndata = "d"\noutput = "o"\nmethod = "lorax"\n')
    with pytest.raises(ConfigError) as info:
        load_train_config(f, {})
    assert str(info.value).startswith(f"{f}: method: unknown method 'lorax'"), str(info.value)


def test_config_file_name_too_long_for_the_file_system_is_kept_as_written(tmp_path):
    """A name too long for the file system is not a path here: no OSError, the value as written."""
    f = tmp_path / "t.toml"
    f.write_text('[train]\nmodel = "' + "m" * 300 + '"\ndata = "d.csv"\noutput = "o"\n')
    cfg = load_train_config(f, {})
    assert cfg.model == "m" * 300 and cfg.data == str(tmp_path / "d.csv")


def test_cli_config_file_value_of_the_wrong_type(tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import main

    f = tmp_path / "t.toml"
    f.write_text(f'[train]\nmodel = "m"\ndata = 5\noutput = "{tmp_path / "run"}"\n')
    r = CliRunner().invoke(main, ["train", "--config", str(f)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.startswith(f"error: {f}: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bert_without_pooler(tmp_path_factory) -> Path:
    """A user's own BERT folder in save_pretrained layout with no pooler weights and no
    1_Pooling/config.json (as paraphrase-MiniLM-L3-v2 ships)."""
    from tiny import make_tiny_bert
    from transformers import BertConfig, BertModel

    d = make_tiny_bert(tmp_path_factory.mktemp("bert-no-pooler"))
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(d), add_pooling_layer=False).save_pretrained(d)
    assert not any(k.startswith("pooler.") for k in load_file(str(d / "model.safetensors")))
    return d


def test_a_folder_without_pooler_weights_trains_with_mean_pooling_and_loads_the_same(
        bert_without_pooler, text_data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="edgeft"):
        train(cfg_for(bert_without_pooler, text_data["train"], out, val=str(text_data["val"]), method="head"))
    assert "mean pooling, because the folder has no pooler weights" in caplog.text
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["pooling"] == info["trained"]["pooling"] == "mean"
    assert "no pooler weights" in info["trained"]["pooling_reason"]
    items = ["pump seal leak", "belt roller track", "motor fuse"]
    from edgeft.runs import predict_logits

    first, second = load_run(out), load_run(out)
    assert first.model.backbone.model.pooler is None  # nothing initialised at random on load
    a = predict_logits(first.model, first.pre, items)
    b = predict_logits(second.model, second.pre, items)
    assert torch.equal(a, b)
    assert evaluate(out, text_data["val"])["accuracy"] == evaluate(out, text_data["val"])["accuracy"]


def test_pooler_pooling_on_a_folder_without_pooler_weights_refuses(bert_without_pooler, text_data, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.errors import ModelError

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--model", str(bert_without_pooler), "--data", str(text_data["train"]),
                                  "--pooling", "pooler", "--output", str(out)])
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: {bert_without_pooler}: --pooling pooler, but the folder has no pooler "
                                "weights (pooler.dense.*); they would be random on every load. "
                                "Use --pooling mean (or cls).")
    assert not out.exists()
    # the loading report catches it too, where the folder's weights cannot be listed beforehand
    spec = load_spec(str(bert_without_pooler))
    spec.pooling = "pooler"
    with pytest.raises(ModelError, match=r"lacks pooler\.dense\.bias, pooler\.dense\.weight; .* --pooling mean"):
        build_task_model(spec, 3)


def test_records_say_what_ran(tiny_bert, text_data, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_bert, text_data["train"], out, val=str(text_data["val"]), method="head", epochs=3))
    info = json.loads((out / "run.json").read_text())
    t = info["trained"]
    assert t["learning_rates"] == {"head": methods.DEFAULTS["head"]["head_lr"]}
    assert t["epochs"]["max"] == 3 and t["epochs"]["ran"] == 3 and t["pooling"] == "pooler"
    assert info["config"]["lr"] is None  # the head method has no body learning rate
    card = (out / "README.md").read_text()
    assert not re.search(r"lr 0\.0(?![0-9])", card) and "head lr 0.003 (backbone frozen)" in card
    for split in ("train", "val"):
        fp = info["data"][split]["fingerprint"]
        assert len(fp) == 16 and f"fingerprint {fp}" in card
    assert info["data"]["train"]["rows"] == 48
    lora = tmp_path / "lora"
    train(cfg_for(tiny_bert, text_data["train"], lora, val=str(text_data["val"]), method="lora", epochs=1,
                  pooling="mean"))
    assert json.loads((lora / "run.json").read_text())["trained"]["learning_rates"] == {"backbone": 1e-3, "head": 1e-2}
    assert "lr 0.001 (head 0.01)" in (lora / "README.md").read_text()


def test_global_options_after_the_command_and_json_file(tiny_bert, text_data, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import main

    r = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--data", str(text_data["val"])])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--data", str(text_data["val"]), "--debug"])
    assert isinstance(r.exception, UsageError)  # --debug after the command keeps the traceback
    r = CliRunner().invoke(main, ["devices", "-v", "-q", "--json-file", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("targets") and "cpu" in json.loads((tmp_path / "d.json").read_text())["targets"]
    r = CliRunner().invoke(main, ["devices", "--json"])
    assert "cpu" in json.loads(r.stdout)["targets"]
