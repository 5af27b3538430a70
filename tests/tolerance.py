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

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-07
K = 4.0
ULPS = 16.0


def float32_tolerance(exact64, pytorch32, k: float = K, ulps: float = ULPS) -> float:
    exact64 = np.asarray(exact64, dtype=np.float64)
    own = float(np.abs(np.asarray(pytorch32, dtype=np.float64) - exact64).max())
    return k * own + ulps * EPS32 * float(np.abs(exact64).max())


def assert_float32_close(candidate32, exact64, tol: float, what: str = "") -> None:
    diff = float(np.abs(np.asarray(candidate32, dtype=np.float64) - np.asarray(exact64, dtype=np.float64)).max())
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > tolerance {tol:.3e} (scale {np.abs(exact64).max():.3g})"


def logits64(model, pre, items) -> np.ndarray:
    """The model's logits computed in float64 (a copy of the model; the original stays float32)."""
    import copy

    import torch

    m = copy.deepcopy(model).double().eval()
    arrays = pre(list(items))
    inputs = {k: torch.from_numpy(v).double() if v.dtype.kind == "f" else torch.from_numpy(v)
              for k, v in arrays.items()}
    with torch.no_grad():
        return m(**inputs).numpy()
