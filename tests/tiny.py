"""Tiny models and data for tests, built in milliseconds from configs (no downloads)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = {
    "pump": "pump leak seal impeller flow pressure valve pipe".split(),
    "motor": "motor winding breaker fuse voltage current phase relay".split(),
    "belt": "belt conveyor roller tension pulley idler track sprocket".split(),
}
FILLER = "the on line at near after shift check noted again today unit".split()
NEW_CLASS_WORDS = "actuator solenoid cylinder manifold spool stroke exhaust regulator".split()


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


def new_class_rows(n: int, seed: int, label: str = "valve"):
    """A class the tiny model has never seen; its words are in the tokenizer's vocabulary."""
    rng = random.Random(seed)
    return [(" ".join(rng.sample(NEW_CLASS_WORDS, 3) + rng.sample(FILLER, rng.randint(1, 4))), label)
            for _ in range(n)]


def make_tiny_bert(d: Path, dropout: float = 0.1) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for ws in WORDS.values() for w in ws} | set(FILLER) | set(NEW_CLASS_WORDS)
    )
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(d)
    return d


def make_images(d: Path, styles: dict, n: int = 10, seed: int = 0) -> Path:
    """A folder per class; each class has its own colour and stripe pattern, 40x40 px."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for label, (colour, step) in styles.items():
        (d / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = Image.new("RGB", (40, 40), tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour))
            draw = ImageDraw.Draw(im)
            for k in range(0, 40, step):
                draw.line((k, 0, rng.randint(0, 40), 40), fill=(255, 255, 255))
            im.save(d / label / f"{i}.png")
    return d


def make_tiny_resnet(d: Path) -> Path:
    from transformers import ResNetConfig

    return _save_hf_image(d, ResNetConfig(image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))


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


IMAGE_STYLES = {"crack": ((200, 40, 40), 8), "clean": ((40, 200, 40), 13), "stain": ((40, 40, 200), 13)}
NEW_IMAGE_STYLE = {"rust": ((150, 90, 20), 5)}


# ---------------------------------------------------------------- a bundle of a few hundred bytes

TINY_LABELS = ["crack", "clean", "stain"]
TINY_HEAD = "heads/head-0001.onnx"


def png_bytes(size=(12, 9), colour=(200, 40, 40)) -> bytes:
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).line((0, 0, size[0] - 1, size[1] - 1), fill=(255, 255, 255))
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size: enough for PIL to see a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _flatten_backbone(path: Path) -> None:
    """pixel_values (batch, 3, 4, 4) -> features (batch, 48): a Flatten."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["features"], axis=1)], "backbone",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 48])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def make_tiny_bundle(d: Path) -> tuple[Path, dict, Path]:
    """(bundle, its manifest, an input image): a real image bundle of a few hundred bytes, torch-free
    (a Flatten backbone and a random 3-class head), for the tests of what the device side refuses."""
    import hashlib

    import numpy as np

    import edgeft
    from edgeft.runtime.bundle import Bundle
    from edgeft.runtime.head import write_head_onnx
    from edgeft.runtime.manifest import MANIFEST
    from edgeft.runtime.preprocess import ImagePreprocessor

    b = d / "bundle"
    (b / "heads").mkdir(parents=True)
    _flatten_backbone(b / "backbone.onnx")
    rng = np.random.default_rng(0)
    write_head_onnx(b / TINY_HEAD, rng.normal(size=(3, 48)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    spec = ImagePreprocessor({"size": [4, 4]}).spec()
    (b / "preprocessor.json").write_text(json.dumps(spec))

    def entry(p: Path) -> dict:
        return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}

    m = {
        "schema": 1, "edgeft_version": edgeft.__version__, "created": "2024-01-01T00:00:00Z",
        "task": "classification", "modality": "image", "labels": TINY_LABELS, "preprocessing": spec,
        "inputs": ["pixel_values"], "outputs": {"backbone": ["features"], "head": ["logits", "probs"]},
        "feature_dim": 48, "precision": "fp32",
        "runtime": {"providers": ["CPUExecutionProvider"], "threads": 1, "static_shapes": False, "batch_size": 1,
                    "max_length": None},
        "backbone": "backbone.onnx", "head": {"version": 1, "file": TINY_HEAD},
        "heads": [{"version": 1, "file": TINY_HEAD, "labels": TINY_LABELS, "source": "build"}],
        "files": {rel: entry(b / rel) for rel in ("backbone.onnx", TINY_HEAD, "preprocessor.json")},
    }
    (b / MANIFEST).write_text(json.dumps(m, indent=2))
    img = d / "input.png"
    img.write_bytes(png_bytes())
    loaded = Bundle(b)  # the unmutated bundle loads and predicts
    assert loaded.labels == TINY_LABELS and len(loaded.predict([str(img)])) == 1
    return b, m, img
