"""Reference inputs for `device check` that carry none of the owner's rows.

`edgeft device check` re-runs a bundle's reference inputs on the device and compares the
answers with those the build recorded. Those inputs need not be the owner's data to prove
the device computes what the build computed: they only have to run through the same kernels
and reach the same answers. By default the build makes them: random token sequences over the
tokenizer's vocabulary (lengths drawn from the judged rows' lengths, wrapped in the
tokenizer's own special tokens), or smooth noise images in the preprocessor's pixel range.
From a pool of them, certify.reference_rows keeps the rows covering every class the model
answers on the pool and the ones closest to flipping (smallest margin), where a device's
kernels would first change an answer. What they do not prove: anything about accuracy on
real inputs (that is parity.json's job, on the build host), and for text, inputs unlike
sentences may leave some classes unanswered (the manifest says which were covered).
"""

from __future__ import annotations

import numpy as np

POOL = {"text": 256, "image": 64}  # candidates drawn; a forward pass each at build time


def special_template(pre) -> tuple[list[int], list[int], set[int]]:
    """(prefix ids, suffix ids, ids never to draw) of the text preprocessor's tokenizer: what it
    wraps every text in ([CLS] ... [SEP] for BERT), found by encoding "" and "a"."""
    (empty, _), (one, _) = pre.encode_ids(["", "a"])
    k = next((i for i, (x, y) in enumerate(zip(empty, one, strict=False)) if x != y), len(empty))
    special = set(empty) | {pre.pad_id}
    try:
        special |= {int(i) for i, tok in pre.tokenizer.get_added_tokens_decoder().items() if tok.special}
    except AttributeError:  # an older tokenizers: the template's own tokens are what we know
        pass
    return list(empty[:k]), list(empty[k:]), special


def text_pool(pre, lengths: list[int], n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n encoded rows (ids, type ids) of random tokens, lengths drawn from `lengths` (tokens
    each real row had, template included), within max_length."""
    rng = np.random.default_rng(seed)
    prefix, suffix, special = special_template(pre)
    vocab = np.array([i for i in range(pre.tokenizer.get_vocab_size()) if i not in special])
    room = pre.max_length - len(prefix) - len(suffix)
    lengths = [max(1, min(room, L - len(prefix) - len(suffix))) for L in (lengths or [16])]
    out = []
    for _ in range(n):
        body = rng.choice(vocab, size=int(rng.choice(lengths))).tolist()
        ids = prefix + body + suffix
        out.append((ids, [0] * len(ids)))
    return out


def image_pool(pre, n: int, seed: int = 0) -> list:
    """n PIL images of smooth colour noise (coarse noise scaled up, varied brightness and
    contrast), in 0-255 RGB: the preprocessor maps them into the model's range as it maps photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = pre.size
    out = []
    for _ in range(n):
        cells = int(rng.integers(2, 17))
        coarse = rng.uniform(0, 255, size=(cells, cells, 3))
        im = Image.fromarray(coarse.astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
        a = (a - a.mean()) * rng.uniform(0.3, 1.5) + rng.uniform(40, 215) + rng.normal(0, 8, a.shape)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"))
    return out
