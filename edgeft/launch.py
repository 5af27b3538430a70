"""`edgeft train --nproc N`: start N local training processes through torchrun's launcher.

The workers run the same `edgeft train` command; accelerate picks up the process group from
torchrun's environment (gloo on CPU, NCCL on GPUs). What the user sees is the main worker's
output, and on failure one `error:` line, not torchrun's report of every worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from .errors import TrainingError


def in_worker() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_PROCESS_INDEX" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `edgeft <argv>` on `nproc` local processes; return the exit code."""
    port = int(os.environ.get("MASTER_PORT") or free_port())
    threads = max(1, (os.cpu_count() or 1) // nproc)  # no oversubscription: cores shared out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0",
           "-m", "edgeft.cli", *strip_nproc(argv)]
    debug = "--debug" in argv
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    noise = False
    for line in proc.stderr:
        # torchrun's own report (warnings, "ChildFailedError", tracebacks of the launcher) is noise
        # to a user; the workers' log lines and their one-line errors are not
        if line.startswith("error: "):
            if line not in errors:
                errors.append(line)
                sys.stderr.write(line)
            continue
        if line.startswith("[rank") and not debug:  # a worker's traceback: shown with --debug
            continue
        if "torch.distributed" in line or "ChildFailedError" in line or line.startswith(("W", "E", "I")) and \
                line[1:5].isdigit() or line.startswith("Traceback") or noise:
            noise = noise or line.startswith("Traceback") or "ChildFailedError" in line
            continue
        if "address already in use" in line.lower():
            errors.append(line)
        sys.stderr.write(line)
    code = proc.wait()
    if code and not errors:
        raise TrainingError(f"training failed in a worker process (exit code {code}); rerun with --debug, "
                            "or with --nproc 1 to see the worker's own error.")
    if code and any("address already in use" in e.lower() for e in errors):
        raise TrainingError(f"port {port} is in use; set MASTER_PORT to a free port.")
    return code
