"""A bundle's backbone features on every core: whole batches, one single-threaded session per worker.

ONNX Runtime releases the GIL while a session runs, so threads run batches side by side. A
retrain's batches are small (a dynamic-int8 bundle answers one row per call: runtime.max_batch
1), and one session with two intra-op threads spends much of each small call synchronising
them; one single-threaded session per core, each running its own whole batches, keeps every
core on useful work (1,000 review snippets on the int8 MiniLM bundle: see bench/device_retrain.py).

The batches are exactly the ones `Bundle.features` makes (same rows, same order, same padding),
so each row's features are the same bits either way: a dynamic-int8 backbone takes its
activation scales from the whole batch, which is why the batches, not the rows, are dealt out.
numpy + onnxruntime only.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAX_WORKERS = 4  # sessions at most: each holds its own copy of the backbone's weights


def workers_for(bundle, batches: int, workers: int | None = None) -> int:
    """How many sessions to run: one per core (at most MAX_WORKERS), never more than batches;
    1 for an engine other than onnxruntime (OpenVINO runs its own streams)."""
    if bundle.engine.name != "onnxruntime":
        return 1
    n = workers if workers is not None else min(MAX_WORKERS, os.cpu_count() or 1)
    return max(1, min(n, batches))


def features(bundle, items: list, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
    """What `bundle.features(items, batch_size)` returns, its batches spread over worker threads,
    each with its own single-threaded session of the backbone."""
    chunks = list(bundle._chunks(items, batch_size))
    n = workers_for(bundle, len(chunks), workers)
    if n <= 1:
        return bundle.features(items, batch_size)
    providers = bundle.backbone.describe() if hasattr(bundle.backbone, "describe") else None
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(n):
        idle.put(None)  # a worker's session is made when it first runs a batch

    def run(chunk_rows):
        chunk, rows = chunk_rows
        model = idle.get()
        try:
            if model is None:
                model = bundle.engine.load(bundle.path, bundle.manifest, providers, 1)
            return model(bundle.pre(chunk))["features"][:rows]
        finally:
            idle.put(model)

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="edgeft-features") as pool:
        out = list(pool.map(run, chunks))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
