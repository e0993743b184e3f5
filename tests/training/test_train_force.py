"""`tinysft train --force`: replaces a run tinysft wrote, and nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # CLI subprocesses


def tinysft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinysft", *args], capture_output=True, text=True, timeout=300)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
            "--set", "train.epochs=1", "--set", "lora.r=4", "--set", "train.mixed_precision=no", *extra]


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_force_replaces_a_finished_run_and_refuses_other_folders(tmp_path, tiny_model_dir, chat_file) -> None:
    run = tmp_path / "run"
    assert tinysft(*train_args(tiny_model_dir, chat_file, run)).returncode == 0
    again = tinysft(*train_args(tiny_model_dir, chat_file, run))
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr, again.stderr
    first_manifest = (run / "manifest.json").read_text()
    forced = tinysft(*train_args(tiny_model_dir, chat_file, run, "--force"))
    assert forced.returncode == 0, forced.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "manifest.json").read_text() != first_manifest  # a new run (new creation time)

    # A folder tinysft did not write, one that holds a run, and one holding the data: refused, untouched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    holder = tmp_path  # holds `run` and the data
    for target in (mine, holder):
        before = tree(target)
        proc = tinysft(*train_args(tiny_model_dir, chat_file, target, "--force"))
        assert proc.returncode == 1, proc.stderr
        assert "refusing to replace" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert tree(target) == before
    # A user file added inside a run makes it the user's too.
    (run / "my-analysis.ipynb").write_text("{}")
    proc = tinysft(*train_args(tiny_model_dir, chat_file, run, "--force"))
    assert proc.returncode == 1 and "my-analysis.ipynb" in proc.stderr, proc.stderr
    assert (run / "my-analysis.ipynb").is_file() and (run / "adapter").is_dir()
