"""Input formats -> one internal shape.

Every supported row format is a small adapter from a JSON object to a :class:`Conversation`
(chat data) or a :class:`LabeledText` (classification). The format is detected from the row's
keys; :data:`CHAT_FORMATS` is a plain registry dict, in detection order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


class RowProblem(Exception):
    """One thing wrong with one row: the field and a one-line fix. Collected into a DataError."""

    def __init__(self, field: str, what: str, fix: str) -> None:
        super().__init__(f"{field}: {what}")
        self.field, self.what, self.fix = field, what, fix


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # "FILE:LINE"
    format: str = "messages"
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the row, kept for reports


@dataclass
class LabeledText:
    text: str
    label: str
    source: str = ""
    format: str = "text_label"
    category: str | None = None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages: "array", not Python's "list"."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise RowProblem(key, "is missing or null", f'give "{key}" a non-empty string')
    if not isinstance(value, str):
        raise RowProblem(key, f"must be a string, got a JSON {json_type(value)}", f'write "{key}" as a JSON string')
    if not allow_empty and not value.strip():
        raise RowProblem(key, "is empty", f'write the text of "{key}", or drop the row')
    return value


def from_messages(row: dict[str, Any]) -> list[Message]:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RowProblem("messages", f"must be a list of {{role, content}} objects, got a JSON {json_type(messages)}",
                         'write "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowProblem(where, f"must be an object with role and content, got a JSON {json_type(m)}",
                             'write {"role": "user", "content": "..."}')
        role = m.get("role")
        if role not in ROLES:
            raise RowProblem(f"{where}.role", f"unknown role {role!r}", "use one of system, user, assistant")
        content = m.get("content")
        if content is None or not isinstance(content, str):
            kind = "null or missing" if content is None else f"a JSON {json_type(content)}, not a string"
            raise RowProblem(f"{where}.content", f"is {kind}", "write the message text as a JSON string")
        out.append({"role": role, "content": content})
    return out


def from_prompt_response(row: dict[str, Any]) -> list[Message]:
    answer_key = "response" if "response" in row else "completion"
    return [{"role": "user", "content": _text(row, "prompt")}, {"role": "assistant", "content": _text(row, answer_key)}]


def from_alpaca(row: dict[str, Any]) -> list[Message]:
    instruction = _text(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowProblem("input", f"must be a string, got a JSON {json_type(extra)}", 'write "input" as a string or ""')
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


_MARKER = re.compile(r"<\|(system|user|assistant)\|>")


def from_role_text(row: dict[str, Any]) -> list[Message]:
    """``"<|user|>\\nHi\\n<|assistant|>\\nHello!"`` (seed 000's format) -> messages."""
    text = _text(row, "text")
    parts = _MARKER.split(text)
    if len(parts) < 3:
        raise RowProblem("text", "has no <|user|> / <|assistant|> role markers",
                         'write "<|user|>\\nquestion\\n<|assistant|>\\nanswer", or use {"prompt", "response"}')
    if parts[0].strip():
        raise RowProblem("text", f"has text before the first role marker: {parts[0].strip()[:40]!r}",
                         "start the text with <|system|>, <|user|> or <|assistant|>")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        content = content.strip()
        for eos in ("</s>", "<|endoftext|>", "<|im_end|>"):
            content = content.removesuffix(eos).rstrip()
        messages.append({"role": role, "content": content})
    return messages


def from_qa_keywords(row: dict[str, Any]) -> list[Message]:
    """Seed 001's ``{"question", "answer_keywords"}``: the keywords, joined, become the answer."""
    keywords = row["answer_keywords"]
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, list) or not keywords or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise RowProblem("answer_keywords", "must be a non-empty list of strings", 'write "answer_keywords": ["word", "word"]')
    return [{"role": "user", "content": _text(row, "question")},
            {"role": "assistant", "content": ", ".join(k.strip() for k in keywords)}]


def from_question_answer(row: dict[str, Any]) -> list[Message]:
    return [{"role": "user", "content": _text(row, "question")}, {"role": "assistant", "content": _text(row, "answer")}]


# ------------------------------------------------------------------------------------------------
# Formats people already have (ShareGPT, TRL preference rows, content as a list of parts).

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


def from_sharegpt(row: dict[str, Any]) -> list[Message]:
    """ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}``."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowProblem("conversations", f"must be a list of {{from, value}} objects, got a JSON {json_type(turns)}",
                         'write "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')
    out: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(where, f"must be an object with from and value, got a JSON {json_type(turn)}",
                             'write {"from": "human", "value": "..."}')
        if "from" not in turn and "role" in turn:  # some exports mix the two spellings
            turn = {"from": turn["role"], "value": turn.get("content", turn.get("value"))}
        role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise RowProblem(f"{where}.from", f"unknown speaker {turn.get('from')!r}",
                             "use human, gpt or system (or user, assistant)")
        value = content_text(turn.get("value"), f"{where}.value")
        out.append({"role": role, "content": value})
    return out


def content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or a list of parts ``[{"type": "text", "text": ...}]``
    (the OpenAI / transformers multimodal shape) whose text parts are joined. Other part types
    (images, audio) cannot be trained by a text model, so they are an error that says so."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else json_type(part)
                raise RowProblem(f"{where}[{j}]", f"is a {kind!r} part; only text parts can be trained",
                                 'give each part as {"type": "text", "text": "..."}, or drop the non-text parts')
            texts.append(part["text"])
        return "".join(texts)
    kind = "null or missing" if content is None else f"a JSON {json_type(content)}, not a string"
    raise RowProblem(where, f"is {kind}", 'write the text as a JSON string or a list of {"type": "text", "text": ...} parts')


def _preference_side(value: Any, key: str) -> list[Message]:
    """One side of a TRL preference row: a string (one assistant answer) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(key, "is empty", f'write the text of "{key}", or drop the row')
        return [{"role": "assistant" if key != "prompt" else "user", "content": value}]
    if isinstance(value, list):
        return from_messages({"messages": value})
    raise RowProblem(key, f"must be a string or a list of messages, got a JSON {json_type(value)}",
                     f'write "{key}" as a string or [{{"role": ..., "content": ...}}]')


def from_preference(row: dict[str, Any]) -> list[Message]:
    """TRL's preference rows ``{"prompt", "chosen", "rejected"}`` (standard: strings; conversational:
    lists of messages): the conversation is prompt + chosen; ``rejected`` becomes the row's
    alternative answer (a string, see :func:`normalize_row`)."""
    prompt = _preference_side(row["prompt"], "prompt")
    chosen = _preference_side(row["chosen"], "chosen")
    return prompt + chosen


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the shapes other tools write into the ones the adapters read, without touching the
    caller's dict: message content given as a list of parts becomes a string, and TRL's
    conversational ``rejected`` (a list of messages) becomes its last assistant message's text."""
    messages = row.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
        row = {**row, "messages": [{**m, "content": content_text(m["content"], f"messages[{i}].content")}
                                   if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                                   for i, m in enumerate(messages)]}
    rejected = row.get("rejected")
    if "chosen" in row and isinstance(rejected, list) and rejected and all(isinstance(m, dict) for m in rejected):
        answers = [m for m in from_messages({"messages": rejected}) if m["role"] == "assistant"]
        if not answers:
            raise RowProblem("rejected", "has no assistant message", 'write "rejected" as the answer the model should not give')
        row = {**row, "rejected": answers[-1]["content"]}
    return row


# name -> (keys that identify it, adapter). Order matters: the first match wins.
CHAT_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], list[Message]]]] = {
    "messages": (("messages",), from_messages),
    "sharegpt": (("conversations",), from_sharegpt),
    "preference": (("prompt", "chosen"), from_preference),
    "prompt_response": (("prompt", "response"), from_prompt_response),
    "prompt_completion": (("prompt", "completion"), from_prompt_response),
    "alpaca": (("instruction", "output"), from_alpaca),
    "qa_keywords": (("question", "answer_keywords"), from_qa_keywords),
    "question_answer": (("question", "answer"), from_question_answer),
    "role_text": (("text",), from_role_text),
}

# Classification rows: text/label, or seed 002's question/answer (answer = the label).
LABEL_FORMATS: dict[str, tuple[str, str]] = {
    "text_label": ("text", "label"),
    "question_answer": ("question", "answer"),
}

KNOWN_KEYS_HINT = ("messages | conversations (ShareGPT) | prompt+chosen+rejected | prompt+response | prompt+completion | instruction+output (alpaca) | "
                   "question+answer_keywords | text with <|user|>/<|assistant|> markers")


def detect_chat_format(row: dict[str, Any]) -> str:
    for name, (keys, _) in CHAT_FORMATS.items():
        if all(k in row for k in keys):
            return name
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowProblem("(row)", f"unknown format (keys: {keys})", f"use one of: {KNOWN_KEYS_HINT}")


def to_conversation(row: Any, source: str = "") -> Conversation:
    """Adapt one parsed JSON value to a Conversation, or raise RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem("(row)", f"is a JSON {json_type(row)}, not an object",
                         'write one JSON object per line, e.g. {"prompt": "...", "response": "..."}')
    row = normalize_row(row)
    name = detect_chat_format(row)
    keys, adapter = CHAT_FORMATS[name]
    messages = adapter(row)
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise RowProblem("category", f"must be a string, got a JSON {json_type(category)}", 'write "category": "name"')
    rejected = row.get("rejected")
    if rejected is not None:
        alternatives = rejected if isinstance(rejected, list) else [rejected]
        if not alternatives or not all(isinstance(a, str) and a.strip() for a in alternatives):
            raise RowProblem("rejected", f"must be a non-empty string or a list of them, got {json_type(rejected)!s}",
                             'write "rejected": "<an answer the model should not give>" (or a list of such answers)')
        if not messages:
            raise RowProblem("messages", "is empty, so `rejected` has no answer to be the alternative to",
                             "add the user message and the chosen assistant answer, or drop the row")
        if messages[-1]["role"] != "assistant":
            raise RowProblem("rejected", "needs the conversation to end with an assistant answer",
                             "end the row with the answer that `rejected` is the alternative to")
    extra = {k: v for k, v in row.items() if k not in keys and k != "category"}
    return Conversation(messages=messages, source=source, format=name, category=category, extra=extra)


def to_labeled(row: Any, source: str = "") -> LabeledText:
    if not isinstance(row, dict):
        raise RowProblem("(row)", f"is a JSON {json_type(row)}, not an object", 'write {"text": "...", "label": "..."}')
    for name, (text_key, label_key) in LABEL_FORMATS.items():
        if text_key in row:
            if label_key not in row or row[label_key] is None:
                raise RowProblem(label_key, "is missing", f'add "{label_key}": "<class name>" to the row')
            label = row[label_key]
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise RowProblem(label_key, f"must be a string or integer, got a JSON {json_type(label)}", "write the class name")
            if not str(label).strip():
                raise RowProblem(label_key, "is empty", "write the class name")
            category = row.get("category") if isinstance(row.get("category"), str) else None
            return LabeledText(text=_text(row, text_key), label=str(label).strip(), source=source, format=name,
                               category=category)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowProblem("(row)", f"unknown classification format (keys: {keys})",
                     'use {"text": ..., "label": ...} or {"question": ..., "answer": LABEL}')


def looks_like_classification(rows: list[tuple[int, Any]]) -> bool:
    """True when every row is ``{"text", "label"}`` with no chat role markers: a classification file
    given to a chat command, which deserves one hint (``--task classify``), not an error per row."""
    return bool(rows) and all(isinstance(r, dict) and "text" in r and "label" in r and not any(
        k in r for keys, _ in CHAT_FORMATS.values() for k in keys if k != "text")
        and not (isinstance(r["text"], str) and _MARKER.search(r["text"])) for _, r in rows)
