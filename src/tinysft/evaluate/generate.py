"""Batched generation: left padding, KV cache, greedy by default, each row stops at its own EOS.

Base vs tuned is the same model: the adapter disabled (``model.disable_adapter()``), then enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tinysft.data.formats import Conversation, Message
from tinysft.data.render import render_prompt


@contextlib.contextmanager
def adapter_state(model: Any, enabled: bool) -> Iterator[None]:
    """Run with the LoRA adapter on (tuned) or off (base). A plain model is always 'base'."""
    if enabled or not hasattr(model, "disable_adapter"):
        yield
    else:
        with model.disable_adapter():
            yield


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS and the end-of-turn tokens of common chat templates."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """model.generate arguments: stop at any end-of-turn token; greedy unless temperature > 0.

    The sampling fields are set to None for greedy decoding so a model's own generation_config
    (which may ask for sampling) cannot make greedy runs non-deterministic.
    """
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_ids(tokenizer),
                              "pad_token_id": _pad_id(tokenizer)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: list[list[Message]], *, max_new_tokens: int = 160,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             system_prompt: str | None = None, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Answer each prompt (a list of messages ending on a user turn); returns the decoded answers.

    Prompts are sorted by length so each left-padded batch wastes little compute; answers come
    back in the input order.
    """
    device = next(model.parameters()).device
    encoded = [render_prompt(p, tokenizer, system_prompt) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad = _pad_id(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: the last column is every row's last prompt token
            n = len(encoded[i])
            ids[r, width - n :] = torch.tensor(encoded[i])
            attn[r, width - n :] = 1
        kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        for r, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(idx))
    return answers


def generate_rows(model: Any, tokenizer: Any, rows: list[Conversation], *, tuned: bool, **kwargs: Any) -> list[str]:
    with adapter_state(model, tuned):
        return generate(model, tokenizer, [r.messages for r in rows], **kwargs)


class _TextCallback:
    """The streamer protocol of ``model.generate`` (put / end): decodes the growing answer after
    every token and hands the new text to ``on_text``.

    The first ``put`` is the prompt and is skipped. A token that ends in the middle of a UTF-8
    character decodes to U+FFFD; that text is held back until the next token completes it.
    Leading whitespace is dropped, as ``generate`` strips it.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded answer already handed on
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not text.endswith("\ufffd") and len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)


@torch.inference_mode()
def stream(model: Any, tokenizer: Any, messages: list[Message], *, on_text: Callable[[str], None],
           max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
           system_prompt: str | None = None) -> str:
    """Answer one conversation, calling ``on_text`` with each new piece of text as it is generated.

    Pieces arrive token by token. Returns the whole answer, decoded at once and stripped, as
    ``generate`` returns it. Runs in the caller's thread, so Ctrl-C interrupts it.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([render_prompt(messages, tokenizer, system_prompt)], device=device)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_TextCallback(tokenizer, on_text),
                         **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
