"""The preference pairs' plumbing, pinned by mutation testing (docs/mutation.md): which answers are
rejected, what a shortened answer keeps, when a pair cannot share its prompt, and the layout of
the separate pair pass. The numbers themselves are checked in tests/models/test_speed_correctness.py
(in-pass pairs equal the separate pass) and tests/training/test_train.py (the term moves the margin).
"""

from __future__ import annotations

import pytest
import torch

from tinysft.data.formats import Conversation, to_conversation
from tinysft.data.render import Rendered, RenderError, render
from tinysft.training.preference import (
    answer_prefix,
    pair_row,
    preference_loss,
    preference_pairs,
    rejected_answers,
    rejected_conversations,
)


def chat(answer: str, user: str = "How do I kill a stuck process?", **extra) -> Conversation:
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "p.jsonl:4",
                        extra=extra)


def test_rejected_answers_are_none_one_or_a_list() -> None:
    assert rejected_answers(chat("Run kill.")) == []
    assert rejected_answers(chat("Run kill.", rejected=None)) == []
    assert rejected_answers(chat("Run kill.", rejected="No.")) == ["No."]
    assert rejected_answers(chat("Run kill.", rejected=["No.", "Never."])) == ["No.", "Never."]
    assert rejected_conversations(chat("Run kill.")) == []


def test_answer_prefix_keeps_the_rows_source_and_truncation_flag() -> None:
    row = Rendered([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 0, 1, 1, 1], "p.jsonl:9", True)
    short = answer_prefix(row, 2)
    assert (short.input_ids, short.loss_mask) == ([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1])
    assert short.source == "p.jsonl:9" and short.truncated is True
    assert answer_prefix(row, 10).loss_mask == [0, 0, 0, 0, 1, 1, 1]  # shorter than asked: all of it
    untrained = Rendered([1, 2], [0, 0], "p.jsonl:1")
    assert answer_prefix(untrained, 1) is untrained


def test_a_pair_whose_prompts_render_differently_is_refused(tokenizer) -> None:
    chosen = render(chat("Run kill."), tokenizer, 512)
    # Same token count before the answer, different tokens: the pair cannot share the prompt.
    other = render(chat("Wait.", user="How do I kill a stuck thread?"), tokenizer, 512)
    assert chosen.last_answer()[0] == other.last_answer()[0]
    assert other.input_ids[: other.last_answer()[0]] != chosen.input_ids[: chosen.last_answer()[0]]
    with pytest.raises(RenderError) as e:
        pair_row(chosen, other)
    assert str(e.value) == ("p.jsonl:4: a `rejected` answer's prompt renders differently from the answer's, so the "
                            "two cannot share it; check the row's messages.")
    longer = render(chat("Wait.", user="How do I kill a stuck process, please?"), tokenizer, 512)
    with pytest.raises(RenderError, match="renders differently"):
        pair_row(chosen, longer)
    same = render(chat("Wait a day."), tokenizer, 512)
    row = pair_row(chosen, same)
    start, end = same.last_answer()
    assert row.rejected == [same.input_ids[start:end]] and row.pair_only
    assert row.pair_tokens == chosen.last_answer()[1] - chosen.last_answer()[0]


class Recorder(torch.nn.Module):
    """The model, recording the shape of every batch it is given."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, **kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        return self.inner(**kwargs)


def test_the_separate_pair_pass_pads_unless_asked_to_pack(tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = Recorder(LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1)).eval())
    rows = [{"prompt": f"How do I pick lock {n}?", "response": f"Use key {n}.", "rejected": f"Sorry {n}, no."}
            for n in (1, 22)]
    pairs = preference_pairs([to_conversation(r) for r in rows], tokenizer, 512, None)
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    longest = max(len(r.input_ids) for r in [*chosen, *rejected])
    total = sum(len(r.input_ids) for r in [*chosen, *rejected])
    with torch.no_grad():
        padded = preference_loss(model, chosen, rejected, tokenizer.pad_token_id, 0.1, torch.device("cpu"))
        packed = preference_loss(model, chosen, rejected, tokenizer.pad_token_id, 0.1, torch.device("cpu"), packing=True)
    assert model.shapes == [(4, longest), (1, total)]
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)
