"""Property-based tests: whatever a user feeds in, tinysft answers with its own error types.

Any JSON value (and any bytes on disk) either becomes training data or raises the project's data
error (RowProblem for one row, DataError for a file, RenderError for a template refusal), never
another exception. Config values behave the same way with ConfigError.

The other half: every well-formed input is accepted, unchanged (the `test_valid_*` tests), so a
validator that rejected everything would fail here instead of passing the error-type checks above.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinysft.config import ConfigError, RunConfig, load_config
from tinysft.data import formats
from tinysft.data.formats import CHAT_FORMATS, ROLES, Conversation, LabeledText, RowProblem
from tinysft.data.render import RenderError, render
from tinysft.data.validate import (
    DataError,
    check_turns,
    load_conversations,
    load_labeled,
    load_prompts,
    read_rows,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that reaches the interesting paths: role markers, template tokens, whitespace-only, non-ASCII.
PIECES = ["<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>", "</s>", "\n", " ", "\t",
          "{{", "}}", "{%", "%}", "é", "日本", "🙂", "\x00", "\u200b"]
text = st.one_of(st.text(max_size=30), st.lists(st.sampled_from(PIECES) | st.text(max_size=5), max_size=6).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
KEYS = sorted({k for keys, _ in CHAT_FORMATS.values() for k in keys} | {"completion", "input", "label", "category",
                                                                       "answer_keywords", "system"})
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from([*ROLES, "bot", "", None]) | json_values,
                                              "content": text | json_values})
conversation = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}), min_size=0, max_size=6)
# Well-formed conversations (optional system, then user/assistant turns): these must mostly render.
turns = st.lists(st.tuples(text, text), min_size=1, max_size=3).map(
    lambda pairs: [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})])
well_formed = st.tuples(st.none() | text, turns).map(
    lambda st_: ([{"role": "system", "content": st_[0]}] if st_[0] is not None else []) + st_[1])
# Rows shaped like the real formats (so validation goes deep), plus anything at all.
rows = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), text | json_values, max_size=4),
    st.fixed_dictionaries({"messages": st.lists(message | json_values, max_size=5)}),
    st.fixed_dictionaries({"messages": conversation}, optional={"category": text | json_values}),
    st.fixed_dictionaries({"prompt": text, "response": text}),
    st.fixed_dictionaries({"messages": well_formed}),
)


@FUZZ
@given(rows)
def test_any_json_value_is_a_conversation_or_a_row_problem(row: Any) -> None:
    try:
        conv = formats.to_conversation(row, source="f.jsonl:1")
    except RowProblem as p:
        assert p.field and p.what and p.fix
        return
    assert isinstance(conv, Conversation) and conv.format in CHAT_FORMATS
    assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in conv.messages)
    try:
        check_turns(conv)
    except RowProblem as p:
        assert p.field and p.fix
        return
    turns = [m["role"] for m in conv.messages if m["role"] != "system"]
    assert turns[0] == "user" and turns[-1] == "assistant"
    assert all(a != b for a, b in itertools.pairwise(turns))


@FUZZ
@given(rows)
def test_any_json_value_is_a_prompt_or_a_data_error(row: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_text(json.dumps(row) + "\n")
        try:
            [conv] = load_prompts([path])
        except DataError as e:
            assert [p.line for p in e.problems] == [1] and e.problems[0].fix
            return
    assert conv.messages and conv.messages[-1]["role"] == "user"


# ---- well-formed input is accepted, and kept as written ------------------------------------------
# Any text with a visible character: the validators refuse only missing, non-string or blank text.
filled = text.filter(lambda t: t.strip())
valid_turns = st.lists(st.tuples(filled, filled), min_size=1, max_size=3).map(
    lambda pairs: [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})])
valid_messages = st.tuples(st.none() | filled, valid_turns).map(
    lambda st_: ([{"role": "system", "content": st_[0]}] if st_[0] is not None else []) + st_[1])
# (row, the messages it must become)
valid_rows = st.one_of(
    valid_messages.map(lambda m: ({"messages": m}, m)),
    st.tuples(filled, filled, st.sampled_from(["response", "completion"])).map(
        lambda t: ({"prompt": t[0], t[2]: t[1]}, [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])),
    st.tuples(filled, filled).map(lambda t: ({"instruction": t[0], "input": "", "output": t[1]},
                                             [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])),
)
plain_words = st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "Why?", "42", "é", "日本", "🙂"]),
                       min_size=1, max_size=8).map(" ".join)


@FUZZ
@given(valid_rows, st.none() | filled)
def test_valid_rows_are_accepted_unchanged(case: tuple[dict, list], category: str | None) -> None:
    row, messages = case
    if category is not None:
        row = {**row, "category": category}
    conv = formats.to_conversation(row, source="f.jsonl:1")
    check_turns(conv)  # raises on a rejected row: the test fails
    assert conv.messages == messages and conv.category == category


@FUZZ
@given(st.lists(st.tuples(plain_words, plain_words), min_size=1, max_size=3))
def test_valid_conversations_render_with_the_answers_trained(tokenizer, pairs: list[tuple[str, str]]) -> None:
    messages = [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    rendered = render(formats.to_conversation({"messages": messages}), tokenizer, 4096)
    assert len(rendered.input_ids) == len(rendered.loss_mask) and set(rendered.loss_mask) == {0, 1}
    trained = tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if m])
    assert trained == "".join(a + tokenizer.eos_token for _, a in pairs)


@FUZZ
@given(st.lists(valid_rows, min_size=1, max_size=5), st.lists(filled, min_size=1, max_size=3),
       st.lists(st.tuples(filled, filled), min_size=1, max_size=4))
def test_valid_files_load_every_row(chat: list[tuple[dict, list]], prompts: list[str],
                                    labeled: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chat_file, prompt_file, label_file = Path(tmp) / "c.jsonl", Path(tmp) / "p.jsonl", Path(tmp) / "l.jsonl"
        chat_file.write_bytes(_lines([row for row, _ in chat]))
        prompt_file.write_bytes(_lines([{"prompt": p} for p in prompts]))
        label_file.write_bytes(_lines([{"text": t, "label": lab} for t, lab in labeled]))
        assert [c.messages for c in load_conversations([chat_file])] == [m for _, m in chat]
        assert [c.messages for c in load_prompts([prompt_file])] == [[{"role": "user", "content": p}] for p in prompts]
        assert [(x.text, x.label) for x in load_labeled([label_file])] == [(t, lab.strip()) for t, lab in labeled]


@FUZZ
@given(st.one_of(json_values, st.fixed_dictionaries({"text": text | json_values}, optional={"label": json_values})))
def test_any_json_value_is_a_labeled_text_or_a_row_problem(row: Any) -> None:
    try:
        item = formats.to_labeled(row, source="l.jsonl:1")
    except RowProblem:
        return
    assert isinstance(item, LabeledText) and item.label.strip() and isinstance(item.text, str)


@FUZZ
@given(rows, st.integers(min_value=8, max_value=96))
def test_any_json_value_renders_or_raises_a_data_error(tokenizer, row: Any, max_length: int) -> None:
    """The whole path a training row takes: adapter, turn checks, chat template, loss mask."""
    try:
        conv = formats.to_conversation(row, source="f.jsonl:1")
        check_turns(conv)
        rendered = render(conv, tokenizer, max_length)
    except (RowProblem, RenderError):
        return
    assert len(rendered.input_ids) == len(rendered.loss_mask) <= max_length
    assert rendered.n_trained > 0 and set(rendered.loss_mask) <= {0, 1}


def _lines(values: list[Any]) -> bytes:
    return "".join(json.dumps(v) + "\n" for v in values).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.lists(rows, max_size=5).map(_lines),
                 st.lists(st.binary(max_size=40) | st.lists(rows, max_size=2).map(_lines), max_size=5).map(b"".join)),
       st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_any_file_loads_or_raises_one_data_error(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        problems: list = []
        parsed = read_rows(path, problems)
        assert all(isinstance(line, int) and line >= 1 for line, _ in parsed)
        assert all(p.file == str(path) and p.fix for p in problems)
        for load in (load_conversations, load_labeled):
            try:
                out = load([path])
            except DataError as e:
                assert e.problems and str(e)
                assert all(str(p).startswith(str(path)) for p in e.problems)
            else:
                assert out and not problems


# Values as YAML or --set give them: numbers, numbers as text ("nan", "-1"), booleans, lists, junk.
EDGES = ["0", "-1", "1", "2", "0.5", "1e-4", "-1e-4", "nan", "inf", "-inf", "1e9", "1.5", "no", "yes", 0, -1, 1.5,
         float("nan")]
NUMBERS = st.sampled_from(EDGES)
settings_values = st.one_of(scalars, NUMBERS, st.lists(scalars | NUMBERS, max_size=3),
                            st.dictionaries(text, scalars, max_size=2))
FIELDS = {section: sorted(cls.__dataclass_fields__) for section, cls in
          (("model", type(RunConfig().model)), ("lora", type(RunConfig().lora)), ("data", type(RunConfig().data)),
           ("train", type(RunConfig().train)), ("eval", type(RunConfig().eval)))}
overrides = st.fixed_dictionaries({}, optional={
    section: st.dictionaries(st.sampled_from(keys) | text, settings_values, max_size=3) for section, keys in FIELDS.items()})


def assert_usable(cfg: RunConfig) -> None:
    """What the trainer and generator rely on; a config that loads must satisfy all of it."""
    t, lora, d, e = cfg.train, cfg.lora, cfg.data, cfg.eval
    numbers = [v for section in cfg.to_dict().values() for v in section.values()
               if isinstance(v, float | int) and not isinstance(v, bool)]
    assert all(math.isfinite(v) for v in numbers)
    assert t.learning_rate > 0 and t.epochs > 0 and t.batch_size >= 1 and t.grad_accum >= 1
    assert 0 <= t.warmup_ratio < 1 and t.weight_decay >= 0 and t.max_grad_norm >= 0 and t.threads >= 0
    assert t.log_every >= 1 and t.eval_every >= 0 and t.save_every >= 0 and t.keep_checkpoints >= 1
    assert lora.r >= 1 and lora.alpha > 0 and 0 <= lora.dropout < 1 and lora.target_modules
    assert d.max_length >= 8 and 0 <= d.val_fraction < 1
    assert e.max_new_tokens >= 1 and e.batch_size >= 1 and e.temperature >= 0


# Settings inside their documented ranges, as YAML or --set would give them.
valid_settings = st.fixed_dictionaries({}, optional={
    "train": st.fixed_dictionaries({}, optional={
        "learning_rate": st.floats(1e-6, 1.0), "epochs": st.integers(1, 20) | st.floats(0.1, 20.0),
        "batch_size": st.integers(1, 64), "grad_accum": st.integers(1, 16), "warmup_ratio": st.floats(0.0, 0.9),
        "weight_decay": st.floats(0.0, 1.0), "max_grad_norm": st.floats(0.0, 10.0), "log_every": st.integers(1, 100)}),
    "lora": st.fixed_dictionaries({}, optional={"r": st.integers(1, 64), "alpha": st.integers(1, 128),
                                                "dropout": st.floats(0.0, 0.9)}),
    "data": st.fixed_dictionaries({}, optional={"max_length": st.integers(8, 8192), "val_fraction": st.floats(0.0, 0.9)}),
    "eval": st.fixed_dictionaries({}, optional={"max_new_tokens": st.integers(1, 1024), "temperature": st.floats(0.0, 2.0)}),
})


@FUZZ
@given(valid_settings)
def test_valid_config_values_are_accepted_as_given(values: dict[str, dict[str, Any]]) -> None:
    cfg = load_config(None, values).to_dict()  # raises ConfigError on a rejected value: the test fails
    assert all(cfg[section][key] == value for section, given in values.items() for key, value in given.items())


@FUZZ
@given(overrides)
def test_any_config_values_load_or_raise_a_config_error(values: dict[str, dict[str, Any]]) -> None:
    try:
        cfg = load_config(None, values)
    except ConfigError as e:
        assert str(e)
        return
    assert_usable(cfg)


def test_every_setting_at_its_edges_loads_or_raises_a_config_error() -> None:
    """Exhaustive over (field, edge value): the sweep a random search would take too long to hit."""
    for section, keys in FIELDS.items():
        for key in keys:
            for value in [*EDGES, "", "abc", None, True, [], {"x": 1}]:
                try:
                    cfg = load_config(None, {section: {key: value}})
                except ConfigError:
                    continue
                assert_usable(cfg)


@FUZZ
@given(st.one_of(text, st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
                 json_values.map(lambda v: json.dumps(v))))
def test_any_config_file_loads_or_raises_a_config_error(content: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e)
