"""Batched generation (left padding, KV cache, per-row stop) gives the same greedy answers as one
prompt at a time, in the input order."""

from __future__ import annotations

import pytest

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon who learned to bake bread in the mountains."}],
    [{"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Why is the sky blue? Explain it to a child."}],
]


def test_batched_equals_one_at_a_time(lively_model, tokenizer) -> None:
    from tinysft.evaluate.generate import generate

    done: list[int] = []
    batched = generate(lively_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, on_batch=done.append)
    single = [generate(lively_model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(single)) > 2 and all(single), "the answers must differ, or the comparison proves little"
    assert done == [4, 1]


def test_each_row_stops_at_its_own_end_token(lively_model, tokenizer) -> None:
    """One row ends early (its end-of-turn token is forced after a trigger token) while the others
    run on: its answer must hold nothing generated after the end, batched as when alone."""
    import torch
    from transformers import LlamaForCausalLM

    from tinysft.data.render import render_prompt
    from tinysft.evaluate.generate import generate

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([render_prompt(PROMPTS[0], tokenizer)])
    first = lively_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    trigger = int(first[0, -1])  # PROMPTS[0]'s third greedy token

    class StopAfterTrigger(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            last = kwargs["input_ids"][:, -1]  # (B,): the token just fed in
            out.logits[:, -1, stop] += 1e4 * (last == trigger).to(out.logits.dtype)
            return out

    model = StopAfterTrigger(lively_model.config).eval()
    model.load_state_dict(lively_model.state_dict())
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in batched]
    assert lengths[0] <= 3 < max(lengths), lengths


@pytest.mark.integration
def test_batched_equals_one_at_a_time_on_the_embedded_model(embedded_dir) -> None:
    import json

    from conftest import EXAMPLES
    from tinysft.config import ModelConfig
    from tinysft.evaluate.generate import generate
    from tinysft.models.load import load_causal_lm

    model, tok, _ = load_causal_lm(ModelConfig(name=str(embedded_dir), dtype="float32"), log=lambda m: None)
    rows = [json.loads(x) for x in (EXAMPLES / "polite-helper" / "prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    # fp32: identical greedy answers are a property of exact arithmetic; in bf16 a padded batch
    # rounds differently from a single row and a near-tie can flip.
    batched = generate(model, tok, prompts, max_new_tokens=24, batch_size=len(prompts))
    single = generate(model, tok, prompts, max_new_tokens=24, batch_size=1)
    assert batched == single
    assert any("Tokyo" in a for a in batched), batched  # a real answer, not padding noise


def test_per_row_answer_caps(lively_model, tokenizer) -> None:
    """One cap per prompt: each row stops at its own cap, and a row's answer is the one it gets
    alone with that cap (a short row leaves the batch early, the others run on)."""
    from tinysft.evaluate.generate import generate

    caps = [3, 12, 5, 12, 1]
    mixed = generate(lively_model, tokenizer, PROMPTS, max_new_tokens=caps, batch_size=3)
    alone = [generate(lively_model, tokenizer, [p], max_new_tokens=n, batch_size=1)[0] for p, n in zip(PROMPTS, caps, strict=True)]
    assert mixed == alone
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in mixed]
    assert all(n <= cap + 1 for n, cap in zip(lengths, caps, strict=True)), lengths  # +1: re-tokenizing the text may split differently
    assert lengths[1] > caps[0] + 1, "the long rows must run past the short ones' caps"
    with pytest.raises(ValueError, match="2 answer limits for 5 prompts"):
        generate(lively_model, tokenizer, PROMPTS, max_new_tokens=[1, 2])


def test_answer_limits_from_the_rows() -> None:
    from tinysft.data.formats import Conversation
    from tinysft.data.validate import DataError
    from tinysft.evaluate.compare import answer_limits

    def row(line: int, **extra) -> Conversation:
        return Conversation([{"role": "user", "content": "x"}], f"p.jsonl:{line}", "prompt", None, extra)

    assert answer_limits([row(1), row(2, max_new_tokens=64), row(3, max_new_tokens=500)], 160) == [160, 64, 160]
    with pytest.raises(DataError) as err:
        answer_limits([row(1, max_new_tokens=0), row(2, max_new_tokens="64"), row(3, max_new_tokens=True)], 160)
    text = str(err.value)
    assert "p.jsonl" in text and "max_new_tokens" in text and text.count("must be a whole number") == 3


def test_compare_answers_each_row_within_its_cap(lively_model, tokenizer) -> None:
    """compare() hands each row's own cap to both sides; rows without one get the run's."""
    from tinysft.data.formats import Conversation
    from tinysft.evaluate.compare import compare
    from tinysft.evaluate.generate import generate

    rows = [Conversation(p, f"p.jsonl:{i}", "prompt", None, {"max_new_tokens": 2} if i % 2 == 0 else {})
            for i, p in enumerate(PROMPTS, 1)]
    comp = compare(lively_model, tokenizer, rows, max_new_tokens=10, batch_size=3)
    want = generate(lively_model, tokenizer, PROMPTS, max_new_tokens=[10, 2, 10, 2, 10])
    assert [r["tuned_answer"] for r in comp.rows] == want  # no adapter here: base and tuned agree
    assert [r["base_answer"] for r in comp.rows] == want
    assert [r.get("max_new_tokens") for r in comp.rows] == [None, 2, None, 2, None]  # the row's field is reported
    assert want[1] != generate(lively_model, tokenizer, [PROMPTS[1]], max_new_tokens=10)[0]
