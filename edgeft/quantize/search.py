"""Which nodes does int8 hurt most? Measure each one alone, then keep the worst in float.

A whole-model int8 variant that misses the accuracy budget usually owes most of its error to
a few nodes (on MiniLM: the FFN output projections, whose GELU inputs have long tails that a
per-tensor activation scale cannot hold). To find them:

1. run the fp32 backbone once over real calibration rows, keeping the inputs every
   quantizable node sees;
2. cut each node out as a one-node model, quantize it exactly as the whole model would be
   (same quantizer, same options), and run both on those inputs: y_int8 - y_fp32 is what
   int8 changes at that node;
3. run the fp32 model with that difference added to the node's output: how far the
   model's output moves (relative L2) is the node's sensitivity, the error it causes
   downstream, not only where it arises (on MiniLM the FFN output projections rank first
   this way, as the hand measurements in STACK.md found);
4. `search` quantizes the whole model with the k most sensitive nodes left in float, k
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

from ..runtime.session import make_session

log = logging.getLogger(__name__)

SENSITIVITY_ROWS = 16  # calibration rows whose node inputs are kept (batch 1 each); 32 ranked MiniLM alike
MAX_FLOAT_SHARE = 0.5  # beyond half the nodes in float it is no longer an int8 model


@dataclass(frozen=True)
class NodeError:
    name: str
    op_type: str
    error: float  # mean relative L2 change of the model's output when this node alone is int8
    local: float = 0.0  # mean relative L2 error of the node's own output

    def as_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "error": round(self.error, 6),
                "local": round(self.local, 6)}


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
    from onnx import helper

    graph_inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in wanted:
        if n not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    # unoptimised: fused nodes would swallow the intermediate values asked for
    sess = make_session(probe.SerializeToString(), optimize=False)
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
                rows: list[dict[str, np.ndarray]], max_rows: int = SENSITIVITY_ROWS) -> list[NodeError]:
    """Every node of `op_types` in `src`, with its error when it alone is quantized, worst first.

    `quantize_one(src, dst, calibration_rows)` quantizes a one-node file the way the whole
    model is quantized (calibration rows are that node's own inputs). A node's error is how
    far the model's output moves (relative L2) when that node alone runs in int8: its own
    int8 error, carried through everything downstream. That is measured exactly, and
    cheaply, by running the fp32 model with the node's int8-minus-fp32 difference added to
    its output (see _perturbable); `local` keeps the node's own relative error.
    """
    import onnx

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    nodes = candidates(model, op_types, rows[0] if rows else None)
    names = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in inits))
    rows = rows[:max_rows]  # every node's inputs on every row are kept at once: few rows for images
    captured = _capture(model, names, rows)
    out = []
    with tempfile.TemporaryDirectory(prefix="edgeft-sens-") as tmp:
        whole = _Perturbable(model, nodes, rows, Path(tmp))
        for k, node in enumerate(nodes):
            one = _one_node_model(model, node, captured)
            fp32_path, q_path = Path(tmp) / f"{k}.onnx", Path(tmp) / f"{k}.q.onnx"
            onnx.save(one, str(fp32_path))
            feeds = [{n: captured[n][r] for n in dict.fromkeys(node.input) if n and n not in inits}
                     for r in range(len(rows))]
            try:
                quantize_one(fp32_path, q_path, feeds)
                ref, got = make_session(fp32_path), make_session(q_path)
            except Exception as e:  # noqa: BLE001 - a node the quantizer cannot take alone: measured as harmless
                log.debug("sensitivity: %s skipped (%s)", node.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            local, downstream = [], []
            for r, feed in enumerate(feeds):  # one row at a time: conv outputs are large
                y, yq = ref.run(None, feed)[0], got.run(None, feed)[0]
                delta = yq.astype(np.float32) - y.astype(np.float32)
                local.append(float(np.linalg.norm(delta) / max(float(np.linalg.norm(y)), 1e-12)))
                downstream.append(whole.error(node.name, r, delta))
            out.append(NodeError(node.name, node.op_type, float(np.mean(downstream)), float(np.mean(local))))
            fp32_path.unlink(), q_path.unlink(missing_ok=True)
    return sorted(out, key=lambda e: -e.error)


def candidates(model, op_types, row: dict[str, np.ndarray] | None = None) -> list:
    """The nodes of `op_types` the search ranks: those with a non-weight input (a node whose inputs
    are all weights has nothing to calibrate or measure) and a float first output (a Gather on a
    shape is nothing int8 touches)."""
    inits = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in op_types and any(i and i not in inits for i in n.input)]
    floats = _float_values(model, [n.output[0] for n in nodes], row)
    return [n for n in nodes if n.output[0] in floats]


def _float_values(model, wanted: list[str] | None = None, row: dict[str, np.ndarray] | None = None) -> set[str]:
    """Names of the float32 values in the graph: by onnx shape inference, and for the `wanted`
    values it leaves untyped, by what one unoptimised run on `row` gives them.

    onnx's inference does not know ONNX Runtime's fused operators (quantize.fuse): it types
    neither their outputs nor anything computed from them, so in a fused graph every MatMul
    downstream of the EmbedLayerNormalization was untyped and left out of the search (the tiny
    BERT: 3 of 9 dynamic-fused candidates, none of weight-only-fused's 6, tests/test_int8_modes.py;
    the maintenance MiniLM: 7 of 25 and none of 18)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    typed = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    floats = {n for n, t in typed.items() if t == onnx.TensorProto.FLOAT}
    unknown = [n for n in dict.fromkeys(wanted or ()) if n not in typed]
    if unknown and row is not None:
        got = _capture(model, unknown, [row])
        floats |= {n for n in unknown if got[n][0].dtype == np.float32}
    elif unknown:  # no row to run: the fused operators' first outputs are float (Attention,
        # EmbedLayerNormalization, SkipLayerNormalization, BiasGelu)
        floats |= {n.output[0] for n in model.graph.node if n.domain == "com.microsoft" and n.output}
    return floats


class _Perturbable:
    """The fp32 model where each node's first output gets `+ delta`, a new graph input that
    broadcasts: [0] leaves the node exact, its int8-minus-fp32 difference makes it the one node
    in int8. `error(node, row, delta)`: how far the model's first output moves (relative L2)."""

    def __init__(self, model, nodes, rows, tmp: Path):
        import onnx

        m, self.inputs = _perturbable(model, nodes)
        path = tmp / "perturbable.onnx"
        onnx.save(m, str(path))
        del m
        self.sess = make_session(path)
        names = [i.name for i in self.sess.get_inputs() if not i.name.startswith("edgeft_delta_")]
        zero = np.zeros(1, np.float32)
        self.base = [{**{k: row[k] for k in names}, **{d: zero for d in self.inputs.values()}} for row in rows]
        self.refs = [self.sess.run(None, feed)[0] for feed in self.base]

    def error(self, node: str, row: int, delta: np.ndarray) -> float:
        y = self.sess.run(None, {**self.base[row], self.inputs[node]: delta})[0]
        ref = self.refs[row]
        return float(np.linalg.norm(y - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def _perturbable(model, nodes):
    """A copy of `model` where each node's first output gets `+ delta` (a new graph input that
    broadcasts: feed [0] to leave the node exact, its int8 difference to quantize it alone)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {n.name: n for n in m.graph.node}
    adds, names = [], {}
    for k, node in enumerate(nodes):
        target = by_name[node.name]
        out = target.output[0]
        raw, delta = f"{out}__edgeft_exact", f"edgeft_delta_{k}"
        target.output[0] = raw
        adds.append((target, helper.make_node("Add", [raw, delta], [out], name=f"edgeft_add_{k}")))
        m.graph.input.append(helper.make_tensor_value_info(delta, TensorProto.FLOAT, None))
        names[node.name] = delta
    order = list(m.graph.node)
    del m.graph.node[:]
    pending = {id(t): a for t, a in adds}
    for n in order:  # each Add right after its node keeps the graph topologically sorted
        m.graph.node.append(n)
        if id(n) in pending:
            m.graph.node.append(pending[id(n)])
    return m, names


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
