"""Label maps, splits and augmentation for training. The readers (`load_dataset`, `Dataset`) live
on the device side, in edgeft.runtime.dataset, so the device reads its retraining data with them too.
"""

from __future__ import annotations

import random
from collections import Counter

from .errors import DataError, did_you_mean
from .runtime.dataset import IMAGE_COLUMNS, IMAGE_SUFFIXES, Dataset, load_dataset

__all__ = ["IMAGE_COLUMNS", "IMAGE_SUFFIXES", "Augment", "Dataset", "check_labels", "label_names", "load_dataset",
           "stratified_split"]

def label_names(train: Dataset) -> list[str]:
    """The label map: sorted label names; id = position. At least two classes."""
    counts = Counter(train.labels)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise DataError(
            f"{train.source}: only one label ({only!r}) in {len(train)} rows; a classifier needs at least two."
        )
    return sorted(counts)


def check_labels(ds: Dataset, names: list[str]) -> None:
    known = set(names)
    for i, y in enumerate(ds.labels):
        if y is not None and y not in known:
            where = f"line {ds.lines[i]}: " if ds.lines else ""
            raise DataError(
                f"{ds.source}: {where}unknown label {y!r}; the training labels are "
                f"{', '.join(names)}.{did_you_mean(y, names)}"
            )


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of each class (at least one where a class has two or more)."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {fraction}.")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(ds.labels):
        by_class.setdefault(y, []).append(i)
    train_idx, val_idx = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val_idx += idx[:k]
        train_idx += idx[k:]
    if not val_idx:
        raise DataError(f"{ds.source}: too few rows to hold out validation data; pass --val.")
    return ds.subset(sorted(train_idx)), ds.subset(sorted(val_idx), f"{ds.source} (held out)")


class Augment:
    """Training-only image augmentation: random resized crop, horizontal flip, colour jitter."""

    def __init__(self, seed: int, flip=True, crop=True, jitter=0.2):
        self.rng = random.Random(seed)
        self.flip, self.crop, self.jitter = flip, crop, jitter

    def __call__(self, im, size):
        from PIL import Image, ImageEnhance

        h, w = size
        if self.crop:
            iw, ih = im.size
            s = self.rng.uniform(0.7, 1.0)
            cw, ch = max(1, int(iw * s)), max(1, int(ih * s))
            x, y = self.rng.randint(0, iw - cw), self.rng.randint(0, ih - ch)
            im = im.crop((x, y, x + cw, y + ch))
        im = im.resize((w, h), Image.BILINEAR)
        if self.flip and self.rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter:
            for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                im = enh(im).enhance(self.rng.uniform(1 - self.jitter, 1 + self.jitter))
        return im
