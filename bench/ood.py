"""Benchmark the device's out-of-distribution flag against the softmax head's own confidence.

    HF_HUB_OFFLINE=1 python bench/ood.py [--run PATH] [--other FILE ...] [--output bench/results/ood.json]
                                         [--head ridge] [--retrain FILE]

Bundle: an fp32 cpu bundle of a MiniLM head run on the maintenance example (trained once into
bench/results/cache/ood-run, or --run), with its replay memory (edgeft build's default).
In-distribution rows: examples/maintenance/test.csv (120 entries the model never trained on).
Out-of-distribution sets:
- "new sibling class": examples/maintenance/new_class_test.csv (a 7th team's entries: the same
  domain, a class the model does not know; the hard case);
- "another domain": each --other FILE (CSV/JSONL with a text column), e.g. the agriculture
  example's soybean field notes (python examples/agriculture/prepare.py writes them); without
  --other, the agriculture CSVs are used where prepare.py has written them.
For each score: AUROC (in-distribution vs the set; 1.0 separates them perfectly), and at the
threshold each score gets from the replay's hold-out rows for 5% false alarms (the split-
conformal quantile, as runtime/ood.py sets it): the share of the set flagged and the share of
the in-distribution test rows flagged (the false alarms measured on rows the threshold never saw).
--head ridge measures a copy of the bundle with the ridge head added (as `edgeft build --head
ridge` adds it: its statistics keep per-class sums of normalised features, the prototypes);
--retrain FILE first retrains the copy with FILE (`--add-classes`, the default guard), as a
device would; the added class's rows of FILE's sibling test file (FILE with _test before its
suffix, e.g. new_class_test.csv) then count as in-distribution too (their false alarms are
reported), and the new sibling set is left out when it is that class.
Scores: the bundle's cosine score (1 - max cosine similarity to the class prototypes), and the
softmax head's 1 - max probability. Prints the table; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import print_cells, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "maintenance"
AGRI = ROOT / "examples" / "agriculture"
CACHE = ROOT / "bench" / "results" / "cache"
PROFILE = 'description = "edgeft bench: cpu fp32"\ntarget = "cpu"\nprecision = "fp32"\n'


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside row > score of an inside row), ties counted half (Mann-Whitney)."""
    both = np.concatenate([inside, outside])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks over ties
        m = both == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    r_out = ranks[len(inside):].sum()
    return float((r_out - len(outside) * (len(outside) + 1) / 2) / (len(inside) * len(outside)))


def ensure_bundle(run: str | None) -> Path:
    from edgeft.build import build
    from edgeft.config import TrainConfig
    from edgeft.train import train

    if run is None:
        run = CACHE / "ood-run"
        if not (run / "run.json").exists():
            print(f"training a MiniLM head run once into {run} ...", flush=True)
            train(TrainConfig(model="minilm", data=str(DATA / "train.csv"), method="head", output=str(run),
                              progress=False))
    run = Path(run)
    out = CACHE / f"ood-bundle-{run.name}"
    if not (out / "manifest.json").exists():
        profile = CACHE / "ood-cpu-fp32.toml"
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(PROFILE)
        print(f"building {out} ...", flush=True)
        build(run, str(profile), out, overwrite=True)
    return out


def variant(path: Path, run: str | None, head: str, retrain_file: str | None) -> Path:
    """The bundle itself, or a fresh copy with the ridge head added and/or retrained with new samples."""
    import json
    import shutil

    if head == "softmax" and not retrain_file:
        return path
    from edgeft.runs import training_data, training_source
    from edgeft.runtime.retrain import retrain
    from edgeft.runtime.ridge_bundle import add_ridge_head

    out = CACHE / f"ood-bundle-{head}{'-retrained' if retrain_file else ''}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(path, out, ignore=shutil.ignore_patterns("cache"))
    if head == "ridge":  # on the run's own training rows (its validation rows stay the replay hold-out)
        info = json.loads((Path(run or CACHE / "ood-run") / "run.json").read_text())
        add_ridge_head(out, training_data(info.get("training") or training_source(info["config"])))
    if retrain_file:
        r = retrain(out, retrain_file, add_classes=True)
        print(f"retrained with {retrain_file}: head v{r.previous_version} -> v{r.version}", flush=True)
    return out


def read_texts(path: Path) -> list[str]:
    from edgeft.runtime.dataset import load_dataset

    return load_dataset(path, require_labels=False).items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="A finished edgeft text run to build the bundle from.")
    ap.add_argument("--other", action="append", default=[], help="Texts of another domain (CSV/JSONL).")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "ood.json"))
    ap.add_argument("--head", choices=("softmax", "ridge"), default="softmax",
                    help="The head family to measure (ridge: added to a copy of the bundle).")
    ap.add_argument("--retrain", help="New samples (CSV) to retrain a copy of the bundle with first (--add-classes).")
    args = ap.parse_args()
    t0 = time.perf_counter()

    from edgeft.runtime.bundle import Bundle
    from edgeft.runtime.metrics import softmax
    from edgeft.runtime.ood import conformal_threshold

    bundle = Bundle(variant(ensure_bundle(args.run), args.run, args.head, args.retrain))
    ood = bundle.ood()
    if ood is None:
        sys.exit(f"{bundle.path}: no replay memory; build it with --replay N.")
    rel = bundle.manifest["head"].get("replay") or bundle.manifest["heads"][0]["replay"]
    with np.load(bundle.path / rel) as z:
        hold = z["features"][z["holdout"]]
    hold_soft = 1 - softmax(bundle.head_outputs(hold)["logits"]).max(1)
    soft_threshold = conformal_threshold(hold_soft, 0.05)

    def scores(texts):
        f = bundle.features(texts)
        return ood.scores(f), 1 - softmax(bundle.head_outputs(f)["logits"]).max(1)

    inside = read_texts(DATA / "test.csv")
    cos_in, soft_in = scores(inside)
    sets = {"new sibling class (maintenance new_class_test.csv)": DATA / "new_class_test.csv"}
    added = None
    if args.retrain:  # the class it added is in-distribution now: its held-out rows' flags are false alarms
        added = Path(args.retrain).with_name(Path(args.retrain).stem + "_test" + Path(args.retrain).suffix)
        sets = {k: v for k, v in sets.items() if v.resolve() != added.resolve()}
    others = [Path(p) for p in args.other] or [p for p in (AGRI / "test.csv", AGRI / "train.csv") if p.exists()][:1]
    for p in others:
        sets[f"another domain ({p.relative_to(ROOT) if p.is_relative_to(ROOT) else p})"] = p
    if not others:
        print("no other-domain texts: run python examples/agriculture/prepare.py, or pass --other FILE", flush=True)
    results = {"bundle": str(bundle.path), "in_distribution": {"file": str(DATA / "test.csv"), "rows": len(inside)},
               "ood": ood.describe(bundle.labels), "softmax_threshold": soft_threshold, "sets": []}
    cells = [("set", "rows", "score", "AUROC", "flagged", "false alarms (test rows)")]
    if added is not None and added.exists():
        cos_add, soft_add = scores(read_texts(added))
        for score, values, thr in (("cosine to prototypes", cos_add, ood.threshold),
                                   ("1 - max softmax", soft_add, soft_threshold)):
            row = {"set": f"in-distribution: the added class ({added.name})", "rows": len(values), "score": score,
                   "false_alarms": float((values > thr).mean()), "threshold": thr}
            results["sets"].append(row)
            cells.append((row["set"], str(len(values)), score, "-", "-", f"{100 * row['false_alarms']:.1f}%"))
    for name, path in sets.items():
        texts = read_texts(path)
        cos_out, soft_out = scores(texts)
        for score, a, b, thr in (("cosine to prototypes", cos_in, cos_out, ood.threshold),
                                 ("1 - max softmax", soft_in, soft_out, soft_threshold)):
            row = {"set": name, "rows": len(texts), "score": score, "auroc": auroc(a, b),
                   "flagged": float((b > thr).mean()), "false_alarms": float((a > thr).mean()), "threshold": thr}
            results["sets"].append(row)
            cells.append((name, str(len(texts)), score, f"{row['auroc']:.3f}", f"{100 * row['flagged']:.1f}%",
                          f"{100 * row['false_alarms']:.1f}%"))
    print(f"bundle {bundle.path.name}: threshold {ood.threshold:.4f} from {ood.calibration_rows} hold-out rows "
          f"(5% false alarms), in-distribution: {len(inside)} test rows")
    print_cells(cells, left=(0, 2))
    from edgeft.quantize.isa import host

    results.update({"cpu": host()["model"], "cpus": os.cpu_count(), "bench_seconds": time.perf_counter() - t0})
    write_results(results, args.output)


if __name__ == "__main__":
    main()
