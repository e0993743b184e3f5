"""`tinysft chat`: the session logic (streaming, base/tuned, reset) and the REPL through a pseudo-terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    from conftest import CHAT_ROWS, write_jsonl
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("chat-run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides(["train.epochs=1", "train.batch_size=4", "train.learning_rate=1e-2",
                                             "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.mixed_precision=no"]))
    cfg.model.name = str(tiny_model_dir)
    cfg.data.train = [str(data)]
    train(cfg, tmp / "run", show_progress=False, log=lambda m: None)
    return tmp / "run"


@pytest.fixture(scope="module")
def loaded(tiny_run):
    from tinysft.models.load import load_run

    return load_run(tiny_run, log=lambda m: None)


# The tiny random model answers greedy prompts with newlines only (an empty answer once stripped), so
# these tests sample (temperature 1, fixed seed) to get real tokens, and compare against `generate`
# with the same seed.
def test_streamed_pieces_add_up_to_the_batched_answer(loaded) -> None:
    import torch

    from tinysft.chat import ChatSession
    from tinysft.evaluate.generate import adapter_state, generate

    session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=12, temperature=1.0)
    pieces: list[str] = []
    torch.manual_seed(7)
    answer = session.reply("What is 2 plus 3?", on_text=pieces.append)
    assert answer and len(pieces) > 1, "tokens must arrive one piece at a time"
    assert "".join(pieces).strip() == answer
    with adapter_state(loaded.model, True):
        assert generate(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "What is 2 plus 3?"}]],
                        max_new_tokens=12, temperature=1.0, seed=7) == [answer]
    assert session.history == [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": answer}]


def test_commands_switch_adapter_and_reset(loaded) -> None:
    import torch

    from tinysft.chat import ChatSession, command
    from tinysft.evaluate.generate import adapter_state, generate

    # One epoch barely moves the tiny model; a loud adapter makes base and tuned answers differ.
    lora_b = {n: p for n, p in loaded.model.named_parameters() if "lora_B" in n}
    saved = {n: p.detach().clone() for n, p in lora_b.items()}
    with torch.no_grad():
        for p in lora_b.values():
            p.normal_(0, 2.0)
    try:
        session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=8, temperature=1.0)
        session.reply("Hi")
        assert "switched to base" in command(session, "/base") and not session.tuned
        assert "1 earlier exchange" in command(session, "/base")
        torch.manual_seed(3)
        base_answer = session.reply("Name a colour.")
        kw = {"max_new_tokens": 8, "temperature": 1.0, "seed": 3}
        with adapter_state(loaded.model, False):
            expected = generate(loaded.model, loaded.tokenizer, [session.history[:3]], **kw)[0]
        with adapter_state(loaded.model, True):
            tuned = generate(loaded.model, loaded.tokenizer, [session.history[:3]], **kw)[0]
    finally:
        with torch.no_grad():
            for n, p in lora_b.items():
                p.copy_(saved[n])
    assert base_answer == expected, "/base answers with the adapter disabled, on the whole history"
    assert tuned != expected, "the adapter must change the answer (else this test proves nothing)"
    assert len(session.history) == 4
    assert "new conversation" in command(session, "/reset") and session.history == []
    assert "switched to tuned" in command(session, "/TUNED") and session.tuned
    assert "unknown command" in command(session, "/bogus")
    assert command(session, "/exit") is None


def test_old_turns_are_dropped_to_fit_the_context(loaded) -> None:
    from tinysft.chat import ChatSession

    session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=4)
    session.history = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}] * 4
    limit = session.context_limit()
    session.reply("Last question?")
    from tinysft.data.render import render_prompt

    assert len(render_prompt(session.history[:-1], loaded.tokenizer)) <= limit
    assert session.history[-2] == {"role": "user", "content": "Last question?"}


@pytest.mark.slow
def test_chat_repl_in_a_pseudo_terminal(tiny_run) -> None:
    pexpect = pytest.importorskip("pexpect")

    exe = Path(sys.executable).with_name("tinysft")
    child = pexpect.spawn(str(exe), ["chat", str(tiny_run), "--max-new-tokens", "6", "--temperature", "1"], encoding="utf-8", timeout=180,
                          env={"TERM": "dumb", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
                               "HOME": str(tiny_run.parent)}, dimensions=(40, 200))
    try:
        child.expect_exact("/reset")  # the help line
        child.expect_exact("you (tuned)> ")
        child.sendline("What is 1 plus 2?")
        child.expect_exact("tuned> ")
        child.expect(r"\S")  # streamed text (sampled: the tiny model's greedy answer is only newlines)
        child.expect_exact("you (tuned)> ")
        child.sendline("/base")
        child.expect_exact("switched to base")
        child.expect_exact("you (base)> ")
        child.sendline("And 2 plus 2?")
        child.expect_exact("base> ")
        child.expect_exact("you (base)> ")
        child.sendline("/reset")
        child.expect_exact("new conversation")
        child.sendline("/tuned")
        child.expect_exact("you (tuned)> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_repl_loop_ends_on_end_of_input_and_survives_ctrl_c(loaded) -> None:
    from tinysft.chat import ChatSession, repl

    lines = iter(["/help", "", "/nope"])
    seen: list[str] = []

    def read(prompt: str) -> str:
        seen.append(prompt)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C at the prompt: a hint, not an exit
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    repl(ChatSession(loaded.model, loaded.tokenizer, tuned=False), read=read, write=written.append, banner="hello")
    text = "".join(written)
    assert text.startswith("hello\n") and "Ctrl-D or /exit" in text and "unknown command /nope" in text
    assert seen[0] == "you (base)> " and len(seen) == 5


def test_chat_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tinysft.cli import app

    result = CliRunner().invoke(app, ["chat", str(tmp_path)])
    assert result.exit_code == 1 and "not a tinysft run directory" in result.output
