"""The one checkpoint protocol, through the classification task (SFT has the same tests in
test_resume.py): a kill between two checkpoints or in the middle of writing one, and damaged
checkpoint files, never cost more than the steps since the last intact checkpoint.

Every classification run here: the 40-row news unit-test set, batch 8 -> 5 micro-batches per
epoch, grad_accum 2 -> 3 optimizer steps per epoch, 4 epochs = 12 steps; LoRA dropout on, so a
resume that did not restore the RNG state would draw other masks and other losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, EXAMPLES, write_jsonl
from tinysft.config import load_config, parse_overrides
from tinysft.training import TrainError, latest_checkpoint, train, train_classifier

TOTAL_STEPS = 12
SETTINGS = ["train.task=classify", "train.epochs=4", "train.batch_size=8", "train.grad_accum=2",
            "train.learning_rate=1e-2", "train.warmup_ratio=0", "train.log_every=1", "train.save_every=2",
            "train.keep_checkpoints=2", "train.threads=1", "train.mixed_precision=no", "data.val_fraction=0",
            "lora.r=8", "lora.alpha=16", "lora.dropout=0.2"]
DATA = EXAMPLES / "news-topics" / "unit_test.jsonl"
QUIET = {"show_progress": False, "log": lambda m: None}
pytestmark = pytest.mark.slow  # subprocess training runs


def cfg_for(model_dir: Path, *extra: str):
    return load_config(None, parse_overrides([f"model.name={model_dir}", f"data.train={DATA}", *SETTINGS, *extra]))


def losses(run: Path) -> list[tuple[int, float]]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_curve(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, TOTAL_STEPS + 1))
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1.01e-5, (step, a, b)  # metrics.jsonl rounds to 5 decimals


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    train_classifier(cfg_for(tiny_bert_dir), run, **QUIET)
    losses_ = [loss for _, loss in losses(run)]
    assert losses_[-1] < losses_[0], "the reference run learns"
    return run


# A CLI training process whose steps are slow enough to be killed between two checkpoints, and
# which can kill itself in the middle of writing one (after the files named in KILL_AFTER).
CHILD = """
import os, signal, sys, time
import torch
import torch.nn.functional as F
real_ce, real_save = F.cross_entropy, torch.save
def slow_ce(*args, **kwargs):
    time.sleep(0.15)
    return real_ce(*args, **kwargs)
F.cross_entropy = slow_ce
kill_after = os.environ.get("KILL_AFTER")
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if kill_after and "step-4" in str(f) and str(f).endswith(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from tinysft.cli import app
app(sys.argv[1:], prog_name="tinysft")
"""


def start_training(model_dir: Path, run: Path, kill_after: str | None = None) -> subprocess.Popen:
    args = ["train", "--model", str(model_dir), "--data", str(DATA), "--out", str(run), "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"KILL_AFTER": kill_after} if kill_after else {})}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_classification_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_bert_dir, reference) -> None:
    run = tmp_path / "run"
    proc = start_training(tiny_bert_dir, run)
    end = time.time() + 240
    while not (run / "checkpoints" / "step-4" / "state.json").is_file():
        assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
        assert time.time() < end, "timed out waiting for step-4"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed_from = int(latest_checkpoint(run).name.split("-")[1])
    assert 4 <= resumed_from < TOTAL_STEPS, "killed mid-run"
    said: list[str] = []
    train_classifier(cfg_for(tiny_bert_dir), run, show_progress=False, log=said.append)
    assert any(f"step {resumed_from}/{TOTAL_STEPS}" in m for m in said), said
    assert_same_curve(losses(run), losses(reference))


@pytest.mark.parametrize("kill_after", ["optimizer.pt", "rng-0.pt"])
def test_a_kill_while_writing_a_checkpoint_never_leaves_a_checkpoint_resume_would_pick(
        tmp_path, tiny_bert_dir, reference, kill_after) -> None:
    """Killed after writing step-4's adapter and optimizer (or every file but state.json): the
    half-written folder is never taken for a checkpoint; resume continues from step-2."""
    run = tmp_path / "run"
    proc = start_training(tiny_bert_dir, run, kill_after=kill_after)
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    half = run / "checkpoints" / ".step-4.tmp"
    assert (half / kill_after).is_file() and not (half / "state.json").exists(), "killed mid-write"
    assert not (run / "checkpoints" / "step-4").exists()
    assert latest_checkpoint(run).name == "step-2"
    said: list[str] = []
    train_classifier(cfg_for(tiny_bert_dir), run, show_progress=False, log=said.append)
    assert any(f"step 2/{TOTAL_STEPS}" in m for m in said), said
    assert not half.exists(), "the half-written folder is cleaned up"
    assert_same_curve(losses(run), losses(reference))


# ---- damaged checkpoints (SFT: the same protocol) --------------------------------------------------------

SFT = ["train.epochs=2", "train.batch_size=2", "train.packing=false", "train.learning_rate=1e-2",
       "train.log_every=1", "train.save_every=2", "train.keep_checkpoints=2", "train.threads=1",
       "train.mixed_precision=no", "lora.r=4", "lora.alpha=8", "lora.dropout=0.2"]


@pytest.fixture
def stopped_sft(tmp_path, tiny_model_dir) -> tuple[Path, object]:
    """An SFT run stopped after step 4, with checkpoints step-2 and step-4."""
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([f"model.name={tiny_model_dir}", f"data.train={data}", *SFT]))
    run = tmp_path / "run"
    train(cfg, run, stop_after_steps=4, **QUIET)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-2", "step-4"]
    return run, cfg


@pytest.mark.parametrize(("damage", "named"), [
    (lambda ck: (ck / "optimizer.pt").write_bytes((ck / "optimizer.pt").read_bytes()[:100]), "optimizer.pt"),
    (lambda ck: (ck / "state.json").write_text('{"step": 4, "total'), "state.json"),
    (lambda ck: (ck / "state.json").write_text('["not", "a", "state"]'), "state.json"),
    (lambda ck: (ck / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10), "adapter_model.safetensors"),
    (lambda ck: (ck / "rng-0.pt").unlink(), "rng-0.pt"),
])
def test_a_damaged_checkpoint_is_named_and_resume_falls_back(stopped_sft, damage, named) -> None:
    run, cfg = stopped_sft
    damage(run / "checkpoints" / "step-4")
    said: list[str] = []
    result = train(cfg, run, show_progress=False, log=said.append)
    note = next(m for m in said if "Damaged checkpoint" in m)
    assert named in note and "step-2" in note, note
    assert any("Resuming from" in m and "step-2" in m for m in said), said
    assert result.steps == 10 and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_no_intact_checkpoint_stops_with_the_files_and_the_way_out(stopped_sft, tmp_path) -> None:
    run, cfg = stopped_sft
    for ck in ("step-2", "step-4"):
        opt = run / "checkpoints" / ck / "optimizer.pt"
        opt.write_bytes(opt.read_bytes()[:50])
    with pytest.raises(TrainError, match=r"every checkpoint is damaged .*step-4.*optimizer\.pt.*step-2.*Delete"):
        train(cfg, run, **QUIET)
    # Through the CLI: exit 1, one paragraph, no traceback, nothing deleted.
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = [sys.executable, "-m", "tinysft", "train", "--out", str(run), "--no-progress"]
    for key, value in (("model.name", cfg.model.name), ("data.train", cfg.data.train[0])):
        args += ["--set", f"{key}={value}"]
    for s in SFT:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "every checkpoint is damaged" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
