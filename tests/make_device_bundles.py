"""Build the small bundles the device tests use: `python tests/make_device_bundles.py OUT`.

CI runs this in the full environment, then runs tests/test_device.py in a second one with the
core dependencies only (no torch), as a device is installed, pointing EDGEFT_DEVICE_BUNDLES
at OUT. Run inside pytest, the same function builds them on the spot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny import (  # noqa: E402
    IMAGE_STYLES,
    NEW_IMAGE_STYLE,
    make_images,
    make_tiny_bert,
    make_tiny_resnet,
    text_rows,
    write_csv,
)


def make_bundles(out: Path) -> dict[str, Path]:
    """{"text": bundle, "mobile": bundle, "image": bundle}; training data and runs live beside them in `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EDGEFT_CACHE", str(out / "cache"))
    from edgeft.build import build
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = Path(out)
    bert = make_tiny_bert(out / "tiny-bert")
    train_csv = write_csv(out / "text-data" / "train.csv", text_rows(24, 1))
    val_csv = write_csv(out / "text-data" / "val.csv", text_rows(8, 2))
    train(TrainConfig(model=str(bert), data=str(train_csv), val=str(val_csv), output=str(out / "text-run"),
                      method="lora", pooling="mean", epochs=8, batch_size=8, lr=5e-3, head_lr=3e-2, patience=8,
                      progress=False))
    build(out / "text-run", "x86-64-server", out / "text", uncertified=True)  # its 24 validation rows cannot certify 99% (the training rows calibrate)
    phone = out / "phone.toml"  # the mobile target: its bundle's backbone is the .ort alone
    phone.write_text('description = "test phone"\ntarget = "mobile"\nprecision = "fp32"\nmax_length = 32\n')
    build(out / "text-run", str(phone), out / "mobile")

    resnet = make_tiny_resnet(out / "tiny-resnet")
    images = make_images(out / "image-data", IMAGE_STYLES, n=12)
    make_images(out / "image-new", NEW_IMAGE_STYLE, n=12, seed=1)
    train(TrainConfig(model=str(resnet), data=str(images), output=str(out / "image-run"), method="head",
                      epochs=40, head_lr=0.05, val_fraction=0.3, patience=40, progress=False))
    profile = out / "image-box.toml"
    profile.write_text('description = "test image box"\ntarget = "cpu"\nprecision = "fp32"\n')
    build(out / "image-run", str(profile), out / "image")
    return {"text": out / "text", "mobile": out / "mobile", "image": out / "image"}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/make_device_bundles.py OUT")
    for name, path in make_bundles(Path(sys.argv[1])).items():
        print(name, path)
