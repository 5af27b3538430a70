"""`edgeft merge`: fold LoRA into the base weights and write a self-contained model directory.

The directory is the backbone in its own layout (Hugging Face `save_pretrained`, or
EfficientNet-Lite's state dict), `head.safetensors` (the linear head), `edgeft.json`
(labels, pooling, preprocessing, where the validation data is) and the tokenizer or image
preprocessing. Every later step reads it without the training run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from . import __version__
from .errors import ParityError, UsageError, refuse_existing
from .float32 import tolerance
from .models import EFFNET_META, save_prompt
from .results import MergeResult
from .runs import MODEL_INFO, load_run, predict_logits, validation_data
from .runtime import atomic

log = logging.getLogger(__name__)

CHECK_ROWS = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def merge(run: str | Path, output: str | Path, data: str | Path | None = None, overwrite: bool = False) -> MergeResult:
    """Write the merged model directory; return (and record) the merged-vs-unmerged check."""
    t0 = time.perf_counter()
    output = Path(output)
    refuse_existing(output, overwrite)
    loaded = load_run(run)
    model, spec = loaded.model, loaded.spec
    source = loaded.info.get("validation")
    if data:
        from .runs import load_labelled

        ds = load_labelled(data, loaded)
    else:
        ds = validation_data(source)
    if ds is None:
        raise UsageError(f"{run}: its validation data ({source}) is gone; pass --data with labelled samples to check the merge on.")
    items = ds.items[:CHECK_ROWS]

    before = predict_logits(model, loaded.pre, items)
    # the gate: float32's own reach for the unmerged model on this CPU (edgeft.float32): merging
    # rounds W + BA to float32 once, far below it; a wrong merge is off by the logits' scale
    limit = tolerance(model, loaded.pre, items, before.numpy())
    merged_lora = loaded.merge_lora()
    after = predict_logits(model, loaded.pre, items)
    diff = float((before - after).abs().max())
    if diff > limit:
        raise ParityError(f"{run}: merged and unmerged logits differ by {diff:.2e} (> {limit:.1e}, float32's reach "
                          f"for this model) on {len(items)} validation rows.")

    report = MergeResult(max_abs_diff=diff, max_abs_diff_limit=limit, rows=len(items), merged_lora=merged_lora,
                         seconds=round(time.perf_counter() - t0, 3))
    with atomic.directory(output, replace=overwrite) as tmp:
        save_model_dir(tmp, model, spec, loaded, report)
    log.info("merged %s -> %s (max |Δ| %.1e on %d rows)", run, output, diff, len(items))
    return report


def save_model_dir(d: Path, model, spec, loaded, merge_report: MergeResult) -> None:
    from safetensors.torch import save_file

    labels = loaded.labels
    inner = model.backbone.net if spec.family == "efficientnet-lite" else model.backbone.model
    if spec.family == "efficientnet-lite":
        save_file({k: v.contiguous() for k, v in inner.state_dict().items()}, str(d / "model.safetensors"))
        (d / EFFNET_META).write_text(json.dumps({"variant": spec.model_type, "image_size": spec.preprocessing["size"][0],
                                                  "weights": "model.safetensors"}, indent=2))
    else:
        inner.config.id2label = dict(enumerate(labels))
        inner.config.label2id = {n: i for i, n in enumerate(labels)}
        inner.save_pretrained(str(d), safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(d / "head.safetensors"))
    save_prompt(d, model.backbone)  # prompt and prefix tuning: the learned tokens (prompts.py)
    src = Path(spec.path)
    if spec.modality == "text":
        for name in TOKENIZER_FILES:  # the original files, so transformers' AutoTokenizer loads too
            if (src / name).exists():
                shutil.copy2(src / name, d / name)
        (d / "tokenizer.json").write_text(loaded.pre.tokenizer.to_str())
    elif (src.is_dir() and (src / "preprocessor_config.json").exists()):
        shutil.copy2(src / "preprocessor_config.json", d / "preprocessor_config.json")
    info = {
        "schema": 1,
        "edgeft_version": __version__,
        "task": "classification",
        "modality": spec.modality,
        "family": spec.family,
        "model_type": spec.model_type,
        "pooling": spec.pooling,
        "feature_dim": spec.feature_dim,
        "labels": labels,
        "preprocessing": loaded.pre.spec(),
        "base_model": spec.source,
        "method": loaded.info["method"],
        "validation": loaded.info.get("validation"),
        "training": loaded.info.get("training"),
        "merge": merge_report.to_json(),
    }
    (d / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (d / "labels.json").write_text(json.dumps({"labels": labels}, indent=2) + "\n")


