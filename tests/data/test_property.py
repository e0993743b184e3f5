"""Property test: random rows through `tinysft data check` (the CLI, as a user runs it) and render.

Rows mix well-formed ones with random unicode: lone UTF-16 surrogates (written as JSON escapes, as a
cut-off emoji is, and as raw bytes), template control tokens such as <|im_start|>, NUL and other
control characters, wrong types. The command must answer with exit 0 or 1, never an internal error
(exit 2) or a traceback; and it must not be a validator that refuses everything: every well-formed
row is accepted (a problem is only ever listed on a line holding a random row), and a file of only
well-formed rows passes.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tinysft.data.formats import Conversation
from tinysft.data.render import Rendered, RenderError, render

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])
CONTROL = ["<|im_start|>", "<|im_end|>", "<|im_start|>system\n", "<|endoftext|>", "<|user|>", "<|assistant|>", "</s>",
           "{{", "{%", "\x00", "\x1b", "\u2028", "\ufeff"]
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
random_text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(CONTROL), surrogate), max_size=6).map("".join)
# Plain text that any chat template renders and trains: printable, no surrogates, no control tokens.
plain = st.text(st.characters(categories=("L", "N", "P", "Zs"), max_codepoint=0x2FFF), min_size=1, max_size=40).filter(
    lambda t: t.strip() != "" and "<|" not in t and "{" not in t and "}" not in t)
any_value = st.recursive(st.none() | st.booleans() | st.integers() | random_text,
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(random_text, inner, max_size=3),
                         max_leaves=8)

valid_row = st.one_of(
    st.builds(lambda p, r: {"prompt": p, "response": r}, plain, plain),
    st.builds(lambda s, u, a: {"messages": ([{"role": "system", "content": s}] if s else [])
                               + [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
              st.none() | plain, plain, plain),
    st.builds(lambda p, r, bad, c: {"prompt": p, "response": r, "rejected": bad, "category": c},
              plain, plain, plain, plain),
)
random_row = st.one_of(
    any_value,
    st.fixed_dictionaries({"prompt": random_text | any_value, "response": random_text | any_value}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": random_text | any_value}),
        max_size=4)}, optional={"rejected": random_text | any_value, "category": any_value}),
    st.fixed_dictionaries({"text": random_text, "label": any_value}),
)


def encode_line(row: Any, raw: bool) -> bytes:
    """One JSONL line: escapes (a lone surrogate as \\ud83d, as in the wild), or raw UTF-8 where
    surrogates become the invalid bytes a careless writer produces."""
    if raw:
        return json.dumps(row, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return json.dumps(row).encode()


def data_check(path: Path, tiny: Path, *extra: str) -> Any:
    from tinysft.cli import app

    return CliRunner().invoke(app, ["data", "check", str(path), "--model", str(tiny), "--max-length", "4096", *extra])


@pytest.mark.slow  # several trainings or CLI runs: outside the fast inner loop
@pytest.mark.parametrize("raw", [False, True], ids=["escaped", "raw-bytes"])
@PROPERTY
@given(rows=st.lists(st.tuples(st.booleans(), st.one_of(valid_row, random_row)), min_size=1, max_size=8),
       data=st.data())
def test_data_check_never_crashes_and_accepts_every_valid_row(tiny_model_dir: Path, raw: bool,
                                                              rows: list[tuple[bool, Any]], data: Any) -> None:
    lines, valid_lines = [], set()
    for number, (want_valid, row) in enumerate(rows, start=1):
        if want_valid:
            row = data.draw(valid_row)
            valid_lines.add(number)
        lines.append(encode_line(row, raw))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        result = data_check(path, tiny_model_dir)
    everything = result.stdout + result.stderr
    assert result.exit_code in (0, 1), everything
    assert "internal error" not in everything and "Traceback" not in everything, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    flagged = {int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+):", result.stderr)}
    assert not flagged & valid_lines, f"a well-formed row was refused:\n{everything}"
    if len(valid_lines) == len(rows):
        assert result.exit_code == 0 and f"OK {len(rows)} rows" in result.stdout, everything


@PROPERTY
@given(rows=st.lists(st.tuples(random_text, st.sampled_from(["sport", "business", "", "x" * 3])), min_size=1,
                     max_size=8))
def test_data_check_classify_csv_never_crashes(tiny_model_dir: Path, rows: list[tuple[str, str]]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        path.write_bytes(buffer.getvalue().encode("utf-8", errors="surrogatepass"))
        result = data_check(path, tiny_model_dir, "--task", "classify")
    everything = result.stdout + result.stderr
    assert result.exit_code in (0, 1) and "internal error" not in everything, everything


@PROPERTY
@given(messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": random_text}), max_size=5),
       valid=st.lists(st.tuples(plain, plain), min_size=1, max_size=2))
def test_render_answers_or_refuses_and_trains_every_valid_conversation(tokenizer: Any, messages: list[dict[str, str]],
                                                                       valid: list[tuple[str, str]]) -> None:
    with contextlib.suppress(RenderError):  # a refusal that says why is a fine answer; nothing else is
        render(Conversation(messages, "random:1"), tokenizer, 256)
    conv = [m for u, a in valid for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    out = render(Conversation(conv, "valid:1"), tokenizer, 4096)
    assert isinstance(out, Rendered) and out.n_trained > 0 and len(out.input_ids) == len(out.loss_mask)
