"""Write the agriculture example's CSVs from the UCI soybean disease data (weka's soybean.arff).

Each plant in the Large Soybean Database (683 plants, 19 diseases, 35 categorical field
observations) becomes one line of plain observation notes, the way a crop scout would write
them, e.g. "july; stand normal; rain above normal; ... leaves abnormal: spots with yellow
halos, over 1/8 inch; stem normal; pods normal; seed normal; roots normal". The task is to
name the disease from the notes.

The ARFF ships inside Debian's `weka` package. It is read from where it was extracted and
never copied into this repository; only the generated CSVs (gitignored) land here.

    python examples/agriculture/prepare.py                  # finds or fetches the ARFF, see below
    python examples/agriculture/prepare.py --arff PATH      # or name it
    edgeft run examples/agriculture/recipe.toml

Without --arff it looks for soybean.arff in /usr/share/doc/weka/examples (weka installed)
and in the cache folder (~/.cache/edgeft/weka, or $EDGEFT_CACHE/weka); if it is in neither,
it runs `apt-get download weka` and `dpkg -x` into the cache folder (no install, no Java).

Files (stratified per disease, seeded; identical notes never straddle two files):
    train.csv           14 diseases; a fifth is held out for validation by edgeft
    test.csv            the same 14 diseases, held out
    new_class.csv       40 plants with phytophthora-rot, a disease the model has never seen,
                        for the on-device retrain that adds it as a class
    new_class_test.csv  the rest of the phytophthora-rot plants, held out
    parity_inputs.txt   600 made-up plants' notes, unlabelled, that the parity gate also judges
The four rarest diseases (2-4-d-injury, diaporthe-pod-&-stem-blight, cyst-nematode,
herbicide-injury: 8-16 plants each) are left out, as in most prior work on this data.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARFF_IN_PACKAGE = Path("usr/share/doc/weka/examples/soybean.arff")
RARE = {"2-4-d-injury", "diaporthe-pod-&-stem-blight", "cyst-nematode", "herbicide-injury"}
NEW_CLASS = "phytophthora-rot"
NEW_CLASS_ROWS = 40
PARITY_INPUTS = 600  # certifying 99% agreement at 95% takes about 300 judged rows with no flip

# ------------------------------------------------------------------ finding the ARFF


def cache_dir() -> Path:
    base = os.environ.get("EDGEFT_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "edgeft") / "weka"


def find_arff(given: Path | None, fetch: bool) -> Path:
    if given is not None:
        if not given.is_file():
            sys.exit(f"{given}: no such file.")
        return given
    for root in (Path("/"), cache_dir()):
        for p in (root / ARFF_IN_PACKAGE, root / (str(ARFF_IN_PACKAGE) + ".gz")):
            if p.is_file():
                return p
    if not fetch:
        sys.exit(f"soybean.arff not found in /{ARFF_IN_PACKAGE.parent} or {cache_dir()}; pass --arff PATH.")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        sys.exit("soybean.arff not found and this is not a Debian-family system (no apt-get/dpkg).\n"
                 "Extract usr/share/doc/weka/examples/soybean.arff from Debian's weka package\n"
                 "(or take soybean.arff from any Weka distribution) and pass --arff PATH.")
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching Debian's weka package to extract soybean.arff into {target} (no install) ...")
        r = subprocess.run(["apt-get", "download", "weka"], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("weka_*.deb"))
        if r.returncode != 0 or not debs:
            sys.exit(f"apt-get download weka failed:\n{r.stderr.strip()}\n"
                     "Run `apt-get update` first, or pass --arff PATH.")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
    for p in (target / ARFF_IN_PACKAGE, target / (str(ARFF_IN_PACKAGE) + ".gz")):
        if p.is_file():
            return p
    sys.exit(f"{debs[0].name} has no {ARFF_IN_PACKAGE}; pass --arff PATH.")


def read_arff(path: Path) -> tuple[list[str], list[list[str]]]:
    """Attribute names and data rows ('?' kept as is) of a dense nominal ARFF."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    names, rows, in_data = [], [], False
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        low = line.lower()
        if low.startswith("@attribute"):
            names.append(line.split()[1].strip("'\""))
        elif low.startswith("@data"):
            in_data = True
        elif in_data:
            values = [v.strip().strip("'\"") for v in line.split(",")]
            if len(values) != len(names):
                sys.exit(f"{path}: line {n}: {len(values)} values, the header declares {len(names)} attributes.")
            rows.append(values)
    if "class" not in names or not rows:
        sys.exit(f"{path}: not the soybean ARFF (no 'class' attribute or no data).")
    return names, rows


# ------------------------------------------------------------------ rows -> notes

WORDS = {
    "precip": {"lt-norm": "rain below normal", "norm": "rain normal", "gt-norm": "rain above normal"},
    "temp": {"lt-norm": "temperature below normal", "norm": "temperature normal", "gt-norm": "temperature above normal"},
    "plant-stand": {"normal": "stand normal", "lt-normal": "stand below normal"},
    "hail": {"yes": "hail", "no": "no hail"},
    "crop-hist": {"diff-lst-year": "other crop last year", "same-lst-yr": "soybean last year",
                  "same-lst-two-yrs": "soybean two years running", "same-lst-sev-yrs": "soybean several years running"},
    "area-damaged": {"scattered": "scattered plants", "low-areas": "low areas", "upper-areas": "upper areas",
                     "whole-field": "whole field"},
    "severity": {"minor": "minor", "pot-severe": "potentially severe", "severe": "severe"},
    "seed-tmt": {"none": "seed untreated", "fungicide": "seed fungicide-treated", "other": "seed treated"},
    "germination": {"90-100": "germination 90-100%", "80-89": "germination 80-89%", "lt-80": "germination under 80%"},
    "plant-growth": {"norm": "growth normal", "abnorm": "growth abnormal"},
    "leafspots-halo": {"yellow-halos": "spots with yellow halos", "no-yellow-halos": "spots without halos"},
    "leafspots-marg": {"w-s-marg": "water-soaked margins", "no-w-s-marg": "no water-soaked margins"},
    "leafspot-size": {"lt-1/8": "under 1/8 inch", "gt-1/8": "over 1/8 inch"},
    "leaf-shread": {"present": "shredded"},
    "leaf-malf": {"present": "malformed"},
    "leaf-mild": {"upper-surf": "mildew on upper surface", "lower-surf": "mildew on lower surface"},
    "lodging": {"yes": "lodging"},
    "stem-cankers": {"below-soil": "cankers below soil", "above-soil": "cankers at soil line",
                     "above-sec-nde": "cankers above second node"},
    "canker-lesion": {"brown": "brown lesions", "dk-brown-blk": "dark brown-black lesions", "tan": "tan lesions"},
    "fruiting-bodies": {"present": "fruiting bodies"},
    "external-decay": {"firm-and-dry": "firm dry decay", "watery": "watery decay"},
    "mycelium": {"present": "mycelium"},
    "int-discolor": {"brown": "brown inside", "black": "black inside"},
    "sclerotia": {"present": "sclerotia"},
    "fruit-pods": {"diseased": "pods diseased", "few-present": "few pods", "norm": "pods normal"},
    "fruit-spots": {"colored": "coloured spots", "brown-w/blk-specks": "brown spots with black specks",
                    "distort": "distorted"},
    "mold-growth": {"present": "mould"},
    "seed-discolor": {"present": "discoloured"},
    "seed-size": {"lt-norm": "small"},
    "shriveling": {"present": "shrivelled"},
    "roots": {"norm": "roots normal", "rotted": "roots rotted", "galls-cysts": "galls or cysts on roots"},
}


def notes(r: dict[str, str]) -> str:
    """One plant's observations as a scout's short notes. Unknown ('?') and 'does not apply'
    values are left unsaid, as are absent findings under an organ marked abnormal."""

    def w(attr):
        return WORDS.get(attr, {}).get(r.get(attr, "?"))

    def organ(name, status_attr, details, normal="norm"):
        status = r.get(status_attr, "?")
        found = [x for x in (w(a) for a in details) if x]
        if status == "?" and not found:
            return None
        head = f"{name} {'normal' if status == normal else 'abnormal' if status != '?' else ''}".strip()
        return f"{head}: {', '.join(found)}" if found else head

    field = [r["date"] if r["date"] != "?" else None, w("plant-stand"), w("precip"), w("temp"), w("hail"),
             w("crop-hist")]
    damage = [x for x in (w("area-damaged"), w("severity")) if x]
    if damage:
        field.append("damage " + ", ".join(damage))
    field += [w("seed-tmt"), w("germination"), w("plant-growth"), w("lodging")]
    parts = [x for x in field if x]
    leaves = organ("leaves", "leaves",
                   ["leafspots-halo", "leafspots-marg", "leafspot-size", "leaf-shread", "leaf-malf", "leaf-mild"])
    stem = organ("stem", "stem", ["stem-cankers", "canker-lesion", "fruiting-bodies", "external-decay",
                                  "mycelium", "int-discolor", "sclerotia"])
    pods, spots = w("fruit-pods"), w("fruit-spots")
    pods = f"{pods or 'pods'}: {spots}" if spots else pods
    seed = organ("seed", "seed", ["mold-growth", "seed-discolor", "seed-size", "shriveling"])
    parts += [x for x in (leaves, stem, pods, seed, w("roots")) if x]
    return "; ".join(parts)


# ------------------------------------------------------------------ splitting


def split(groups: list[list[dict]], fractions: list[float], rng: random.Random) -> list[list[dict]]:
    """Assign whole groups (identical notes) to parts so each part gets about its share of rows."""
    groups = groups[:]
    rng.shuffle(groups)
    total = sum(len(g) for g in groups)
    parts = [[] for _ in fractions]
    for g in groups:
        # the part furthest below its target takes the group
        i = min(range(len(parts)), key=lambda k: (len(parts[k]) - fractions[k] * total) / max(fractions[k], 1e-9))
        parts[i] += g
    return parts


def write(path: Path, rows: list[dict], rng: random.Random) -> None:
    rows = rows[:]
    rng.shuffle(rows)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for r in rows:
            w.writerow([r["text"], r["label"]])
    tmp.replace(path)
    print(f"{path}: {len(rows)} plants, {len({r['label'] for r in rows})} diseases")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arff", type=Path, help="soybean.arff (default: find it, or fetch weka's .deb and extract it)")
    ap.add_argument("--no-fetch", action="store_true", help="never run apt-get; fail if the ARFF is not found")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the CSVs (default: beside this script)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", type=float, default=0.25, help="share of each disease held out for test.csv")
    a = ap.parse_args(argv)

    arff = find_arff(a.arff, fetch=not a.no_fetch)
    names, values = read_arff(arff)
    print(f"{arff}: {len(values)} plants, {len({v[-1] for v in values})} diseases")
    by_class: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for v in values:
        r = dict(zip(names, v, strict=True))
        label = r["class"]
        if label in RARE:
            continue
        text = notes(r)
        by_class[label][text].append({"text": text, "label": label})
    rng = random.Random(a.seed)
    train, test, new, new_test = [], [], [], []
    for label in sorted(by_class):
        groups = list(by_class[label].values())
        n = sum(len(g) for g in groups)
        if label == NEW_CLASS:
            x, y = split(groups, [NEW_CLASS_ROWS / n, 1 - NEW_CLASS_ROWS / n], rng)
            new += x
            new_test += y
        else:
            x, y = split(groups, [1 - a.test, a.test], rng)
            train += x
            test += y
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test), ("new_class", new), ("new_class_test", new_test)):
        write(a.out / f"{name}.csv", rows, rng)
    write_parity_inputs(a.out / "parity_inputs.txt", names, values, {r["text"] for r in train + test}, rng)


def write_parity_inputs(path: Path, names: list[str], values: list[list[str]], real: set[str],
                        rng: random.Random, n: int = PARITY_INPUTS) -> None:
    """Unlabelled notes for the parity gate (recipe.toml's parity_data): made-up plants, each
    observation drawn on its own from what plants of one disease showed (no plant of the data is
    copied; notes equal to a real plant's are skipped). Agreement needs no labels, and these
    certify int8 on notes *like* the scouts', not on a real field: the README says so."""
    by_disease: dict[str, list[dict]] = defaultdict(list)
    for v in values:
        r = dict(zip(names, v, strict=True))
        if r["class"] not in RARE and r["class"] != NEW_CLASS:
            by_disease[r["class"]].append(r)
    diseases, out, seen = sorted(by_disease), [], set(real)
    while len(out) < n:
        plants = by_disease[diseases[len(out) % len(diseases)]]
        text = notes({k: rng.choice(plants)[k] for k in names})
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"{path}: {len(out)} made-up plants' notes (unlabelled, for the parity gate)")


if __name__ == "__main__":
    main()
