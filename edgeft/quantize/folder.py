"""`edgeft quantize` on a folder: an export dir -> the same layout with a smaller backbone,
gated against the fp32 export; nothing is written when the gate says no."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..certify import CALIBRATION_ROWS
from ..config import QuantizeConfig
from ..errors import DataError, ParityError, UsageError, refuse_existing
from ..onnx_graph import fuse
from ..results import QuantizeResult
from ..runtime import atomic
from ..runtime.compare import checks, compare
from ..runtime.manifest import file_entry
from ..runtime.preprocess import load_preprocessor
from ..runtime.session import read_meta, write_meta
from . import registry
from .budget import quantize_to_budget
from .gate import describe_miss, prepare_gate

log = logging.getLogger("edgeft.quantize")

FILES = ("backbone.onnx", "head.onnx", "model.onnx")
COPIED = ("tokenizer.json", "preprocessor.json", "labels.json")
LATENCY_RUNS, LATENCY_BLOCKS, WARMUP_RUNS, LATENCY_INPUTS = 30, 3, 2, 10


def _training_rows(info: dict):
    """The training rows of the run (or merged model) an export came from, or None."""
    from ..runs import read_run, training_data, training_source

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


def _datasets(cfg: QuantizeConfig, export_dir: Path, info: dict, calibrated: bool):
    """(calibration rows or None, the held-out rows): the user's calibration rows, else the
    training rows, else the validation rows; the validation rows judge, else the calibration rows.
    Where one file both calibrates and judges, half of it calibrates and the other half judges
    (certify.calibration_items, shared): the rows calibration used never judge."""
    from ..data import check_labels, load_dataset
    from ..runs import validation_data

    calib_ds = None
    if cfg.calibration is not None:
        calib_ds = load_dataset(cfg.calibration, cfg.text_column, cfg.label_column, require_labels=False)
        if calib_ds.kind != info["modality"]:
            raise DataError(f"{cfg.calibration}: {calib_ds.kind} data, but {export_dir} holds a {info['modality']} model.")
        check_labels(calib_ds, info["labels"])
    val_ds = validation_data(info.get("validation"))
    parity_ds = val_ds if val_ds is not None else calib_ds
    if parity_ds is None:
        raise UsageError(f"{export_dir}: its validation data is gone and no --calibration was given. "
                         "Pass --calibration DATA (labelled rows) so the quantized model can be checked.")
    if calib_ds is None and calibrated:
        # the rows the model trained on: calibration and the search's ranking then never see
        # the rows that judge the result
        calib_ds = _training_rows(info)
        if calib_ds is None:
            log.warning("%s: its training rows are gone; half of the validation rows calibrate and the other half "
                        "judge (pass --calibration or --parity-data for more rows to judge).", export_dir)
            calib_ds = val_ds
    return calib_ds, parity_ds


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def _judging_rows(cfg: QuantizeConfig, info: dict, parity_ds, calib_items: list, precision: str, t,
                  tag: str = "validation"):
    """Every row calibration did not use judges (edgeft.certify): the validation rows (or the
    calibration file's rows not drawn, where the validation rows are gone: `tag`), the training
    rows not drawn for calibration, --parity-data; agreement passes on its 95% lower bound
    unless --uncertified, and too few rows to certify are refused before any work."""
    from ..certify import judging_rows, refusal, too_few

    rows = judging_rows(info["labels"], held_out=[(tag, parity_ds)], training=_training_rows(info),
                        calibrated=set(calib_items), parity_data=cfg.parity_data,
                        modality=info["modality"], text_column=cfg.text_column)
    if not len(rows):
        raise UsageError(f"{cfg.output}: no rows are left to judge the quantized model (all of them calibrate). "
                         "Pass --parity-data FILE (inputs, one per line).")
    certify = not cfg.uncertified and t.min_agreement < 1.0 and precision != "fp32"
    need = too_few(rows, t.min_agreement) if certify else None
    if need:
        raise ParityError(refusal(cfg.output, rows, t.min_agreement, need) + " Nothing was written.")
    return rows, certify


def _write_models(tmp: Path, export_dir: Path, result: dict, mode: str, precision: str) -> None:
    """backbone.onnx (the variant that passed), head.onnx (fp32) and model.onnx (both fused), each
    with the export's metadata plus the quantization; the tokenizer/preprocessor/labels copied."""
    import onnx

    shutil.copy2(result["path"], tmp / "backbone.onnx")
    backbone, head = onnx.load(str(tmp / "backbone.onnx")), onnx.load(str(export_dir / "head.onnx"))
    metas = {"backbone.onnx": read_meta(backbone) or read_meta(onnx.load(str(export_dir / "backbone.onnx"))),
             "head.onnx": read_meta(head)}
    metas["model.onnx"] = {**metas["backbone.onnx"], "part": "model"}  # what export writes
    quant_meta = {"mode": mode, "backbone": precision, "head": "fp32", "per_channel": result["per_channel"],
                  "op_types": result["op_types"], "kept_float": result["kept_float"],
                  **({"fused": result["fusion"]["fused"]} if result.get("fusion") else {})}
    fused = fuse(backbone, head)
    for f, m in (("backbone.onnx", backbone), ("head.onnx", head), ("model.onnx", fused)):
        write_meta(m, {**metas[f], "precision": precision, "quantization": quant_meta}, __version__)
        onnx.save(m, str(tmp / f))
    del backbone, head, fused
    for f in COPIED:
        if (export_dir / f).exists():
            shutil.copy2(export_dir / f, tmp / f)


def _miss(output, mode: str, precision: str, what: str) -> ParityError:
    hint = " fp16 usually keeps parity;" if precision == "int8" else ""
    return ParityError(f"{output}: {mode} quantization {what}. Nothing was written.{hint} --min-agreement and "
                       "--max-drop loosen the gate knowingly.")


def _final_parity(cfg, quant, tmp: Path, export_dir: Path, gate, pre, parity_ds, t, precision,
                  judged: str) -> tuple[dict, list]:
    """The written model.onnx (`quant`) against the fp32 one on the gate's rows (and fused against split)."""
    from ..runtime.session import OnnxModel

    got, gap, kept = _parity(quant, OnnxModel(tmp / "backbone.onnx"),
                             OnnxModel(tmp / "head.onnx"), pre, gate.items)
    report = compare(gate.reference, got, gate.y, gate.labels, gate.items)
    report.update(fused_vs_split_max_abs_diff=gap, batch=1, reference=str(export_dir / "model.onnx"),
                  data=parity_ds.source, thresholds=t.__dict__, checks=checks(report, t, certify=gate.certify))
    failed = [c for c in report["checks"] if not c["passed"]]
    if failed:
        raise _miss(cfg.output, cfg.mode, precision, f"strays too far from the fp32 export on {report['rows']} rows "
                    f"({judged}; held out: {parity_ds.source}): " + "; ".join(c["message"] for c in failed))
    return report, kept


def _search_cost(result: dict, tmp: Path, kept: list) -> None:
    """What keeping nodes in float cost against the all-int8 attempt, into result["search"]."""
    from ..runtime.session import OnnxModel

    cost = _latency(OnnxModel(tmp / "backbone.onnx"), OnnxModel(result["plain_path"]), kept)
    result["plain"]["latency_ms"] = cost["quantized_ms"]
    result["search"]["cost"] = {
        "extra_bytes": result["bytes"] - result["plain"]["bytes"],
        "extra_ms": round(cost["fp32_ms"] - cost["quantized_ms"], 3),
        "note": "backbone only, batch 1: this variant against the all-int8 attempt"}


def quantize(export_dir, mode=None, output=None, **options) -> QuantizeResult:
    """Quantize an export dir's backbone into `output` (same layout + quantize.json); return
    what quantize.json holds (QuantizeResult).

    Takes a QuantizeConfig, or its fields. `calibration`: data file or image folder (labels
    optional) whose rows calibrate static/nncf and rank nodes for the search; without it the
    export's training rows (else half its validation rows); up to 300, drawn across classes
    (edgeft.certify.calibration_items). Parity runs the quantized model.onnx against the fp32
    one, batch 1, on every row calibration did not draw (validation, training, --parity-data),
    within QuantizeConfig.budget (default Thresholds.for_precision("int8" or "fp16"): 99% top-1
    agreement on its 95% lower bound, at most 0.5 point of accuracy lost). Outside it, or with
    too few rows to certify it: ParityError, nothing written.
    """
    cfg = export_dir if isinstance(export_dir, QuantizeConfig) else QuantizeConfig(export_dir, mode, output, **options)
    return _run(cfg)


def _run(cfg: QuantizeConfig) -> QuantizeResult:  # the step in order; each stage is a function above
    from ..certify import calibration_items, describe_calibration
    from ..runtime.session import OnnxModel

    t0 = time.perf_counter()
    export_dir, output, m = Path(cfg.export_dir), Path(cfg.output), registry.get(cfg.mode)
    info = _read_export(export_dir)
    if output.resolve() == export_dir.resolve():
        raise UsageError(f"{output}: is the export itself. Choose another --output.")
    refuse_existing(output, cfg.overwrite)
    modality, precision = info["modality"], m.precision
    pre = load_preprocessor(export_dir, info["preprocessing"])
    calib_ds, parity_ds = _datasets(cfg, export_dir, info, m.calibrated)
    t = cfg.budget(precision)
    shared = calib_ds is not None and (calib_ds is parity_ds or _same_file(calib_ds.source, parity_ds.source))
    calib_items = calibration_items(calib_ds, CALIBRATION_ROWS, shared=shared) if m.calibrated else []
    calibration = describe_calibration(calib_items, calib_ds, shared) if calib_items else None
    rows, certify = _judging_rows(cfg, info, parity_ds, calib_items, precision, t,
                                  tag="calibration" if parity_ds is calib_ds and cfg.calibration else "validation")
    ref_model = OnnxModel(export_dir / "model.onnx")
    gate = prepare_gate("quantize", parity_ds, info["labels"], pre, OnnxModel(export_dir / "head.onnx"), t,
                        modality=modality, rows=(rows.items, rows.labels()), certify=certify,
                        reference=lambda items, batches: np.concatenate([ref_model(a)["logits"] for a in batches]))
    log.debug("calibration: %s; parity against fp32 on %d rows (%s)", calibration, len(gate.items), rows.describe())
    with atomic.directory(output, replace=cfg.overwrite) as tmp, tempfile.TemporaryDirectory(prefix="edgeft-quantize-") as work:
        calib_rows = [pre([x]) for x in calib_items] if calib_items else None
        result = quantize_to_budget(export_dir / "backbone.onnx", Path(work), cfg.mode, modality=modality, gate=gate,
                                    calibration=calib_rows, per_channel=cfg.per_channel, search=cfg.search)
        del calib_rows
        if not result["passed"]:
            raise _miss(output, cfg.mode, precision, f"misses the budget against the fp32 export on {len(gate.items)} "
                        f"rows ({rows.describe()}; held out: {parity_ds.source}): {describe_miss(result)}")
        _write_models(tmp, export_dir, result, cfg.mode, precision)
        quant_model = OnnxModel(tmp / "model.onnx")
        report, kept = _final_parity(cfg, quant_model, tmp, export_dir, gate, pre, parity_ds, t, precision,
                                     rows.describe())
        report.update(sources=rows.counts(), certified=certify)
        latency = _latency(ref_model, quant_model, kept)
        if result.get("search"):
            _search_cost(result, tmp, kept)
        if calibration is not None:  # whether the rows drawn were read (they are set aside either way)
            calibration["used"] = ("calibrates" if m.needs_calibration else
                                   "ranked nodes for the search" if result.get("search") else
                                   "set aside for the search's ranking (no search was needed)")
        summary = _summary(cfg, m, tmp, export_dir, result, calibration, report, latency, t0)
        atomic.write_json(tmp / "quantize.json", summary.to_json())
        # export.json too, so tools that read an export folder read this one alike
        atomic.write_json(tmp / "export.json", {
            **info, "precision": precision, "quantization": "quantize.json", "parity": report,
            "files": {f: {k: v for k, v in summary.files[f].items() if k != "fp32_bytes"} for f in FILES}})
    return summary


def _summary(cfg, m, tmp: Path, export_dir: Path, result, calibration, report, latency, t0) -> QuantizeResult:
    """quantize.json."""
    written = [f for f in (*FILES, *COPIED) if (tmp / f).exists()]
    files = {f: {**file_entry(tmp / f), "fp32_bytes": (export_dir / f).stat().st_size} for f in written}
    return QuantizeResult(
        edgeft_version=__version__, mode=cfg.mode, precision=m.precision, source=str(export_dir),
        per_channel=result["per_channel"], op_types=result["op_types"], head="fp32",
        kept_float=result["kept_float"], search=result.get("search"), all_int8=result.get("plain"),
        fusion=result.get("fusion"), calibration=calibration, files=files, parity=report, latency=latency,
        seconds=round(time.perf_counter() - t0, 3))
