"""The rules a data file must pass to be trained on, in one place: `tinysft data check` and
`tinysft train` call the same functions with the same options, so the checker never approves
what the trainer refuses.

* chat rows: :func:`check_trainable` renders every row (and every `rejected` alternative) as
  training does, truncated to ``data.max_length`` with ``data.system_prompt``; a row with zero
  trained tokens after truncation, or one the chat template cannot render, is a FILE:LINE problem.
* classification files: :func:`require_two_labels`: a classifier needs at least two classes.
"""

from __future__ import annotations

from typing import Any

from tinysft.data.formats import Conversation
from tinysft.data.render import Rendered, RenderError, render, render_problem
from tinysft.data.validate import DataError, Problem


def _alternatives(conv: Conversation) -> list[Conversation]:
    """The row with each `rejected` answer in place of its last answer (the preference term's other side)."""
    rejected = conv.extra.get("rejected")
    answers = [] if rejected is None else rejected if isinstance(rejected, list) else [rejected]
    return [Conversation([*conv.messages[:-1], {"role": "assistant", "content": a}], conv.source, conv.format,
                         conv.category) for a in answers]


def check_trainable(convs: list[Conversation], tokenizer: Any, *, max_length: int,
                    system_prompt: str | None = None) -> list[Rendered]:
    """Render every conversation exactly as training does; return the renderings (one per row).

    Raises DataError listing every row that cannot be trained (zero trained tokens once truncated
    to ``max_length``, a template that renders a turn differently in context, ...), each at its
    FILE:LINE, with the field (``messages`` or ``rejected``) and the fix.
    """
    out: list[Rendered] = []
    problems: list[Problem] = []
    for conv in convs:
        try:
            out.append(render(conv, tokenizer, max_length, system_prompt))
        except RenderError as e:
            problems.append(render_problem(conv, "messages", e))
            continue
        for alt in _alternatives(conv):
            try:
                render(alt, tokenizer, max_length, system_prompt)
            except RenderError as e:
                problems.append(render_problem(alt, "rejected", e))
                break
    if problems:
        raise DataError(problems)
    return out


def require_two_labels(labels: list[str], files: list[str]) -> None:
    """Raise DataError unless ``labels`` (the training labels) holds at least two classes."""
    if len(set(labels)) < 2:
        only = f"only one label ({labels[0]!r})" if labels else "no label"
        raise DataError([Problem(", ".join(map(str, files)), None, "label", f"{only} in the training data",
                                 "a classifier needs rows of at least two labels")])
