"""What a new user meets in the first hour, through the command line: the version, completion, the
help text, and every early failure ending in one paragraph with the fix (exit 1, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, write_jsonl
from tinysft.config import load_config

ROWS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a, b in [(1, 2), (3, 4), (5, 6)]]


def tinysft(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinysft", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 1, one 'error:' paragraph containing each needle, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr and "internal error" not in proc.stderr
    assert "error: " in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A one-step run on the tiny model whose eval.max_new_tokens is 3."""
    from tinysft import train

    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)
    cfg = load_config(None, {"model": {"name": str(tiny_model_dir)}, "data": {"train": [str(data)]},
                             "train": {"max_steps": 1, "batch_size": 2}, "lora": {"r": 4},
                             "eval": {"max_new_tokens": 3}})
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(cfg, run, log=lambda _: None)
    return run


@pytest.mark.slow  # CLI subprocesses
def test_version_usage_name_and_flags_shown_bare() -> None:
    from tinysft import __version__

    proc = tinysft("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tinysft {__version__}"
    help_text = tinysft("data", "check", "--help").stdout
    assert "Usage: tinysft data check" in help_text and "python -m" not in help_text
    assert "--strict" in help_text and "<bool>" not in help_text


@pytest.mark.slow  # CLI subprocesses
def test_shell_completion_completes_commands() -> None:
    proc = tinysft(env={"_TINYSFT_COMPLETE": "complete_bash", "COMP_WORDS": "tinysft tr", "COMP_CWORD": "1"})
    assert proc.returncode == 0 and proc.stdout.split() == ["train"]
    assert "--install-completion" in tinysft("--help").stdout


def test_dtype_aliases_everywhere() -> None:
    cfg = load_config(None, {"model": {"dtype": "bf16"}, "train": {"mixed_precision": "bfloat16"}})
    assert (cfg.model.dtype, cfg.train.mixed_precision) == ("bfloat16", "bf16")
    assert load_config(None, {"model": {"dtype": "fp16"}}).model.dtype == "float16"
    assert load_config(None, {"model": {"dtype": "fp32"}}).model.dtype == "float32"


@pytest.mark.slow  # CLI subprocesses
def test_merge_accepts_fp16(tiny_run: Path, tmp_path: Path) -> None:
    proc = tinysft("merge", str(tiny_run), "--out", str(tmp_path / "merged"), "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"
    user_error(tinysft("merge", str(tiny_run), "--out", str(tmp_path / "m2"), "--dtype", "fp8"), "fp16")


@pytest.mark.slow  # CLI subprocesses
def test_generate_defaults_to_the_runs_answer_length(tiny_run: Path, tmp_path: Path, tokenizer) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tell me a long story about cats."}])
    out = tmp_path / "answers.jsonl"
    assert tinysft("generate", str(tiny_run), "--prompts", str(prompts), "--out", str(out)).returncode == 0
    answer = json.loads(out.read_text())["response"]
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 3  # eval.max_new_tokens of the run


@pytest.mark.slow  # CLI subprocesses
def test_eval_on_a_config_folder_says_train_it_first() -> None:
    proc = tinysft("eval", str(EXAMPLES / "polite-helper"), "--no-forgetting")
    user_error(proc, "not a run", "tinysft train", "config.yaml")
    assert "--resume" not in proc.stderr


@pytest.mark.slow  # CLI subprocesses
def test_serve_and_ui_on_a_busy_port_fail_before_loading(tiny_run: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        for command in ("serve", "ui"):
            start = time.monotonic()
            proc = tinysft(command, str(tiny_run), "--port", port, timeout=120)
            user_error(proc, f"port {port}", "already in use", "--port")
            assert "Serving" not in proc.stderr + proc.stdout and "Open http" not in proc.stderr
            assert time.monotonic() - start < 60


@pytest.fixture
def no_template_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with its chat template removed (a base model, as many hub models are)."""
    folder = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow  # five CLI processes
def test_model_without_chat_template(no_template_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    user_error(tinysft("data", "check", str(data), "--model", str(no_template_model)),
               "no chat template", "model.chat_template", "chatml")
    assert tinysft("data", "check", str(data), "--model", str(no_template_model), "--chat-template", "chatml").returncode == 0
    user_error(tinysft("train", "--model", str(no_template_model), "--data", str(data), "--out", str(tmp_path / "r0"),
                       "--set", "train.max_steps=1"), "model.chat_template")
    template = tmp_path / "mine.jinja"
    from tinysft.data.templates import CHATML

    template.write_text(CHATML)
    run = tmp_path / "r1"
    proc = tinysft("train", "--model", str(no_template_model), "--data", str(data), "--out", str(run), "--no-progress",
                   "--set", f"model.chat_template={template}", "--set", "train.max_steps=1", "--set", "lora.r=4")
    assert proc.returncode == 0, proc.stderr
    assert load_config(run / "config.yaml").model.chat_template == str(template.resolve())
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    proc = tinysft("generate", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 0, proc.stderr


def test_unknown_chat_template_names_the_builtins(tmp_path: Path) -> None:
    from tinysft.config import ConfigError
    from tinysft.data.templates import template_text

    with pytest.raises(ConfigError, match=r"model.chat_template: 'nosuch'.*chatml, zephyr, plain"):
        template_text("nosuch")


def test_python_api_in_process(tiny_run: Path, tmp_path: Path) -> None:
    import tinysft
    from tinysft import evaluate

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 plus 2?", "keywords": ["3"]}])
    result = evaluate(tiny_run, prompts, out_dir=tmp_path / "report", log=lambda _: None)
    assert set(result.metrics) == {"base", "tuned"} and "n" in result.metrics["tuned"]
    assert result.paths["json"].is_file() and (tmp_path / "report" / "report.md").is_file()
    assert tinysft.evaluate is evaluate  # the same object before and after the subpackage is imported
    from tinysft.models.registry import ModelError

    with pytest.raises(ModelError, match="not a tinysft run"):
        evaluate(tmp_path)


def test_import_is_fast_and_loads_no_torch() -> None:
    code = "import sys, tinysft; print('torch' in sys.modules, tinysft.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split()[0] == "False", proc.stdout + proc.stderr


# ---- the README's quickstart ------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(language + "\n")]


def readme_commands() -> list[list[str]]:
    """Every `tinysft ...` line of the README's bash blocks, split as the shell would, comments dropped."""
    import shlex

    lines = [line for block in readme_blocks("bash") for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("tinysft ")]


def test_every_readme_command_parses_with_the_real_cli() -> None:
    """Each command line of the README parses: the subcommand exists, every flag exists and takes the
    value written (click builds the context without running the command)."""
    import typer.main

    from tinysft.cli import app

    group = typer.main.get_command(app)
    commands = readme_commands()
    assert len(commands) >= 25
    for argv in commands:
        args = argv[1:]
        if args == ["--version"] or args == ["--install-completion"]:
            continue
        command, rest = group, args
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]
        assert command is not group, argv
        command.make_context(" ".join(argv[:2]), list(rest), resilient_parsing=False)


def test_readme_example_files_exist() -> None:
    import re

    text = README.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?:examples|docs)/[\w./-]+\.(?:jsonl|yaml|md|png)", text))
    assert len(paths) >= 8
    for path in paths:
        assert (README.parent / path).is_file(), path


@pytest.mark.integration  # the real embedded model, ten steps
def test_readme_python_block_runs(tmp_path: Path) -> None:
    (block,) = readme_blocks("python")
    (tmp_path / "examples").symlink_to(EXAMPLES)
    import tinysft

    env = {**os.environ, "PYTHONPATH": str(Path(tinysft.__file__).resolve().parents[1])}  # this tinysft, from any cwd
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=3000,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout or "n" in proc.stdout
    assert (tmp_path / "runs" / "notebook" / "report.json").is_file()
