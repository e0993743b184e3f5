"""The one decoder: prompt encoding, continuous batching, streaming, sampling and stop rules.

``eval`` / ``generate``, ``chat``, ``serve`` and ``export``'s greedy check all decode through
``decode`` below, so the same prompt with the same settings gives the same answer whichever
command asks.

- Prompts are encoded by ``encode_prompt``: the chat template's own control tokens become control
  tokens, while message text is tokenized as plain text, so a user cannot forge a turn by typing
  ``<|im_start|>system``.
- Continuous batching: up to ``batch_size`` answers are decoded together; when one ends, its row
  leaves the batch and the next prompt is prefilled into its place, so nobody waits for the longest
  answer of a fixed batch.
- Llama-shaped models (llama, mistral, qwen2) decode through ``tinysft.models.llama_decode``: the LoRA
  adapter merged into a copy of the weights (base and tuned each built once, switched without
  reloading), fused projections and a per-row KV cache. Other models (QLoRA bases, other
  architectures) run the same scheduler over transformers' own forward, in fixed waves.
- Sampling: greedy when ``temperature`` is (nearly) 0; else temperature, ``top_k``, ``top_p``. With
  a ``seed`` every answer has its own random generator seeded with it, so an answer does not depend
  on which other prompts shared its batch; without one, the global torch generator is used.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tinysft.data.formats import Message

GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily (dividing logits by 1e-300 overflows)."""

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


# ---- prompts -------------------------------------------------------------------------------------
def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS and the end-of-turn tokens of common chat templates."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN if tok in vocab)
    return sorted(i for i in ids if i is not None)


def special_strings(tokenizer: Any) -> list[str]:
    """The text of every special (control) token, longest first."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found.update(getattr(tokenizer, "all_special_tokens", []))
    return sorted((s for s in found if s), key=len, reverse=True)


def _sentinel(i: int) -> str:
    return f"\ue000tinysft-message-{i}\ue001"  # private-use characters: no template touches them


def encode_prompt(tokenizer: Any, messages: list[Message], system_prompt: str | None = None) -> list[int]:
    """Token ids of a conversation ready for generation (chat template + generation prompt).

    Control tokens come only from the template: each message's text is tokenized with special-token
    strings as plain text. The template is rendered once with a placeholder per message, to learn
    where message text sits; outside message text, special tokens are split out as the tokenizer
    itself would, so an ordinary conversation gets exactly the ids of tokenizing the rendered text.
    A template that rewrites message text (so placeholders do not survive) is still served, but
    text holding a control-token string is then refused with ValueError.
    """
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    real = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    marked = [{**m, "content": _sentinel(i)} for i, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    specials = special_strings(tokenizer)
    # pieces: (text, is_message_text); message text replaces its placeholder
    pieces: list[tuple[str, bool]] = []
    rest = template
    for i, m in enumerate(messages):
        head, sep, rest_ = rest.partition(_sentinel(i))
        if not sep:
            break
        pieces += [(head, False), (m["content"], True)]
        rest = rest_
    else:
        pieces.append((rest, False))
        if "".join(p for p, _ in pieces) == real:
            return _encode_pieces(tokenizer, pieces, specials)
    forged = [s for m in messages for s in specials if s in m["content"]]
    if forged:
        raise ValueError(f"a message contains the control token {forged[0]!r}, and this model's chat template "
                         "rewrites message text, so it cannot be kept as plain text; remove it.")
    return tokenizer(real, add_special_tokens=False)["input_ids"]


def _encode_pieces(tokenizer: Any, pieces: list[tuple[str, bool]], specials: list[str]) -> list[int]:
    """Tokenize template text and message text: a special-token string is a control token only in
    template text. Text between two control tokens is tokenized in one call (as the tokenizer
    does), so message text merges with the template text around it exactly as before."""
    ids: list[int] = []
    run = ""
    for text, is_message in pieces:
        if is_message:
            run += text
            continue
        while text:
            hit = min(((text.find(s), -len(s), s) for s in specials if s in text), default=None)
            if hit is None:
                run += text
                break
            at, _, tok = hit
            run += text[:at]
            if run:
                ids += tokenizer(run, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                run = ""
            ids.append(tokenizer.convert_tokens_to_ids(tok))
            text = text[at + len(tok):]
    if run:
        ids += tokenizer(run, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


@contextlib.contextmanager
def adapter_state(model: Any, enabled: bool) -> Iterator[None]:
    """Run with the LoRA adapter on (tuned) or off (base). A plain model is always 'base'."""
    if enabled or not hasattr(model, "disable_adapter"):
        yield
    else:
        with model.disable_adapter():
            yield


# ---- sampling ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop. The defaults are greedy, as for evaluation."""

    max_new_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """Keep only the k most likely tokens before top_p (0: all)."""
    seed: int | None = 0
    """Seeds each answer's own generator; None draws from torch's global generator."""
    stop: tuple[str, ...] = ()
    """Text that ends the answer (not included in it), as in OpenAI's ``stop``."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def pick_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """Choose the next token from one row of logits [vocab]: argmax when greedy, else a draw from
    softmax(logits / temperature) cut to the top_k tokens and to the smallest set holding top_p."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < sampling.top_p  # mass before a token < top_p; keeps the top one
        if sampling.top_k > 0:
            keep[sampling.top_k:] = False
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def stable_length(text: str, stops: tuple[str, ...] | list[str]) -> int:
    """How much of ``text`` can be shown now: not a trailing partial UTF-8 character (decoded as
    U+FFFD), and not a tail that could still grow into a stop sequence."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


# ---- the scheduler -------------------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    """The answer as decoded (special tokens dropped, no space clean-up, not stripped)."""
    tokens: list[int]
    finish_reason: str
    """"stop" (an end-of-turn token or a stop string), "length" (max_new_tokens) or "cancelled"."""


class _Row:
    """One answer being decoded."""

    def __init__(self, index: int, sampling: Sampling, on_text: Callable[[int, str], None] | None) -> None:
        self.index, self.sampling, self.on_text = index, sampling, on_text
        self.tokens: list[int] = []
        self.text, self.sent, self.finish = "", 0, ""
        self.generator: torch.Generator | None = None
        if sampling.seed is not None and not sampling.greedy:
            self.generator = torch.Generator().manual_seed(sampling.seed)

    def add(self, token: int, stops: set[int], decode: Callable[[list[int]], str]) -> bool:
        """Take the chosen token; True while the answer goes on."""
        if token in stops:
            self.finish = "stop"
            return False
        self.tokens.append(token)
        if self.sampling.stop or self.on_text is not None:
            self.text = decode(self.tokens)
            hits = [i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0]
            if hits:
                self.text, self.finish = self.text[: min(hits)], "stop"
                return False
            stable = stable_length(self.text, self.sampling.stop)
            if self.on_text is not None and stable > self.sent:
                self.on_text(self.index, self.text[self.sent:stable])
                self.sent = stable
        if len(self.tokens) >= self.sampling.max_new_tokens:
            self.finish = "length"
            return False
        return True

    def answer(self, decode: Callable[[list[int]], str]) -> Answer:
        if not (self.sampling.stop and self.finish == "stop"):
            self.text = decode(self.tokens)
        if self.on_text is not None and len(self.text) > self.sent:
            self.on_text(self.index, self.text[self.sent:])
        return Answer(self.text, self.tokens, self.finish or "cancelled")


def decode(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling | list[Sampling] = Sampling(),
           *, batch_size: int = 256, on_text: Callable[[int, str], None] | None = None,
           on_answer: Callable[[int], None] | None = None, cancelled: Callable[[], bool] | None = None,
           dtype: torch.dtype | None = None, engine: str = "auto") -> list[Answer]:
    """Answer each prompt (token ids from ``encode_prompt``); answers come back in input order.

    ``sampling`` is one setting for all prompts or one per prompt. ``on_text(i, piece)`` streams
    prompt i's answer as it grows (text that is final: never a partial character or a possible stop
    string's start); ``on_answer(i)`` is called as each answer ends. ``cancelled()`` is checked
    before every step; when it returns True the unfinished answers end as they are. The adapter
    (if any) is used as ``adapter_state`` left it. ``engine``: "auto", "fast" (llama-shaped models
    only) or "transformers". ``dtype`` (fast engine only): the decoding dtype, default ``llama_decode.decode_dtype``.
    """
    from tinysft.models import llama_decode as decode_llama

    settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    if len(settings) != len(prompts):
        raise ValueError(f"{len(settings)} sampling settings for {len(prompts)} prompts")
    if not prompts:
        return []
    batch_size = max(1, min(batch_size, len(prompts)))
    stops = set(stop_ids(tokenizer))
    decode_text = _text_decoder(tokenizer)
    use_fast = engine == "fast" or (engine == "auto" and decode_llama.supported(model))
    longest = max((len(p) + s.max_new_tokens for p, s in zip(prompts, settings, strict=True)), default=1)
    backend: Any = (decode_llama.FastBackend(model, batch_size, longest, dtype, prefix=shared_prefix(prompts))
                    if use_fast else decode_llama.WaveBackend(model, batch_size, _pad_id(tokenizer)))
    rows = [_Row(i, s, on_text) for i, s in enumerate(settings)]
    # Longest prompts first: their prefill is done while the batch is full, and the fixed waves of
    # the transformers engine pad little when neighbours have similar lengths.
    queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    active: list[int] = []  # rows that were fed a token, in the order of ``logits``' rows
    logits = torch.empty(0)  # [len(active), vocab]: each row's scores for its next token

    def finish(i: int) -> None:
        backend.release(i)
        if on_answer is not None:
            on_answer(i)

    with torch.inference_mode():
        while queue or active:
            if cancelled is not None and cancelled():
                break
            fed: list[int] = []  # rows that go on, and the token each is fed next
            tokens: list[int] = []
            pending, pending_logits, active = active, logits, []
            while True:  # sample every pending row; refill the slots that frees; repeat for the new rows
                if pending:
                    greedy_picks = pending_logits.argmax(-1).tolist()
                    for j, (i, g) in enumerate(zip(pending, greedy_picks, strict=True)):
                        row = rows[i]
                        tok = g if row.sampling.greedy else pick_next(pending_logits[j], row.sampling, row.generator)
                        if row.add(tok, stops, decode_text):
                            fed.append(i)
                            tokens.append(tok)
                        else:
                            finish(i)
                free = backend.free_slots()
                if not (free and queue):
                    break
                admitted = [queue.popleft() for _ in range(min(free, len(queue)))]
                admit_logits = backend.admit([(i, prompts[i]) for i in admitted])
                keep = []
                for j, i in enumerate(admitted):
                    if rows[i].sampling.max_new_tokens < 1:
                        rows[i].finish = "length"
                        finish(i)
                    else:
                        keep.append(j)
                pending, pending_logits = [admitted[j] for j in keep], admit_logits[keep]
            if fed:
                active, logits = fed, backend.step(fed, tokens)
    return [r.answer(decode_text) for r in rows]


SHARED_PREFIX_MIN = 4
"""Shorter common prefixes are not worth a cache of their own."""


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The token ids every prompt starts with, leaving each prompt at least one token of its own (its
    last position gives the first answer token's logits); [] for fewer than two prompts or a prefix
    under SHARED_PREFIX_MIN tokens. For chat prompts this is the template's system turn and the
    start of the user turn, computed once per decode instead of once per prompt."""
    if len(prompts) < 2:
        return []
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return list(first[:n]) if n >= SHARED_PREFIX_MIN else []


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    # No space clean-up: it can rewrite text already streamed when the next token arrives.
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ---- conveniences for callers --------------------------------------------------------------------
def generate_text(model: Any, tokenizer: Any, conversations: list[list[Message]], sampling: Sampling = Sampling(),
                  *, system_prompt: str | None = None, batch_size: int = 256,
                  on_answer: Callable[[int], None] | None = None) -> list[str]:
    """Answer each conversation (ending on a user turn); the answers stripped, in input order."""
    prompts = [encode_prompt(tokenizer, c, system_prompt) for c in conversations]
    answers = decode(model, tokenizer, prompts, sampling, batch_size=batch_size, on_answer=on_answer)
    return [a.text.strip() for a in answers]


def stream_text(model: Any, tokenizer: Any, messages: list[Message], sampling: Sampling, *,
                on_text: Callable[[str], None], system_prompt: str | None = None) -> str:
    """Answer one conversation, handing each new piece of text to ``on_text`` as it is decoded
    (leading whitespace dropped). Returns the whole answer stripped, as ``generate_text`` does."""
    started = False

    def piece(_i: int, text: str) -> None:
        nonlocal started
        if not started:
            text = text.lstrip()
            started = bool(text)
        if text:
            on_text(text)

    prompt = encode_prompt(tokenizer, messages, system_prompt)
    return decode(model, tokenizer, [prompt], sampling, batch_size=1, on_text=piece)[0].text.strip()


@torch.inference_mode()
def greedy_continuations(model: Any, prompts: list[list[int]], n: int) -> list[tuple[torch.Tensor, list[int]]]:
    """For each prompt: its logits [seq, vocab] (float32) and exactly ``n`` greedy tokens, end-of-turn
    tokens not special: fixed-length continuations to compare two models with (export's check). The
    continuations are decoded together, as one batch of the one decoder."""
    device = next(model.parameters()).device
    logits = [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]
    answers = decode(model, _NoStops(), prompts, Sampling(max_new_tokens=n), batch_size=len(prompts) or 1)
    return [(lg, a.tokens) for lg, a in zip(logits, answers, strict=True)]


class _NoStops:
    """A stand-in tokenizer for ``decode`` with no stop tokens: fixed-length answers (``greedy_continuations``;
    benchmarks/decode_sides.py times both passes on equal work with it)."""

    eos_token_id = None
    pad_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {}

    def decode(self, ids: list[int], **_kw: Any) -> str:
        return ""
