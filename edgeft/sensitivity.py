"""Which nodes does int8 hurt most? Measure each one alone, then keep the worst in float.

A whole-model int8 variant that misses the accuracy budget usually owes most of its error to
a few nodes (on MiniLM: the FFN output projections, whose GELU inputs have long tails that a
per-tensor activation scale cannot hold). To find them:

1. run the fp32 backbone once over real calibration rows, keeping the inputs every
   quantizable node sees;
2. cut each node out as a one-node model, quantize it exactly as the whole model would be
   (same quantizer, same options), and run both on those inputs: the node's relative error
   ||y_int8 - y_fp32|| / ||y_fp32|| is its sensitivity;
3. `search` quantizes the whole model with the k most sensitive nodes left in float, k
   doubling until the budget holds, then bisects down to the fewest that pass.

Each step runs the real onnxruntime quantizer, so what is measured is what ships.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SENSITIVITY_ROWS = 32  # calibration rows whose node inputs are kept (batch 1 each)
MAX_FLOAT_SHARE = 0.5  # beyond half the nodes in float it is no longer an int8 model


@dataclass(frozen=True)
class NodeError:
    name: str
    op_type: str
    error: float  # mean relative L2 error of the node's output over the rows

    def as_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "error": round(self.error, 6)}


def name_nodes(model) -> bool:
    """Give every unnamed (or duplicate-named) node a unique name; True when one changed.
    Excluding nodes from quantization goes by name."""
    seen, changed = set(), False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"edgeft_{node.op_type}_{i}"
            changed = True
        seen.add(node.name)
    return changed


def _elem_type(a: np.ndarray) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(a.dtype)


def _capture(model, names: list[str], rows: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The values `names` take on each row, read from an fp32 run of `model`."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph_inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in wanted:
        if n not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # unoptimised: fused nodes would swallow the intermediate values asked for
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = [i.name for i in sess.get_inputs()]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for row in rows:
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: row[k] for k in feeds}), strict=True))
        for n in names:
            out[n].append(row[n] if n in graph_inputs else values[n])
    return out


def _one_node_model(model, node, captured: dict[str, list[np.ndarray]]):
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    inputs = [n for n in node.input if n]
    g = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info(n, _elem_type(captured[n][0]), [None] * captured[n][0].ndim)
         for n in dict.fromkeys(inputs) if n not in inits],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        initializer=[inits[n] for n in dict.fromkeys(inputs) if n in inits])
    one = helper.make_model(g, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version
    return one


def node_errors(src: Path, quantize_one: Callable[[Path, Path, list[dict]], None], op_types: list[str],
                rows: list[dict[str, np.ndarray]]) -> list[NodeError]:
    """Every node of `op_types` in `src`, with its error when quantized alone, worst first.

    `quantize_one(src, dst, calibration_rows)` quantizes a one-node file the way the whole
    model is quantized (calibration rows are that node's own inputs).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    # a node whose inputs are all weights has nothing to calibrate or measure
    nodes = [n for n in nodes if any(i and i not in inits for i in n.input)]
    names = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in inits))
    rows = rows[:SENSITIVITY_ROWS]
    captured = _capture(model, names, rows)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    out = []
    with tempfile.TemporaryDirectory(prefix="edgeft-sens-") as tmp:
        for k, node in enumerate(nodes):
            one = _one_node_model(model, node, captured)
            fp32_path, q_path = Path(tmp) / f"{k}.onnx", Path(tmp) / f"{k}.q.onnx"
            onnx.save(one, str(fp32_path))
            feeds = [{n: captured[n][r] for n in dict.fromkeys(node.input) if n and n not in inits}
                     for r in range(len(rows))]
            try:
                quantize_one(fp32_path, q_path, feeds)
                ref = ort.InferenceSession(str(fp32_path), opts, providers=["CPUExecutionProvider"])
                got = ort.InferenceSession(str(q_path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - a node the quantizer cannot take alone: measured as harmless
                log.debug("sensitivity: %s skipped (%s)", node.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            errs = []
            for feed in feeds:
                y, yq = ref.run(None, feed)[0].astype(np.float64), got.run(None, feed)[0].astype(np.float64)
                errs.append(float(np.linalg.norm(yq - y) / max(np.linalg.norm(y), 1e-12)))
            out.append(NodeError(node.name, node.op_type, float(np.mean(errs))))
            fp32_path.unlink(), q_path.unlink(missing_ok=True)
    return sorted(out, key=lambda e: -e.error)


def max_float(ranking: list[NodeError], share: float | None = None) -> int:
    """How many nodes the search may keep in float: a share of those int8 changes at all."""
    n = len([e for e in ranking if e.error > 0])
    return max(1, int(n * (MAX_FLOAT_SHARE if share is None else share))) if n else 0


def search(ranking: list[NodeError], attempt: Callable[[list[str]], dict], *,
           max_float_share: float | None = None) -> tuple[dict | None, list[dict]]:
    """Fewest of the worst-ranked nodes to keep in float so that `attempt(excluded)` passes.

    `attempt(names)` quantizes with `names` in float and returns a dict with at least
    {"passed": bool}. k doubles (1, 2, 4, ...) up to `max_float_share` of the ranked nodes,
    then bisects between the last failing and the first passing k. Returns (the passing
    attempt with the fewest nodes in float, or None; every attempt in order).
    """
    names = [e.name for e in ranking if e.error > 0]
    limit = max_float(ranking, max_float_share)
    tried: list[dict] = []
    done: dict[int, dict] = {}

    def run(k: int) -> dict:
        if k not in done:
            result = attempt(names[:k])
            done[k] = {**result, "kept_float": names[:k]}
            tried.append(done[k])
        return done[k]

    lo, k = 0, 1  # lo: the largest k known to fail (0: the plain variant, which the caller tried)
    hi = None
    while k <= limit:
        if run(k)["passed"]:
            hi = k
            break
        lo = k
        k = limit if k < limit and 2 * k > limit else 2 * k
    if hi is None:
        return None, tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid)["passed"]:
            hi = mid
        else:
            lo = mid
    return done[hi], tried
