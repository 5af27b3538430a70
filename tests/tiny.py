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
