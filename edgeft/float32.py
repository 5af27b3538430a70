"""How far a float32 result may be from PyTorch's on the same inputs, on the CPU it runs on.

A fixed gate such as |Δ logits| <= 1e-4 lets one CPU's rounding decide: ONNX Runtime and
PyTorch sum in other orders and fuse other operations on AVX2, AVX-512, AMX or NEON, and a
deep model amplifies that rounding more than a shallow one. What does not depend on the host
is how far float32 may be from the float64 result of the same model on the same inputs, and
PyTorch's own float32 error measures that on the CPU in use:

    tolerance = k * max |pytorch32 - pytorch64| + ulps * eps32 * max |pytorch64|

k = 5 leaves room for another runtime's order of summation to be a few times worse than
PyTorch's (4) plus PyTorch's own error once more, since the gate compares with float32
PyTorch rather than float64 (the triangle inequality). The ulps term, relative to the logits'
scale, covers a model whose PyTorch error happens to be near zero. A wrong export (a head
off by a factor, a missing layer) is wrong by the logits' own scale, orders of magnitude
above this.
"""

from __future__ import annotations

import copy

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-07
K = 5.0
ULPS = 16.0


def reach(exact64, pytorch32, k: float = K, ulps: float = ULPS) -> float:
    """The tolerance above, from the float64 and float32 logits of the same rows."""
    exact64 = np.asarray(exact64, dtype=np.float64)
    own = float(np.abs(np.asarray(pytorch32, dtype=np.float64) - exact64).max())
    return k * own + ulps * EPS32 * float(np.abs(exact64).max())


def logits64(model, pre, items, batch_size: int = 16) -> np.ndarray:
    """The model's logits in float64 (on a copy: the model itself stays float32)."""
    import torch

    m = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            arrays = pre(list(items[i : i + batch_size]))
            out.append(m(**{k: torch.from_numpy(v).double() if v.dtype.kind == "f" else torch.from_numpy(v)
                            for k, v in arrays.items()}).numpy())
    return np.concatenate(out)


def tolerance(model, pre, items, pytorch32) -> float:
    """The gate for a float32 runtime's logits against `pytorch32` (the model's float32 logits of `items`)."""
    return reach(logits64(model, pre, items), pytorch32)
