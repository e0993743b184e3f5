"""Interruption-safe runs: checkpoints, resume after SIGKILL / Ctrl-C, refusing what cannot continue, NaN.

Every run here: 10 conversations, batch 2 -> 5 micro-batches per epoch, grad_accum 2 -> 3 optimizer
steps per epoch (the last one a single micro-batch), 4 epochs = 12 steps. LoRA dropout is on, so a
resume that did not restore the RNG state would draw other dropout masks and other losses.
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

from conftest import CHAT_ROWS, write_jsonl
from tinysft.config import load_config, parse_overrides
from tinysft.training import TrainError, latest_checkpoint, train

TOTAL_STEPS = 12
SETTINGS = ["train.epochs=4", "train.batch_size=2", "train.grad_accum=2", "train.packing=false",
            "train.learning_rate=1e-2", "train.log_every=1", "train.save_every=2", "train.keep_checkpoints=2",
            "train.threads=1", "train.mixed_precision=no", "lora.r=4", "lora.alpha=8", "lora.dropout=0.2",
            "lora.target_modules=all-linear"]
QUIET = {"show_progress": False, "log": lambda m: None}


def cfg_for(model_dir: Path, data: Path, *extra: str):
    return load_config(None, parse_overrides([f"model.name={model_dir}", f"data.train={data}", *SETTINGS, *extra]))


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs logged so far; a line still being written is skipped."""
    path, rows = run / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_curve(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, TOTAL_STEPS + 1))
    # metrics.jsonl rounds to 5 decimals: equal losses round equally, so 1e-5 is one rounding step.
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1.01e-5, (step, a, b)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", CHAT_ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data) -> Path:
    """An uninterrupted run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(cfg_for(tiny_model_dir, data), run, **QUIET)
    return run


def test_checkpoints_every_n_steps_and_at_the_end_keeping_the_last_k(reference) -> None:
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step-10", "step-12"], "keep_checkpoints=2 keeps the two newest; the last is the end"
    final = reference / "checkpoints" / "step-12"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt",
                 "scheduler.pt", "rng-0.pt", "state.json"):
        assert (final / name).is_file(), name
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == TOTAL_STEPS and state["world_size"] == 1
    assert not [p for p in reference.rglob(".*") if "tmp" in p.name or "old" in p.name], "temporary folders left"


def test_stopped_run_continues_with_the_same_losses(tmp_path, tiny_model_dir, data, reference) -> None:
    """Stopped after step 5 (mid-epoch: 4 micro-batches of epoch 2 to skip), then rerun with the same --out."""
    run = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, data)
    first = train(cfg, run, stop_after_steps=5, **QUIET)
    assert first.steps == 5 and latest_checkpoint(run).name == "step-5"
    assert not (run / "adapter").exists(), "an unfinished run has no adapter"
    said: list[str] = []
    # No resume=True: rerunning the same command on an unfinished run continues it.
    result = train(cfg, run, show_progress=False, log=said.append)
    assert any("Resuming from" in m and "step-5" in m for m in said), said
    assert result.steps == TOTAL_STEPS and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_curve(losses(run), losses(reference))


SLOW_TRAIN = """
import sys, time
import tinysft.training.sft as t
loss = t.lm_and_pair_loss
def slow(*args, **kwargs):  # make each step long enough to be killed between two checkpoints
    time.sleep(0.25)
    return loss(*args, **kwargs)
t.lm_and_pair_loss = slow
from tinysft.cli import app
app(sys.argv[1:], prog_name="tinysft")
"""


def start_training(model_dir: Path, data: Path, run: Path) -> subprocess.Popen:
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(run), "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def wait_for(check, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the signal (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_model_dir, data, reference) -> None:
    run = tmp_path / "run"
    proc = start_training(tiny_model_dir, data, run)
    wait_for(lambda: (run / "checkpoints" / "step-4" / "state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed_from = int(latest_checkpoint(run).name.split("-")[1])
    assert 4 <= resumed_from < TOTAL_STEPS, "killed mid-run"
    said: list[str] = []
    train(cfg_for(tiny_model_dir, data), run, resume=True, show_progress=False, log=said.append)
    assert any(f"step {resumed_from}/{TOTAL_STEPS}" in m for m in said), said
    assert_same_curve(losses(run), losses(reference))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, tiny_model_dir, data, reference) -> None:
    run = tmp_path / "run"
    proc = start_training(tiny_model_dir, data, run)
    wait_for(lambda: len(losses(run)) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted:" in err and "saving a checkpoint" in err, err[-2000:]
    stopped_at = int(latest_checkpoint(run).name.split("-")[1])
    assert stopped_at == losses(run)[-1][0] < TOTAL_STEPS, "the checkpoint is the step it stopped after"
    train(cfg_for(tiny_model_dir, data), run, **QUIET)
    assert_same_curve(losses(run), losses(reference))


def test_half_written_checkpoints_are_ignored(tmp_path, tiny_model_dir, data) -> None:
    run = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, data)
    train(cfg, run, stop_after_steps=4, **QUIET)
    # What a kill during a save leaves: a temporary folder, and (older layouts) a folder without state.json.
    (run / "checkpoints" / ".step-6.tmp" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-8").mkdir()
    assert latest_checkpoint(run).name == "step-4"
    said: list[str] = []
    train(cfg, run, show_progress=False, log=said.append, stop_after_steps=6)
    assert any("step-4" in m for m in said), said
    assert not (run / "checkpoints" / ".step-6.tmp").exists()


def test_refuses_to_continue_with_other_settings_or_data(tmp_path, tiny_model_dir, data) -> None:
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, data), run, stop_after_steps=2, **QUIET)
    with pytest.raises(TrainError, match=r"other settings: train\.learning_rate was 0\.01, now 0\.02"):
        train(cfg_for(tiny_model_dir, data, "train.learning_rate=2e-2"), run, **QUIET)
    # How often to log / save is not part of the run: it may change between a run and its continuation.
    train(cfg_for(tiny_model_dir, data, "train.save_every=3", "train.log_every=2"), run, stop_after_steps=3, **QUIET)
    assert latest_checkpoint(run).name == "step-3"
    edited = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS[:-1])
    other = tmp_path / "other"
    train(cfg_for(tiny_model_dir, edited), other, stop_after_steps=2, **QUIET)
    write_jsonl(edited, CHAT_ROWS)
    with pytest.raises(TrainError, match="changed since the run started"):
        train(cfg_for(tiny_model_dir, edited), other, **QUIET)


def test_refuses_a_checkpoint_from_another_number_of_processes(tmp_path, tiny_model_dir, data) -> None:
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, data), run, stop_after_steps=2, **QUIET)
    state = run / "checkpoints" / "step-2" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))
    with pytest.raises(TrainError, match="written by 2 process"):
        train(cfg_for(tiny_model_dir, data), run, **QUIET)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, data,
                                                                      monkeypatch) -> None:
    import torch

    import tinysft.training.sft as sft

    real = sft.lm_and_pair_loss
    calls = {"n": 0}

    def nan_from_step_5(*args, **kwargs):
        calls["n"] += 1
        loss, n, pref = real(*args, **kwargs)
        return (loss * float("nan"), n, pref) if calls["n"] > 8 else (loss, n, pref)  # 2 micro-batches per step

    monkeypatch.setattr(sft, "lm_and_pair_loss", nan_from_step_5)
    run = tmp_path / "run"
    with pytest.raises(TrainError, match=r"loss became nan at step 5.*step-4, is kept") as e:
        train(cfg_for(tiny_model_dir, data), run, **QUIET)
    assert "learning_rate" in str(e.value)
    assert latest_checkpoint(run).name == "step-4" and not (run / "adapter").exists()
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_huge_learning_rate_is_caught(tmp_path, tiny_model_dir, data) -> None:
    with pytest.raises(TrainError, match=r"became (nan|inf|-inf) at step \d+: training diverged"):
        train(cfg_for(tiny_model_dir, data, "train.learning_rate=1e30", "train.max_grad_norm=0",
                      "train.warmup_ratio=0"), tmp_path / "run", **QUIET)


def test_finished_run_is_refused_even_with_resume(reference, tiny_model_dir, data) -> None:
    with pytest.raises(TrainError, match="already holds a run that finished"):
        train(cfg_for(tiny_model_dir, data), reference, resume=True, **QUIET)
