"""`edgeft build`: a run or model directory -> a verified bundle for one device profile.

merge (in memory) -> export (fp32, parity checked) -> quantize per the profile's precision ->
the target plugin's packaging -> reference inputs with their PyTorch outputs -> parity of the
finished bundle against PyTorch -> manifest with every file's sha256. The bundle folder is
renamed into place only when all of that passed: an interrupted build leaves no bundle.

Each file is written once: the models and inputs first, then everything computed by running
the bundle as a device runs it (from the manifest still in memory), then manifest.json last.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import __version__
from .certify import (
    CALIBRATION_ROWS,
    Rows,
    calibration_items,
    describe_calibration,
    holds,
    judging_rows,
    reference_rows,
    refusal,
    too_few,
)
from .config import BuildConfig
from .errors import ParityError, UsageError, refuse_existing
from .float32 import tolerance
from .names import HEAD_FAMILIES
from .profiles import find_profile
from .quantize import get as get_mode
from .quantize import prepare_gate, variants_for
from .quantize.choose import choose_variant
from .results import BuildResult, ExportResult
from .runtime import atomic
from .runtime.bundle import FEATURE_DRIFT, Bundle
from .runtime.compare import checks, compare
from .runtime.manifest import MANIFEST, check_files, file_entry, read_manifest
from .targets import BuildContext

log = logging.getLogger(__name__)

REFERENCE_ROWS = 16
REPLAY_HOLDOUT = 0.25  # validation rows per class for the retrain guard, as a share of per_class (at least 5)
HEAD_FILE = "heads/head-0001.onnx"
EMULATED_FEATURE_SHARE = FEATURE_DRIFT  # aarch64 int8 features may differ from x86's by rounding, never by this much
FLOAT64_ROWS = 128  # rows the float64 run that sets an fp32 bundle's |Δ logits| limit takes (the gate's spread)
PARITY_KEYS = ("rows", "sources", "judged_on", "max_abs_diff", "max_abs_diff_limit", "mean_abs_diff", "agreement", "accuracy",
               "reference_accuracy", "accuracy_drop", "bounds", "emulated")  # what the manifest keeps of parity.json


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Plan:
    """What the build decided before writing anything."""

    cfg: BuildConfig
    output: Path
    profile: object
    target: object
    settings: dict  # the profile resolved against its target
    loaded: object  # runs.Loaded: the PyTorch model, LoRA merged
    head: str  # the head family the bundle answers with (HEAD_FAMILIES)
    ds: object  # the labelled rows that judge parity
    variants: tuple[str, ...]  # quantization variants to try (none: fp32)
    train_ds: object | None = None  # the training rows: replay memory, calibration unless given, and judging
    calib_items: list = ()  # the rows that calibrate (and rank nodes for the search); they never judge
    rows: Rows | None = None  # the rows that judge: every row calibration did not use (edgeft.certify)
    certify: bool = False  # judge agreement on its 95% lower bound (quantized, unless --uncertified)
    calibration: dict | None = None  # what calibrated: data, rows drawn, of how many (certify.describe_calibration)

    @property
    def precision(self) -> str:
        return self.settings["precision"]

    @property
    def modality(self) -> str:
        return self.loaded.spec.modality

    @property
    def calibrated(self) -> bool:
        """Some variant reads real rows (to calibrate, or to rank nodes for the search)."""
        return any(get_mode(v, engine=None).calibrated for v in self.variants)


def build(source, device=None, output=None, **options) -> BuildResult:
    """Build the bundle; return where it is and its manifest. Takes a BuildConfig, or its fields.

    Fails (ParityError) without writing if parity breaks. keep_examples: parity.json and
    reference/items.json hold the input texts (image names) of their rows; by default they
    name rows by index and hash only (edgeft.certify.holds)."""
    cfg = source if isinstance(source, BuildConfig) else BuildConfig(source, device, output, **options)
    t0 = time.perf_counter()
    plan = _plan(cfg)
    with tempfile.TemporaryDirectory(prefix="edgeft-build-") as work:
        manifest = _build_in(plan, Path(work), t0)
    if cfg.archive:
        write_archive(plan.output)
    log.info("built %s for %s (%s, %s) in %.1f s", plan.output, plan.profile.name, plan.target.name,
             plan.precision, time.perf_counter() - t0)
    return BuildResult(plan.output, manifest)


def _plan(cfg: BuildConfig) -> _Plan:
    from .runs import load_labelled, load_model, training_data, training_source, validation_data

    output = Path(cfg.output)
    refuse_existing(output, cfg.overwrite)
    profile, target = find_profile(cfg.device)
    settings = profile.resolved(target)
    loaded = load_model(cfg.source)
    loaded.merge_lora()
    head = cfg.head or (loaded.info.get("config") or {}).get("head") or "softmax"  # default: the run's own choice
    if head not in HEAD_FAMILIES:
        raise UsageError(f"--head {head!r}: expected one of {', '.join(HEAD_FAMILIES)}.")
    if head == "ridge" and not cfg.replay:
        raise UsageError("--head ridge: its on-device guard needs the replay hold-out; pass --replay N (N > 0).")
    ds = load_labelled(cfg.data, loaded) if cfg.data else validation_data(loaded.info.get("validation"))
    if ds is None:
        raise UsageError(f"{cfg.source}: its validation data is gone; pass --data with labelled rows for the parity check.")
    # quantization variants: the target's, else the registry's defaults for the precision; each
    # is gated (with the search where it misses) and the fastest passing one wins
    precision = settings["precision"]
    variants = variants_for(target, precision, loaded.spec.modality)
    plan = _Plan(cfg, output, profile, target, settings, loaded, head, ds, tuple(variants))
    source_info = loaded.info.get("training") or (
        training_source(loaded.info["config"]) if "config" in loaded.info else None)
    plan.train_ds = training_data(source_info)
    plan.calib_items = _calibration_items(plan)
    _judging_rows(plan, validation_data(loaded.info.get("validation")) if cfg.data else None)
    return plan


def _judging_rows(plan: _Plan, validation) -> None:
    """The gate's rows: the validation and --data rows, the training rows calibration did not
    draw and --parity-data, stratified and seeded (edgeft.certify); refused before any work when
    they are too few to certify the budget even with no flip."""
    cfg = plan.cfg
    held_out = [("validation", validation), ("data", plan.ds)] if cfg.data else [("validation", plan.ds)]
    plan.rows = judging_rows(plan.loaded.labels, held_out=held_out, training=plan.train_ds,
                             calibrated=set(plan.calib_items), parity_data=cfg.parity_data, modality=plan.modality)
    t = cfg.budget(plan.precision)
    plan.certify = plan.precision != "fp32" and not cfg.uncertified and t.min_agreement < 1.0
    need = too_few(plan.rows, t.min_agreement) if plan.certify else None
    if need:
        raise ParityError(refusal(plan.output, plan.rows, t.min_agreement, need))


def _build_in(plan: _Plan, work: Path, t0: float) -> dict:  # the build's stages, in order, in `work`
    from .export import export

    cfg, settings, export_dir = plan.cfg, plan.settings, work / "export"
    exported = export(cfg.source, export_dir, opset=settings["opset"], data=cfg.data)
    calib_items = plan.calib_items
    spec, pre = _preprocessing(plan, exported, export_dir, calib_items)
    ov_settings = None
    if settings["engine"] == "openvino":
        from .quantize.openvino_ir import runtime_settings

        ov_settings = runtime_settings(settings, plan.precision)
    gate = _gate(plan, pre, export_dir, ov_settings)
    backbone_src, quant = export_dir / "backbone.onnx", None
    if plan.variants:
        quant = choose_variant(plan.variants, backbone_src, work, gate, precision=plan.precision,
                               modality=plan.modality, pre=pre, calib_items=calib_items, ov_settings=ov_settings,
                               output=plan.output, profile=plan.profile, target=plan.target,
                               judged=plan.rows.describe())
        backbone_src = Path(quant.pop("path"))
        quant["calibration"] = plan.calibration  # the rows drawn to calibrate (they never judge)
    with atomic.directory(plan.output, replace=cfg.overwrite) as tmp:
        backbone_file = _write_backbone(tmp, backbone_src)
        head = _write_head(tmp, export_dir, plan)
        if plan.modality == "text":
            shutil.copy2(export_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "preprocessor.json").write_text(json.dumps(spec, indent=2) + "\n")
        reference, reference_kind = _write_reference_inputs(tmp, plan, pre, gate)
        manifest = _manifest(plan, exported, spec, quant, ov_settings, backbone_file, head)
        manifest["reference"] = reference_kind
        if plan.target.package is not None:
            plan.target.package(BuildContext(tmp, plan.profile, plan.target, manifest, exported.inputs,
                                             plan.modality, spec))
        if cfg.replay:
            _add_replay(tmp, plan, manifest)
        parity = _bundle_parity(tmp, plan, manifest, gate, reference, exported)
        manifest["parity"] = {k: parity.get(k) for k in PARITY_KEYS}
        if plan.head == "ridge":
            manifest = _add_ridge_head(tmp, plan, manifest)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        _write_manifest(tmp, manifest, manifest["reference"]["kind"] == "examples")
        if cfg.sign_key:  # before the rename: a bundle that should be signed and is not never appears,
            from .runtime.trust import sign  # and --overwrite keeps the old one when signing fails

            sign(tmp, cfg.sign_key)
    return manifest


def _calibration_items(plan: _Plan) -> list:
    """Real rows that calibrate int8 and rank nodes for the search, drawn across classes and
    seeded as `edgeft quantize` draws them (certify.calibration_items): the user's, else the
    training rows, else half of the parity rows (the other half judges; the rows that calibrate
    never judge). OpenVINO: the bucket widths come from these rows too."""
    from .data import load_dataset

    if not (plan.calibrated or plan.settings["engine"] == "openvino"):
        return []
    if plan.cfg.calibration:
        ds, shared = load_dataset(plan.cfg.calibration, require_labels=False), False
    else:
        ds, shared = (plan.train_ds, False) if plan.train_ds is not None else (plan.ds, True)
    if shared:
        log.warning("%s: its training rows are gone; half of the parity rows (%d of %d) calibrate and the other "
                    "half judge (pass --calibration or --parity-data for more rows to judge).", plan.cfg.source,
                    min(CALIBRATION_ROWS, len(ds) // 2), len(ds))
    items = calibration_items(ds, CALIBRATION_ROWS, shared=shared)
    plan.calibration = describe_calibration(items, ds, shared)
    return items


def _preprocessing(plan: _Plan, exported: ExportResult, export_dir: Path, calib_items: list):
    """The bundle's preprocessing: the export's, fitted to the device (length, fixed shapes,
    OpenVINO's buckets); and the preprocessor it makes."""
    from .runtime.preprocess import load_preprocessor

    spec, settings = dict(exported.preprocessing), plan.settings
    if plan.modality == "text":
        if settings["max_length"]:
            spec["max_length"] = min(spec["max_length"], settings["max_length"])
        if settings["static_shapes"]:
            spec["pad_to"] = spec["max_length"]
        elif settings["engine"] == "openvino":  # a few fixed widths, so OpenVINO never recompiles
            from .runtime.preprocess import choose_buckets

            tok = load_preprocessor(export_dir, spec)
            spec["buckets"] = choose_buckets([len(ids) for ids, _ in tok.encode_ids(calib_items)],
                                             spec["max_length"])
    return spec, load_preprocessor(export_dir, spec)


def _gate(plan: _Plan, pre, export_dir: Path, ov_settings: dict | None):
    """The gate every candidate and the finished bundle face: PyTorch's answers on the parity
    rows, computed once."""
    from .runs import predict_logits
    from .runtime.session import OnnxModel

    opener = None
    if ov_settings is not None:
        from .quantize.openvino_ir import open_ir

        opener = lambda p: open_ir(p, ov_settings, build=True)  # noqa: E731
    loaded = plan.loaded
    return prepare_gate("build", None, loaded.labels, pre, OnnxModel(export_dir / "head.onnx"),
                        plan.cfg.budget(plan.precision), modality=plan.modality, open_model=opener,
                        reference=lambda items, _batches: predict_logits(loaded.model, loaded.pre, items).numpy(),
                        rows=(plan.rows.items, plan.rows.labels()), certify=plan.certify)


def _write_backbone(tmp: Path, src: Path) -> str:
    if src.suffix == ".xml":  # an OpenVINO IR: the graph and its weights
        shutil.copy2(src, tmp / "backbone.xml")
        shutil.copy2(src.with_suffix(".bin"), tmp / "backbone.bin")
        return "backbone.xml"
    shutil.copy2(src, tmp / "backbone.onnx")
    return "backbone.onnx"


def _write_head(tmp: Path, export_dir: Path, plan: _Plan) -> dict:
    """The bundle's first head (the exported, trained softmax head) -> its entry in the manifest's
    "heads". Another family (ridge) is fitted on the finished bundle and becomes version 2."""
    (tmp / "heads").mkdir()
    shutil.copy2(export_dir / "head.onnx", tmp / HEAD_FILE)
    return {"version": 1, "file": HEAD_FILE, "labels": plan.loaded.labels, "created": now(), "source": "build",
            "base_model": plan.loaded.spec.source, "method": plan.loaded.info.get("method")}


def _write_reference_inputs(tmp: Path, plan: _Plan, pre, gate) -> tuple[dict, dict]:
    """reference/inputs.npz and items.json (the device re-runs them with `edgeft device check`).

    By default synthetic inputs (edgeft.synthetic: no row of the owner's data leaves with the
    bundle); with keep_examples the gate's real rows. Either way certify.reference_rows keeps
    every class PyTorch answers and the smallest-margin rows. Returns PyTorch's logits and
    features of them (for outputs.npz), and what they are (the manifest's "reference")."""
    if plan.cfg.keep_examples:
        ref_items = [gate.items[i] for i in reference_rows(gate.reference, REFERENCE_ROWS)]
        arrays, names = pre(ref_items), [str(x) for x in ref_items]
        kind = {"kind": "examples", "rows": len(ref_items), "from": "the gate's rows (--keep-examples)"}
    else:
        arrays, kind = _synthetic_inputs(plan, pre, gate)
        names = [{"synthetic": i} for i in range(kind["rows"])]
    (tmp / "reference").mkdir()
    np.savez(tmp / "reference" / "inputs.npz", **arrays)
    feats, logits = _pytorch_outputs(plan, arrays)
    (tmp / "reference" / "items.json").write_text(json.dumps(names, indent=1))
    labels = plan.loaded.labels
    kind["classes"] = sorted({labels[i] for i in logits.argmax(1).tolist()})
    return {"logits": logits, "features": feats}, kind


def _pytorch_outputs(plan: _Plan, arrays: dict, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's features and logits of preprocessed arrays."""
    import torch

    n = len(next(iter(arrays.values())))
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            tensors = {k: torch.from_numpy(v[i : i + batch]) for k, v in arrays.items()}
            f = plan.loaded.model.features(**tensors)
            feats.append(f.numpy())
            logits.append(plan.loaded.model.head(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def _synthetic_inputs(plan: _Plan, pre, gate) -> tuple[dict, dict]:
    """REFERENCE_ROWS synthetic inputs chosen from a pool by PyTorch's answers on them."""
    from .synthetic import POOL, image_pool, text_pool

    n = POOL[plan.modality]
    if plan.modality == "text":
        lengths = [len(ids) for ids, _ in pre.encode_ids([str(x) for x in gate.items[:1000]])]
        pool = text_pool(pre, lengths, n)
        arrays = pre.collate(pool)
    else:
        pool = image_pool(pre, n)
        arrays = pre(pool)
    _, logits = _pytorch_outputs(plan, arrays)
    pick = reference_rows(logits, REFERENCE_ROWS)
    chosen = [pool[i] for i in pick]
    labels = plan.loaded.labels
    kind = {"kind": "synthetic", "rows": len(pick), "pool": n,
            "made": ("random token sequences over the tokenizer's vocabulary, lengths as the judged rows'"
                     if plan.modality == "text" else "smooth colour noise images in the preprocessor's range"),
            "pool_classes": sorted({labels[i] for i in logits.argmax(1).tolist()})}
    return (pre.collate(chosen) if plan.modality == "text" else pre(chosen)), kind


def _manifest(plan: _Plan, exported: ExportResult, spec: dict, quant: dict | None, ov_settings: dict | None,
              backbone_file: str, head: dict) -> dict:
    """The manifest, in memory until the bundle passed; "files" is filled in last."""
    settings, profile, target, loaded = plan.settings, plan.profile, plan.target, plan.loaded
    # dynamic int8: activation scales per call over the whole batch, so the device answers one
    # row per call (the build judged it so); runtime.max_batch says so, in a schema-2 manifest
    one_row = quant is not None and get_mode(quant["mode"], engine=None).batch_dependent
    return {
        "schema": 2 if (settings["engine"] != "onnxruntime" or one_row) else 1,
        "edgeft_version": __version__,
        "created": now(),
        "task": "classification",
        "source": str(Path(plan.cfg.source).resolve()),
        "modality": plan.modality,
        "labels": loaded.labels,
        "preprocessing": spec,
        "inputs": exported.inputs,
        "outputs": {"backbone": ["features"], "head": ["logits", "probs"]},
        "feature_dim": exported.feature_dim,
        "precision": plan.precision,
        "quantization": quant,
        "device": {"profile": profile.name, "description": profile.description,
                   "profile_file": Path(profile.path).name},
        "target": {"name": target.name, "plugin": target.plugin},
        "runtime": {**{k: settings[k] for k in ("providers", "threads", "static_shapes", "batch_size",
                                                "max_length", "engine")},
                    **({"openvino": ov_settings} if ov_settings else {}),
                    **({"max_batch": 1} if one_row else {})},
        "retrain": settings["retrain"],
        "backbone": backbone_file,
        "head": {"version": head["version"], "file": head["file"]},
        "heads": [head],
        "files": {},
    }


def _draft(tmp: Path, manifest: dict) -> Bundle:
    """The bundle as a device loads it, from the manifest still in memory (hashed when written)."""
    return Bundle(tmp, providers=["CPUExecutionProvider"], check_hashes=False, manifest=manifest)


def _add_replay(tmp: Path, plan: _Plan, manifest: dict) -> None:
    """The replay memory: training features from the bundle's own backbone (what the device computes)."""
    if plan.train_ds is None:
        raise UsageError(f"{plan.cfg.source}: its training data is gone, and the replay memory needs it; "
                         "pass --replay 0 to build without one (the device then cannot retrain).")
    rel = write_replay(tmp, plan.train_ds, plan.ds, plan.loaded.labels, plan.cfg.replay, _draft(tmp, manifest))
    manifest["replay"] = {"per_class": plan.cfg.replay, "holdout": REPLAY_HOLDOUT}
    manifest["head"]["replay"] = rel
    manifest["heads"][0]["replay"] = rel


def _bundle_parity(tmp: Path, plan: _Plan, manifest: dict, gate, reference: dict, exported: ExportResult) -> dict:
    """The finished bundle, run as a device runs it, against PyTorch on the gate's rows: ParityError
    if it fails; else reference/outputs.npz and parity.json written, parity returned."""
    bundle = _draft(tmp, manifest)
    got = bundle.logits(gate.items, batch_size=1 if plan.modality == "text" else 32)
    parity = compare(gate.reference, got, gate.y, plan.loaded.labels, gate.items, examples=plan.cfg.keep_examples)
    thresholds = gate.thresholds
    if plan.precision == "fp32" and thresholds.max_abs_diff is not None and plan.cfg.thresholds is None:
        # float32's reach for this model on this CPU (edgeft/float32.py), not a fixed 1e-4; the
        # manifest keeps it, and `device check` judges the device's fp32 kernels by it
        rows = list(gate.items[:FLOAT64_ROWS])
        parity["max_abs_diff_limit"] = tolerance(plan.loaded.model, plan.loaded.pre, rows, gate.reference[:len(rows)])
        thresholds = thresholds.override(max_abs_diff=parity["max_abs_diff_limit"])
    parity["checks"] = checks(parity, thresholds, certify=plan.certify)
    parity["passed"] = all(c["passed"] for c in parity["checks"])
    parity["precision"] = plan.precision
    parity["sources"] = plan.rows.counts()
    parity["judged_on"] = _judged_on(plan)
    if not parity["passed"]:
        raise ParityError(f"{plan.output}: the {plan.precision} bundle for {plan.profile.name} fails parity with PyTorch "
                          f"on {len(gate.items)} rows ({plan.rows.describe()}): "
                          + "; ".join(c["message"] for c in parity["checks"] if not c["passed"]))
    outputs = dict(reference)
    if plan.precision != "fp32":  # what `edgeft device check` compares a device with (see Bundle.check)
        outputs["bundle_features"] = bundle.reference_features()
    np.savez(tmp / "reference" / "outputs.npz", **outputs)
    parity["emulated"] = _emulated_check(tmp, plan, manifest)
    parity["export_fp32"] = ({k: exported.parity[k] for k in ("max_abs_diff", "agreement")}
                             if exported.parity else None)
    (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    return parity


def _emulated_check(tmp: Path, plan: _Plan, manifest: dict) -> dict | None:
    """ARM64 profiles: the device check under QEMU with ONNX Runtime's aarch64 kernels on the
    profile's core (edgeft.emulate), when it is set up; recorded either way.

    Refused only when the aarch64 features stray beyond EMULATED_FEATURE_SHARE of the features'
    own scale (broken kernels, e.g. QEMU 7.2's SME paths). Smaller int8 rounding differences can
    flip a reference row whose margin is below twice them: the reference rows include the
    smallest-margin ones on purpose, so such a flip is reported (and `device check` on that core
    would report it too), not refused: the gate's budget, not 16 rows, judges agreement."""
    from .emulate import build_check

    r = build_check(tmp, manifest, getattr(plan.profile, "arch", None), getattr(plan.profile, "cpu", None),
                    plan.cfg.emulate)
    if r and r["status"] == "ran":
        diff, scale = r.get("x86_features_max_abs_diff"), r.get("x86_features_max_abs")
        if diff is not None and scale and diff > EMULATED_FEATURE_SHARE * scale:
            raise ParityError(f"{plan.output}: on an emulated {r['describes']} the backbone's features differ from "
                              f"this host's by {diff:.3g} (over {EMULATED_FEATURE_SHARE:.0%} of their scale "
                              f"{scale:.3g}): the aarch64 kernels compute another model.")
    return r


def _judged_on(plan: _Plan) -> str:
    if plan.precision == "fp32":
        return "every row: 100% agreement and max |Δ logits| within the limit"
    if plan.certify:
        return "agreement on its one-sided 95% lower bound (certified)"
    return "point estimates (--uncertified: not certified)"


def _add_ridge_head(tmp: Path, plan: _Plan, manifest: dict) -> dict:
    """The closed-form family on the bundle's own features, made the active head; the trained
    head stays one version back (runtime/ridge_bundle.py). Parity above judged the trained head."""
    from .runtime.ridge_bundle import add_ridge_head

    manifest["files"] = _hashes(tmp)  # what add_ridge_head checks its manifest against; hashed again at the end
    return add_ridge_head(tmp, plan.train_ds, manifest=manifest)


def _hashes(tmp: Path) -> dict:
    return {str(p.relative_to(tmp)): file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}


def _write_manifest(tmp: Path, manifest: dict, keep_examples: bool) -> None:
    """Hash every file, name what each holds, write manifest.json (once), and read it back as a
    device would."""
    manifest["files"] = _hashes(tmp)
    for rel, entry in manifest["files"].items():  # what kind of data each file holds
        entry["holds"] = holds(rel, keep_examples)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check_files(tmp, read_manifest(tmp))


def write_replay(bundle: Path, train_ds, val_ds, labels: list[str], per_class: int, model: Bundle | None = None) -> str:
    """replay/replay-0001.npz: the bundle's own features (`model`, else the bundle loaded from
    disk) of up to `per_class` training rows per class, plus held-out rows from the validation
    data (rows the head never trained on, so the retrain guard compares old and new heads fairly)."""
    rng = np.random.default_rng(0)
    index = {n: i for i, n in enumerate(labels)}
    items, ys, hold = [], [], []
    n_hold = max(5, round(per_class * REPLAY_HOLDOUT))
    for ds, limit, is_hold in ((train_ds, per_class, False), (val_ds, n_hold, True)):
        y = np.array([index[v] for v in ds.labels])
        for c in range(len(labels)):
            for i in rng.permutation(np.flatnonzero(y == c))[:limit]:
                items.append(ds.items[i]), ys.append(c), hold.append(is_hold)
    model = model or Bundle(bundle, providers=["CPUExecutionProvider"], check_hashes=False)
    feats = model.features(items)
    rel = "replay/replay-0001.npz"
    (bundle / "replay").mkdir(exist_ok=True)
    np.savez(bundle / rel, features=feats.astype(np.float32), labels=np.array(ys, dtype=np.int64),
             holdout=np.array(hold, dtype=bool))
    return rel


def write_archive(bundle: Path) -> Path:
    """BUNDLE.tar.gz beside the bundle, written under a temporary name and renamed."""
    dest = bundle.with_name(bundle.name + ".tar.gz")
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(bundle.rglob("*")):
            tar.add(p, arcname=str(Path(bundle.name) / p.relative_to(bundle)), recursive=False)
    tmp.replace(dest)
    return dest
