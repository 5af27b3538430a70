"""Training on several processes (torchrun, DDP on gloo) gives what one process gives.

Each torchrun test starts several Python processes (about 10-20 s each on 2 cores): they are
marked slow, so they run in the full suite (CI) and not in the quick loop (-m "not slow").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert

from edgeft.config import TrainConfig
from edgeft.errors import UsageError
from edgeft.train import train


@pytest.fixture(scope="module")
def bert0(tmp_path_factory):
    """Dropout off: two processes draw different dropout masks than one, by design."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert0"), dropout=0.0)


def edgeft(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def common(bert0, text_data, method):
    return ["--model", bert0, "--data", text_data["train"], "--val", text_data["val"], "--method", method,
            "--pooling", "mean", "--epochs", "3", "--batch-size", "8", "--dropout", "0", "--lora-dropout", "0",
            "--lr", "1e-3", "--head-lr", "1e-2", "--metric", "loss", "--patience", "5", "--no-progress"]


def weights(run, name="trained.safetensors"):
    return load_file(str(run / name))


# Tolerance of every weight comparison here: 1e-5. Two processes sum gradients in another order
# (the all-reduce), a float32 rounding difference of ~1e-7 relative per step; Adam moves a weight
# by lr * m / sqrt(v), so the difference grows by about lr * 1e-7 per step (lr 1e-3 / 1e-2 here,
# under 30 steps): 1e-5 is orders above that on any CPU, and far below what a wrong gradient
# (a missing average, a doubled batch) moves, which is of order lr per step.
ATOL = 1e-5


@pytest.mark.slow  # torchrun: the full suite (CI), not the quick loop
@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_equal_one(method, bert0, text_data, tmp_path):
    one = edgeft("train", *common(bert0, text_data, method), "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = edgeft("train", *common(bert0, text_data, method), "--output", tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "training on 2 processes" in two.stderr
    assert two.stdout.count("train  ok") == 1  # only the main process reports (and writes)
    for name in ("trained.safetensors", "checkpoints/epoch-002/weights.safetensors"):
        a, b = weights(tmp_path / "one", name), weights(tmp_path / "two", name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=0, msg=k)


@pytest.mark.slow  # torchrun
def test_head_cache_and_head_match(bert0, text_data, tmp_path):
    env = {"EDGEFT_CACHE": str(tmp_path / "cache2")}
    two = edgeft("train", *common(bert0, text_data, "head"), "--output", tmp_path / "two", "--nproc", "2", env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    env1 = {"EDGEFT_CACHE": str(tmp_path / "cache1")}
    one = edgeft("train", *common(bert0, text_data, "head"), "--output", tmp_path / "one", env=env1)
    assert one.returncode == 0, one.stderr[-2000:]
    c1 = sorted((tmp_path / "cache1" / "features").glob("*.safetensors"))
    c2 = sorted((tmp_path / "cache2" / "features").glob("*.safetensors"))
    assert [p.name for p in c1] == [p.name for p in c2] and len(c1) == 2
    for a, b in zip(c1, c2, strict=True):  # one float32 forward pass in other batches: ~1e-7 relative
        torch.testing.assert_close(load_file(str(b))["features"], load_file(str(a))["features"], atol=ATOL, rtol=0)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=0)


@pytest.mark.slow  # two full trainings
def test_grad_accum_keeps_the_global_batch(bert0, text_data, tmp_path):
    base = dict(model=str(bert0), data=str(text_data["train"]), val=str(text_data["val"]), method="full",
                pooling="mean", epochs=2, batch_size=8, dropout=0.0, lr=1e-3, metric="loss", progress=False)
    train(TrainConfig(output=str(tmp_path / "a"), **base))
    train(TrainConfig(output=str(tmp_path / "b"), grad_accum=4, **base))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=0)


@pytest.mark.slow  # torchrun
def test_resume_with_another_process_count(bert0, text_data, tmp_path):
    """Two processes stop after epoch 2 (a crash, simulated); one process resumes; same weights."""
    import shutil

    args = common(bert0, text_data, "lora")
    whole = edgeft("train", *args, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    two = edgeft("train", *args, "--output", tmp_path / "cut", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    cut = tmp_path / "cut"
    shutil.rmtree(cut / "checkpoints" / "epoch-002")  # as if killed during epoch 3
    for f in ("run.json", "trained.safetensors", "metrics.json"):
        (cut / f).unlink()
    again = edgeft("train", *args, "--output", cut, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from epoch-001" in again.stderr
    a, b = weights(tmp_path / "whole"), weights(cut)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=0)


def test_fp16_on_cpu_is_refused(bert0, text_data, tmp_path):
    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA GPU"):
        train(TrainConfig(model=str(bert0), data=str(text_data["train"]), output=str(tmp_path / "x"),
                          precision="fp16"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # torchrun
def test_port_in_use_is_one_clear_error(bert0, text_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = edgeft("train", *common(bert0, text_data, "lora"), "--output", tmp_path / "r", "--nproc", "2",
                   env={"MASTER_PORT": str(port), "EDGEFT_DIST_TIMEOUT": "20", "TORCHELASTIC_MAX_RETRIES": "0"},
                   timeout=240)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
