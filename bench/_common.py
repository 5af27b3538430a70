"""What every bench script shares: the table layout, how busy the machine was, writing results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def print_cells(cells: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> None:
    """One table: the columns in `left` left-aligned, the rest right-aligned; a rule under the head."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for i, c in enumerate(cells):
        print(" | ".join(s.ljust(w) if j in left else s.rjust(w) for j, (s, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (Linux /proc/stat), else nan."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def others_share(fn, *args, **kw):
    """(fn's result, the share of the machine's CPUs other processes used meanwhile)."""
    busy, mine, t0 = machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    result = fn(*args, **kw)
    others = (machine_busy_seconds() - busy) - (sum(os.times()[:2]) - mine)
    return result, max(0.0, others) / ((time.perf_counter() - t0) * os.cpu_count())


def write_results(results: dict, output: str | Path) -> None:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out} ({results['bench_seconds']:.0f} s)")
