"""A softmax head fitted in numpy, and written as ONNX. The device's whole training engine.

Objective (convex): class-weighted cross-entropy of softmax(z W + b) over standardised
features z = (x - mean) / std, plus (l2 / 2) * ||W||^2. Full-batch Adam from zeros, with
early stopping on held-out rows. The same objective and optimizer in PyTorch (nn.Linear,
torch.optim.Adam) give the same weights: a test on the training side compares them.
Standardisation is folded into the weights at the end, so the head is one Gemm on raw
features: logits = x W' + b'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .metrics import softmax
from .session import write_meta


@dataclass
class FitResult:
    weight: np.ndarray  # (C, D), on raw features (standardisation folded in); nn.Linear layout
    bias: np.ndarray  # (C,)
    iterations: int
    best_iteration: int
    train_loss: float
    holdout_loss: float | None
    history: list[float] = field(default_factory=list)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'Balanced' weights n / (k * count_c), so a class with 40 samples counts as much as one with 400."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _loss_grad(Z, Y1, sw, W, b, l2):
    """Weighted mean cross-entropy + L2, and its gradients (W is D x C here)."""
    P = softmax(Z @ W + b)
    loss = -(sw * np.log(np.clip((P * Y1).sum(1), 1e-12, None))).sum() + 0.5 * l2 * (W * W).sum()
    G = (P - Y1) * sw[:, None]
    return loss, Z.T @ G + l2 * W, G.sum(0)


def fit_softmax(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-3, lr: float = 0.05,
                max_iter: int = 300, holdout: tuple[np.ndarray, np.ndarray] | None = None,
                patience: int = 30, min_iter: int = 100, balanced: bool = True, betas=(0.9, 0.999),
                eps: float = 1e-8) -> FitResult:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    mean = X.mean(0)
    std = X.std(0)
    std[std < 1e-6] = 1.0  # a constant feature carries nothing; leave it unscaled
    Z = (X - mean) / std
    Y1 = np.eye(n_classes)[y]
    cw = class_weights(y, n_classes) if balanced else np.ones(n_classes)
    sw = cw[y] / cw[y].sum()  # per-sample weights summing to 1: a weighted mean
    if holdout is not None:
        Zh = (np.asarray(holdout[0], dtype=np.float64) - mean) / std
        yh = np.asarray(holdout[1], dtype=np.int64)
        swh = cw[yh] / max(cw[yh].sum(), 1e-12)
    D = X.shape[1]
    W, b = np.zeros((D, n_classes)), np.zeros(n_classes)
    mW, vW, mb, vb = np.zeros_like(W), np.zeros_like(W), np.zeros_like(b), np.zeros_like(b)
    best = (np.inf, W.copy(), b.copy(), 0)
    history, loss = [], 0.0
    t = 0
    for t in range(1, max_iter + 1):
        loss, gW, gb = _loss_grad(Z, Y1, sw, W, b, l2)
        history.append(float(loss))
        # Adam, as torch.optim.Adam computes it (bias-corrected moments)
        mW = betas[0] * mW + (1 - betas[0]) * gW
        vW = betas[1] * vW + (1 - betas[1]) * gW * gW
        mb = betas[0] * mb + (1 - betas[0]) * gb
        vb = betas[1] * vb + (1 - betas[1]) * gb * gb
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        W = W - lr * (mW / c1) / (np.sqrt(vW / c2) + eps)
        b = b - lr * (mb / c1) / (np.sqrt(vb / c2) + eps)
        if holdout is not None and len(yh) and t >= min_iter:
            # Adam from zeros overshoots at first (the hold-out loss rises, then falls), so the
            # early-stopping watch starts after min_iter steps
            hl = -(swh * np.log(np.clip(softmax(Zh @ W + b)[np.arange(len(yh)), yh], 1e-12, None))).sum()
            if hl < best[0] - 1e-9:
                best = (hl, W.copy(), b.copy(), t)
            elif t - best[3] >= patience:
                break
    if holdout is not None and len(yh) and best[3] > 0:
        hold_loss, W, b, best_t = best
    else:
        hold_loss, best_t = None, t
    # fold the standardisation into the weights: (x - m) / s @ W + b = x @ (W / s) + (b - (m / s) @ W)
    Wf = W / std[:, None]
    bf = b - (mean / std) @ W
    return FitResult(Wf.T.astype(np.float32), bf.astype(np.float32), t, best_t, float(loss),
                     None if hold_loss is None else float(hold_loss), history)


def head_logits(X: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=np.float32) @ weight.T + bias


@dataclass
class LinearHead:
    """A fitted head: logits = x W^T + b, written as one Gemm. What retrain guards and commits."""

    weight: np.ndarray  # (C, D), nn.Linear layout
    bias: np.ndarray  # (C,)
    fit: dict  # what the fit reports (the retrain report's metrics.fit)
    fit_seconds: float = 0.0

    def logits(self, X: np.ndarray) -> np.ndarray:
        return head_logits(X, self.weight, self.bias)

    def write_onnx(self, path: str | Path, metadata: dict | None = None) -> None:
        write_head_onnx(path, self.weight, self.bias, metadata=metadata)


def write_head_onnx(path: str | Path, weight: np.ndarray, bias: np.ndarray, opset: int = 17,
                    metadata: dict | None = None) -> None:
    """features (batch, D) -> logits (batch, C), probs (batch, C): one Gemm and a Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    C, D = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "edgeft_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", C])],
        [numpy_helper.from_array(np.ascontiguousarray(weight, dtype=np.float32), "head.weight"),
         numpy_helper.from_array(np.ascontiguousarray(bias, dtype=np.float32), "head.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeft")
    model.ir_version = 8  # readable by every onnxruntime from 1.10 on
    if metadata:
        write_meta(model, metadata)
    onnx.checker.check_model(model)
    write_bytes(path, model.SerializeToString())


def read_head_onnx(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of a head file, whichever exporter wrote it."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    gemm = next((n for n in m.graph.node if n.op_type == "Gemm"), None)
    if gemm is not None:
        w, b = inits[gemm.input[1]], inits[gemm.input[2]]
        trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
        return (w if trans_b else w.T).astype(np.float32), b.astype(np.float32)
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    add = next(n for n in m.graph.node if n.op_type == "Add")
    w = inits[mm.input[1]]
    b = inits[next(i for i in add.input if i in inits)]
    return w.T.astype(np.float32), b.astype(np.float32)
