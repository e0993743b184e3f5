import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from tinysft.data.formats import RowProblem, detect_chat_format, to_conversation
from tinysft.data.stats import conversation_stats
from tinysft.data.validate import (
    DataError,
    load_conversations,
    load_labeled,
    load_prompts,
    weight_categories,
)


@pytest.mark.parametrize(("row", "fmt", "user", "assistant"), [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "messages", "Hi", "Hello"),
    ({"prompt": "Hi", "response": "Hello"}, "prompt_response", "Hi", "Hello"),
    ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", "Hi", "Hello"),
    ({"instruction": "Translate", "input": "Bonjour", "output": "Hello"}, "alpaca", "Translate\n\nBonjour", "Hello"),
    ({"instruction": "Say hi", "input": "", "output": "Hi"}, "alpaca", "Say hi", "Hi"),
    ({"text": "<|user|>\nHi\n<|assistant|>\nHello</s>"}, "role_text", "Hi", "Hello"),
    ({"question": "Boiling point?", "answer_keywords": ["100", "Celsius"]}, "qa_keywords", "Boiling point?", "100, Celsius"),
])
def test_formats_become_one_conversation_shape(row: dict, fmt: str, user: str, assistant: str) -> None:
    conv = to_conversation(row, "f:1")
    assert conv.format == fmt
    assert conv.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_extra_fields_and_category_are_kept() -> None:
    conv = to_conversation({"prompt": "a", "response": "b", "category": "factual", "keywords": ["x"]})
    assert conv.category == "factual"
    assert conv.extra == {"keywords": ["x"]}


@pytest.mark.parametrize("rejected", ["No.", ["No.", "Sure! Here's how."]])
def test_rejected_is_a_string_or_a_list_of_them(rejected) -> None:
    assert to_conversation({"prompt": "a", "response": "b", "rejected": rejected}).extra == {"rejected": rejected}


@pytest.mark.parametrize("rejected", ["", [], ["ok", ""], ["ok", 3], {"a": "b"}])
def test_bad_rejected_is_named(rejected) -> None:
    with pytest.raises(RowProblem, match="non-empty string or a list of them"):
        to_conversation({"prompt": "a", "response": "b", "rejected": rejected})


def test_unknown_format_names_the_keys() -> None:
    with pytest.raises(RowProblem, match=r"unknown format \(keys: foo"):
        detect_chat_format({"foo": 1})


def test_all_problems_collected_with_file_line_field_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "ok", "response": "fine"}),
        '{"prompt": "broken", "response": ',  # line 2: truncated JSON
        json.dumps([1, 2]),  # line 3: an array
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "a"}]}),
        json.dumps({"prompt": "x", "response": None}),
        json.dumps({"messages": [{"role": "system", "content": "only"}]}),
    ]) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations([f])
    lines = str(e.value).splitlines()
    assert len(e.value.problems) == 6
    assert lines[0].startswith(f"{f}:2: (line): is not valid JSON")
    assert "—" in lines[0]  # every problem carries a fix
    text = str(e.value)
    assert f"{f}:3: (row): is a JSON array" in text
    assert f"{f}:4: messages[1].role: two 'user' turns in a row" in text
    assert f"{f}:5: messages[0].role: unknown role 'wizard'" in text
    assert f"{f}:6: response: is missing or null" in text
    assert f"{f}:7: messages: has only a system message" in text


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "win.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b"}\r\n{"prompt": "c", "response": "d"}\r\n')
    assert len(load_conversations([f])) == 2


def test_non_utf8_and_empty_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "response": "b"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load_conversations([bad, empty])
    assert f"{bad}:1: (line): is not valid UTF-8" in str(e.value)
    assert f"{empty}: (file): is empty" in str(e.value)


def test_prompts_keep_extra_fields_and_split_references(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Capital of Japan?", "category": "factual", "keywords": ["Tokyo"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ])
    rows = load_prompts([f])
    assert rows[0].extra == {"keywords": ["Tokyo"]} and rows[0].category == "factual"
    assert rows[1].messages == [{"role": "user", "content": "Hi"}] and rows[1].extra["reference"] == "Hello"


def test_duplicates_are_found() -> None:
    rows = [to_conversation({"prompt": p, "response": "x"}, f"f:{i}") for i, p in enumerate([
        "What is the capital of France?", "what is the capital of  France?", "What is the capital city of France today?",
        "Name three primary colours."])]
    stats = conversation_stats(rows, near_threshold=0.5)
    assert stats.exact_duplicates == [("f:0", "f:1")]
    assert any({a, b} == {"f:0", "f:2"} for a, b, _ in stats.near_duplicates)
    assert not any("f:3" in (a, b) for a, b, _ in stats.near_duplicates)


def test_labeled_rows_and_unknown_labels(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "l.jsonl", [{"text": "Goal!", "label": "Sports"}, {"question": "Stocks?", "answer": "Business"}])
    assert [r.label for r in load_labeled([f])] == ["Sports", "Business"]
    with pytest.raises(DataError, match=r"l.jsonl:2: label: unknown label 'Business'"):
        load_labeled([f], labels=["Sports", "World"])
    csv = tmp_path / "l.csv"
    csv.write_text("text,label\nRain in Spain,World\n")
    assert load_labeled([csv])[0].label == "World"


def _convs(categories: list[str | None]) -> list:
    return [to_conversation({"prompt": f"q{i}", "response": "a", **({"category": c} if c else {})}, f"f:{i + 1}")
            for i, c in enumerate(categories)]


def test_category_weights_repeat_drop_and_sample() -> None:
    convs = _convs(["refusal", "task", "factual", None] * 50)
    mixed = weight_categories(convs, {"refusal": 3, "task": 0, "factual": 0.5}, seed=1)
    count = {c: sum(1 for m in mixed if m.category == c) for c in ("refusal", "task", "factual", None)}
    assert count["refusal"] == 150 and count["task"] == 0 and count[None] == 50
    assert mixed == weight_categories(convs, {"refusal": 3, "task": 0, "factual": 0.5}, seed=1)
    # Weight 0.5 keeps each row with probability 1/2. One draw of 50 is too noisy to check that
    # (measured over 1000 seeds: 14 to 36 kept), so count 20 seeds' draws: 1000 coin flips, sd 16;
    # measured totals 463-541 over 50 such groups. 500 +- 80 fails a keep rate of 0.42 or 0.58.
    kept = [sum(m.category == "factual" for m in weight_categories(convs, {"factual": 0.5}, seed=s)) for s in range(20)]
    assert 420 <= sum(kept) <= 580 and len(set(kept)) > 1, kept  # and the seed changes the draw
    assert weight_categories(convs, {}, seed=1) is convs


def test_file_weights_multiply_the_category_weights() -> None:
    convs = [to_conversation({"prompt": f"q{i}", "response": "a", "category": "refusal" if i % 2 else "task"},
                             f"/data/{'more' if i >= 100 else 'main'}.jsonl:{i + 1}") for i in range(200)]
    mixed = weight_categories(convs, {"refusal": 2}, seed=3, file_weights={"more.jsonl": 0.5})
    main = [m for m in mixed if m.source.startswith("/data/main")]
    more = [m for m in mixed if m.source.startswith("/data/more")]
    assert len(main) == 50 * 2 + 50  # refusals twice, tasks once
    assert sum(m.category == "refusal" for m in more) == 50  # 2 x 0.5 = once each
    # The half of the 50 tasks: the rate over 20 seeds (1000 draws, bounds as in the test above).
    halves = [sum(m.category == "task" and m.source.startswith("/data/more") for m in
                  weight_categories(convs, {"refusal": 2}, seed=s, file_weights={"more.jsonl": 0.5})) for s in range(20)]
    assert 420 <= sum(halves) <= 580, halves
    assert weight_categories(convs, {}, seed=3, file_weights={"data/more.jsonl": 0}) == convs[:100]  # a path's end


def test_file_weights_name_a_missing_or_ambiguous_file() -> None:
    convs = [to_conversation({"prompt": "q", "response": "a"}, src) for src in ("/a/train.jsonl:1", "/b/train.jsonl:1")]
    with pytest.raises(DataError) as e:
        weight_categories(convs, {}, file_weights={"tran.jsonl": 2})
    assert "data.file_weights.tran.jsonl" in str(e.value) and "matches no training file" in str(e.value)
    with pytest.raises(DataError, match="matches 2 training files"):
        weight_categories(convs, {}, file_weights={"train.jsonl": 2})
    assert len(weight_categories(convs, {}, file_weights={"b/train.jsonl": 2})) == 3


def test_category_weights_name_a_missing_category() -> None:
    with pytest.raises(DataError) as e:
        weight_categories(_convs(["refusal", "task"]), {"refusl": 2})
    assert "'refusl'" in str(e.value) and "refusal, task" in str(e.value)
    with pytest.raises(DataError, match="weight 0"):
        weight_categories(_convs(["refusal"]), {"refusal": 0})


# ---- pinned by mutation testing (docs/mutation.md): the exact messages users see, and edge cases ----
def test_prompt_file_problems_name_line_field_and_fix(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "  "}, {"prompt": 3},
                                           {"messages": [{"role": "assistant", "content": "x"}]},
                                           {"prompt": "ok", "category": 5}])
    with pytest.raises(DataError) as e:
        load_prompts([f])
    assert str(e.value).splitlines() == [
        f'{f}:1: prompt: must be a non-empty string — write "prompt": "your question"',
        f'{f}:2: prompt: must be a non-empty string — write "prompt": "your question"',
        f"{f}:3: messages: does not end with a user turn to answer — end the conversation with a user message"]
    with pytest.raises(DataError) as e:
        load_prompts([])
    assert str(e.value) == ": (data): no prompts found — add prompt rows"


def test_prompt_rows_answer_the_last_user_turn_and_drop_a_non_string_category(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."}]
    f = write_jsonl(tmp_path / "p.jsonl", [{"messages": turns}, {"prompt": "ok", "category": 5, "keywords": ["a"]}])
    multi, odd = load_prompts([f])
    assert multi.messages == turns[:3] and multi.extra["reference"] == "Blue." and multi.source == f"{f}:1"
    assert odd.category is None and odd.extra == {"keywords": ["a"]} and odd.source == f"{f}:2"


def test_weight_problems_read_as_written() -> None:
    def message(convs: list, weights: dict, **kw) -> str:
        with pytest.raises(DataError) as e:
            weight_categories(convs, weights, **kw)
        return str(e.value)

    two = _convs(["refusal", "task"])
    assert message(two, {"refusl": 2}) == ("(config): data.category_weights: category 'refusl' not in the training "
                                           "data — use one of: refusal, task")
    assert message(two, {"refusl": 2, "tsk": 1}) == ("(config): data.category_weights: categories 'refusl', 'tsk' not "
                                                     "in the training data — use one of: refusal, task")
    assert message(_convs([None]), {"x": 2}) == ("(config): data.category_weights: category 'x' not in the training "
                                                 "data — use one of: none (no row has a 'category' field)")
    assert message(_convs(["refusal"]), {"refusal": 0}) == ("(config): data.category_weights: every training row has "
                                                            "weight 0 — give at least one category (or file) a weight above 0")
    same = [to_conversation({"prompt": "q", "response": "a"}, src) for src in ("/a/train.jsonl:1", "/b/train.jsonl:1")]
    assert message(same, {}, file_weights={"tran.jsonl": 2}) == (
        "(config): data.file_weights.tran.jsonl: matches no training file — use a name from data.train "
        "(train.jsonl, train.jsonl)")
    assert message(same, {}, file_weights={"train.jsonl": 2}) == (
        "(config): data.file_weights.train.jsonl: matches 2 training files — give more of the path, e.g. "
        "/a/train.jsonl or /b/train.jsonl")


def test_fractional_weights_above_one_repeat_then_sample() -> None:
    convs = _convs(["refusal", None] * 50)
    # Weight 1.5: each refusal once, plus a second copy with probability 1/2 (20 seeds x 50: mean 1500,
    # bounds as in test_category_weights_repeat_drop_and_sample); rows without a category keep weight 1.
    totals = [sum(m.category == "refusal" for m in weight_categories(convs, {"refusal": 1.5}, seed=s)) for s in range(20)]
    assert 1420 <= sum(totals) <= 1580 and all(t >= 50 for t in totals), totals
    assert all(sum(m.category is None for m in weight_categories(convs, {"refusal": 1.5}, seed=s)) == 50 for s in range(3))


def test_split_source_takes_the_line_after_the_last_colon() -> None:
    from tinysft.data.validate import split_source

    assert split_source("C:/data/a.jsonl:12") == ("C:/data/a.jsonl", 12)
    assert split_source("noline") == ("noline", None)
    assert split_source("f.jsonl:x") == ("f.jsonl", None)


def test_stats_count_formats_categories_turns_and_both_kinds_of_duplicates() -> None:
    rows = [to_conversation(r, f"f:{i + 1}") for i, r in enumerate([
        {"prompt": "What is the capital of France?", "response": "Paris.", "category": "factual"},
        {"prompt": "what is the   CAPITAL of france?", "response": "paris.", "category": "factual"},  # exact (case, spaces)
        {"prompt": "What is the capital of France?", "response": "It is Paris."},  # same prompt, other answer
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]},
        {"prompt": "Hi", "response": "Hello"},  # one-word prompts have one shingle ("hi")
        {"prompt": "!!!", "response": "?"},  # no words: never a near duplicate
        {"prompt": "!!!", "response": "?"},
    ])]
    stats = conversation_stats(rows, near_threshold=0.5)
    assert stats.rows == 7 and stats.formats == {"prompt_response": 6, "messages": 1}
    assert stats.categories == {"factual": 2, "(none)": 5} and stats.turns == {1: 6, 2: 1}
    assert stats.exact_duplicates == [("f:1", "f:2"), ("f:6", "f:7")]
    # Same first user message but different conversations: a near duplicate at similarity 1.0;
    # exact duplicates are not listed again as near ones.
    assert stats.near_duplicates == [("f:1", "f:3", 1.0), ("f:2", "f:3", 1.0), ("f:4", "f:5", 1.0)]
    assert conversation_stats(rows, near_threshold=0.5, max_pairs=2).near_duplicates == []
    two_thirds = [to_conversation({"prompt": p, "response": "x"}, f"g:{i}") for i, p in enumerate(["red green blue",
                                                                                                   "red green blue sky"])]
    assert conversation_stats(two_thirds, near_threshold=0.6).near_duplicates == [("g:0", "g:1", 0.67)]
    assert conversation_stats(two_thirds, near_threshold=0.7).near_duplicates == []


def test_json_array_and_csv_files_name_the_element_or_the_file(tmp_path: Path) -> None:
    def message(path: Path, load) -> str:
        with pytest.raises(DataError) as e:
            load([path])
        return str(e.value)

    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c"}, [1]]))
    lines = message(array, load_conversations).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{array}:2", f"{array}:3"]  # element i is line i + 1
    assert lines[1] == (f'{array}:3: (row): is a JSON array, not an object — write one JSON object per line, e.g. '
                        '{"prompt": "...", "response": "..."}')
    broken = tmp_path / "b.json"
    broken.write_text('[{"prompt": ')
    assert message(broken, load_conversations) == (f"{broken}: (file): is not valid JSON (Expecting value: line 1 "
                                                   "column 13 (char 12)) — fix the JSON, or write JSONL")
    latin = tmp_path / "c.csv"
    latin.write_bytes(b"text,label\ncaf\xe9,x\n")
    # The first bad line and the byte within it (the first line is valid text).
    assert message(latin, load_labeled) == f"{latin}:2: (line): is not valid UTF-8 (byte 3) — re-save the file as UTF-8"
