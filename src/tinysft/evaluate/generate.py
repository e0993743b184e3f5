"""Answers for evaluation and ``tinysft generate``: the shared decoder (``tinysft.generation``) with
greedy defaults, over conversations.

Base vs tuned is the same model: the adapter disabled (``adapter_state(model, False)``), then enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinysft.data.formats import Conversation, Message
from tinysft.generation import Sampling, adapter_state, decode, encode_prompt, stop_ids, stream_text

__all__ = ["adapter_state", "encode_prompt", "generate", "generate_rows", "stop_ids", "stream"]


def generate(model: Any, tokenizer: Any, prompts: list[list[Message]], *, max_new_tokens: int | list[int] = 160,
             batch_size: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             system_prompt: str | None = None, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Answer each prompt (a list of messages ending on a user turn); returns the answers stripped,
    in input order. Up to ``batch_size`` answers are decoded together (continuous batching: a row
    that ends early frees its slot for the next prompt). ``max_new_tokens``: one cap for all, or
    one per prompt.

    ``on_batch(n)`` reports progress: called each time ``batch_size`` more answers are done
    (and once for the rest at the end).
    """
    done = 0

    def progress(_i: int) -> None:
        nonlocal done
        done += 1
        if on_batch is not None and (done % batch_size == 0 or done == len(prompts)):
            on_batch(batch_size if done % batch_size == 0 else done % batch_size)

    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} answer limits for {len(prompts)} prompts")
    settings = [Sampling(max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed) for n in limits]
    ids = [encode_prompt(tokenizer, c, system_prompt) for c in prompts]
    answers = decode(model, tokenizer, ids, settings, batch_size=batch_size, on_answer=progress)
    return [a.text.strip() for a in answers]


def generate_rows(model: Any, tokenizer: Any, rows: list[Conversation], *, tuned: bool, **kwargs: Any) -> list[str]:
    """``generate`` over dataset rows with the adapter on (``tuned``) or off."""
    with adapter_state(model, tuned):
        return generate(model, tokenizer, [r.messages for r in rows], **kwargs)


def stream(model: Any, tokenizer: Any, messages: list[Message], *, on_text: Callable[[str], None],
           max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
           system_prompt: str | None = None) -> str:
    """Answer one conversation, calling ``on_text`` with each new piece of text as it is decoded.

    Returns the whole answer stripped, as ``generate`` returns it, and the same answer ``generate``
    gives with the same settings. Runs in the caller's thread, so Ctrl-C interrupts it.
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return stream_text(model, tokenizer, messages, sampling, on_text=on_text, system_prompt=system_prompt)
