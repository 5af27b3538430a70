"""Write the solar-cell example's CSVs from the installed `elpv-dataset` package.

The images stay where pip installed them: every CSV row holds the absolute path of one
image inside site-packages and its label, so nothing of the dataset is copied here.

    pip install -c constraints.txt elpv-dataset      # or: pip install -c constraints.txt -e ".[examples]"
    python examples/solar-cells/prepare.py
    edgeft run examples/solar-cells/recipe.toml

Labels: elpv gives each cell a defect probability from expert review (0, 1/3, 2/3 or 1);
a cell is `defective` when it is at least 0.5 (`--threshold`), else `functional`.

Files (seeded, disjoint, stratified by defect probability):
    train.csv       300 monocrystalline cells, half of them defective (edgeft holds a fifth
                    out for validation)
    test.csv        160 monocrystalline cells in the dataset's own mix (about a third
                    defective), held out: the parity gate and verification
    poly_new.csv    60 polycrystalline cells, half defective: what a technician labels on the
                    device after the line switches to poly modules (the on-device retrain)
    poly_test.csv   160 polycrystalline cells in the dataset's own mix, held out: did the
                    retrain help, and what did it cost on the mono cells
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import defaultdict
from importlib import util
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ["path", "label", "defect_probability", "cell_type"]


def find_package_data() -> Path:
    spec = util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("elpv-dataset is not installed. Install it with:\n"
                 "    pip install -c constraints.txt elpv-dataset")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "labels.csv").is_file():
        sys.exit(f"{data}: no labels.csv; is elpv-dataset installed completely? "
                 "Reinstall it with: pip install --force-reinstall -c constraints.txt elpv-dataset")
    return data


def read_labels(data: Path) -> list[dict]:
    """labels.csv: whitespace-separated `images/cellNNNN.png  probability  mono|poly`."""
    rows = []
    for n, line in enumerate((data / "labels.csv").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rel, prob, kind = line.split()
            prob = float(prob)
        except ValueError:
            sys.exit(f"{data / 'labels.csv'}: line {n}: expected 'path probability type', got {line!r}.")
        image = data / rel
        if not image.is_file():
            sys.exit(f"{data / 'labels.csv'}: line {n}: image {image} is missing.")
        rows.append({"path": str(image), "probability": prob, "type": kind})
    return rows


def stratified(rows: list[dict], sizes: list[int], rng: random.Random, what: str = "cells") -> list[list[dict]]:
    """Disjoint samples of the given sizes, each with the pool's mix of defect probabilities."""
    if sum(sizes) > len(rows):
        sys.exit(f"asked for {sum(sizes)} {what}, only {len(rows)} available; choose smaller sizes.")
    strata = defaultdict(list)
    for r in rows:
        strata[round(r["probability"], 2)].append(r)
    for s in strata.values():
        rng.shuffle(s)
    # interleave the strata proportionally, so every prefix of `order` keeps the mix
    order = []
    for key in sorted(strata):
        s = strata[key]
        order += [((i + 0.5) / len(s), key, r) for i, r in enumerate(s)]
    order.sort(key=lambda x: (x[0], x[1]))
    pool = [r for _, _, r in order]
    out, start = [], 0
    for n in sizes:
        out.append(pool[start:start + n])
        start += n
    return out


def write(path: Path, rows: list[dict], threshold: float, rng: random.Random) -> None:
    rows = rows[:]
    rng.shuffle(rows)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            label = "defective" if r["probability"] >= threshold else "functional"
            w.writerow([r["path"], label, f"{r['probability']:.2f}", r["type"]])
    tmp.replace(path)
    n_def = sum(r["probability"] >= threshold for r in rows)
    print(f"{path}: {len(rows)} cells ({len(rows) - n_def} functional, {n_def} defective)")


def balanced(rows: list[dict], n: int, threshold: float, rng: random.Random, kind: str) -> list[dict]:
    """n cells, half defective and half functional (each half with its pool's mix of probabilities)."""
    defective = [r for r in rows if r["probability"] >= threshold]
    functional = [r for r in rows if r["probability"] < threshold]
    return (stratified(defective, [n // 2], rng, f"defective {kind} cells")[0]
            + stratified(functional, [n - n // 2], rng, f"functional {kind} cells")[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the CSVs (default: beside this script)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.5, help="defect probability from which a cell is defective")
    ap.add_argument("--train", type=int, default=300, help="monocrystalline training cells, half of them defective")
    ap.add_argument("--test", type=int, default=160, help="monocrystalline held-out cells, the dataset's own mix")
    ap.add_argument("--poly-new", type=int, default=60, help="polycrystalline cells for the on-device retrain, half defective")
    ap.add_argument("--poly-test", type=int, default=160, help="polycrystalline held-out cells, the dataset's own mix")
    a = ap.parse_args(argv)

    data = find_package_data()
    rows = read_labels(data)
    rng = random.Random(a.seed)
    mono = [r for r in rows if r["type"] == "mono"]
    poly = [r for r in rows if r["type"] == "poly"]
    # held-out sets first, with the line's real mix; training sets from the rest, balanced, so
    # the minority class (defective) is learned as well as the majority
    test, mono_rest = stratified(mono, [a.test, max(len(mono) - a.test, 0)], rng, "mono cells")
    train = balanced(mono_rest, a.train, a.threshold, rng, "mono")
    poly_test, poly_rest = stratified(poly, [a.poly_test, max(len(poly) - a.poly_test, 0)], rng, "poly cells")
    poly_new = balanced(poly_rest, a.poly_new, a.threshold, rng, "poly")
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"elpv-dataset images in {data / 'images'} ({len(rows)} cells: {len(mono)} mono, {len(poly)} poly)")
    for name, part in (("train", train), ("test", test), ("poly_new", poly_new), ("poly_test", poly_test)):
        write(a.out / f"{name}.csv", part, a.threshold, rng)


if __name__ == "__main__":
    main()
