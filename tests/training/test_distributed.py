"""Multi-process training: 2 CPU processes (torchrun, gloo) against 1 process with twice the accumulation.

With batch_size 1 and 10 conversations, an epoch is 10 micro-batches B0..B9. One process with
grad_accum 4 steps on {B0..B3}, {B4..B7}, {B8, B9}; two processes with grad_accum 2 each take every
other micro-batch (rank 0: B0, B2, ...; rank 1: B1, B3, ...), so their first step covers
{B0, B2} + {B1, B3}: the same tokens. The loss is token-weighted over the whole step on all ranks,
so the two runs compute the same loss and gradient up to float summation order. Dropout is off:
each rank draws its own masks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CHAT_ROWS, write_jsonl
from tinysft.config import load_config, parse_overrides
from tinysft.training import train

SETTINGS = ["train.epochs=4", "train.batch_size=1", "train.packing=false", "train.learning_rate=1e-2",
            "train.log_every=1", "train.save_every=6", "train.threads=1", "train.mixed_precision=no", "model.dtype=float32",
            "lora.r=4", "lora.alpha=8", "lora.dropout=0", "lora.target_modules=all-linear"]

pytestmark = pytest.mark.slow  # torchrun: two training processes


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    one = tmp_path / "one"
    train(load_config(None, parse_overrides([f"model.name={tiny_model_dir}", f"data.train={data}", *SETTINGS,
                                             "train.grad_accum=4"])), one, show_progress=False, log=lambda m: None)

    two = tmp_path / "two"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(two), "--no-progress",
            "--set", "train.grad_accum=2"]
    for s in SETTINGS:
        args += ["--set", s]
    # --standalone picks a free port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinysft", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Rank 0 alone logs and reports: one line per step, one "Done".
    assert proc.stdout.count("Done: 12 steps") == 1, proc.stdout
    rows = metrics(two)
    assert [r["step"] for r in rows] == list(range(1, 13))
    want = [r["loss"] for r in metrics(one)]
    got = [r["loss"] for r in rows]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, (got, want)
    assert want[-1] < want[0], "the runs must actually train"

    # The checkpoint holds both ranks' RNG states; the adapters agree.
    final = two / "checkpoints" / "step-12"
    assert (final / "rng-0.pt").is_file() and (final / "rng-1.pt").is_file()
    assert json.loads((final / "state.json").read_text())["world_size"] == 2
    from safetensors.torch import load_file

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)
