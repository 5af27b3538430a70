"""Which quantized backbone a bundle ships (`edgeft build`): every variant the target offers,
gated; of the passing ones, the fastest measured on real rows when the build host is of the
device profile's ISA class, else the first in the target's documented order for that class
(edgeft.quantize.isa). The manifest's quantization entry says which, and why ("chosen_by")."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from ..errors import ParityError
from .budget import quantize_to_budget
from .gate import describe_miss
from .registry import get as get_mode

log = logging.getLogger(__name__)

LATENCY_ROWS = 10  # batch-1 rows each passing variant is timed on


def backbone_ms(model, arrays: list[dict]) -> float:
    """Median batch-1 latency of a backbone over real inputs (after warm-up)."""
    for a in arrays[:2]:
        model(a)
    times = []
    for _ in range(3):
        for a in arrays:
            t = time.perf_counter()
            model(a)
            times.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(times), 3)


def choose_variant(variants, backbone_src: Path, work: Path, gate, *, precision: str, modality: str, pre,
                   calib_items: list, ov_settings: dict | None, output, profile, target=None,
                   judged: str = "") -> dict:
    """Every variant of `variants`, judged by `gate` (with the search where one misses); of the
    passing ones, `isa.choose` picks for the device `profile` (a Profile; a name alone: the
    fastest on this host). ParityError with every variant's numbers if none passes."""
    from ..runtime.session import OnnxModel
    from .isa import choose, reduce_range

    name = getattr(profile, "name", profile)
    items = gate.items
    opener = gate.open_model or OnnxModel
    calib = [pre(calib_items[i : i + 1]) for i in range(len(calib_items))] if calib_items else None
    timing = [pre(items[i : i + 1]) for i in range(min(LATENCY_ROWS, len(items)))]
    rr = reduce_range(profile) if not isinstance(profile, str) else False
    tried, passing = [], []
    for mode in variants:
        if get_mode(mode, engine=None).engine == "openvino":
            from .openvino_ir import ir_variant

            r = ir_variant(backbone_src, work / mode, mode, modality=modality, gate=gate, calibration=calib,
                           settings=ov_settings)
        else:
            r = quantize_to_budget(backbone_src, work / mode, mode, modality=modality, gate=gate, calibration=calib,
                                   reduce_range=rr)
        if r["passed"]:
            r["latency_ms"] = backbone_ms(opener(r["path"]), timing)
            if r.get("plain") and r.get("plain_path"):  # what the search's float nodes cost in speed
                r["plain"]["latency_ms"] = backbone_ms(opener(r["plain_path"]), timing)
            passing.append(r)
        tried.append({k: v for k, v in r.items() if k not in ("path", "plain_path")})
    if not passing:
        detail = "; ".join(describe_miss(r) for r in tried)
        raise ParityError(f"{output}: no {precision} variant for {name} meets the budget against PyTorch on "
                          f"{len(items)} rows{f' ({judged})' if judged else ''} ({detail}). Pass more held-out rows "
                          "with --data or unlabelled ones with --parity-data, loosen the budget knowingly with "
                          "--min-agreement/--max-drop, or choose fp16/fp32.")
    if target is None or isinstance(profile, str):
        best, how = min(passing, key=lambda r: r["latency_ms"]), {"method": "timed", "said": "fastest on the build host"}
    else:
        best, how = choose(passing, profile, target)
    log.info("%s: %s chosen (%s); %.2f ms per row on this host (backbone, batch 1)", name, best["mode"], how["said"],
             best["latency_ms"])
    return {**{k: v for k, v in best.items() if k not in ("failed", "plain_path")},
            "fp32_bytes": backbone_src.stat().st_size,
            "fp32_latency_ms": backbone_ms(OnnxModel(backbone_src), timing), "tried": tried, "chosen_by": how}
