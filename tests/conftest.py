"""Shared fixtures: tiny random models built from configs, tiny datasets, a clean cache."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One BLAS/OpenMP thread per test process, set before torch or numpy load. The tiny models gain
# nothing from a second thread, and pytest-xdist already runs one worker per core (addopts):
# with two threads per worker, OpenMP's spin-waits fight over the cores (a tiny MobileNetV2's
# float64 reference took 108 s on a busy 2-core host, 17 s with one thread).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from tiny import (  # noqa: E402
    IMAGE_STYLES,
    _save_hf_image,
    make_images,
    make_tiny_bert,
    make_tiny_bundle,
    make_tiny_resnet,
    text_rows,
    write_csv,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


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
    return make_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


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
def tiny_bundle(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(bundle, its manifest, an input image): a torch-free image bundle of a few hundred bytes
    (tests/tiny.py). Read-only: copy the bundle before changing it."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


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
    return make_images(tmp_path_factory.mktemp("image-data"), IMAGE_STYLES)


@pytest.fixture(scope="session")
def full_text_run(tiny_bert, text_data, tmp_path_factory) -> Path:
    """The tiny BERT fully fine-tuned for a few epochs: clear margins between classes, so a
    correct int8 model keeps every answer and a broken one visibly does not. Shared by the
    quantization and OpenVINO tests (read-only: copy it before changing it)."""
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = tmp_path_factory.mktemp("full-text-run") / "run"
    train(TrainConfig(model=str(tiny_bert), data=str(text_data["train"]), val=str(text_data["val"]),
                      output=str(out), method="full", pooling="mean", epochs=4, batch_size=8, lr=5e-3,
                      progress=False))
    return out


@pytest.fixture(scope="session")
def lora_text_run(tiny_bert, text_data, tmp_path_factory) -> Path:
    """The tiny BERT with LoRA, trained until its answers have margins (int8 should not flip them).
    Shared by the export, merge, verify and bundle tests (read-only: copy it before changing it)."""
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = tmp_path_factory.mktemp("lora-text-run") / "run"
    train(TrainConfig(model=str(tiny_bert), data=str(text_data["train"]), val=str(text_data["val"]),
                      output=str(out), method="lora", pooling="mean", epochs=8, batch_size=8, lr=5e-3,
                      head_lr=3e-2, patience=8, progress=False))
    return out


@pytest.fixture(scope="session")
def full_image_run(tiny_resnet, image_data, tmp_path_factory) -> Path:
    """The tiny ResNet fully fine-tuned on the striped images. Shared by the int8 image tests of
    quantize and OpenVINO (read-only)."""
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = tmp_path_factory.mktemp("full-image-run") / "run"
    train(TrainConfig(model=str(tiny_resnet), data=str(image_data), output=str(out), method="full",
                      epochs=6, lr=1e-2, head_lr=5e-2, progress=False))
    return out


@pytest.fixture(scope="session")
def device_bundles(tmp_path_factory) -> dict[str, Path]:
    """{"text": bundle, "image": bundle} for the device and trust tests: prebuilt in
    EDGEFT_DEVICE_BUNDLES (the torch-free environment of .ci/run), or built here once (read-only)."""
    prebuilt = os.environ.get("EDGEFT_DEVICE_BUNDLES")
    if prebuilt:
        return {p.name: p for p in Path(prebuilt).iterdir() if (p / "manifest.json").exists()}
    from make_device_bundles import make_bundles

    return make_bundles(tmp_path_factory.mktemp("device-bundles"))


class Interrupted(Exception):
    """A training run killed between epochs (raised by the `crash_after_epoch` fixture)."""


@pytest.fixture
def crash_after_epoch(monkeypatch):
    """`with crash_after_epoch(k): train(...)`: the run dies right after saving epoch k's
    checkpoint (the `with` fails if it does not); saving is restored when the block ends."""
    import edgeft.checkpoints as T

    real_save = T.save_checkpoint

    @contextlib.contextmanager
    def crashing(epoch: int):
        def save_then_crash(run, e, *a, **k):
            real_save(run, e, *a, **k)
            if e == epoch:
                raise Interrupted

        monkeypatch.setattr(T, "save_checkpoint", save_then_crash)
        try:
            with pytest.raises(Interrupted):
                yield
        finally:
            monkeypatch.setattr(T, "save_checkpoint", real_save)

    return crashing
