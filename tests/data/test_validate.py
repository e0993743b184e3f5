"""data/validate.py: what a user sees for each kind of bad file, and which rows are kept.

Written against the survivors of a mutmut run (docs/mutation.md, run 3): each test pins a message
exactly (file, line, field, what, fix), a row's source, or which rows are kept and which dropped,
where the older tests matched a fragment or never reached the branch. No tokenizer, no model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import write_jsonl
from tinysft.data.formats import Conversation, RowProblem, to_conversation
from tinysft.data.validate import (
    DataError,
    Problem,
    check_turns,
    load_conversations,
    load_labeled,
    load_prompts,
    read_rows,
    weight_categories,
)

ROW = {"prompt": "Hi", "response": "Hello"}
LINE = json.dumps(ROW) + "\n"


def problems_of(load: Callable, paths: list[Path], **kw) -> list[str]:
    """The lines of the DataError that ``load(paths)`` raises."""
    with pytest.raises(DataError) as e:
        load(paths, **kw)
    return str(e.value).splitlines()


def rows_and_problems(path: Path) -> tuple[list, list[str]]:
    problems: list[Problem] = []
    rows = read_rows(path, problems)
    return rows, [str(p) for p in problems]


# ---- encodings and binary files ------------------------------------------------------------------
@pytest.mark.parametrize(("encoding", "bom", "name"), [
    ("utf-32-le", True, "UTF-32LE"),
    ("utf-32-be", True, "UTF-32BE"),
    ("utf-16-le", True, "UTF-16LE (little-endian)"),
    ("utf-16-be", True, "UTF-16BE (big-endian)"),
    ("utf-16-le", False, "UTF-16LE (little-endian)"),  # no byte-order mark: told by the NUL beside each character
    ("utf-16-be", False, "UTF-16BE (big-endian)"),
])
def test_wide_encodings_are_named_with_the_command_that_converts_them(tmp_path: Path, encoding: str, bom: bool,
                                                                        name: str) -> None:
    f = tmp_path / "rows.jsonl"
    text = LINE * 6  # 222 characters: the detection reads the first 200 bytes
    f.write_bytes((("\ufeff" if bom else "") + text).encode(encoding))
    short = name.split()[0]
    assert rows_and_problems(f) == ([], [
        f"{f}: (file): is {name} text, not UTF-8 — convert it, e.g. iconv -f {short} -t UTF-8 rows.jsonl > "
        "rows-utf8.jsonl (or re-save it as UTF-8 in your editor)"])


def test_a_nul_byte_is_its_lines_problem_after_a_text_line(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_bytes((LINE + '{"prompt": "x\x00y\x00", "response": "b"}\n' + LINE).encode())
    rows, problems = rows_and_problems(f)
    assert [line for line, _ in rows] == [1, 3]
    assert problems == [f"{f}:2: (line): holds a NUL byte (byte 13) — remove it: NUL is not text (was a binary "
                        "file pasted in?)"]  # the first NUL


@pytest.mark.parametrize("data", [
    b'{"prompt": "x\x00", "response": "y"}\n' + LINE.encode(),  # the NUL on the first line, after a space
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",  # a PNG renamed: first line not UTF-8
], ids=["nul-on-first-line", "png"])
def test_a_file_whose_first_line_is_not_text_looks_binary(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_bytes(data)
    assert rows_and_problems(f) == ([], [f"{f}: (file): looks binary (NUL bytes), not JSON lines text — pass a UTF-8 "
                                         ".jsonl file"])


# ---- lone surrogates -------------------------------------------------------------------------------
def test_lone_surrogates_name_the_field_and_drop_only_their_row(tmp_path: Path) -> None:
    def fix(char: str) -> str:
        return (f"holds a lone UTF-16 surrogate (\\u{ord(char):04x}), half of an escaped character such as an emoji"
                " — write the character itself, or both halves of its escape (e.g. \\ud83d\\ude00)")

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a\udc00"}]
    f = write_jsonl(tmp_path / "rows.jsonl", [
        ROW,
        {"prompt": "\ud83d", "response": "x"},
        {"\ud83dkey": 1},
        {"messages": chat},
        {"messages": [{"\udc01": "user"}]},
        "\ud83e",
        {"prompt": "Bye", "response": "Bye!"},
    ])
    rows, problems = rows_and_problems(f)
    assert rows == [(1, ROW), (7, {"prompt": "Bye", "response": "Bye!"})]
    assert problems == [f"{f}:2: prompt: {fix(chr(0xd83d))}", f"{f}:3: (key): {fix(chr(0xd83d))}",
                        f"{f}:4: messages[1].content: {fix(chr(0xdc00))}", f"{f}:5: messages[0].(key): {fix(chr(0xdc01))}",
                        f"{f}:6: (row): {fix(chr(0xd83e))}"]
    # The same in a JSON array file, where element i is line i + 1.
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([ROW, {"prompt": "\ud83d", "response": "x"}, ROW]))
    rows, problems = rows_and_problems(array)
    assert rows == [(1, ROW), (3, ROW)]
    assert problems == [f"{array}:2: prompt: {fix(chr(0xd83d))}"]


# ---- one JSON document spread over several lines -----------------------------------------------------
@pytest.mark.parametrize(("doc", "fix"), [
    ({"rows": [ROW, ROW], "tags": ["é"]}, "write one complete JSON object per line (the rows look like they are "
                                          "under 'rows': write each of them on its own line)"),
    (ROW, "write one complete JSON object per line"),
], ids=["rows-under-a-key", "one-row"])
def test_a_pretty_printed_object_is_one_problem_that_says_how_to_fix_it(tmp_path: Path, doc: dict, fix: str) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("\n" + json.dumps(doc, indent=2, ensure_ascii=False) + "\n")  # a blank line first
    assert problems_of(load_conversations, [f]) == [
        f"{f}: (file): is one JSON object spread over several lines, not JSON lines — {fix}"]


def test_a_pretty_printed_array_in_a_jsonl_file_is_one_problem(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps([ROW, ROW], indent=2) + "\n")
    assert problems_of(load_conversations, [f]) == [
        f"{f}: (file): is one JSON array spread over several lines, not JSON lines — name the file .json to read it "
        "as an array of rows, or write one object per line (.jsonl)"]


# ---- CSV -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "line"), [
    (b"text,label\nok,x\ncaf\xe9,x\n", 3),
    (b"\ncaf\xe9,x\n", 2),  # after a blank first line
])
def test_a_bad_byte_in_a_csv_is_named_by_its_line_and_its_byte_in_that_line(tmp_path: Path, data: bytes,
                                                                           line: int) -> None:
    f = tmp_path / "l.csv"
    f.write_bytes(data)
    assert problems_of(load_labeled, [f]) == [f"{f}:{line}: (line): is not valid UTF-8 (byte 3) — re-save the file as UTF-8"]


def test_csv_header_problems(tmp_path: Path) -> None:
    blank_first = tmp_path / "blank.csv"
    blank_first.write_text("\ntext,label\nRain,World\n")
    assert rows_and_problems(blank_first) == ([], [f"{blank_first}:1: (header): has no header row — start the CSV "
                                                   "with: text,label"])
    mac = tmp_path / "mac.csv"  # classic Mac line endings: a lone \r
    mac.write_bytes(b"text,label\rRain,World\r")
    rows, [problem] = rows_and_problems(mac)
    assert rows == []
    assert problem.startswith(f"{mac}:1: (header): is not valid CSV (") and problem.endswith(") — fix the header row")


def test_a_bad_csv_row_is_named_by_the_line_it_starts_on_and_later_rows_are_read(tmp_path: Path) -> None:
    f = tmp_path / "l.csv"
    f.write_bytes(b'text,label\n"two\nlines",a\nbad\rcell,b\nlast,c\n')
    rows, [problem] = rows_and_problems(f)
    # (A quoted record over several lines is numbered by its last line; that is not pinned here.)
    assert [row for _, row in rows] == [{"text": "two\nlines", "label": "a"}, {"text": "last", "label": "c"}]
    assert rows[1][0] == 5
    assert problem.startswith(f"{f}:4: (line): is not valid CSV (") and problem.endswith(") — fix the quoting on this line")


def test_a_csv_cell_over_8_mb_is_its_rows_problem(tmp_path: Path) -> None:
    f = tmp_path / "l.csv"
    f.write_text('text,label\nshort,a\n"' + "x" * 9_000_000 + '",b\nlast,c\n')
    rows, problems = rows_and_problems(f)
    assert rows == [(2, {"text": "short", "label": "a"}), (4, {"text": "last", "label": "c"})]
    assert problems == [f"{f}:3: (cell): has a cell over 8 MB — split the document into smaller rows"]


# ---- the loaders ----------------------------------------------------------------------------------
def test_a_classification_file_given_as_chat_is_one_hint_and_the_next_file_is_still_read(tmp_path: Path) -> None:
    labels = tmp_path / "l.csv"
    labels.write_text("text,label\nRain in Spain,World\n")
    chat = write_jsonl(tmp_path / "c.jsonl", [ROW, {"prompt": "x"}])
    hint, problem = problems_of(load_conversations, [labels, chat])
    assert hint == (f"{labels}: (file): has text,label rows: classification data, not chat — train it with --task "
                    "classify (or set train.task: classify in the config)")
    assert problem.startswith(f"{chat}:2: (row): unknown format (keys: prompt) — ")


def test_rows_carry_their_file_and_line(tmp_path: Path) -> None:
    chat = tmp_path / "c.jsonl"
    chat.write_text(LINE + "\n" + LINE)
    assert [c.source for c in load_conversations([chat])] == [f"{chat}:1", f"{chat}:3"]
    labels = tmp_path / "l.jsonl"
    labels.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    assert [r.source for r in load_labeled([labels])] == [f"{labels}:1", f"{labels}:3"]


def test_files_without_rows_are_named_together(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("[]")
    b.write_text("[]\n")
    assert problems_of(load_conversations, [a, b]) == [f"{a}, {b}: (data): no rows found — add data rows"]
    assert problems_of(load_labeled, [a, b]) == [f"{a}, {b}: (data): no rows found — add data rows"]
    assert problems_of(load_prompts, [a, b]) == [f"{a}, {b}: (data): no prompts found — add prompt rows"]


def test_an_unknown_label_lists_the_training_labels(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "l.jsonl", [{"text": "Goal!", "label": "Sports"}, {"text": "Stocks", "label": "Business"}])
    assert problems_of(load_labeled, [f], labels=["Sports", "World"]) == [
        f"{f}:2: label: unknown label 'Business' — use one of the training labels: Sports, World"]


def test_a_missing_prompt_file_is_named(tmp_path: Path) -> None:
    assert problems_of(load_prompts, [tmp_path / "nope.jsonl"]) == [
        f"{tmp_path / 'nope.jsonl'}: (file): does not exist — check the path"]


@pytest.mark.parametrize("answer", ["response", "completion"])
def test_a_training_row_given_as_a_prompt_keeps_its_answer_as_the_reference(tmp_path: Path, answer: str) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", answer: "A.", "category": "c"}, {"prompt": "Plain?"}])
    trained, plain = load_prompts([f])
    assert trained.messages == [{"role": "user", "content": "Q?"}]
    assert trained.extra == {"reference": "A."} and trained.category == "c"
    assert trained.format == f"prompt_{answer}"
    assert plain.format == "prompt" and plain.messages == [{"role": "user", "content": "Plain?"}]


def test_every_file_weight_applies() -> None:
    convs = [to_conversation(ROW, f"/d/{name}.jsonl:1") for name in ("a", "b", "c")]
    mixed = weight_categories(convs, {}, file_weights={"a.jsonl": 2, "b.jsonl": 0})
    assert [c.source for c in mixed] == ["/d/a.jsonl:1", "/d/a.jsonl:1", "/d/c.jsonl:1"]


@pytest.mark.parametrize(("count", "last"), [(20, "f:20: x: bad — fix"), (21, "... and 1 more problems"),
                                             (25, "... and 5 more problems")])
def test_a_data_error_shows_twenty_problems_then_counts_the_rest(count: int, last: str) -> None:
    error = DataError([Problem("f", i + 1, "x", "bad", "fix") for i in range(count)])
    lines = str(error).splitlines()
    assert len(lines) == min(count, 20) + (count > 20) and lines[-1] == last
    assert len(error.problems) == count


# ---- read_rows: file-level and line-level problems -------------------------------------------------
@pytest.mark.parametrize(("name", "make", "problem"), [
    ("nope.jsonl", None, "(file): does not exist — check the path"),
    ("folder", "dir", "(file): is a folder, not a file — pass a .jsonl file"),
    ("nope.parquet", None, "(file): does not exist — check the path"),  # a table source: its own reader says so
    ("empty.jsonl", " \n\n", "(file): is empty — add one JSON object per line"),
    ("empty.CSV", "\n", "(file): is empty — add a header row (text,label) and one row per line"),
])
def test_file_problems_name_the_file_and_the_fix(tmp_path: Path, name: str, make: str | None, problem: str) -> None:
    f = tmp_path / name
    if make == "dir":
        f.mkdir()
    elif make is not None:
        f.write_text(make)
    assert rows_and_problems(f) == ([], [f"{f}: {problem}"])


def test_a_hub_name_without_owner_is_a_file_problem() -> None:
    problems: list[Problem] = []
    assert read_rows("hf:no-slash", problems) == []
    assert [str(p) for p in problems] == ["hf:no-slash: (file): hf:no-slash is not a hub dataset name — write "
                                          "hf:OWNER/NAME or hf:OWNER/NAME:SPLIT"]


def test_line_problems_name_the_line_and_the_rest_are_read(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + LINE.encode()  # a byte-order mark is dropped
                  + b'{"prompt": "caf\xe9", "response": "b"}\r\n'
                  + b'{"prompt": "a", "response": }\n'
                  + b"\r\n  \n"  # blank lines are skipped
                  + b'{"prompt": "' + b"x" * (9_000_000 - 31) + b'", "response": "b"}\n'  # 9,000,000 bytes
                  + LINE.encode())
    rows, problems = rows_and_problems(f)
    assert rows == [(1, ROW), (7, ROW)]
    assert problems == [
        f"{f}:2: (line): is not valid UTF-8 (byte 15) — re-save the file as UTF-8",
        f"{f}:3: (line): is not valid JSON (Expecting value at column 29) — fix the JSON on this line; each line must "
        "be one complete object",
        f"{f}:6: (line): is 9 MB long — split it: one conversation per line, each well under 8 MB"]


def test_a_line_of_exactly_8_mib_is_read(tmp_path: Path) -> None:
    head, tail = b'{"prompt": "', b'", "response": "b"}'
    f = tmp_path / "rows.jsonl"
    f.write_bytes(head + b"x" * (8 * 1024 * 1024 - len(head) - len(tail)) + tail + b"\r\n")  # the \r is not counted
    rows, problems = rows_and_problems(f)
    assert problems == [] and [line for line, _ in rows] == [1]


# ---- check_turns: one rule each, with the message index it names ---------------------------------
def _turns(*spec: str) -> list[dict[str, str]]:
    """Messages from "role" or "role=content" (content defaults to the role's name)."""
    return [{"role": r, "content": c or r} for r, _, c in (x.partition("=") for x in spec)]


@pytest.mark.parametrize(("messages", "field", "what", "fix"), [
    ([], "messages", "is empty", "add at least one user and one assistant message"),
    (_turns("user", "system", "assistant"), "messages[1].role", "system message after the first turn",
     "put the system message first"),
    (_turns("user= \n", "assistant"), "messages[0].content", "user message is empty", "write its text, or drop the row"),
    (_turns("system", "user", "assistant", "user", "assistant=\t"), "messages[4].content", "assistant message is empty",
     "write its text, or drop the row"),
    (_turns("system"), "messages", "has only a system message", "add a user message and an assistant answer"),
    (_turns("system", "assistant", "user", "assistant"), "messages", "the first turn after any system message is not "
     "'user'", "start with a user message"),
    (_turns("system", "user", "assistant", "assistant"), "messages[3].role", "two 'assistant' turns in a row",
     "alternate user and assistant (merge the two messages)"),
    (_turns("user", "assistant", "user", "user"), "messages[3].role", "two 'user' turns in a row",
     "alternate user and assistant (merge the two messages)"),
    (_turns("user"), "messages", "has no assistant turn, so nothing would be trained", "add the assistant's answer"),
    (_turns("system", "user", "assistant", "user"), "messages", "ends with a user turn that has no answer",
     "add the assistant's answer or drop the turn"),
])
def test_each_turn_rule_names_the_message_and_the_fix(messages: list, field: str, what: str, fix: str) -> None:
    with pytest.raises(RowProblem) as e:
        check_turns(Conversation(messages))
    assert (e.value.field, e.value.what, e.value.fix) == (field, what, fix)


@pytest.mark.parametrize("messages", [_turns("user", "assistant"), _turns("system", "user", "assistant"),
                                      _turns("system", "user", "assistant", "user", "assistant")])
def test_well_formed_turns_pass(messages: list) -> None:
    check_turns(Conversation(messages))


def test_a_json_array_file_may_start_with_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "rows.json"
    f.write_text("\n  " + json.dumps([ROW, ROW], indent=2))
    assert rows_and_problems(f) == ([(1, ROW), (2, ROW)], [])
