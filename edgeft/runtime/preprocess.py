"""Input preprocessing shared by training and the device, so both see the same numbers.

Text goes through a `tokenizers.Tokenizer` (the fast tokenizer's own engine, read from
tokenizer.json); images through Pillow and numpy. Both return plain numpy arrays.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import numpy as np

from ..errors import DataError


class TextPreprocessor:
    """Texts -> {input_ids, attention_mask, token_type_ids} as int64, padded to the batch's longest.

    pad_to: every batch this wide (fixed-shape runtimes). buckets: ascending widths, the last
    max_length; each batch is padded to the smallest one that holds its longest sequence, so a
    runtime that compiles per shape (OpenVINO) sees only these few widths. Not both.
    """

    def __init__(self, tokenizer, max_length: int = 128, pad_to: int | None = None,
                 buckets: list[int] | None = None):
        from tokenizers import Tokenizer

        self.max_length = int(max_length)
        self.pad_to = int(pad_to) if pad_to else None  # fixed-shape runtimes: always this width
        self.buckets = _check_buckets(buckets, self.max_length) if buckets is not None else None
        if self.pad_to and self.buckets:
            raise ValueError(f"text pad_to {self.pad_to} and buckets {self.buckets}: expected one of them, not both")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer = tokenizer
        # Some shipped tokenizer.json files pad every input to a fixed length (MiniLM's pads
        # to 128): that wastes compute and changes nothing, so pad per batch instead.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is None:
            pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = int(pad or 0)

    def spec(self) -> dict:
        spec = {"kind": "text", "max_length": self.max_length, "tokenizer": "tokenizer.json"}
        if self.pad_to:
            spec["pad_to"] = self.pad_to
        if self.buckets:
            spec["buckets"] = list(self.buckets)
        return spec

    def width(self, longest: int) -> int:
        """The padded width of a batch whose longest sequence has `longest` tokens."""
        if self.pad_to:
            return self.pad_to
        longest = max(1, longest)
        if self.buckets:
            i = bisect.bisect_left(self.buckets, longest)
            return self.buckets[i] if i < len(self.buckets) else longest
        return longest

    def encode_ids(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids and type ids per text, unpadded (for caching and bucketing)."""
        encs = self.tokenizer.encode_batch(list(texts))
        return [(e.ids, e.type_ids) for e in encs]

    def collate(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        n = len(encoded)
        width = self.width(max((len(ids) for ids, _ in encoded), default=0))
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (t, tt) in enumerate(encoded):
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
            types[i, : len(tt)] = tt
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.collate(self.encode_ids(texts))


def _check_buckets(buckets, max_length: int) -> list[int]:
    """Strictly ascending whole numbers above 0, the last one max_length; or ValueError."""
    ok = (isinstance(buckets, (list, tuple)) and len(buckets) > 0
          and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets)
          and all(a < b for a, b in zip(buckets[:-1], buckets[1:], strict=True))
          and buckets[-1] == max_length)
    if not ok:
        raise ValueError(f"text buckets {buckets!r}: expected strictly ascending whole numbers above 0, "
                         f"the last one max_length ({max_length})")
    return list(buckets)


def choose_buckets(lengths: list[int], max_length: int, n: int = 3) -> list[int]:
    """Up to `n` bucket widths for TextPreprocessor(buckets=...) from observed token lengths.

    The n-1 widths below max_length are percentiles of the lengths (the 50th and 90th for n=3,
    spread from the 50th to the 90th otherwise), rounded up to a multiple of 8; the last is
    max_length. Ascending, without duplicates: fewer than n when the percentiles coincide.
    """
    max_length = int(max_length)
    if max_length < 1 or n < 1:
        raise ValueError(f"choose_buckets: expected max_length >= 1 and n >= 1, got {max_length} and {n}")
    clipped = [min(max(int(v), 1), max_length) for v in lengths]
    widths = {max_length}
    if clipped and n > 1:
        for q in np.linspace(50, 90, n - 1):
            v = int(np.percentile(clipped, q, method="higher"))  # an observed length: that share fits
            widths.add(min(-(-v // 8) * 8, max_length))
    return sorted(widths)


MAX_SIDE = 8192  # pixels: an image side a spec may ask for


def _side(key: str, value, expected: str) -> int:
    """A positive whole number of pixels up to MAX_SIDE (JSON may spell 224 as 224.0), or ValueError."""
    n = int(value) if isinstance(value, float) and value.is_integer() else value
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_SIDE:
        raise ValueError(f"image {key} {value!r}: expected {expected}, whole pixels from 1 to {MAX_SIDE}")
    return n


def _sides(key: str, value) -> list[int]:
    """[height, width], each a _side."""
    try:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return [_side(key, v, "") for v in value]
    except ValueError:
        pass
    raise ValueError(f"image {key} {value!r}: expected [height, width], whole pixels from 1 to {MAX_SIDE}")


def _number(value, positive: bool) -> bool:
    """A real number that float32 holds (finite), and above 0 if `positive`."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= float(np.finfo(np.float32).max) and (not positive or np.float32(value) > 0))


def _finite(key: str, value, positive: bool) -> float:
    if not _number(value, positive):
        raise ValueError(f"image {key} {value!r}: expected a finite number{' above 0' if positive else ''}")
    return float(value)


def _channels(key: str, value, positive: bool) -> np.ndarray:
    """Three finite numbers, one per RGB channel (std: each above 0)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_number(v, positive) for v in value):
        raise ValueError(f"image {key} {value!r}: expected 3 finite numbers{' above 0' if positive else ''}, "
                         "one per RGB channel")
    return np.asarray(value, dtype=np.float32)


class ImagePreprocessor:
    """Image paths or PIL images -> {pixel_values: float32 (N, 3, H, W)}, the model's own normalisation.

    spec keys: size [H, W]; resize_to (shorter side before the centre crop, or [H, W] to
    resize directly); mean and std per channel, applied after scaling pixels by `scale`.
    """

    def __init__(self, spec: dict):
        self.size = tuple(_sides("size", spec.get("size")))
        resize_to = spec.get("resize_to", list(self.size))
        if isinstance(resize_to, (list, tuple)):
            self.resize_to = _sides("resize_to", resize_to)
        else:
            self.resize_to = _side("resize_to", resize_to, "a shorter side or [height, width]")
            if self.resize_to < max(self.size):
                raise ValueError(f"image resize_to {resize_to!r}: expected a shorter side of at least the crop size "
                                 f"{list(self.size)}")
        self.scale = _finite("scale", spec.get("scale", 1 / 255), positive=True)
        self.mean = _channels("mean", spec.get("mean", [0.485, 0.456, 0.406]), positive=False)
        self.std = _channels("std", spec.get("std", [0.229, 0.224, 0.225]), positive=True)
        self._spec = {
            "kind": "image",
            "size": list(self.size),
            "resize_to": self.resize_to,
            "scale": self.scale,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    def spec(self) -> dict:
        return dict(self._spec)

    def load(self, item):
        from PIL import Image

        if not isinstance(item, (str, Path)):
            return item.convert("RGB")
        try:
            with Image.open(item) as im:
                return im.convert("RGB")
        except Exception as e:  # Pillow raises many types, DecompressionBombError among them
            raise DataError(f"{item}: unreadable image ({type(e).__name__}: {e}). Use jpg, png, bmp or webp.") from None

    def resize(self, im):
        from PIL import Image

        h, w = self.size
        if isinstance(self.resize_to, (list, tuple)):
            return im.resize((int(self.resize_to[1]), int(self.resize_to[0])), Image.BILINEAR)
        # shorter side to resize_to, keeping the aspect ratio, then a centre crop of H x W
        s = int(self.resize_to)
        iw, ih = im.size
        if iw <= ih:
            nw, nh = s, max(s, round(ih * s / iw))
        else:
            nw, nh = max(s, round(iw * s / ih)), s
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))

    def to_array(self, im) -> np.ndarray:
        a = np.asarray(im, dtype=np.float32) * self.scale
        a = (a - self.mean) / self.std
        return a.transpose(2, 0, 1)

    def __call__(self, items, augment=None) -> dict[str, np.ndarray]:
        out = []
        for item in items:
            im = self.load(item)
            im = augment(im, self.size) if augment is not None else self.resize(im)
            out.append(self.to_array(im))
        return {"pixel_values": np.stack(out).astype(np.float32)}


def load_preprocessor(directory: str | Path, spec: dict):
    """Rebuild the preprocessor described by `spec` from files in `directory`."""
    if spec["kind"] == "text":
        tok = Path(directory) / spec.get("tokenizer", "tokenizer.json")
        if not isinstance(spec.get("tokenizer", "tokenizer.json"), str) or not tok.is_file():
            raise ValueError(f"no tokenizer file {tok}")
        return TextPreprocessor(Path(directory) / spec.get("tokenizer", "tokenizer.json"), spec["max_length"],
                                spec.get("pad_to"), spec.get("buckets"))
    return ImagePreprocessor(spec)


def read_spec(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
