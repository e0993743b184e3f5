"""The preference term: push each `rejected` answer below the row's own answer.

Reference-free, in the CPO form (Xu et al., 2024; TRL's CPOTrainer): added to the SFT loss, the
mean over pairs of -log sigmoid(beta * (log p(chosen) - log p(rejected))). SFT alone only pulls the
chosen answer up; this also pushes the rejected one down, for the same prompt. With
``train.preference_reference`` the margin is measured against the base model's (DPO, Rafailov et
al. 2023; TRL's DPOTrainer): ``reference_margins`` computes those once before training, since the
base model does not change.

A pair is (chosen, rejected) renderings that share everything before the last answer. With
packing and tinysft's packed attention, the pairs are scored inside the SFT pass as extra
pair-only rows whose rejected answer is a branch of the prompt (``pair_row``,
``losses.lm_and_pair_loss``); otherwise in a pass of their own (``preference_loss``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.data.batching import collate, pack
from tinysft.data.formats import Conversation
from tinysft.data.render import Rendered, RenderError, render_all
from tinysft.losses import sequence_logprobs

REFERENCE_BATCH = 16  # pairs per no-grad pass when computing the reference margins


def rejected_answers(conv: Conversation) -> list[str]:
    """The row's `rejected` answers (one string or a list of them); [] for a row without."""
    rejected = conv.extra.get("rejected")
    return [] if rejected is None else rejected if isinstance(rejected, list) else [rejected]


def rejected_conversations(conv: Conversation) -> list[Conversation]:
    """The conversation once per rejected answer, that answer in place of its last turn."""
    return [Conversation([*conv.messages[:-1], {"role": "assistant", "content": answer}], conv.source, conv.format,
                         conv.category) for answer in rejected_answers(conv)]


def answer_prefix(rendered: Rendered, tokens: int) -> Rendered:
    """The conversation up to the first ``tokens`` trained tokens of its last answer; only those
    are trained (earlier answers are shared by chosen and rejected, so their terms cancel)."""
    if not any(rendered.loss_mask):
        return rendered
    start, end = rendered.last_answer()
    end = min(end, start + tokens)
    return Rendered(rendered.input_ids[:end], [0] * start + [1] * (end - start), rendered.source, rendered.truncated)


def preference_pairs(convs: list[Conversation], tokenizer: Any, max_length: int,
                     system_prompt: str | None, answer_tokens: int = 0) -> list[tuple[Rendered, Rendered]]:
    """(chosen, rejected) renderings, one per rejected answer of each conversation; failures are one DataError.

    ``answer_tokens`` > 0 keeps only the first that many tokens of both answers (where the model
    decides to refuse or to answer), which also makes the pair pass shorter.
    """
    chosen = [c for c in convs for _ in rejected_answers(c)]
    pairs = list(zip(render_all(chosen, tokenizer, max_length, system_prompt),
                     render_all([a for c in convs for a in rejected_conversations(c)], tokenizer, max_length,
                                system_prompt),
                     strict=True))
    if answer_tokens > 0:
        pairs = [(answer_prefix(c, answer_tokens), answer_prefix(r, answer_tokens)) for c, r in pairs]
    return pairs


def pair_row(chosen: Rendered, rejected: Rendered, reference: float | None = None) -> Rendered:
    """``chosen`` carrying ``rejected``'s last answer as a branch, for the in-pass preference term
    (``data.batching.pack`` lays it out, ``losses.lm_and_pair_loss`` scores it); not in the SFT loss.
    ``reference``: the reference model's margin for the pair (DPO); None = reference-free."""
    def answer(x: Rendered) -> list[int]:
        start, end = x.last_answer()
        return x.input_ids[start:end]

    c, _ = chosen.last_answer()
    if rejected.last_answer()[0] != c or rejected.input_ids[:c] != chosen.input_ids[:c]:
        raise RenderError(f"{chosen.source}: a `rejected` answer's prompt renders differently from the answer's, "
                          "so the two cannot share it; check the row's messages.")
    return dataclasses.replace(chosen, rejected=[answer(rejected)], pair_tokens=len(answer(chosen)), pair_only=True,
                               reference=None if reference is None else [reference])


@torch.no_grad()
def reference_margins(model: Any, pairs: list[tuple[Rendered, Rendered]], pad_id: int, device: torch.device,
                      autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under ``model`` as it is (call it on the base
    model, before LoRA or its weights are loaded): the DPO term's reference, computed once.

    Padded batches (``collate``), so the result does not depend on packed attention being installed.
    """
    was_training = model.training
    model.eval()
    margins: list[float] = []
    try:
        for i in range(0, len(pairs), REFERENCE_BATCH):
            part = pairs[i:i + REFERENCE_BATCH]
            with autocast():
                logp = sequence_logprobs(model, collate([*(c for c, _ in part), *(r for _, r in part)], pad_id).to(device))
            margins.extend((logp[:len(part)] - logp[len(part):]).float().tolist())
    finally:
        model.train(was_training)
    return margins


def preference_loss(model: Any, chosen: list[Rendered], rejected: list[Rendered], pad_id: int, beta: float,
                    device: torch.device, packing: bool = False, reference: list[float] | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta * (log p(chosen) - log p(rejected) - reference margin)),
    in a pass of its own (``reference`` None: reference-free).

    Chosen and rejected share the prompt and earlier turns, so only the last answer differs in the
    margin. ``packing``: all of them in one padding-free row (the model must attend per
    conversation, as ``models.packed_attention`` makes it).
    """
    layout = pack if packing else collate
    logp = sequence_logprobs(model, layout([*chosen, *rejected], pad_id).to(device))
    n = len(chosen)
    margin = (logp[:n] - logp[n:]).float()
    if reference is not None:
        margin = margin - torch.tensor(reference, device=margin.device)
    return -F.logsigmoid(beta * margin).mean()
