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
