"""Batches for training: length-grouped batches, as padded rows or as one packed row.

Labels are the input ids where the loss mask is 1 and -100 elsewhere; the shift by one happens
in the loss (``labels[:, 1:]`` lines up with ``logits[:, :-1]``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tinysft.data.render import Rendered

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where not trained
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None for packed rows
    position_ids: torch.Tensor  # (B, T); restarts at 0 for each packed conversation
    n_tokens: int  # real (non-padding) tokens of the conversations (rejected branches not counted)
    n_trained: int  # tokens with a loss
    # Packed rows with rejected branches (``pack``): per position t, the token that the hidden state
    # at t scores for a pair's chosen side / rejected side (IGNORE elsewhere), and the pair count.
    chosen_targets: torch.Tensor | None = None  # (1, T)
    rejected_targets: torch.Tensor | None = None  # (1, T)
    n_pairs: int = 0  # conversations with rejected branches (each one example of the preference term)
    # Per position, the reference margin of the branch whose first rejected token it scores (0
    # elsewhere; None = reference-free pairs): the DPO term subtracts it from the pair's margin.
    reference: torch.Tensor | None = None  # (1, T) float

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.input_ids.to(device), self.labels.to(device), move(self.attention_mask),
                     self.position_ids.to(device), self.n_tokens, self.n_trained, move(self.chosen_targets),
                     move(self.rejected_targets), self.n_pairs, move(self.reference))


def _labels(r: Rendered) -> list[int]:
    return [t if m else IGNORE for t, m in zip(r.input_ids, r.loss_mask, strict=True)]


def collate(rows: list[Rendered], pad_id: int) -> Batch:
    """Right-pad rows to the longest; padding has no loss and no attention."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(_labels(r))
        attn[i, :n] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, labels, attn, pos, int(attn.sum()), sum(r.n_trained for r in rows))


def pack(rows: list[Rendered], pad_id: int) -> Batch:
    """Concatenate rows into one sequence (a (1, T) batch); position ids restart per conversation.

    No token attends across conversations: with no attention mask, restarting position ids make
    transformers build a block-diagonal causal mask, and ``models.packed_attention`` (used by
    training) splits the row at the same places. Labels at each boundary are already safe: the
    first token of a conversation is never trained (it is template text), so no target crosses.
    ``pad_id`` is unused (a packed row has no padding); it keeps the signature of ``collate``.

    A row with ``rejected`` answers is followed by one *branch* per answer: the prompt's last token
    and the rejected tokens, with position ids that continue from the prompt instead of
    restarting at 0. ``models.packed_attention`` lets a branch attend to its conversation's first
    tokens and to itself, so each rejected answer is scored in the prompt's context at the cost of
    its own tokens only; the chosen side is the conversation's own answer, already in the row.
    Branches are not in the SFT loss; ``chosen_targets`` / ``rejected_targets`` say which
    positions score which pair token.
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    chosen: list[int] = []
    rejected: list[int] = []
    reference: list[float] = []
    n_pairs = 0
    for r in rows:
        base = len(ids)
        ids.extend(r.input_ids)
        labels.extend([IGNORE] * len(r.input_ids) if r.pair_only else _labels(r))
        pos.extend(range(len(r.input_ids)))
        chosen.extend([IGNORE] * len(r.input_ids))
        rejected.extend([IGNORE] * len(r.input_ids))
        reference.extend([0.0] * len(r.input_ids))
        if not r.rejected:
            continue
        start, _ = r.last_answer()  # position start - 1 predicts each answer's first token
        for j in range(r.pair_tokens):
            chosen[base + start - 1 + j] = r.input_ids[start + j]
        for k, alt in enumerate(r.rejected):
            branch = [r.input_ids[start - 1], *alt[:-1]]  # alt's last token is only a target
            ids.extend(branch)
            labels.extend([IGNORE] * len(branch))
            pos.extend(range(start - 1, start - 1 + len(branch)))
            chosen.extend([IGNORE] * len(branch))
            rejected.extend(alt)
            reference.extend([r.reference[k] if r.reference else 0.0] + [0.0] * (len(branch) - 1))
        n_pairs += 1
    sft = [r for r in rows if not r.pair_only]
    if not n_pairs:
        return Batch(torch.tensor([ids]), torch.tensor([labels]), None, torch.tensor([pos]),
                     sum(len(r.input_ids) for r in sft), sum(r.n_trained for r in sft))
    return Batch(torch.tensor([ids]), torch.tensor([labels]), None, torch.tensor([pos]),
                 sum(len(r.input_ids) for r in sft), sum(r.n_trained for r in sft), torch.tensor([chosen]),
                 torch.tensor([rejected]), n_pairs,
                 torch.tensor([reference]) if any(r.reference for r in rows) else None)


def append_rows(batch: Batch, rows: list[Rendered]) -> Batch:
    """A packed batch with ``rows`` packed after its own (e.g. ``pair_only`` rows: pairs from a pool
    scored in the same pass). ``n_tokens`` / ``n_trained`` count SFT rows only, as in ``pack``."""
    extra = pack(rows, 0)

    def targets(b: Batch, t: torch.Tensor | None) -> torch.Tensor:
        return torch.full_like(b.input_ids, IGNORE) if t is None else t

    def reference(b: Batch) -> torch.Tensor:
        return torch.zeros(b.input_ids.shape) if b.reference is None else b.reference

    return Batch(torch.cat([batch.input_ids, extra.input_ids], 1), torch.cat([batch.labels, extra.labels], 1), None,
                 torch.cat([batch.position_ids, extra.position_ids], 1), batch.n_tokens + extra.n_tokens,
                 batch.n_trained + extra.n_trained,
                 torch.cat([targets(batch, batch.chosen_targets), targets(extra, extra.chosen_targets)], 1),
                 torch.cat([targets(batch, batch.rejected_targets), targets(extra, extra.rejected_targets)], 1),
                 batch.n_pairs + extra.n_pairs,
                 None if batch.reference is None and extra.reference is None
                 else torch.cat([reference(batch), reference(extra)], 1))


def make_batches(rows: list[Rendered], batch_size: int, pad_id: int, *, packing: bool = False, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = True) -> list[Batch]:
    """``batch_size`` conversations per batch, of similar length, in a shuffled order of batches.

    ``group_by_length=False`` keeps the shuffled order as it is: batches of mixed lengths (more
    padding unless packed), so a batch does not gather one kind of row (short refusals, long
    explanations) the way length-sorted batches do.

    Packing changes how a batch is laid out, not what is in it: the same conversations, in the
    same batches, as one padding-free row instead of ``batch_size`` padded rows. So a packed run
    takes the same optimizer steps on the same data as an unpacked one (and the same loss, up to
    float rounding), only without computing padding.
    """
    order = list(range(len(rows)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    # Sort within chunks of 8 batches by length, so batches are similar-length (little padding)
    # but still random.
    chunk = batch_size * 8 if group_by_length else batch_size
    grouped: list[list[int]] = []
    for s in range(0, len(order), chunk):
        part = order[s : s + chunk]
        if group_by_length:
            part = sorted(part, key=lambda i: len(rows[i].input_ids))
        grouped.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    if shuffle:
        rng.shuffle(grouped)
    layout = pack if packing else collate
    return [layout([rows[i] for i in g], pad_id) for g in grouped]


def split_batch(batch: Batch, max_tokens: int | None) -> list[Batch]:
    """Cut a batch into pieces of at most ``max_tokens`` real tokens, at conversation boundaries.

    Run one forward/backward per piece and the gradients add up to the whole batch's (the loss is
    a sum over trained tokens, and no target crosses a conversation boundary); activation memory
    follows the piece, not the batch. A conversation longer than ``max_tokens`` is a piece alone.
    """
    if not max_tokens or batch.n_tokens <= max_tokens:
        return [batch]
    if batch.attention_mask is None:  # packed rows: conversations start where position ids restart
        spans = []
        for r in range(batch.input_ids.shape[0]):
            positions = batch.position_ids[r].tolist()
            for s, e in _runs(positions):
                if positions[s] != 0 and spans:  # a rejected branch stays with its conversation
                    spans[-1] = (r, spans[-1][1], e)
                else:
                    spans.append((r, s, e))
    else:  # padded rows: each row is one conversation
        spans = [(r, 0, int(n)) for r, n in enumerate(batch.attention_mask.sum(-1).tolist())]
    pieces: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for r, s, e in spans:
        if pieces[-1] and used + (e - s) > max_tokens:
            pieces.append([])
            used = 0
        pieces[-1].append((r, s, e))
        used += e - s
    out = []
    for piece in pieces:
        if batch.attention_mask is None:
            def cut(t: torch.Tensor, piece: list[tuple[int, int, int]] = piece) -> torch.Tensor:
                return torch.cat([t[r, s:e] for r, s, e in piece])[None]

            ids, labels, pos, attn = cut(batch.input_ids), cut(batch.labels), cut(batch.position_ids), None
            n_tokens = sum(_root_tokens(pos[0].tolist()))
            if batch.rejected_targets is not None:
                chosen, rejected = cut(batch.chosen_targets), cut(batch.rejected_targets)
                n_pairs = len(set(((pos[0] == 0).cumsum(0)[rejected[0] != IGNORE]).tolist()))  # paired conversations
                reference = None if batch.reference is None else cut(batch.reference)
                out.append(Batch(ids, labels, None, pos, n_tokens, int((labels != IGNORE).sum()), chosen, rejected,
                                 n_pairs, reference))
                continue
        else:
            rows = [r for r, _, _ in piece]
            width = max(e for _, _, e in piece)
            ids, labels = batch.input_ids[rows, :width], batch.labels[rows, :width]
            attn, pos = batch.attention_mask[rows, :width], batch.position_ids[rows, :width]
            n_tokens = sum(e - s for _, s, e in piece)
        out.append(Batch(ids, labels, attn, pos, n_tokens, int((labels != IGNORE).sum())))
    return out


# A conversation shares its opening tokens with the one before it only from this many on: each
# shared segment costs one concatenation of keys and values per layer.
MIN_SHARED_TOKENS = 4


def share_prefixes(batch: Batch) -> Batch:
    """The same packed batch with the tokens that open several of its conversations computed once.

    Chat data repeats its openings: the chat template's default system prompt (24 tokens of
    SmolLM2's template), a shared instruction, the same prompt with another answer. A
    conversation's hidden states depend only on the tokens before them, so where two
    conversations start with the same tokens they have the same hidden states there. Here the
    conversations (each with its rejected branches) are sorted by their tokens, and each one
    after the first keeps only what follows the tokens it shares with the one before it: a
    segment whose position ids start there, which ``models.packed_attention`` lets attend to
    those tokens of the segment that holds them (the same rule as a rejected branch). Losses and
    gradients are those of ``batch`` (sums over the same targets), up to float rounding.

    A conversation never gives up a token whose hidden state has a target of its own (the
    template text before its first trained token is what is shared), nor its prefix beyond the
    start of the previous conversation's rejected branches (their position ids would claim it),
    nor the previous conversation's last token (segments are found where position ids stop
    growing by one). ``n_tokens``, ``n_trained`` and ``n_pairs`` stay as they are: the batch holds
    the same conversations. For packed (1, T) rows as ``pack``, ``append_rows`` and
    ``split_batch`` make them (every conversation starting at position 0); others are returned as
    they are.
    """
    if batch.attention_mask is not None or batch.input_ids.shape[0] != 1:
        return batch
    pos = batch.position_ids[0].tolist()
    ids = batch.input_ids[0].tolist()
    labels = batch.labels[0].tolist()
    chosen = batch.chosen_targets[0].tolist() if batch.chosen_targets is not None else None
    units: list[list[tuple[int, int]]] = []  # per conversation: its run, then its branches' runs
    for s, e in _runs(pos):
        if pos[s] == 0 or not units:
            units.append([(s, e)])
        else:
            units[-1].append((s, e))
    if len(units) < 2:
        return batch

    def free(unit: list[tuple[int, int]]) -> int:
        """Leading tokens of the conversation whose hidden states have no target of its own."""
        s, e = unit[0]
        limit = e - s - 1
        for j in range(1, e - s):
            if labels[s + j] != IGNORE:  # predicted by the hidden state at j - 1
                limit = min(limit, j - 1)
                break
        if chosen is not None:
            limit = min(limit, next((j for j in range(e - s) if chosen[s + j] != IGNORE), limit))
        return min([limit, *(pos[b] for b, _ in unit[1:])])

    units.sort(key=lambda u: ids[u[0][0] : u[0][1]])
    keep: list[int] = []  # row indices, in the new order
    prev: list[int] = []
    prev_cap = 0
    for unit in units:
        s, e = unit[0]
        tokens = ids[s:e]
        shared = 0
        for a, b in zip(prev, tokens[:prev_cap], strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, free(unit))
        if shared < MIN_SHARED_TOKENS:
            shared = 0
        keep.extend(range(s + shared, e))
        for b, f in unit[1:]:
            keep.extend(range(b, f))
        # The next conversation may share at most up to this one's branches and short of its last token.
        prev, prev_cap = tokens, min([e - s - 1, *(pos[b] for b, _ in unit[1:])])
    if len(keep) == len(ids):
        return batch
    index = torch.tensor(keep)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, index]

    return Batch(take(batch.input_ids), take(batch.labels), None, take(batch.position_ids), batch.n_tokens,
                 batch.n_trained, take(batch.chosen_targets), take(batch.rejected_targets), batch.n_pairs,
                 take(batch.reference))


def _root_tokens(positions: list[int]) -> list[int]:
    """Lengths of a packed row's conversations, without their rejected branches."""
    return [e - s for s, e in _runs(positions) if positions[s] == 0]


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each conversation in a packed row: a new one wherever positions do not grow by 1."""
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    return list(zip(starts, [*starts[1:], len(positions)], strict=True))
