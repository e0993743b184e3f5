"""Edges of the loss code, pinned by mutation testing (docs/mutation.md).

tests/models/test_speed_correctness.py shows that pairs scored inside the SFT pass equal the
separate pair pass for 0 and 3 preference tokens; a one-token rejected answer at the very end of
the packed row (``train.preference_tokens=1``, a pair row packed last) is the case where the
row's last position starts a segment of its own.
"""

from __future__ import annotations

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
