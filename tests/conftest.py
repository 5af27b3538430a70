"""Shared fixtures: tiny random models built from configs, tiny datasets, a clean cache."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = {
    "pump": "pump leak seal impeller flow pressure valve pipe".split(),
    "motor": "motor winding breaker fuse voltage current phase relay".split(),
    "belt": "belt conveyor roller tension pulley idler track sprocket".split(),
}
FILLER = "the on line at near after shift check noted again today unit".split()


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def text_rows(n_per_class: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_class):
            toks = rng.sample(words, 3) + rng.sample(FILLER, rng.randint(1, 6))
            rng.shuffle(toks)
            rows.append((" ".join(toks), label))
    rng.shuffle(rows)
    return rows


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for ws in WORDS.values() for w in ws} | set(FILLER)
    )
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


def _calibrate_batchnorm(model, size: int) -> None:
    """Give a random CNN's batch norms the statistics of real inputs, as a pretrained one has.

    Left at their initial values (mean 0, variance 1) the activations of a deep random CNN
    grow layer by layer, and float rounding differences between runtimes grow with them.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(pixel_values=torch.randn(8, 3, size, size))
    model.eval()


def _save_hf_image(d: Path, cfg) -> Path:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(cfg)
    _calibrate_batchnorm(model, cfg.image_size)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig

    return _save_hf_image(tmp_path_factory.mktemp("tiny-vit"), ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))


@pytest.fixture(scope="session")
def tiny_mobilenet(tmp_path_factory) -> Path:
    from transformers import MobileNetV2Config

    return _save_hf_image(tmp_path_factory.mktemp("tiny-mnv2"), MobileNetV2Config(
        image_size=32, depth_multiplier=0.35))


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    from transformers import ResNetConfig

    return _save_hf_image(tmp_path_factory.mktemp("tiny-resnet"), ResNetConfig(
        image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))


@pytest.fixture(scope="session")
def tiny_effnet(tmp_path_factory) -> Path:
    """EfficientNet-Lite0's architecture at 32 px with random weights, in edgeft's layout."""
    import torch
    from safetensors.torch import save_file

    from edgeft.models import EFFNET_META, build_effnet

    d = tmp_path_factory.mktemp("tiny-effnet")
    torch.manual_seed(0)
    net = build_effnet({"variant": "efficientnet-lite0", "image_size": 32}, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / EFFNET_META).write_text(json.dumps({"variant": "efficientnet-lite0", "image_size": 32,
                                             "weights": "model.safetensors"}))
    return d


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("text-data")
    return {
        "train": write_csv(d / "train.csv", text_rows(16, 1)),
        "val": write_csv(d / "val.csv", text_rows(6, 2)),
    }


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    """A folder per class; each class has its own colour and stripe pattern, 40x40 px."""
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("image-data")
    rng = random.Random(0)
    styles = {"crack": (200, 40, 40), "clean": (40, 200, 40), "stain": (40, 40, 200)}
    for label, colour in styles.items():
        (d / label).mkdir()
        for i in range(10):
            im = Image.new("RGB", (40, 40), tuple(max(0, c + rng.randint(-30, 30)) for c in colour))
            draw = ImageDraw.Draw(im)
            for k in range(0, 40, 8 if label == "crack" else 13):
                draw.line((k, 0, rng.randint(0, 40), 40), fill=(255, 255, 255))
            im.save(d / label / f"{i}.png")
    return d
