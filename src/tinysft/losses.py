"""The causal-LM losses: the SFT loss, its in-pass preference pairs, sequence log-probabilities
and the held-out loss.

Training (``training.sft``) and evaluation (``evaluate.perplexity``) both import these, so the
number a run logs as eval loss and the one ``tinysft eval`` reports are computed by one function.
Everything here is summed, not averaged: the caller divides by the token count of the whole
optimizer step (all micro-batches, all processes), so accumulation and data parallelism give the
same gradients as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.data.batching import IGNORE, Batch
from tinysft.models.chunked_head import head_cross_entropy, plain_lm_head

NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep that computes no logits


def causal_lm_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the trained tokens of ``batch``, and their count.

    Only positions whose *next* token is trained go through the LM head: a quarter to a half of
    the tokens are prompt context, and the 49k-wide head is a large share of the FLOPs. Where the
    head is a plain frozen Linear (``plain_lm_head``), it runs in chunks that never hold all the
    logits (``head_cross_entropy``); otherwise the model's own head runs on those positions only
    (``logits_to_keep``). labels[:, 1:] lines up with logits[:, :-1].
    """
    loss, n, _ = lm_and_pair_loss(model, batch)
    return loss, n


def _pair_segments(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For a packed row with rejected branches: the positions scoring chosen / rejected tokens,
    each position's segment (conversation or branch), each segment's conversation, and the count."""
    chosen_t, rejected_t = batch.chosen_targets[0], batch.rejected_targets[0]  # (T,) per predicting position
    at_c, at_r = (chosen_t != IGNORE).nonzero().squeeze(-1), (rejected_t != IGNORE).nonzero().squeeze(-1)
    pos = batch.position_ids[0]
    segment = F.pad((pos[1:] - pos[:-1] != 1).cumsum(0), (1, 0))  # the conversation or branch of each position
    # A rejected branch is a segment with rejected targets; each branch belongs to the latest
    # conversation before it (which, after data.batching.share_prefixes, need not start at 0).
    n_seg = int(segment[-1]) + 1
    is_branch = torch.zeros(n_seg, dtype=torch.bool, device=pos.device).index_fill_(0, segment[at_r], True)
    seg_idx = torch.arange(n_seg, device=pos.device)
    conv_of = torch.where(is_branch, -1, seg_idx).cummax(0).values  # segment -> its conversation's segment
    return at_c, at_r, segment, conv_of, n_seg


def lm_and_pair_loss(model: Any, batch: Batch, beta: float = 0.1) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``causal_lm_loss`` plus, from the same forward pass, the preference term of the batch's
    in-row pairs (pair rows packed with rejected branches, ``data.batching.pack``): the sum over
    those rows of the mean over their rejected answers of -log sigmoid(beta * (log p(chosen) -
    log p(rejected) - reference margin)), the reference margin 0 unless the batch carries one
    (``Batch.reference``, DPO); 0 for a batch without pairs.

    The chosen side is the conversation's own answer (its first ``pair_tokens`` tokens), the
    rejected side the branch, scored in the same prompt's context: the same numbers as
    ``training.preference.preference_loss`` on separate (chosen, rejected) conversations, without
    computing either prompt again.
    """
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE
    pairs = batch.n_pairs > 0 and batch.rejected_targets is not None
    zero = torch.zeros((), device=batch.input_ids.device)
    if pairs:
        at_c, at_r, segment, conv_of, n_seg = _pair_segments(batch)
        chosen_t, rejected_t = batch.chosen_targets[0], batch.rejected_targets[0]
    head = plain_lm_head(model)
    if head is not None:
        # logits_to_keep=[] (no position): the model's own head does no work (with 1 position it
        # still copies the whole head); the last hidden state (after the final norm) feeds the
        # chunked head.
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=NO_POSITIONS.to(batch.input_ids.device), output_hidden_states=True, use_cache=False)
        full = out.hidden_states[-1]
        hidden = full[:, :-1]  # (B, T-1, d): position t predicts token t+1
        loss = head_cross_entropy(hidden[trained], head.weight, targets[trained])
        if not pairs:
            return loss, int(trained.sum()), zero
        # A few positions per pair (~2 x preference_tokens): their full logits are small.
        at = torch.cat([at_c, at_r])
        logprobs = F.linear(full[0, at], head.weight).float().log_softmax(-1)
    else:
        # Aligned with the positions (the last one has no next token in the row, but can score a
        # branch's last rejected token).
        targets = F.pad(targets, (0, 1), value=IGNORE)
        keep = (targets != IGNORE).any(0)
        if pairs:  # the pair positions need logits too
            keep = keep | (chosen_t != IGNORE) | (rejected_t != IGNORE)
        keep = keep.nonzero().squeeze(-1)  # positions t whose target t+1 is trained or paired
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=keep, use_cache=False)
        logits = out.logits.float()  # (B, K, V)
        tgt = targets[:, keep]  # (B, K)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        if not pairs:
            return loss, int(trained.sum()), zero
        slot = torch.full_like(chosen_t, -1)
        slot[keep] = torch.arange(len(keep), device=keep.device)  # position -> row of `logits`
        at = torch.cat([at_c, at_r])
        logprobs = logits[0, slot[at]].log_softmax(-1)
    # Summed log-probability of each conversation's chosen tokens and of each branch's rejected ones.
    lp = logprobs.gather(1, torch.cat([chosen_t[at_c], rejected_t[at_r]])[:, None]).squeeze(1)
    n_c = len(at_c)
    chosen = lp.new_zeros(n_seg).index_add(0, conv_of[segment[at_c]], lp[:n_c])  # per conversation segment
    branches = segment[at_r].unique()  # one pair per branch
    rejected = lp.new_zeros(n_seg).index_add(0, segment[at_r], lp[n_c:])[branches]
    conv = conv_of[branches]  # each branch's conversation
    margin = chosen[conv] - rejected
    if batch.reference is not None:  # DPO: measured against the reference model's margin
        margin = margin - lp.new_zeros(n_seg).index_add(0, segment[at_r], batch.reference[0, at_r].to(lp))[branches]
    # A conversation with several rejected answers is one example: the mean of its pairs' terms.
    per_conv = lp.new_zeros(len(chosen)).index_add(0, conv, torch.ones_like(rejected))
    terms = -F.logsigmoid(beta * margin) / per_conv[conv]
    return loss, int(trained.sum()), terms.sum()


def sequence_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each conversation's trained tokens, differentiable: (B,) for a
    padded batch, one per packed conversation (in order) for a packed (1, T) row."""
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE
    if batch.attention_mask is None:  # packed: conversations split where packed attention splits them
        breaks = batch.position_ids[:, 1:] - batch.position_ids[:, :-1] != 1  # segment_bounds' rule
        seq = breaks.cumsum(-1)  # owner of each target token (token t+1): 0 = the first conversation
        n_seq = int(breaks.sum()) + 1
    else:
        seq = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        n_seq = targets.shape[0]
    head = plain_lm_head(model)
    if head is not None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=NO_POSITIONS.to(batch.input_ids.device), output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, :-1][trained]  # (N, d), trained target positions in order
        tgt, owner = targets[trained], seq[trained]
        return -torch.stack([head_cross_entropy(hidden[owner == k], head.weight, tgt[owner == k])
                             for k in range(n_seq)])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    return -torch.zeros(n_seq, device=nll.device, dtype=nll.dtype).index_add(0, seq[trained], nll[trained])


@torch.no_grad()
def evaluate_loss(model: Any, batches: list[Batch], device: torch.device | str,
                  autocast: Callable[[], AbstractContextManager[Any]]) -> float:
    """Token-weighted mean loss over the batches (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast():
            loss, n = causal_lm_loss(model, b.to(device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)
