"""Conversation -> (input_ids, loss_mask) with the model's own chat template.

This is the one place that decides which tokens are trained: the assistant's turns, including
the end-of-turn token, so the model learns to stop. Everything else (system, user, the template's
role headers) is context only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tinysft.data.formats import Conversation, Message
from tinysft.data.validate import DataError, Problem

_SURROGATE = re.compile("[\ud800-\udfff]")


class RenderError(ValueError):
    """A conversation the chat template cannot render into trainable tokens; says why."""


def render_problem(conv: Conversation, field: str, error: RenderError) -> Problem:
    """``error`` (raised rendering ``conv``) as a DataError entry at the row's FILE:LINE; the message
    loses the ``{source}: `` prefix it is raised with, which the entry already shows."""
    return Problem.at(conv.source, field, str(error).split(": ", 1)[-1], "see above")


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target, aligned with input_ids
    source: str = ""
    truncated: bool = False
    # Rejected alternatives to the last answer, for a preference term computed in the same pass
    # (``data.batching.pack`` lays each out as a branch sharing the prompt): their first tokens,
    # and how many of the last answer's first tokens each is compared with.
    rejected: list[list[int]] | None = None
    pair_tokens: int = 0
    pair_only: bool = False  # in the preference term only, not in the SFT loss (a pair from a pool)
    # Per rejected answer, the reference model's margin log p(answer) - log p(rejected) that the
    # term is measured against (DPO); None = reference-free.
    reference: list[float] | None = None

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)

    def last_answer(self) -> tuple[int, int]:
        """(start, end) of the last trained run of tokens (the last answer); (0, 0) if nothing is trained."""
        mask = self.loss_mask
        if not any(mask):
            return 0, 0
        end = len(mask) - mask[::-1].index(1)
        start = end - 1
        while start > 0 and mask[start - 1]:
            start -= 1
        return start, end


def _template(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(conv: Conversation | list[Message], tokenizer: Any, max_length: int | None = None,
           system_prompt: str | None = None) -> Rendered:
    """Render a conversation with the tokenizer's chat template.

    For each assistant turn i the template is rendered twice: the prompt ``messages[:i]`` with the
    generation prompt, and ``messages[:i+1]``. Both must be prefixes of the whole conversation's
    text (templates that rewrite earlier turns break that, and we refuse rather than guess). The
    characters between the two are the trained span; trailing whitespace after the end-of-turn
    token is not trained. Each span is tokenised on its own, so the prompt's tokens are exactly
    the tokens the model sees at inference time, and the answer starts on a token boundary.
    """
    messages = conv.messages if isinstance(conv, Conversation) else conv
    source = conv.source if isinstance(conv, Conversation) else ""
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not messages:
        raise RenderError(f"{source}: the conversation is empty — add a user message and the assistant's answer.")
    if messages[0]["role"] == "assistant":  # the template cannot render the empty prompt before it
        raise RenderError(f"{source}: the conversation starts with an assistant turn — start it with a user message.")
    if any(_SURROGATE.search(m["content"]) for m in messages):  # no tokenizer can encode one
        raise RenderError(f"{source}: a message holds a lone UTF-16 surrogate (half of an escaped emoji) — write "
                          "the character itself, or both halves of its escape.")
    full = _template(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or not full.startswith(upto) or not upto.startswith(prompt):
            raise RenderError(
                f"{source}: the chat template renders assistant turn {i} differently inside the whole "
                "conversation than on its own (the prompt is not a prefix of prompt+answer), so the "
                "trained tokens cannot be located safely. Split the conversation into single-turn rows, "
                "or use a model whose template renders turns independently."
            )
        end = len(upto.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    if not spans:
        raise RenderError(f"{source}: no assistant text to train on after rendering — add an assistant answer.")

    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in spans:
        for text, trained in ((full[cursor:start], 0), (full[start:end], 1)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                mask.extend([trained] * len(piece))
        cursor = end
    if cursor < len(full):
        piece = tokenizer(full[cursor:], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([0] * len(piece))

    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise RenderError(
            f"{source}: zero trained tokens — the assistant's answer begins after data.max_length="
            f"{max_length} tokens. Raise data.max_length or shorten the prompt."
        )
    return Rendered(ids, mask, source, truncated)


def render_prompt(messages: list[Message], tokenizer: Any, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt ready for generation (template + generation prompt)."""
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = _template(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def show_mask(rendered: Rendered, tokenizer: Any) -> Any:
    """A rich Text of the rendered row: trained tokens on green, context dim."""
    from rich.text import Text

    text = Text()
    for tid, trained in zip(rendered.input_ids, rendered.loss_mask, strict=True):
        piece = tokenizer.decode([tid])
        text.append(piece, style="bold black on green" if trained else "dim")
    return text


def render_all(convs: list[Conversation], tokenizer: Any, max_length: int,
               system_prompt: str | None = None) -> list[Rendered]:
    """Render every conversation; all failures are collected into one DataError (file:line each)."""
    out, problems = [], []
    for c in convs:
        try:
            out.append(render(c, tokenizer, max_length, system_prompt))
        except RenderError as e:
            problems.append(render_problem(c, "messages", e))
    if problems:
        raise DataError(problems)
    return out
