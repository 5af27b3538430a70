"""Write unlabelled maintenance-log entries (one per line) for the parity gate.

`python examples/maintenance/make_parity_inputs.py OUT.txt` (seeded: the same file every time).
The recipe names this script as its [build] parity_data, so `edgeft demo` and `edgeft run`
write the file into the recipe's output folder (OUT/parity-data/parity_inputs.txt) at run
time; it is never generated into the repository.

A gate that certifies "at least 99% of answers kept" at 95% confidence needs about 300
judged rows without a flip, more with one: the example's 120 held-out rows cannot. Agreement
with PyTorch needs no labels, so the recipe's build and verify steps also judge these
entries (`parity_data`). They are composed from asset, fault and place phrases in the style of
train.csv (no text of train.csv or test.csv is copied), so they certify agreement on entries
*like* the log's, not on a real plant's: the README says so.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ASSETS = {
    "electrical": ["VFD on conveyor {n}", "main breaker in MCC {n}", "motor on pump {n}", "panel heater in cabinet {n}",
                   "cable tray feeding line {n}", "fuse holder on press {n}", "contactor K{n} in the control panel",
                   "servo drive on robot cell {n}", "24V supply in enclosure {n}", "earth strap on mixer {n}"],
    "mechanical": ["bearing on conveyor {n} head pulley", "gearbox on mixer {n}", "drive chain on line {n}",
                   "coupling on pump {n}", "timing belt on packer {n}", "idler roller on belt {n}",
                   "shaft seal on agitator {n}", "sprocket on the infeed of line {n}", "wear strip on chute {n}",
                   "lifting hook on crane {n}"],
    "hydraulic": ["HPU on press {n}", "hydraulic hose on baler {n}", "cylinder on the tipper {n}",
                  "proportional valve on press {n}", "return filter on HPU {n}", "accumulator on injection unit {n}",
                  "pressure relief valve on the lift table {n}", "oil cooler on the HPU of line {n}",
                  "hydraulic pump on shear {n}", "manifold block on press brake {n}"],
    "controls": ["PLC rack on line {n}", "HMI on filler {n}", "proximity sensor on station {n}", "SCADA screen for tank {n}",
                 "encoder on conveyor {n}", "barcode scanner at packing bench {n}", "level sensor in silo {n}",
                 "profinet switch in cabinet {n}", "recipe on the line {n} HMI", "photo eye at the palletiser {n}"],
    "safety": ["light curtain on press {n}", "e-stop on line {n}", "guard door interlock on cell {n}",
               "handrail on mezzanine {n}", "fire extinguisher by bay {n}", "lockout station at line {n}",
               "safety scanner on AGV {n}", "eyewash station in area {n}", "spill kit near tank {n}",
               "pull cord on conveyor {n}"],
    "facilities": ["roof over bay {n}", "toilet in the block {n} washroom", "HVAC unit on the office roof {n}",
                   "LED high bay light in aisle {n}", "roller door at dock {n}", "air compressor {n} in the plant room",
                   "boiler room vent {n}", "car park barrier {n}", "canteen water heater {n}", "window in office {n}"],
}
FAULTS = {
    "electrical": ["tripping on overcurrent", "showing fault F0{n}", "smells of burnt insulation", "not powering up",
                   "blowing fuses every shift", "humming loudly and hot to touch"],
    "mechanical": ["making a grinding noise", "running hot", "worn and slipping", "vibrating badly above half speed",
                   "needs realigning", "knocking at every revolution"],
    "hydraulic": ["leaking oil onto the floor", "losing pressure under load", "weeping at the fitting", "oil milky again",
                  "slow to extend", "pressure gauge reading {n}0 bar low"],
    "controls": ["reading zero all the time", "lost comms with the PLC", "frozen and needs reboot",
                 "giving false triggers", "shows wrong counts", "alarm {n} comes up for no reason"],
    "safety": ["bypassed with a cable tie", "not stopping the machine", "missing its inspection tag", "damaged and loose",
               "blocked by pallets", "not working when tested"],
    "facilities": ["leaking when it rains", "blocked again", "not heating", "flickering all night",
                   "stuck half open", "very noisy since monday"],
}
TAILS = ["", "", "", " please", " urgent", " - night shift reports", ", seen twice this week", " again",
         ", production asking when", " (asset tag {n}{n}7)"]


def entries(n: int = 600, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    teams = sorted(ASSETS)
    while len(out) < n:
        team = teams[len(out) % len(teams)]
        text = f"{rng.choice(ASSETS[team])} {rng.choice(FAULTS[team])}{rng.choice(TAILS)}"
        text = text.replace("{n}", str(rng.randint(1, 9)))
        if rng.random() < 0.3:
            text = text[0].lower() + text[1:]
        if text not in seen:
            seen.add(text)
            out.append(text[0].upper() + text[1:] if rng.random() < 0.7 else text)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_parity_inputs.py OUT.txt")
    path = Path(sys.argv[1])
    path.write_text("\n".join(entries()) + "\n", encoding="utf-8")
    print(f"wrote {path}")
