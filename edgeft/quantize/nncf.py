"""nncf: int8 QDQ by NNCF's post-training recipe for the model type, and every other NNCF call.

The recipe for text is ModelType.TRANSFORMER (SmoothQuant, mixed preset), calibrated on
real samples: about 99% of MiniLM's answers kept, but ONNX Runtime's CPU provider runs QDQ
slower than fp32 (OpenVINO runs it fast: the `openvino` target). Needs the openvino extra.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError, require
from .ort import onnx_inputs
from .registry import Mode, register

log = logging.getLogger(__name__)

AC_MAX_ITERATIONS = 8  # NNCF's accuracy control: at most this many rounds of reverting quantizers
# (uncapped, a forced restore on MiniLM ran for minutes without converging)


def load_nncf():
    """NNCF, offline and quiet: it sends usage telemetry by default unless NNCF_CI is set (edgeft
    works offline and sends nothing), and logs at INFO on its own logger."""
    os.environ.setdefault("NNCF_CI", "1")
    nncf = require("nncf", "openvino")
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


@contextlib.contextmanager
def progress_to_stderr():
    """NNCF draws its progress bars on stdout, where edgeft prints results: send them to stderr
    (or nowhere, under --quiet)."""
    target = sys.stderr if logging.getLogger("edgeft").isEnabledFor(logging.INFO) else io.StringIO()
    with contextlib.redirect_stdout(target):
        yield


def model_type(nncf, modality: str):
    return nncf.ModelType.TRANSFORMER if modality == "text" else None


def run(src, dst, *, modality, calibration=None, per_channel=True, exclude=None) -> list[str]:
    import onnx

    if not calibration:
        raise UsageError(f"{src}: nncf quantization needs calibration samples; none were given.")
    nncf = load_nncf()
    model = onnx.load(str(src))
    names = onnx_inputs(model)
    with progress_to_stderr():
        q = nncf.quantize(model, nncf.Dataset([{n: r[n] for n in names} for r in calibration]),
                          model_type=model_type(nncf, modality), subset_size=len(calibration),
                          ignored_scope=nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None)
    onnx.save(q, str(dst))
    dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted({n.op_type for n in q.graph.node
                   if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq.intersection(n.input)})


def qdq_nodes(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}


def accuracy_control(model, calibration: list[dict[str, np.ndarray]], gate, modality: str, fp32: Path):
    """NNCF's accuracy control on an OpenVINO or ONNX model -> (quantized model, what it did).

    The metric is top-1 agreement with the fp32 model (`fp32`, the exported backbone, with the
    gate's head) on the calibration rows: it needs no labels, it is the stricter half of the
    budget, and it leaves the gate's rows out of the search, so the gate that judges the result
    afterwards (agreement and accuracy drop against PyTorch) is still a fair test. Fitting the
    search to the gate's own 66 rows gave 100% there and 95% on held-out rows (MiniLM). NNCF
    quantizes, then reverts the quantizers that cost most, in at most AC_MAX_ITERATIONS rounds.
    """
    from ..runtime.session import OnnxModel

    nncf = load_nncf()
    reference = OnnxModel(fp32)
    val_items = [(row, gate.head({"features": reference(row)["features"]})["logits"].argmax(1))
                 for row in calibration]
    features = _features_of_candidate()

    def validation_fn(candidate, data) -> float:
        agree = total = 0
        for arrays, top in data:
            got = gate.head({"features": features(candidate, arrays).astype(np.float32)})["logits"].argmax(1)
            agree += int((got == top).sum())
            total += len(top)
        return agree / max(total, 1)

    t0 = time.perf_counter()
    with progress_to_stderr():
        controlled = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calibration), nncf.Dataset(val_items, lambda item: item),
            validation_fn=validation_fn, max_drop=1.0 - gate.thresholds.min_agreement,
            drop_type=nncf.DropType.ABSOLUTE, model_type=model_type(nncf, modality), subset_size=len(calibration),
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                max_num_iterations=AC_MAX_ITERATIONS))
    return controlled, {"method": "nncf.quantize_with_accuracy_control",
                        "metric": f"top-1 agreement with fp32 on {len(val_items)} calibration rows",
                        "max_iterations": AC_MAX_ITERATIONS, "seconds": round(time.perf_counter() - t0, 2)}


def _features_of_candidate():
    """(candidate, arrays) -> features, for the model NNCF hands the validation function: an ONNX
    ModelProto (one session per candidate) or an OpenVINO CompiledModel."""
    from ..runtime.session import make_session

    cached: list = [None, None]  # (the candidate ModelProto itself, its session): compared with `is`

    def features(candidate, arrays):
        if hasattr(candidate, "SerializeToString"):  # the ONNX backend hands over a ModelProto
            if cached[0] is not candidate:  # holding the object keeps its id from being reused
                cached[:] = [candidate, make_session(candidate.SerializeToString())]
            sess = cached[1]
            names = [i.name for i in sess.get_inputs()]
            return sess.run(None, {k: arrays[k] for k in names})[0]
        return np.asarray(candidate(arrays)[0])  # the OpenVINO backend: a CompiledModel

    return features


MODE = register(Mode("nncf", "int8", run, calibrated=True, needs_calibration=True, accuracy_control=True,
                     help="int8 QDQ by NNCF's recipe for the model type (needs the openvino extra)"))
