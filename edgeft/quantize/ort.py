"""What the onnxruntime quantizers (dynamic, static, weight-only) share."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..errors import UsageError


def onnx_inputs(model) -> list[str]:
    """Inputs the graph declares (older exports list initializers as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def extra_options() -> dict:
    import onnx

    # DefaultTensorType: the type of tensors shape inference cannot tell (ORT-fused graphs)
    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


class Reader:
    """An onnxruntime CalibrationDataReader (it checks for get_next) keeping only declared inputs."""

    def __init__(self, rows: list[dict[str, np.ndarray]], names: list[str]):
        for k, row in enumerate(rows):
            missing = [n for n in names if n not in row]
            if missing:
                raise UsageError(f"calibration sample {k}: missing inputs {missing}; the model declares {names}.")
        self._rows = iter([{n: row[n] for n in names} for row in rows])

    def get_next(self):
        return next(self._rows, None)


class _NoPreprocessNag(logging.Filter):
    """onnxruntime's quantizer logs, on the root logger, a nag to run its pre-processing; it
    changed nothing measurable on MiniLM here (same agreement to the row)."""

    def filter(self, record):
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def no_preprocess_nag():
    nag = _NoPreprocessNag()
    logging.getLogger().addFilter(nag)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(nag)


def present_ops(src) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node}
