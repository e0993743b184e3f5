"""The command line end to end on a temp dir, with the tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.slow  # every test runs `python -m tinysft` in a subprocess


def tinysft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinysft", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_data_check_names_line_2_and_exits_1(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "broken"\n{"prompt": "c", "response": "d"}\n')
    proc = tinysft("data", "check", str(f))
    assert proc.returncode == 1
    assert f"{f}:2:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_data_check_prints_stats_and_masks(chat_file: Path, tiny_model_dir: Path) -> None:
    proc = tinysft("data", "check", str(chat_file), "--model", str(tiny_model_dir), "--show-mask", "1")
    assert proc.returncode == 0, proc.stderr
    assert "10 rows" in proc.stdout and "math: 8" in proc.stdout and "tokens per row" in proc.stdout
    assert "trained tokens highlighted" in proc.stdout


def test_train_generate_eval(tmp_path: Path, chat_file: Path, prompt_file: Path, tiny_model_dir: Path) -> None:
    run = tmp_path / "run"
    proc = tinysft("train", "--model", str(tiny_model_dir), "--data", str(chat_file), "--set", "train.epochs=1",
                   "--set", "lora.r=4", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    answers = tmp_path / "answers.jsonl"
    proc = tinysft("generate", str(run), "--prompts", str(prompt_file), "--out", str(answers), "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 3 and all("response" in r for r in rows)
    assert rows[0]["keywords"] == ["4"], "extra fields are kept"

    proc = tinysft("eval", str(run), "--prompts", str(prompt_file), "--out", str(tmp_path / "rep"), "--max-new-tokens", "8",
                   "--no-forgetting")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["metrics"]) == {"base", "tuned"}
    assert len(report["rows"]) == 3 and {"base_answer", "tuned_answer"} <= set(report["rows"][0])
    assert (tmp_path / "rep" / "report.md").read_text().count("|") > 10
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!doctype html>")


def test_user_errors_are_one_paragraph_not_tracebacks(tmp_path: Path, chat_file: Path) -> None:
    cases = [
        (["train", "--data", str(chat_file), "--set", "train.learning_rate=-1"], "learning_rate must be > 0"),
        (["train", "--data", str(chat_file), "--set", "lora.rank=3"], "Did you mean 'r'"),
        (["train", "--model", str(tmp_path / "nope"), "--data", str(chat_file)], "no such model folder"),
        (["eval", str(tmp_path), "--prompts", str(chat_file)], "not a tinysft run directory"),
        (["train", "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for args, fragment in cases:
        proc = tinysft(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert fragment in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_models_lists_the_embedded_defaults() -> None:
    proc = tinysft("models")
    assert proc.returncode == 0
    assert "smollm2-135m-instruct" in proc.stdout and "all-minilm-l6-v2" in proc.stdout


def test_prompt_rows_written_back_even_with_messages(tmp_path: Path, tiny_model_dir: Path, chat_file: Path) -> None:
    rows = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}], "id": 7}])
    run = tmp_path / "run"
    assert tinysft("train", "--model", str(tiny_model_dir), "--data", str(chat_file), "--set", "train.epochs=1",
                   "--out", str(run), "--no-progress").returncode == 0
    out = tmp_path / "o.jsonl"
    proc = tinysft("generate", str(run), "--prompts", str(rows), "--out", str(out), "--max-new-tokens", "4", "--base")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["id"] == 7


def test_cli_runs_on_tcmalloc_where_the_system_has_it() -> None:
    from tinysft.models.cpu.allocator import tcmalloc_path

    exe = shutil.which("tinysft", path=str(Path(sys.executable).parent))
    assert exe
    on = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120)
    off = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TINYSFT_TCMALLOC": "0"})
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert "memory allocator: default" in off.stdout
    want = "tcmalloc" if tcmalloc_path() else "default"
    assert f"memory allocator: {want}" in on.stdout, on.stdout
