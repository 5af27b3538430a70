"""SIGKILL a device command at random moments, then check what it left: the crash tests of
`device retrain` for each head family share this loop."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def kill_at_random_moments(source: Path, workdir: Path, command: Callable[[Path], list[str]],
                           check: Callable[[Path], object], trials: int, seed: int = 0) -> list:
    """Time `command` once on a copy of `source`; then, per trial, run it on a fresh copy, kill it
    with SIGKILL after 30-100% of that time and call `check(copy)`. Returns what each check returned."""
    timing = workdir / "timing"
    shutil.copytree(source, timing)
    t0 = time.perf_counter()
    subprocess.run(command(timing), check=True, capture_output=True)
    full = time.perf_counter() - t0
    shutil.rmtree(timing)
    rng = random.Random(seed)
    seen = []
    for trial in range(trials):
        b = workdir / f"t{trial}"
        shutil.copytree(source, b)
        p = subprocess.Popen(command(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.append(check(b))
        shutil.rmtree(b)
    return seen
