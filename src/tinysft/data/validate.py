"""Read and validate data files. Every problem is collected, then raised once as a DataError.

Each problem reads ``FILE:LINE: field: what is wrong — how to fix``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinysft.data.formats import (
    Conversation,
    LabeledText,
    RowProblem,
    looks_like_classification,
    to_conversation,
    to_labeled,
)

MAX_LINE_BYTES = 8 * 1024 * 1024  # one row larger than this is a mistake, not a conversation
MAX_SHOWN = 20


@dataclass
class Problem:
    file: str
    line: int | None
    field: str
    what: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.what} — {self.fix}"

    @classmethod
    def at(cls, source: str, field: str, what: str, fix: str) -> Problem:
        """A problem at a row's ``source`` (``FILE:LINE``, as the loaders write it)."""
        return cls(*split_source(source), field, what, fix)


def split_source(source: str) -> tuple[str, int | None]:
    """A row's ``source`` as (file, line); the line is None where the source has none."""
    file, _, line = source.rpartition(":")
    return file or source, int(line) if line.isdigit() else None


class DataError(ValueError):
    """All problems found in the data, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = [str(p) for p in problems[:MAX_SHOWN]]
        if len(problems) > MAX_SHOWN:
            shown.append(f"... and {len(problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(shown))


def read_rows(path: str | Path, problems: list[Problem]) -> list[tuple[int, Any]]:
    """Parse a JSONL (or CSV) file into (line number, value) pairs, adding problems as found."""
    from tinysft.data.tables import TableError, is_table_source, read_table_rows

    if is_table_source(path):  # parquet, a datasets folder or file, hf:OWNER/NAME
        try:
            return read_table_rows(path)
        except TableError as e:
            problems.append(Problem(str(path), None, "(file)", e.what, e.fix))
            return []
    path = Path(path)
    name = str(path)
    if not path.exists():
        problems.append(Problem(name, None, "(file)", "does not exist", "check the path"))
        return []
    if path.is_dir():
        problems.append(Problem(name, None, "(file)", "is a folder, not a file", "pass a .jsonl file"))
        return []
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless; drop it
    if not raw.strip():
        fix = "add a header row (text,label) and one row per line" if path.suffix.lower() == ".csv" else \
            "add one JSON object per line"
        problems.append(Problem(name, None, "(file)", "is empty", fix))
        return []
    utf16 = _wide_encoding(raw)
    if utf16:
        problems.append(Problem(name, None, "(file)", f"is {utf16} text, not UTF-8",
                                f"convert it, e.g. iconv -f {utf16.split()[0]} -t UTF-8 {path.name} > {path.stem}-utf8"
                                f"{path.suffix} (or re-save it as UTF-8 in your editor)"))
        return []
    if b"\x00" in raw[:4096] and not _starts_as_text(raw):
        problems.append(Problem(name, None, "(file)", "looks binary (NUL bytes), not JSON lines text",
                                "pass a UTF-8 .jsonl file"))
        return []
    if path.suffix.lower() == ".csv":
        return _read_csv(raw, name, problems)
    if path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
        return _read_json_array(raw, name, problems)
    if _is_multiline_document(raw):
        problems.append(_document_problem(raw, name))
        return []
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")  # CRLF files are fine
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            problems.append(Problem(name, number, "(line)", f"is {len(line) // 1_000_000} MB long",
                                    "split it: one conversation per line, each well under 8 MB"))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(name, number, "(line)", f"is not valid UTF-8 (byte {e.start})",
                                    "re-save the file as UTF-8"))
            continue
        if "\x00" in text:
            problems.append(Problem(name, number, "(line)", f"holds a NUL byte (byte {text.index(chr(0))})",
                                    "remove it: NUL is not text (was a binary file pasted in?)"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(Problem(name, number, "(line)", f"is not valid JSON ({e.msg} at column {e.colno})",
                                    "fix the JSON on this line; each line must be one complete object"))
            continue
        if _add_surrogate_problem(value, name, number, problems):
            rows.append((number, value))
    return rows


def _wide_encoding(raw: bytes) -> str | None:
    """"UTF-16LE (little-endian)" etc. for UTF-16 / UTF-32 text (by its byte-order mark, or, without
    one, by the NUL byte beside every ASCII character), else None."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"),
                      (b"\xff\xfe", "UTF-16LE (little-endian)"), (b"\xfe\xff", "UTF-16BE (big-endian)")):
        if raw.startswith(bom):
            return name
    head = raw[:200]
    if len(head) >= 8 and len(head) % 2 == 0:
        even, odd = head[0::2], head[1::2]
        if odd.count(0) == len(odd) and 0 not in even:
            return "UTF-16LE (little-endian)"
        if even.count(0) == len(even) and 0 not in odd:
            return "UTF-16BE (big-endian)"
    return None


def _starts_as_text(raw: bytes) -> bool:
    """True when the first non-blank line is UTF-8 text without NUL: then a bad byte further down
    is a problem of its line (named with its line and byte), not of the whole file."""
    first = next((line for line in raw.split(b"\n") if line.strip()), b"")
    if b"\x00" in first:
        return False
    try:
        first.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """(field, surrogate) of the first string in a parsed row holding a lone UTF-16 surrogate.

    JSON's ``\\ud83d`` escape without its second half parses to a string no encoder can write;
    caught here, it is a row problem instead of a crash in the tokenizer."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (where or "(row)", found.group()) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            hit = _lone_surrogate(str(key), f"{where}.(key)" if where else "(key)") or \
                _lone_surrogate(item, f"{where}.{key}" if where else str(key))
            if hit:
                return hit
    if isinstance(value, list):
        for i, item in enumerate(value):
            hit = _lone_surrogate(item, f"{where}[{i}]")
            if hit:
                return hit
    return None


def _add_surrogate_problem(value: Any, name: str, number: int, problems: list[Problem]) -> bool:
    """Add a problem for a lone surrogate in ``value``; True when there is none (the row is usable)."""
    hit = _lone_surrogate(value)
    if hit is None:
        return True
    field, char = hit
    problems.append(Problem(name, number, field, f"holds a lone UTF-16 surrogate (\\u{ord(char):04x}), half of "
                            "an escaped character such as an emoji", "write the character itself, or both halves "
                            "of its escape (e.g. \\ud83d\\ude00)"))
    return False


def _is_multiline_document(raw: bytes) -> bool:
    """True for one pretty-printed JSON value spread over several lines (its first line alone is not JSON)."""
    first = next((line for line in raw.split(b"\n") if line.strip()), b"")
    if raw.lstrip()[:1] not in (b"{", b"[") or len(raw) > MAX_LINE_BYTES:
        return False
    try:
        json.loads(first)
        return False
    except ValueError:
        pass
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return False


def _document_problem(raw: bytes, name: str) -> Problem:
    doc = json.loads(raw.decode("utf-8"))
    if isinstance(doc, list):
        return Problem(name, None, "(file)", "is one JSON array spread over several lines, not JSON lines",
                       "name the file .json to read it as an array of rows, or write one object per line (.jsonl)")
    lists = [k for k, v in doc.items() if isinstance(v, list)] if isinstance(doc, dict) else []
    hint = f" (the rows look like they are under {lists[0]!r}: write each of them on its own line)" if lists else ""
    return Problem(name, None, "(file)", "is one JSON object spread over several lines, not JSON lines",
                   f"write one complete JSON object per line{hint}")


def _read_json_array(raw: bytes, name: str, problems: list[Problem]) -> list[tuple[int, Any]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(Problem(name, None, "(file)", f"is not valid JSON ({e})", "fix the JSON, or write JSONL"))
        return []
    return [(i + 1, row) for i, row in enumerate(data) if _add_surrogate_problem(row, name, i + 1, problems)]


def _read_csv(raw: bytes, name: str, problems: list[Problem]) -> list[tuple[int, Any]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        offset = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        problems.append(Problem(name, line, "(line)", f"is not valid UTF-8 (byte {offset})", "re-save the file as UTF-8"))
        return []
    # Python's csv module refuses a cell over 128 KiB by default; a long document is normal
    # classification input, so cells may be as large as a JSONL line.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    reader = csv.DictReader(io.StringIO(text))
    try:
        if not reader.fieldnames:
            problems.append(Problem(name, 1, "(header)", "has no header row", "start the CSV with: text,label"))
            return []
    except csv.Error as e:
        problems.append(Problem(name, 1, "(header)", f"is not valid CSV ({e})", "fix the header row"))
        return []
    rows: list[tuple[int, Any]] = []
    while True:  # one bad row is listed, and the rows after it are still read
        start = reader.line_num + 1  # the line the next record starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            too_big = "field larger than field limit" in str(e)
            problems.append(Problem(name, start, "(cell)" if too_big else "(line)",
                                    f"has a cell over {MAX_LINE_BYTES // 1_000_000} MB" if too_big
                                    else f"is not valid CSV ({e})",
                                    "split the document into smaller rows" if too_big else "fix the quoting on this line"))
            continue
        rows.append((reader.line_num, dict(row)))
    return rows


def check_turns(conv: Conversation) -> None:
    """Structural rules for a training conversation; raises RowProblem on the first broken one."""
    msgs = conv.messages
    if not msgs:
        raise RowProblem("messages", "is empty", "add at least one user and one assistant message")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise RowProblem(f"messages[{i}].role", "system message after the first turn", "put the system message first")
        if not m["content"].strip():
            raise RowProblem(f"messages[{i}].content", f"{m['role']} message is empty", "write its text, or drop the row")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not turns:
        raise RowProblem("messages", "has only a system message", "add a user message and an assistant answer")
    if turns[0]["role"] != "user":
        raise RowProblem("messages", "the first turn after any system message is not 'user'", "start with a user message")
    for i in range(1, len(turns)):
        if turns[i]["role"] == turns[i - 1]["role"]:
            j = i + (len(msgs) - len(turns))
            raise RowProblem(f"messages[{j}].role", f"two '{turns[i]['role']}' turns in a row",
                             "alternate user and assistant (merge the two messages)")
    if not any(m["role"] == "assistant" for m in turns):
        raise RowProblem("messages", "has no assistant turn, so nothing would be trained", "add the assistant's answer")
    if turns[-1]["role"] != "assistant":
        raise RowProblem("messages", "ends with a user turn that has no answer", "add the assistant's answer or drop the turn")


def load_conversations(paths: list[str | Path], *, for_training: bool = True) -> list[Conversation]:
    """Read chat data in any supported format. Raises DataError listing every problem."""
    problems: list[Problem] = []
    out: list[Conversation] = []
    for path in paths:
        rows = read_rows(path, problems)
        if looks_like_classification(rows):  # one hint, not a role-marker error per row
            problems.append(Problem(str(path), None, "(file)", "has text,label rows: classification data, not chat",
                                    "train it with --task classify (or set train.task: classify in the config)"))
            continue
        for line, row in rows:
            try:
                conv = to_conversation(row, source=f"{path}:{line}")
                if for_training:
                    check_turns(conv)
                out.append(conv)
            except RowProblem as p:
                problems.append(Problem(str(path), line, p.field, p.what, p.fix))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([Problem(", ".join(map(str, paths)), None, "(data)", "no rows found", "add data rows")])
    return out


def weight_categories(convs: list[Conversation], weights: dict[str, float], seed: int = 0,
                      file_weights: dict[str, float] | None = None) -> list[Conversation]:
    """Re-mix training rows by category and by file: weight 2 repeats a row twice per epoch, 0.5
    keeps a seeded half, 0 drops it. A row's weight is its category's times its file's; unlisted
    categories and files (and rows without a category) keep weight 1; order is kept.

    A ``file_weights`` key names a training file by its name or by the end of its path
    (``more.jsonl``, ``extra/more.jsonl``). A weighted category absent from the data, or a file
    name that matches no training file (or several), is an error (usually a typo).
    """
    file_weights = file_weights or {}
    if not weights and not file_weights:
        return convs
    present = Counter(c.category for c in convs if c.category)
    missing = sorted(set(weights) - set(present))
    if missing:
        found = ", ".join(sorted(present)) or "none (no row has a 'category' field)"
        raise DataError([Problem("(config)", None, "data.category_weights",
                                 f"categor{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} "
                                 f"not in the training data", f"use one of: {found}")])
    by_file = _file_weight_by_path(sorted({_source_file(c) for c in convs}), file_weights)
    rng = random.Random(seed)
    out: list[Conversation] = []
    for conv in convs:
        weight = weights.get(conv.category or "", 1.0) * by_file.get(_source_file(conv), 1.0)
        whole = int(weight)
        out.extend([conv] * whole)
        if weight > whole and rng.random() < weight - whole:
            out.append(conv)
    if not out:
        raise DataError([Problem("(config)", None, "data.category_weights", "every training row has weight 0",
                                 "give at least one category (or file) a weight above 0")])
    return out


def _source_file(conv: Conversation) -> str:
    return split_source(conv.source)[0]


def _file_weight_by_path(files: list[str], file_weights: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    problems = []
    for name, weight in file_weights.items():
        parts = Path(name).parts
        hits = [f for f in files if parts and Path(f).parts[-len(parts):] == parts]
        if len(hits) == 1:
            out[hits[0]] = weight
            continue
        listed = ", ".join(Path(f).name for f in files)
        problems.append(Problem("(config)", None, f"data.file_weights.{name}",
                                "matches no training file" if not hits else f"matches {len(hits)} training files",
                                f"use a name from data.train ({listed})" if not hits
                                else "give more of the path, e.g. " + " or ".join(hits)))
    if problems:
        raise DataError(problems)
    return out


def load_prompts(paths: list[str | Path]) -> list[Conversation]:
    """Evaluation prompts: rows with ``prompt`` (one user turn) or ``messages`` ending on a user turn.

    Extra keys (category, keywords, max_words, reference, ...) are kept in ``Conversation.extra``.
    """
    problems: list[Problem] = []
    out: list[Conversation] = []
    for path in paths:
        for line, row in read_rows(path, problems):
            try:
                out.append(_prompt_row(row, f"{path}:{line}"))
            except RowProblem as p:
                problems.append(Problem(str(path), line, p.field, p.what, p.fix))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([Problem(", ".join(map(str, paths)), None, "(data)", "no prompts found", "add prompt rows")])
    return out


def _prompt_row(row: Any, source: str) -> Conversation:
    if isinstance(row, dict) and "prompt" in row and "response" not in row and "completion" not in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowProblem("prompt", "must be a non-empty string", 'write "prompt": "your question"')
        extra = {k: v for k, v in row.items() if k not in ("prompt", "category")}
        category = row.get("category") if isinstance(row.get("category"), str) else None
        return Conversation([{"role": "user", "content": prompt}], source, "prompt", category, extra)
    conv = to_conversation(row, source)
    msgs = conv.messages
    if msgs and msgs[-1]["role"] == "assistant":
        # A training-style row: answer the prompt part, keep the answer as the reference.
        conv.extra.setdefault("reference", msgs[-1]["content"])
        conv.messages = msgs[:-1]
    if not conv.messages or conv.messages[-1]["role"] != "user":
        raise RowProblem("messages", "does not end with a user turn to answer", "end the conversation with a user message")
    return conv


def load_labeled(paths: list[str | Path], labels: list[str] | None = None) -> list[LabeledText]:
    """Read classification rows; with ``labels``, a row whose label is not in the set is a problem."""
    problems: list[Problem] = []
    out: list[LabeledText] = []
    for path in paths:
        for line, row in read_rows(path, problems):
            try:
                item = to_labeled(row, source=f"{path}:{line}")
                if labels and item.label not in labels:
                    raise RowProblem("label", f"unknown label {item.label!r}",
                                     f"use one of the training labels: {', '.join(labels)}")
                out.append(item)
            except RowProblem as p:
                problems.append(Problem(str(path), line, p.field, p.what, p.fix))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([Problem(", ".join(map(str, paths)), None, "(data)", "no rows found", "add data rows")])
    return out


# ---------------------------------------------------------------------------------------------------
# Stats: formats, categories, duplicates. Token lengths come from render (they need a tokenizer).
