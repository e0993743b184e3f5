"""Batches: packing keeps every conversation whole, split passes add up to the batch, a rejected
answer stays with its conversation, and shared openings keep losses and gradients.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import random

import pytest
import torch

from equivalence import per_token_loss, rendered_rows, tiny_llama
from tinysft.data.batching import IGNORE, Batch, collate, make_batches, pack
from tinysft.data.render import Rendered, render
from tinysft.losses import causal_lm_loss
from tinysft.models.packed_attention import segment_bounds, use_packed_attention


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Rendered]:
    return rendered_rows(tokenizer)


def test_packed_batches_hold_the_same_conversations(tokenizer) -> None:
    rows = [render([{"role": "user", "content": "q" * (i % 7 + 1)}, {"role": "assistant", "content": "a" * (i % 5 + 1)}],
                   tokenizer) for i in range(21)]
    padded = make_batches(rows, 4, tokenizer.pad_token_id, seed=3)
    packed = make_batches(rows, 4, tokenizer.pad_token_id, packing=True, seed=3)
    assert len(packed) == len(padded) == 6
    for a, b in zip(padded, packed, strict=True):
        assert b.input_ids.shape == (1, a.n_tokens) and b.attention_mask is None
        assert a.n_tokens == b.n_tokens and a.n_trained == b.n_trained
        assert sorted(a.input_ids[a.attention_mask.bool()].tolist()) == sorted(b.input_ids[0].tolist())


def test_batches_mix_lengths_without_length_grouping(tokenizer) -> None:
    # 16 short and 16 long conversations: grouped by length, a batch holds one kind; ungrouped,
    # batches are runs of the shuffled order, each conversation once.
    rows = [render([{"role": "user", "content": "q" * (1 if i % 2 else 40)}, {"role": "assistant", "content": "a"}],
                   tokenizer) for i in range(32)]
    long_len = max(len(r.input_ids) for r in rows)

    def kinds(batches):  # per batch: the set of kinds (long or not) it holds
        return [{int(n) == long_len for n in b.attention_mask.sum(1)} for b in batches]

    grouped = make_batches(rows, 4, tokenizer.pad_token_id, seed=5)
    assert all(len(k) == 1 for k in kinds(grouped))
    mixed = make_batches(rows, 4, tokenizer.pad_token_id, seed=5, group_by_length=False)
    assert any(len(k) == 2 for k in kinds(mixed))
    order = list(range(32))
    rng = random.Random(5)
    rng.shuffle(order)
    chunks = [order[s : s + 4] for s in range(0, 32, 4)]
    rng.shuffle(chunks)
    for batch, idx in zip(mixed, chunks, strict=True):
        assert batch.attention_mask.sum(1).tolist() == [len(rows[i].input_ids) for i in idx]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_split_batch_pieces_add_up_to_the_batch(rows, tokenizer, layout) -> None:
    """Forward/backward piece by piece (bounded memory) gives the whole batch's loss and gradients."""
    from tinysft.config import LoraConfig
    from tinysft.data.batching import split_batch
    from tinysft.models.load import add_lora

    model = add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
    for i, (name, p) in enumerate(model.named_parameters()):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
    # float64: the sums are the same, only their order differs, and in float32 that order moved a
    # gradient element by 2e-6 (3.5e-4 relative) on an AMD EPYC (Zen 4) where Sapphire Rapids passed.
    model.double()
    use_packed_attention(model)
    batch = (pack if layout == "packed" else collate)(rows, tokenizer.pad_token_id)
    limit = batch.n_tokens // 2  # whole conversations: 2 or 3 pieces, some with several
    pieces = split_batch(batch, limit)
    assert 1 < len(pieces) < len(rows)
    assert all(p.n_tokens <= limit for p in pieces)
    assert sum(p.n_tokens for p in pieces) == batch.n_tokens and sum(p.n_trained for p in pieces) == batch.n_trained
    assert split_batch(batch, None) == [batch] and split_batch(batch, batch.n_tokens) == [batch]

    def grads(parts: list[Batch]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            loss, _ = causal_lm_loss(model, part)
            loss.backward()
            total += float(loss.detach())
        return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    whole_loss, whole = grads([batch])
    split_loss, split = grads(pieces)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for k, g in whole.items():
        torch.testing.assert_close(split[k], g, rtol=1e-4, atol=1e-6)


def _paired_conversations():
    from tinysft.data.formats import Conversation

    chats = [
        ([{"role": "user", "content": "How do I kill a stuck process?"}, {"role": "assistant", "content": "Run kill -9 PID."}],
         "I'm sorry, but I can't help with that."),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}], None),
        ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4."}, {"role": "user", "content": "And how do I pick a lock?"},
          {"role": "assistant", "content": "I can't help with that, but a locksmith can."}],
         ["Sure! Here's how you can do that: take a tension wrench and a pick.", "Great question! Here's how."]),
        ([{"role": "user", "content": "Name three colours of the rainbow, please."},
          {"role": "assistant", "content": "Red, orange and yellow, then green and blue."}], "No."),
    ]
    return [Conversation(m, f"t.jsonl:{i + 1}", extra={} if r is None else {"rejected": r})
            for i, (m, r) in enumerate(chats)]


def _lora_tiny(tokenizer):
    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora

    model = add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
    for i, (name, p) in enumerate(model.named_parameters()):  # lora_B starts at 0: make every path carry a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
    assert use_packed_attention(model)
    return model


@pytest.mark.parametrize("tokens", [0, 3])
@pytest.mark.parametrize("chunked_head", [True, False])
@pytest.mark.parametrize("dpo", [False, True])
def test_pairs_in_the_sft_pass_equal_a_separate_pair_pass(rows, tokenizer, tokens, chunked_head, dpo,
                                                          monkeypatch) -> None:
    """Pool pairs as ``pair_only`` rows in the SFT pass (each rejected answer a branch of its
    prompt) give the separate pair pass's mean term and LoRA gradients, and leave the SFT loss and
    its token counts as they are; with reference margins (DPO) too."""
    import tinysft.losses as losses
    from tinysft.data.batching import append_rows
    from tinysft.training.preference import pair_row, preference_loss, preference_pairs

    if not chunked_head:
        monkeypatch.setattr(losses, "plain_lm_head", lambda _m: None)
    convs = [c for c in _paired_conversations() if c.extra]
    pairs = preference_pairs(convs, tokenizer, 512, None, tokens)
    assert len(pairs) == 4  # row 3 has two rejected answers
    reference = [1.5, -2.0, 0.25, 3.0] if dpo else None
    pair_rows = [pair_row(c, r, None if reference is None else reference[i]) for i, (c, r) in enumerate(pairs)]
    model = _lora_tiny(tokenizer)
    sft_batch = pack(rows, tokenizer.pad_token_id)
    fused = append_rows(sft_batch, pair_rows)
    assert (fused.n_tokens, fused.n_trained, fused.n_pairs) == (sft_batch.n_tokens, sft_batch.n_trained, 4)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    sft, n, pref_sum = losses.lm_and_pair_loss(model, fused)
    alone, n_alone = losses.causal_lm_loss(model, sft_batch)
    assert n == n_alone and float(sft.detach()) == pytest.approx(float(alone.detach()), rel=1e-5)
    together = grads(sft + pref_sum / len(pairs))
    separate = preference_loss(model, [c for c, _ in pairs], [r for _, r in pairs], tokenizer.pad_token_id,
                               0.1, torch.device("cpu"), packing=True, reference=reference)
    assert float(pref_sum.detach()) / len(pairs) == pytest.approx(float(separate.detach()), rel=1e-5)
    assert float(separate.detach()) != pytest.approx(0.6931, rel=1e-3)  # margins are not all 0
    apart = grads(losses.causal_lm_loss(model, sft_batch)[0] + separate)
    for k, g in apart.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(together[k], g, rtol=1e-4, atol=1e-6)


def test_reference_margins_travel_with_their_branches(rows, tokenizer) -> None:
    """A DPO pair's reference margin stays with its branch through ``append_rows``,
    ``split_batch`` and ``share_prefixes`` (which reorder and cut the row): the summed term is
    the one computed from the margins and reference values pair by pair."""
    import torch.nn.functional as F

    from tinysft.data.batching import append_rows, share_prefixes, split_batch
    from tinysft.losses import lm_and_pair_loss
    from tinysft.training.preference import pair_row, preference_pairs

    pairs = preference_pairs([c for c in _paired_conversations() if c.extra], tokenizer, 512, None, 4)
    reference = [4.0, -3.0, 0.5, 2.0]
    model = _lora_tiny(tokenizer)
    with torch.no_grad():
        free = [lm_and_pair_loss(model, pack([pair_row(c, r)], 0), beta=1.0)[2] for c, r in pairs]
    # Each row holds one pair, so its reference-free term gives its margin: -log sigmoid(m) = t.
    margins = [float(-torch.log(torch.expm1(t))) for t in free]
    expected = sum(float(-F.logsigmoid(torch.tensor(m - ref))) for m, ref in zip(margins, reference, strict=True))
    batch = append_rows(pack(rows, tokenizer.pad_token_id),
                        [pair_row(c, r, ref) for (c, r), ref in zip(pairs, reference, strict=True)])
    assert batch.reference is not None and float(batch.reference.sum()) == pytest.approx(sum(reference))
    layouts = {"whole": [batch], "split": split_batch(batch, max(len(r.input_ids) for r in rows) + 1),
               "shared": [share_prefixes(batch)]}
    assert len(layouts["split"]) > 1 and layouts["shared"][0].input_ids.shape[1] < batch.input_ids.shape[1]
    with torch.no_grad():
        for name, pieces in layouts.items():
            total = sum(float(lm_and_pair_loss(model, p, beta=1.0)[2]) for p in pieces)
            assert total == pytest.approx(expected, rel=1e-4), name


def test_split_batch_keeps_a_rejected_branch_with_its_conversation(rows, tokenizer) -> None:
    import dataclasses

    from tinysft.data.batching import split_batch
    from tinysft.losses import lm_and_pair_loss
    from tinysft.training.preference import pair_row, preference_pairs

    pairs = preference_pairs([c for c in _paired_conversations() if c.extra], tokenizer, 512, None, 4)
    # Rows carrying rejected branches, trained in SFT too (pair_only=False), so every token count is comparable.
    branched = [dataclasses.replace(pair_row(c, r), pair_only=False) for c, r in pairs]
    mixed = [*rows[:3], *branched, *rows[3:]]
    batch = pack(mixed, tokenizer.pad_token_id)
    pieces = split_batch(batch, max(len(r.input_ids) for r in mixed) + 1)
    assert len(pieces) > 1
    assert sum(p.n_pairs for p in pieces) == batch.n_pairs == 4
    assert sum(p.n_tokens for p in pieces) == batch.n_tokens
    assert sum(p.input_ids.shape[1] for p in pieces) == batch.input_ids.shape[1]
    model = _lora_tiny(tokenizer)
    with torch.no_grad():
        whole = lm_and_pair_loss(model, batch)
        parts = [lm_and_pair_loss(model, p) for p in pieces]
    assert sum(float(p[0]) for p in parts) == pytest.approx(float(whole[0]), rel=1e-5)
    assert sum(float(p[2]) for p in parts) == pytest.approx(float(whole[2]), rel=1e-5)
    for p in pieces:  # every piece starts with a conversation, never with a branch
        assert int(p.position_ids[0, 0]) == 0


def _shared_opening_rows(tokenizer) -> tuple[list[Rendered], list[Rendered]]:
    """SFT rows with shared openings at two depths (the template's system prompt; a whole prompt
    answered twice, which sorts next to a row with a different prompt), one with its own system
    prompt, the paired conversations, and pool pairs (``pair_only``) of them."""
    from tinysft.data.render import render_all
    from tinysft.training.preference import pair_row, preference_pairs

    colours = "Name three colours of the rainbow, please."
    chats = [
        [{"role": "user", "content": colours}, {"role": "assistant", "content": "Red, orange and yellow."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "user", "content": colours}, {"role": "assistant", "content": "Green, blue and violet."}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4."}],
        [{"role": "user", "content": "Name a big cat."}, {"role": "assistant", "content": "A tiger."}],
    ]
    paired_convs = [c for c in _paired_conversations() if c.extra]
    sft = [render(c, tokenizer) for c in chats]
    paired = render_all(paired_convs, tokenizer, 512)
    pool = [pair_row(c, r) for c, r in preference_pairs(paired_convs, tokenizer, 512, None, 4)]
    return [*sft, *paired], pool


@pytest.mark.parametrize("short", [True, False], ids=["short-attention", "sdpa"])
def test_shared_prefixes_keep_losses_and_gradients(tokenizer, short, monkeypatch) -> None:
    """A packed batch whose shared openings are computed once (``share_prefixes``) gives the
    batch's SFT loss, preference term and LoRA gradients, with fewer tokens in the pass."""
    import tinysft.models.packed_attention as packed_attention
    from tinysft.data.batching import append_rows, share_prefixes
    from tinysft.losses import lm_and_pair_loss

    if not short:
        monkeypatch.setattr(packed_attention, "SHORT_ATTENTION_MAX", 0)
    sft_rows, pool = _shared_opening_rows(tokenizer)
    batch = append_rows(pack(sft_rows, tokenizer.pad_token_id), pool)
    shared = share_prefixes(batch)
    system = len(render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenizer).input_ids)
    # Every conversation but the first and the one with its own system prompt drops at least the
    # template's system prompt; the second colours row drops its whole prompt.
    assert batch.input_ids.shape[1] - shared.input_ids.shape[1] > (len(sft_rows) + len(pool) - 2) * (system - 10)
    assert (shared.n_tokens, shared.n_trained, shared.n_pairs) == (batch.n_tokens, batch.n_trained, batch.n_pairs)
    assert int((shared.labels != IGNORE).sum()) == int((batch.labels != IGNORE).sum())
    assert int((shared.rejected_targets != IGNORE).sum()) == int((batch.rejected_targets != IGNORE).sum())
    model = _lora_tiny(tokenizer)

    def run(b: Batch) -> tuple[float, float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        sft, _n, pref = lm_and_pair_loss(model, b)
        (sft + pref).backward()
        return float(sft.detach()), float(pref.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                                           if p.requires_grad}

    sft, pref, grads = run(batch)
    sft_s, pref_s, grads_s = run(shared)
    assert sft_s == pytest.approx(sft, rel=1e-5) and pref_s == pytest.approx(pref, rel=1e-5)
    for k, g in grads.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(grads_s[k], g, rtol=1e-4, atol=1e-6)


def test_shared_prefixes_read_the_conversation_that_holds_them(tokenizer) -> None:
    """Each shared segment reads its opening from the latest conversation that starts before it,
    not from the row's first one: the second colours row's prompt is in the first colours row."""
    from tinysft.data.batching import share_prefixes

    sft_rows, _ = _shared_opening_rows(tokenizer)
    shared = share_prefixes(pack(sft_rows, tokenizer.pad_token_id))
    firsts = [int(shared.position_ids[0, s]) for s in segment_bounds(shared.position_ids)[0][:-1]]
    assert firsts[0] == 0 and len(set(firsts[1:])) > 1 and all(f > 0 for f in firsts[1:3])  # two depths
    model = tiny_llama(len(tokenizer))
    assert use_packed_attention(model)
    with torch.no_grad():
        alone = [float(per_token_loss(model, collate([r], tokenizer.pad_token_id)).sum()) for r in sft_rows]
        together = float(per_token_loss(model, shared).sum())
    assert together == pytest.approx(sum(alone), rel=1e-5)


def test_shared_prefixes_leave_unpacked_and_single_batches_alone(rows, tokenizer) -> None:
    from tinysft.data.batching import share_prefixes

    padded = collate(rows, tokenizer.pad_token_id)
    assert share_prefixes(padded) is padded
    one = pack(rows[:1], tokenizer.pad_token_id)
    assert share_prefixes(one) is one
