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


def test_rejected_conversations_replace_the_last_answer_and_keep_the_rows_identity() -> None:
    conv = Conversation([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}], "p.jsonl:7", "prompt-response", "greeting",
                        extra={"rejected": ["Go away.", "What?"]})
    got = rejected_conversations(conv)
    assert [c.messages for c in got] == [[*conv.messages[:2], {"role": "assistant", "content": a}]
                                         for a in ("Go away.", "What?")]
    assert all((c.source, c.format, c.category) == ("p.jsonl:7", "prompt-response", "greeting") for c in got)


def test_pairs_are_rendered_with_the_runs_length_limit_and_system_prompt(tokenizer) -> None:
    conv = chat("Run kill with the process id, then check that it stopped. " * 4, rejected="I can't help. " * 6)
    rejected = rejected_conversations(conv)[0]
    full = render(conv, tokenizer, None, "Be brief.")
    limit = full.last_answer()[0] + 5
    (chosen, other), = preference_pairs([conv], tokenizer, limit, "Be brief.")
    assert chosen == render(conv, tokenizer, limit, "Be brief.") and chosen.truncated
    assert other == render(rejected, tokenizer, limit, "Be brief.") and other.truncated
    assert len(chosen.input_ids) == len(other.input_ids) == limit
    assert chosen.input_ids[: full.last_answer()[0]] == full.input_ids[: full.last_answer()[0]]


def test_one_answer_token_keeps_one_trained_token_on_each_side(tokenizer) -> None:
    conv = chat("Run kill with the process id.", rejected="I can't help with that.")
    (chosen, rejected), = preference_pairs([conv], tokenizer, 512, None, answer_tokens=1)
    full_chosen, full_rejected = preference_pairs([conv], tokenizer, 512, None)[0]
    assert sum(chosen.loss_mask) == sum(rejected.loss_mask) == 1
    assert chosen.input_ids == full_chosen.input_ids[: full_chosen.last_answer()[0] + 1]
    assert rejected.input_ids == full_rejected.input_ids[: full_rejected.last_answer()[0] + 1]


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


def test_reference_margins_are_each_pairs_margin_in_batches_and_leave_the_mode_as_it_was(tokenizer) -> None:
    """One margin per pair, in order, across the pass boundary (REFERENCE_BATCH), equal to the
    pair's own log p(chosen) - log p(rejected); a model in training mode is scored without dropout
    and handed back in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinysft.data.batching import collate
    from tinysft.losses import sequence_logprobs
    from tinysft.training.preference import REFERENCE_BATCH, reference_margins

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         attention_dropout=0.5))
    rows = [{"prompt": f"How do I pick lock {n}?", "response": f"Use key {n}." * (1 + n % 3),
             "rejected": f"Sorry {n}, no."} for n in range(REFERENCE_BATCH + 3)]
    pairs = preference_pairs([to_conversation(r) for r in rows], tokenizer, 512, None)
    model.train()
    got = reference_margins(model, pairs, tokenizer.pad_token_id, torch.device("cpu"))
    assert model.training
    model.eval()
    with torch.no_grad():
        want = [float(sequence_logprobs(model, collate([c], tokenizer.pad_token_id))[0]
                      - sequence_logprobs(model, collate([r], tokenizer.pad_token_id))[0]) for c, r in pairs]
    assert len(got) == len(pairs)
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(m, 3) for m in got}) > 3  # the pairs differ, so an order mix-up would show
