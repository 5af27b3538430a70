"""How far a float32 result may be from the exact one, on any CPU.

Float32 kernels differ from CPU to CPU (ONNX Runtime's and PyTorch's on AVX2, AVX-512, AMX or
NEON sum in other orders and fuse other operations), so no fixed number such as 1e-5 bounds their
difference: one host's rounding would decide. What does not depend on the host is how far a
float32 computation may be from the float64 result of the same model on the same inputs. That
distance is set by the computation (its depth, its accumulation lengths, how much the model
amplifies rounding) and PyTorch's own float32 error measures it, on the CPU the test runs on:

    |candidate32 - exact64| <= k * max |pytorch32 - exact64| + ulps * eps32 * max |exact64|

k leaves room for another kernel's order of summation to be a few times worse than PyTorch's; the
epsilon term, relative to the output's scale, covers a computation whose PyTorch error happens to
be near zero (a linear head alone). A comparison with float32 PyTorch rather than with float64
takes PyTorch's own error once more (the triangle inequality): `k + 1`.
"""

from __future__ import annotations

import numpy as np

from edgeft import float32 as F32

EPS32 = F32.EPS32  # 1.19e-07
K = 4.0  # against float64; the library's gates compare with float32 PyTorch: K + 1 (edgeft/float32.py)
ULPS = F32.ULPS


def float32_tolerance(exact64, pytorch32, k: float = K, ulps: float = ULPS) -> float:
    return F32.reach(exact64, pytorch32, k=k, ulps=ulps)


def assert_float32_close(candidate32, exact64, tol: float, what: str = "") -> None:
    diff = float(np.abs(np.asarray(candidate32, dtype=np.float64) - np.asarray(exact64, dtype=np.float64)).max())
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > tolerance {tol:.3e} (scale {np.abs(exact64).max():.3g})"


def logits64(model, pre, items) -> np.ndarray:
    """The model's logits computed in float64 (a copy of the model; the original stays float32)."""
    return F32.logits64(model, pre, list(items))


def dot_tolerance(X, W, b=None) -> np.ndarray:
    """How far two float32 evaluations of X @ W.T + b may differ, element by element, a priori.

    Each is within n * eps32 * (|X| @ |W|.T + |b|) of the exact value, n the length of the sum
    (the standard bound for a float32 dot product, whatever the order of summation or the use of
    fused multiply-adds): twice that between two of them."""
    X, W = np.asarray(X, dtype=np.float64), np.asarray(W, dtype=np.float64)
    mag = np.abs(X) @ np.abs(W).T + (0.0 if b is None else np.abs(np.asarray(b, dtype=np.float64)))
    return 2 * (X.shape[1] + 1) * EPS32 * mag


def softmax_sum_tolerance(n_classes: int) -> float:
    """How far float32 probabilities' sum may be from 1: a few float32 ulps per class (the exp, the
    division, the sum's own rounding)."""
    return 8 * n_classes * EPS32


def validation_tolerance(path, k: float = K + 1) -> float:
    """How far a float32 runtime's logits may be from float32 PyTorch's for the run or model
    directory at `path`, on its validation rows (what export, merge and build judge): k = K + 1."""
    from edgeft.runs import load_model, predict_logits, validation_data

    loaded = load_model(path)
    items = validation_data(loaded.info["validation"]).items
    exact = logits64(loaded.model, loaded.pre, items)
    return float32_tolerance(exact, predict_logits(loaded.model, loaded.pre, items).numpy(), k=k)
