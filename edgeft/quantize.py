"""`edgeft quantize`: an export dir -> the same layout with a smaller backbone, checked against fp32.

dynamic  int8 weights, activation scales computed per call (onnxruntime quantize_dynamic)
static   int8 QDQ, activation scales fixed by calibration on real preprocessed samples
fp16     half-precision weights and compute, float32 inputs and outputs
nncf     int8 QDQ by NNCF's post-training recipe for the model type (transformer: SmoothQuant,
         mixed preset), calibrated on real samples; about 99% of MiniLM's answers kept, but
         ONNX Runtime's CPU provider runs QDQ slower than fp32 (OpenVINO runs it fast: the
         `openvino` target); needs the openvino extra
weight-only  int8 weights in blocks of 32 (MatMulNBits), activations stay float: the answers of
         fp32 at a quarter of the size (measured on MiniLM: 100% top-1 agreement where dynamic
         int8 kept 96-98%), about 1.5-2x faster than fp32 on CPU; the embedding table int8 too

Only the backbone is quantized: the head stays fp32, since the device retrains it in fp32,
and model.onnx is the two joined again, as export does it. The quantized model.onnx runs
against the fp32 one on the same real rows; a result outside the quantized thresholds
(top-1 agreement >= 99%, accuracy drop <= 1 point) is a ParityError and nothing is written.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .errors import DataError, ParityError, UsageError, did_you_mean, refuse_existing, require
from .onnx_graph import fuse
from .parity import Thresholds, checks, compare
from .runtime import atomic
from .runtime.preprocess import load_preprocessor

log = logging.getLogger(__name__)

MODES = ("dynamic", "static", "nncf", "fp16", "weight-only")
PRECISION = {"dynamic": "int8", "static": "int8", "nncf": "int8", "fp16": "fp16", "weight-only": "int8"}
CALIBRATED = ("dynamic", "static", "nncf", "weight-only")  # modes that read real rows (dynamic, weight-only: for the search only)
WEIGHT_ONLY_BLOCK = 32  # int8 scales per 32 weights: block 128 flipped 2.5% of MiniLM's answers, 32 none
FILES = ("backbone.onnx", "head.onnx", "model.onnx")
COPIED = ("tokenizer.json", "preprocessor.json", "labels.json")
# Static QDQ over every op type can put infinite scales on a BERT's attention-mask path
# ((1 - mask) * float32 min) and break it (33% agreement on MiniLM, STACK.md); the weights
# live in these op types. The parity gate, not this list, is what catches a broken model.
STATIC_OP_TYPES = {"text": ["MatMul"], "image": ["Conv", "MatMul", "Gemm"]}
CALIBRATION_ROWS = 300  # batch-1 samples; more rarely moves MinMax ranges
PARITY_ROWS = 1000  # batch 1 each: what a device sees, and no batch-mates moving dynamic scales
LATENCY_RUNS, LATENCY_BLOCKS, WARMUP_RUNS, LATENCY_INPUTS = 30, 3, 2, 10


def _onnx_inputs(model) -> list[str]:
    """Inputs the graph declares (older exports list initializers as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


class _Reader:
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


def quantize_model(src: Path, dst: Path, mode: str, *, modality: str,
                   calibration: list[dict[str, np.ndarray]] | None = None, per_channel: bool = True,
                   exclude: list[str] | None = None) -> dict:
    """Quantize one ONNX file (a backbone) `src` -> `dst`, self-contained.

    mode: "dynamic" (int8 weights, activation scales per call), "static" (int8 QDQ; needs
    `calibration`, input dicts of real preprocessed samples) or "fp16" (float16 inside,
    float32 inputs and outputs). `modality` ("text" or "image") picks the op types static
    quantizes; `exclude` names nodes to keep in float (dynamic, static, weight-only). Returns
    {"mode", "op_types", "per_channel", "bytes"}.
    """
    import onnx

    if mode not in MODES:
        raise UsageError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}.{did_you_mean(mode, MODES)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    present = {n.op_type for n in model.graph.node}
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "nncf":
        from .openvino_build import _nncf, _progress_to_stderr

        if not calibration:
            raise UsageError(f"{src}: nncf quantization needs calibration samples; none were given.")
        nncf = _nncf()
        names = _onnx_inputs(model)
        with _progress_to_stderr():
            q = nncf.quantize(model, nncf.Dataset([{n: r[n] for n in names} for r in calibration]),
                              model_type=nncf.ModelType.TRANSFORMER if modality == "text" else None,
                              subset_size=len(calibration),
                              ignored_scope=nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None)
        onnx.save(q, str(dst))
        dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        op_types = sorted({n.op_type for n in q.graph.node
                           if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq.intersection(n.input)})
        del q
    elif mode == "fp16":
        float16 = require("onnxconverter_common.float16")
        with warnings.catch_warnings():
            # it warns once per constant it clamps to fp16's range, e.g. the -3.4e38 of a masked mean
            warnings.simplefilter("ignore", UserWarning)
            half = float16.convert_float_to_float16(model, keep_io_types=True)
        _fix_float_casts(half)
        onnx.save(half, str(dst))
        op_types = sorted(present - set(float16.DEFAULT_OP_BLOCK_LIST))
        per_channel = False
    else:
        from onnxruntime.quantization import (
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

        inputs = _onnx_inputs(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        del model  # the quantizers read the file themselves (given a ModelProto, they rewrite it in place)
        # DefaultTensorType: the type of tensors shape inference cannot tell (ORT-fused graphs)
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        nag = _NoPreprocessNag()
        logging.getLogger().addFilter(nag)
        try:
            if mode == "weight-only":
                op_types = _weight_only(src, dst, present, extra, exclude)
            elif mode == "dynamic":
                op_types = sorted(present & set(IntegerOpsRegistry))
                quantize_dynamic(str(src), str(dst), op_types_to_quantize=op_types, per_channel=per_channel,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None, extra_options=extra)
            else:
                if not calibration:
                    raise UsageError(f"{src}: static quantization needs calibration samples; none were given.")
                if per_channel and opset < 13:  # onnxruntime writes DequantizeLinear(axis=) regardless
                    raise UsageError(f"{src}: static per-channel int8 needs opset 13 or newer (this is opset "
                                     f"{opset}). Re-export with --opset 13 or later, or pass --no-per-channel.")
                wanted = STATIC_OP_TYPES.get(modality)
                op_types = sorted(present & set(QDQRegistry if wanted is None else wanted))
                # MinMax keeps only each tensor's min and max per sample, so 300 samples cost little
                # memory. (Not CalibMaxIntermediateOutputs: onnxruntime 1.32 discards the samples it
                # clears with it instead of folding them into the ranges.)
                # U8S8 (uint8 activations, int8 weights): onnxruntime's recommended pairing on x86
                quantize_static(str(src), str(dst), _Reader(calibration, inputs), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=exclude or None, extra_options=extra)
        finally:
            logging.getLogger().removeFilter(nag)
    out = onnx.load(str(dst), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer):
        raise UsageError(f"{dst}: the quantizer wrote external data; edgeft ships single-file models.")
    meta = _edgeft_meta(out)
    if meta:  # the quantizers keep the export's metadata, precision "fp32" included
        _save_with_meta(out, dst, {**meta, "precision": PRECISION[mode]})
    return {"mode": mode, "op_types": op_types, "per_channel": bool(per_channel), "bytes": dst.stat().st_size}


IMAGE_SENSITIVITY_ROWS = 4  # a CNN's activations are large: 4 images x every node's inputs, held at once
SEARCHABLE = ("dynamic", "static", "weight-only")  # modes whose nodes can be kept in float one by one


def _file_bytes(path: Path) -> int:
    """A model's size on disk: an OpenVINO IR is the .xml and its .bin."""
    path = Path(path)
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.exists() else 0)


class Gate:
    """A candidate backbone (ONNX file) -> the parity checks of head(backbone(x)) against reference
    logits on fixed rows. `batches`: preprocessed input dicts, in the order of `reference`."""

    def __init__(self, reference: np.ndarray, y: list[int] | None, labels: list[str], batches, head,
                 thresholds: Thresholds, open_model=None):
        self.reference, self.y, self.labels, self.head, self.thresholds = reference, y, labels, head, thresholds
        self.open_model = open_model  # path -> model(arrays) -> {"features"}; None: onnxruntime
        self.batches = batches  # a list, or a callable giving a fresh iterable (images: decoded per use)

    def logits(self, model) -> np.ndarray:
        batches = self.batches() if callable(self.batches) else self.batches
        return np.concatenate([self.head({"features": model(a)["features"]})["logits"] for a in batches])

    def __call__(self, path: Path, label: str | None = None) -> dict:
        """The verdict on the model at `path`; logged as `label` when given."""
        from .runtime.session import OnnxModel

        model = (self.open_model or OnnxModel)(path)
        rep = compare(self.reference, self.logits(model), self.y, self.labels)
        found = checks(rep, self.thresholds)
        verdict = {"passed": all(c["passed"] for c in found), "agreement": rep["agreement"],
                   "accuracy_drop": rep.get("accuracy_drop"), "bytes": _file_bytes(path),
                   "failed": [c["message"] for c in found if not c["passed"]]}
        if label:
            log.info("%s: agreement %.2f%%, accuracy drop %.2f points%s", label, 100 * verdict["agreement"],
                     100 * (verdict["accuracy_drop"] or 0.0), "" if verdict["passed"] else " (misses the budget)")
        return verdict


VERDICT = ("agreement", "accuracy_drop", "bytes", "failed")  # what a result keeps of an attempt it replaced


def quantize_to_budget(src: Path, work: Path, mode: str, *, modality: str, gate: Gate,
                       calibration: list[dict[str, np.ndarray]] | None = None, per_channel: bool = True,
                       search: bool = True) -> dict:
    """Quantize `src` with `mode` into `work`; when the result misses the gate (dynamic or static
    int8), keep the nodes int8 hurts most in float until it passes (edgeft.sensitivity).

    Returns quantize_model's info plus the gate's verdict ("passed", "agreement",
    "accuracy_drop", "failed"), "path" (the file that passed, or the plain attempt), and for a
    search: "kept_float" (node names), "plain" (the all-int8 attempt) and "search" (ranking,
    attempts). Nothing raises for a missed budget: the caller decides.
    """
    import onnx

    from .sensitivity import SENSITIVITY_ROWS, max_float, name_nodes, node_errors
    from .sensitivity import search as search_nodes

    work.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    if mode in SEARCHABLE and name_nodes(model):  # keeping nodes in float goes by name
        src = work / f"{Path(src).stem}.named.onnx"
        onnx.save(model, str(src))
    del model
    plain = work / f"backbone.{mode}.onnx"
    info = quantize_model(src, plain, mode, modality=modality, calibration=calibration, per_channel=per_channel)
    if not info["op_types"]:  # e.g. weight-only on a CNN: nothing it can quantize
        return {**info, "path": None, "passed": False, "failed": ["no operator of this model to quantize"]}
    out = {**info, **gate(plain, mode), "path": plain, "kept_float": []}
    if mode == "nncf" and not out["passed"] and search and calibration:
        from .openvino_build import accuracy_control

        plain_verdict = {k: out[k] for k in VERDICT}
        controlled, info_ac = accuracy_control(onnx.load(str(src)), calibration, gate, modality, src)
        path = work / "backbone.nncf.ac.onnx"
        onnx.save(controlled, str(path))
        out.update(gate(path), path=path, plain=plain_verdict, search=info_ac, plain_path=plain)
        before = _qdq_nodes(plain)
        out["search"].update(quantizers=len(before), reverted=len(before - _qdq_nodes(path)))
        return out
    if out["passed"] or not search or mode not in SEARCHABLE or not calibration:
        return out

    def quantize_one(a: Path, b: Path, rows: list[dict]) -> None:
        quantize_model(a, b, mode, modality=modality, calibration=rows, per_channel=per_channel)

    t0 = time.perf_counter()
    ranking = node_errors(src, quantize_one, info["op_types"], calibration,
                          max_rows=IMAGE_SENSITIVITY_ROWS if modality == "image" else SENSITIVITY_ROWS)

    def attempt(names: list[str]) -> dict:
        path = work / f"backbone.{mode}.float{len(names)}.onnx"
        quantize_model(src, path, mode, modality=modality, calibration=calibration, per_channel=per_channel,
                       exclude=names)
        return {**gate(path, f"{mode} with {len(names)} node(s) in float"), "path": path}

    best, tried = search_nodes(ranking, attempt)
    plain_verdict = {k: out[k] for k in VERDICT}
    out["search"] = {
        "nodes": len(ranking), "max_float": max_float(ranking),
        "ranking": [e.as_dict() for e in ranking[:20]],
        "tried": [{"kept_float": len(t["kept_float"]), "passed": t["passed"], "agreement": t["agreement"],
                   "accuracy_drop": t["accuracy_drop"], "bytes": t["bytes"]} for t in tried],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out["plain"], out["plain_path"] = plain_verdict, plain
    if best is not None:
        out.update({k: best[k] for k in ("passed", "agreement", "accuracy_drop", "bytes", "failed", "path",
                                         "kept_float")})
    elif tried:  # report the closest miss: the attempt with the most nodes in float
        last = max(tried, key=lambda t: len(t["kept_float"]))
        out.update({k: last[k] for k in ("agreement", "accuracy_drop", "bytes", "failed", "kept_float")})
    return out


def _qdq_nodes(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}


def describe_miss(result: dict) -> str:
    """One line: why a variant missed its budget, with the search's numbers."""
    text = f"{result['mode']}: " + ", ".join(result.get("failed") or ["failed"])
    s = result.get("search")
    if s and "nodes" in s:
        text += (f" even with {len(result.get('kept_float') or [])} of {s['nodes']} nodes kept in float "
                 f"(the search stops at {s['max_float']})")
    elif s:
        text += f" even after {s['method']} reverted {s['reverted']} of {s['quantizers']} quantizers to float"
    return text


def _weight_only(src: Path, dst: Path, present: set[str], extra: dict, exclude: list[str] | None = None) -> list[str]:
    """MatMul weights to 8-bit blocks (MatMulNBits, int8 compute where the CPU has it), then the
    embedding tables (Gather) to int8 with dynamic quantization."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    require("onnx_ir")  # onnxruntime's MatMulNBits quantizer imports it; say how to install it
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)  # it logs every node it skips at INFO
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                                accuracy_level=4, bits=8)
    q = nbits.MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                   accuracy_level=4, algo_config=config, nodes_to_exclude=list(exclude or []))
    q.process()
    mid = dst.with_name(f".{dst.name}.matmul.onnx")
    try:
        q.model.save_model_to_file(str(mid), use_external_data_format=False)
        if "Gather" in present:
            quantize_dynamic(str(mid), str(dst), op_types_to_quantize=["Gather"], per_channel=False,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None, extra_options=extra)
        else:
            mid.replace(dst)
    finally:
        mid.unlink(missing_ok=True)
    return sorted({"MatMul", "Gather"} & present)


def _fix_float_casts(model) -> None:
    """Cast(to=float) nodes inside an fp16 graph: make them cast to fp16, as their outputs are typed.

    The converter retypes every float tensor to float16 but leaves Cast's `to` attribute, so
    e.g. a masked mean's `mask.float()` yields float where float16 is declared and
    onnxruntime refuses to load the model.
    """
    import onnx

    half = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in half:
            for a in node.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                    a.i = onnx.TensorProto.FLOAT16


def _edgeft_meta(model) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props["edgeft"]) if "edgeft" in props else {}


def _save_with_meta(model, path: Path, meta: dict) -> None:
    import onnx

    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgeft", json.dumps(meta)
    model.producer_name, model.producer_version = "edgeft", __version__
    onnx.save(model, str(path))


def _training_rows(info: dict):
    """The training rows of the run (or merged model) an export came from, or None."""
    from .runs import read_run, training_data, training_source

    src = Path(info.get("source") or "")
    try:
        if (src / "run.json").exists():
            run = read_run(src)
            where = run.get("training") or training_source(run["config"])
        elif (src / "edgeft.json").exists():
            where = json.loads((src / "edgeft.json").read_text()).get("training")
        else:
            return None
        return training_data(where)
    except (OSError, ValueError, KeyError):
        return None


def _read_export(export_dir: Path) -> dict:
    missing = [f for f in (*FILES, "export.json") if not (export_dir / f).exists()]
    if not export_dir.is_dir() or missing:
        raise UsageError(f"{export_dir}: not a folder from edgeft export (missing {', '.join(missing)}).")
    info = json.loads((export_dir / "export.json").read_text())
    if info.get("precision", "fp32") != "fp32":
        raise UsageError(f"{export_dir}: already {info['precision']}; quantize the fp32 export it came from.")
    return info


def _latency(fp32, quant, inputs) -> dict:
    """Median batch-1 ms of both models on the same real inputs.

    Alternating blocks of runs, not single calls: a session's intra-op threads keep spinning
    after a run, and switching sessions every call makes each pay for the other's threads
    (fp32 measured 12.6 ms that way against 8.6 ms alone). Alternating blocks still spread
    the machine's noise (about ±15%) over both.
    """
    times = {"fp32": [], "quantized": []}
    for _ in range(LATENCY_BLOCKS):
        for name, model in (("fp32", fp32), ("quantized", quant)):
            for k in range(WARMUP_RUNS):
                model(inputs[k % len(inputs)])
            for k in range(LATENCY_RUNS // LATENCY_BLOCKS):
                t = time.perf_counter()
                model(inputs[k % len(inputs)])
                times[name].append(1000 * (time.perf_counter() - t))
    out = {f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()}
    out.update(runs=len(times["fp32"]), inputs=len(inputs), batch=1)
    out["speedup"] = round(out["fp32_ms"] / out["quantized_ms"], 3) if out["quantized_ms"] else None
    return out


def _parity(quant, backbone, head, pre, items) -> tuple[np.ndarray, float, list]:
    """Quantized logits, batch 1 per row; fused-vs-split gap; the first rows for timing. (The fp32
    logits of the same rows are the gate's reference, computed once.)"""
    got, gap, kept = [], 0.0, []
    for k, x in enumerate(items):
        arrays = pre([x])  # one row at a time: 1,000 preprocessed images would not fit in memory
        got.append(quant(arrays)["logits"])
        if k < LATENCY_INPUTS:
            kept.append(arrays)
            split = head({"features": backbone(arrays)["features"]})["logits"]
            gap = max(gap, float(np.abs(split - got[-1]).max()))
    return np.concatenate(got), gap, kept


def quantize(export_dir, mode, output, *, calibration=None, text_column="text", label_column="label",
             per_channel=True, overwrite=False, thresholds=None, search=True) -> dict:
    """Quantize an export dir's backbone into `output` (same layout + quantize.json); return quantize.json.

    `calibration`: data file or image folder (labels optional) whose rows calibrate static
    mode; without it static calibrates on the export's validation rows. Parity runs the
    quantized model.onnx against the fp32 one, batch 1, on the validation rows (or the
    calibration rows where those are gone); `thresholds` default to
    Thresholds.for_precision("int8" or "fp16"). Outside them: ParityError, nothing written.
    """
    import onnx

    from .data import check_labels, load_dataset
    from .runs import validation_data
    from .runtime.bundle import sha256
    from .runtime.session import OnnxModel

    t0 = time.perf_counter()
    export_dir, output = Path(export_dir), Path(output)
    if mode not in MODES:
        raise UsageError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}.{did_you_mean(mode, MODES)}")
    info = _read_export(export_dir)
    if output.resolve() == export_dir.resolve():
        raise UsageError(f"{output}: is the export itself. Choose another --output.")
    refuse_existing(output, overwrite)
    modality, labels, precision = info["modality"], info["labels"], PRECISION[mode]
    pre = load_preprocessor(export_dir, info["preprocessing"])

    calib_ds = None
    if calibration is not None:
        calib_ds = load_dataset(calibration, text_column, label_column, require_labels=False)
        if calib_ds.kind != modality:
            raise DataError(f"{calibration}: {calib_ds.kind} data, but {export_dir} holds a {modality} model.")
        check_labels(calib_ds, labels)
    val_ds = validation_data(info.get("validation"))
    parity_ds = val_ds if val_ds is not None else calib_ds
    if parity_ds is None:
        raise UsageError(f"{export_dir}: its validation data is gone and no --calibration was given. "
                         "Pass --calibration DATA (labelled rows) so the quantized model can be checked.")
    if calib_ds is None and mode in CALIBRATED:
        # the rows the model trained on: calibration and the search's ranking then never see
        # the rows that judge the result
        calib_ds = _training_rows(info)
        if calib_ds is None:
            log.warning("%s: its training rows are gone; calibrating on the validation rows that also judge "
                        "the result (pass --calibration to keep them apart).", export_dir)
            calib_ds = val_ds
    items = parity_ds.items[:PARITY_ROWS]
    y = None
    if all(v is not None for v in parity_ds.labels[: len(items)]):
        index = {n: i for i, n in enumerate(labels)}
        y = [index[v] for v in parity_ds.labels[: len(items)]]
    t = thresholds or Thresholds.for_precision(precision)
    if mode in ("static", "nncf"):
        log.debug("calibrating on %d rows of %s", min(len(calib_ds), CALIBRATION_ROWS), calib_ds.source)
    log.debug("parity against fp32 on %d rows of %s", len(items), parity_ds.source)

    ref_model = OnnxModel(export_dir / "model.onnx")
    if modality == "text":  # a few hundred token rows: keep them; images are decoded per use
        rows = [pre([x]) for x in items]
        batches = rows
    else:
        batches = lambda: (pre([x]) for x in items)  # noqa: E731
    ref = np.concatenate([ref_model(a)["logits"] for a in (batches() if callable(batches) else batches)])
    gate = Gate(ref, y, labels, batches, OnnxModel(export_dir / "head.onnx"), t)
    with atomic.directory(output, replace=overwrite) as tmp, tempfile.TemporaryDirectory(prefix="edgeft-quantize-") as work:
        calib_rows = ([pre([x]) for x in calib_ds.items[:CALIBRATION_ROWS]]
                      if mode in CALIBRATED and calib_ds is not None else None)
        result = quantize_to_budget(export_dir / "backbone.onnx", Path(work), mode, modality=modality, gate=gate,
                                    calibration=calib_rows, per_channel=per_channel, search=search)
        del calib_rows
        if not result["passed"]:
            hint = " fp16 usually keeps parity;" if precision == "int8" else ""
            raise ParityError(
                f"{output}: {mode} quantization misses the budget against the fp32 export on {len(items)} rows of "
                f"{parity_ds.source}: {describe_miss(result)}. Nothing was written.{hint} --min-agreement and "
                "--max-drop loosen the gate knowingly.")
        shutil.copy2(result["path"], tmp / "backbone.onnx")
        backbone, head = onnx.load(str(tmp / "backbone.onnx")), onnx.load(str(export_dir / "head.onnx"))
        metas = {"backbone.onnx": _edgeft_meta(backbone) or _edgeft_meta(onnx.load(str(export_dir / "backbone.onnx"))),
                 "head.onnx": _edgeft_meta(head)}
        metas["model.onnx"] = {**metas["backbone.onnx"], "part": "model"}  # what export writes
        quant_meta = {"mode": mode, "backbone": precision, "head": "fp32", "per_channel": result["per_channel"],
                      "op_types": result["op_types"], "kept_float": result["kept_float"]}
        fused = fuse(backbone, head)
        for f, m in (("backbone.onnx", backbone), ("head.onnx", head), ("model.onnx", fused)):
            _save_with_meta(m, tmp / f, {**metas[f], "precision": precision, "quantization": quant_meta})
        del backbone, head, fused
        for f in COPIED:
            if (export_dir / f).exists():
                shutil.copy2(export_dir / f, tmp / f)

        fp32_model, quant_model = ref_model, OnnxModel(tmp / "model.onnx")
        got, gap, kept = _parity(quant_model, OnnxModel(tmp / "backbone.onnx"), OnnxModel(tmp / "head.onnx"),
                                 pre, items)
        report = compare(ref, got, y, labels, items)
        report.update(fused_vs_split_max_abs_diff=gap, batch=1, reference=str(export_dir / "model.onnx"),
                      data=parity_ds.source, thresholds=t.__dict__, checks=checks(report, t))
        failed = [c for c in report["checks"] if not c["passed"]]
        if failed:
            hint = " fp16 usually keeps parity;" if precision == "int8" else ""
            raise ParityError(
                f"{output}: {mode} quantization strays too far from the fp32 export on {report['rows']} rows of "
                f"{parity_ds.source}: " + "; ".join(c["message"] for c in failed)
                + f". Nothing was written.{hint} --min-agreement and --max-drop loosen the gate knowingly.")
        latency = _latency(fp32_model, quant_model, kept)
        if result.get("search"):  # what keeping nodes in float cost against the all-int8 attempt
            plain_model = OnnxModel(result["plain_path"])
            split = OnnxModel(tmp / "backbone.onnx")
            cost = _latency(split, plain_model, kept)
            result["plain"]["latency_ms"] = cost["quantized_ms"]
            result["search"]["cost"] = {
                "extra_bytes": result["bytes"] - result["plain"]["bytes"],
                "extra_ms": round(cost["fp32_ms"] - cost["quantized_ms"], 3),
                "note": "backbone only, batch 1: this variant against the all-int8 attempt"}

        written = [f for f in (*FILES, *COPIED) if (tmp / f).exists()]
        files = {f: {"sha256": sha256(tmp / f), "bytes": (tmp / f).stat().st_size,
                     "fp32_bytes": (export_dir / f).stat().st_size} for f in written}
        summary = {
            "edgeft_version": __version__, "mode": mode, "precision": precision, "source": str(export_dir),
            "per_channel": result["per_channel"], "op_types": result["op_types"], "head": "fp32",
            "kept_float": result["kept_float"], "search": result.get("search"), "all_int8": result.get("plain"),
            "calibration": ({"data": calib_ds.source, "rows": min(len(calib_ds), CALIBRATION_ROWS)}
                            if mode in ("static", "nncf") or result.get("search") else None),
            "files": files, "parity": report, "latency": latency,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic.write_json(tmp / "quantize.json", summary)
        # export.json too, so tools that read an export folder read this one alike
        atomic.write_json(tmp / "export.json", {
            **info, "precision": precision, "quantization": "quantize.json", "parity": report,
            "files": {f: {k: v for k, v in files[f].items() if k != "fp32_bytes"} for f in FILES}})
    return summary
