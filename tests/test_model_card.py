"""The model card written into the adapter (and merged) folder, and the Ollama Modelfile beside a GGUF."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tinysft.model_card import model_card_text, modelfile_text, write_modelfile

ROWS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a, b in [(1, 2), (3, 4)]]
OLLAMA_INSTRUCTIONS = {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from tinysft import load_config, train

    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": [str(data)], "train.max_steps": 1,
                             "lora.r": 4, "eval.max_new_tokens": 4})
    out = tmp_path_factory.mktemp("runs") / "card-run"
    train(cfg, out, log=lambda _: None)
    return out


def test_card_names_base_data_hash_and_config(run: Path, tiny_model_dir: Path) -> None:
    text = model_card_text(run)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == tiny_model_dir.name and front["library_name"] == "peft"  # a name, not a cache path
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["train"][0]
    assert hashlib.sha256(Path(data).read_bytes()).hexdigest() in text
    assert "max_steps: 1" in text and "Before / after" not in text  # not evaluated yet


@pytest.mark.slow  # CLI subprocesses
def test_eval_puts_the_before_after_summary_in_the_adapter_card(run: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 plus 2?", "keywords": ["3"]}])
    proc = subprocess.run([sys.executable, "-m", "tinysft", "eval", str(run), "--prompts", str(prompts),
                           "--no-forgetting"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    card = (run / "adapter" / "README.md").read_text()
    assert "## Before / after" in card and "| figure | base | tuned |" in card
    assert "[More Information Needed]" not in card  # PEFT's empty template is gone


def test_merged_card(run: Path) -> None:
    text = model_card_text(run, "merged", "bfloat16")
    assert "library_name: transformers" in text and "bfloat16" in text


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs; triple-quoted arguments may span lines, as Ollama reads them."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, arg = line.partition(" ")
        assert word.upper() in OLLAMA_INSTRUCTIONS, line
        if arg.startswith('"""') and (arg.count('"""') == 1):
            while '"""' not in lines[i]:
                arg += "\n" + lines[i]
                i += 1
            arg += "\n" + lines[i]
            i += 1
        out.append((word.upper(), arg))
    return out


def test_modelfile_for_a_chatml_model(tokenizer, tmp_path: Path) -> None:
    gguf = tmp_path / "polite.gguf"
    gguf.write_bytes(b"GGUF")
    path = write_modelfile(gguf, tokenizer, system_prompt="Be polite.")
    assert path == tmp_path / "polite.Modelfile"
    pairs = parse_modelfile(path.read_text())
    assert ("FROM", "./polite.gguf") in pairs and (tmp_path / pairs[0][1]).is_file()
    template = next(arg for word, arg in pairs if word == "TEMPLATE")
    assert "<|im_start|>{{ .Role }}" in template and "{{ .Content }}<|im_end|>" in template
    assert ("PARAMETER", 'stop "<|im_end|>"') in pairs
    assert ("SYSTEM", '"""Be polite."""') in pairs
    # The template renders what the tokenizer renders, with Ollama's fields filled by hand.
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                             tokenize=False, add_generation_prompt=True)
    filled = ("<|im_start|>system\nS<|im_end|>\n" "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert expected == filled


def test_modelfile_without_a_known_format_relies_on_the_gguf_template() -> None:
    class Tok:
        chat_template = "{{ messages }}"
        eos_token = "<eos>"

    pairs = parse_modelfile(modelfile_text("m.gguf", Tok()))
    assert [w for w, _ in pairs] == ["FROM", "PARAMETER"] and pairs[1][1] == 'stop "<eos>"'


@pytest.mark.slow  # CLI subprocesses
def test_merge_writes_the_card_and_export_the_modelfile(run: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "tinysft", "merge", str(run), "--out", str(merged)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    card = (merged / "README.md").read_text()
    assert "library_name: transformers" in card and "## Config" in card
    gguf = tmp_path / "tiny.gguf"
    proc = subprocess.run([sys.executable, "-m", "tinysft", "export", str(run), "--format", "gguf", "--out", str(gguf)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    pairs = parse_modelfile((tmp_path / "tiny.Modelfile").read_text())
    assert ("FROM", "./tiny.gguf") in pairs and any(w == "TEMPLATE" for w, _ in pairs)
