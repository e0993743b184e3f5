"""Edges of the loss code, pinned by mutation testing (docs/mutation.md).

tests/models/test_speed_correctness.py shows that pairs scored inside the SFT pass equal the
separate pair pass for 0 and 3 preference tokens; a one-token rejected answer at the very end of
the packed row (``train.preference_tokens=1``, a pair row packed last) is the case where the
row's last position starts a segment of its own.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tinysft.losses as losses
from tinysft.data.batching import append_rows, pack
from tinysft.data.formats import to_conversation
from tinysft.data.render import render
from tinysft.training.preference import pair_row, preference_loss, preference_pairs


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinysft.models.packed_attention import use_packed_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    assert use_packed_attention(model)
    return model


@pytest.mark.parametrize("chunked_head", [True, False])
def test_one_token_pairs_at_the_end_of_the_row_equal_the_separate_pass(tokenizer, chunked_head, monkeypatch) -> None:
    if not chunked_head:
        monkeypatch.setattr(losses, "plain_lm_head", lambda _m: None)
    rows = [{"prompt": f"How do I pick lock {n}?", "response": f"Use key {n}, then oil it.",
             "rejected": [f"Sorry {n}, no.", f"Never {n}."]} for n in (1, 22)]
    pairs = preference_pairs([to_conversation(r) for r in rows], tokenizer, 512, None, answer_tokens=1)
    sft = [render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)]
    batch = append_rows(pack(sft, tokenizer.pad_token_id), [pair_row(c, r) for c, r in pairs])
    assert batch.n_pairs == 4
    model = tiny_llama(len(tokenizer))
    model.requires_grad_(not chunked_head)  # a frozen head is the chunked path's condition
    with torch.no_grad():
        loss, n, pref_sum = losses.lm_and_pair_loss(model, batch, beta=0.5)
        alone, n_alone = losses.causal_lm_loss(model, pack(sft, tokenizer.pad_token_id))
        separate = [preference_loss(model, [c], [r], tokenizer.pad_token_id, 0.5, torch.device("cpu")) for c, r in pairs]
    assert n == n_alone and float(loss) == pytest.approx(float(alone), rel=1e-5)
    assert float(pref_sum) == pytest.approx(sum(float(s) for s in separate), rel=1e-5)
    assert len({round(float(s), 4) for s in separate}) > 1


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_logprobs_with_a_frozen_plain_head_never_computes_full_logits(tokenizer, packed, monkeypatch) -> None:
    """The chunked head (``head_cross_entropy``) scores the trained tokens; the model's own head runs
    on no position at all (the 49k-wide logits of every position are what the chunked path avoids)."""
    from tinysft.data.batching import collate

    rows = [render([{"role": "user", "content": f"Hi {n}"}, {"role": "assistant", "content": "Hello!" * n}], tokenizer)
            for n in (1, 3)]
    model = tiny_llama(len(tokenizer))
    model.requires_grad_(False)
    batch = (pack if packed else collate)(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        want = losses.sequence_logprobs(model, batch)  # before any hook: the numbers to keep
    positions, chunked = [], []
    model.lm_head.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[-2]))
    real = losses.head_cross_entropy
    monkeypatch.setattr(losses, "head_cross_entropy", lambda *a, **k: chunked.append(1) or real(*a, **k))
    with torch.no_grad():
        got = losses.sequence_logprobs(model, batch)
    assert positions == [0] and len(chunked) == len(rows)
    assert torch.equal(got, want) and got.shape == (len(rows),)


def test_the_sft_loss_with_pairs_and_a_frozen_plain_head_never_computes_full_logits(tokenizer, monkeypatch) -> None:
    rows = [{"prompt": f"How do I pick lock {n}?", "response": f"Use key {n}.", "rejected": f"Sorry {n}, no."}
            for n in (1, 22)]
    pairs = preference_pairs([to_conversation(r) for r in rows], tokenizer, 512, None)
    sft = [render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)]
    batch = append_rows(pack(sft, tokenizer.pad_token_id), [pair_row(c, r) for c, r in pairs])
    model = tiny_llama(len(tokenizer))
    model.requires_grad_(False)
    with torch.no_grad():
        want = losses.lm_and_pair_loss(model, batch)
    positions, chunked = [], []
    model.lm_head.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[-2]))
    real = losses.head_cross_entropy
    monkeypatch.setattr(losses, "head_cross_entropy", lambda *a, **k: chunked.append(1) or real(*a, **k))
    with torch.no_grad():
        got = losses.lm_and_pair_loss(model, batch)
    assert positions == [0] and chunked == [1]
    assert got[1] == want[1] and torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and float(got[2]) > 0


@pytest.mark.parametrize("chunked_head", [True, False])
def test_a_row_with_two_rejected_branches_is_one_example_the_mean_of_its_pairs(tokenizer, chunked_head,
                                                                                monkeypatch) -> None:
    """``pack`` lays out any number of branches per row; ``lm_and_pair_loss`` counts such a row
    once, as the mean of its pairs' terms (training makes one branch per row, so only this shows it)."""
    if not chunked_head:
        monkeypatch.setattr(losses, "plain_lm_head", lambda _m: None)
    row = {"prompt": "How do I pick lock 7?", "response": "Use key 7, then oil it.", "rejected": ["Sorry, no.", "Never."]}
    (chosen, first), (_, second) = preference_pairs([to_conversation(row)], tokenizer, 512, None)
    two = dataclasses.replace(pair_row(chosen, first), rejected=[*pair_row(chosen, first).rejected,
                                                                *pair_row(chosen, second).rejected])
    sft = [render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)]
    batch = append_rows(pack(sft, tokenizer.pad_token_id), [two])
    model = tiny_llama(len(tokenizer))
    model.requires_grad_(not chunked_head)
    with torch.no_grad():
        _, _, pref_sum = losses.lm_and_pair_loss(model, batch, beta=0.5)
        separate = [float(preference_loss(model, [chosen], [r], tokenizer.pad_token_id, 0.5, torch.device("cpu")))
                    for r in (first, second)]
    assert batch.n_pairs == 1 and abs(separate[0] - separate[1]) > 1e-3
    assert float(pref_sum) == pytest.approx(sum(separate) / 2, rel=1e-5)
