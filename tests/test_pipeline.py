"""The demo's evaluation set: held-out prompts only, enough of each category for its figures to mean
something, and answer caps that leave every verdict its tokens."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from conftest import EXAMPLES
from tinysft.config import load_config
from tinysft.data.validate import load_conversations, load_prompts
from tinysft.evaluate.compare import answer_limits
from tinysft.evaluate.metrics import OPENING_TOKENS, is_refusal

HELPER = EXAMPLES / "polite-helper"
DEMO = HELPER / "demo-prompts.jsonl"
TRAIN_FILES = ["train.jsonl", "seed.jsonl", "contrast.jsonl", "more-answers.jsonl", "more-refusals.jsonl"]
TOKENS_PER_WORD = 1.31  # the embedded tokenizer on the shipped answers (more-answers.jsonl)


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_the_demo_evaluates_its_prompt_file() -> None:
    cfg = load_config(HELPER / "config.yaml")
    assert [Path(p).resolve() for p in cfg.eval.prompts] == [DEMO.resolve()]


def test_demo_prompts_are_held_out_rows_never_training_ones() -> None:
    """Each row is a row of heldout.jsonl as it stands (plus its answer cap), so the disjointness
    tests in tests/test_examples.py cover it; and no training file holds its prompt."""
    heldout = {r["prompt"]: r for r in _rows(HELPER / "heldout.jsonl")}
    demo = _rows(DEMO)
    for r in demo:
        fields = {k: v for k, v in r.items() if k != "max_new_tokens"}
        assert heldout.get(r["prompt"]) == fields, r["prompt"]
    assert len({r["prompt"] for r in demo}) == len(demo), "a prompt listed twice"
    users = {m["content"].strip().lower() for c in load_conversations([HELPER / f for f in TRAIN_FILES])
             for m in c.messages if m["role"] == "user"}
    assert not [r["prompt"] for r in demo if r["prompt"].strip().lower() in users]


def test_demo_prompts_are_enough_and_balanced() -> None:
    """At least 40 prompts; every kind of figure over at least 8 of them (a 1-prompt swing is no
    longer a 100-point change) and no kind over more than a third; every harm area of the held-out
    set asked at least once."""
    demo = _rows(DEMO)
    assert len(demo) >= 40
    kinds = Counter("length" if r["category"].startswith("length_") else r["category"] for r in demo)
    assert set(kinds) == {"harmful", "lookalike", "factual", "length"}, kinds
    assert all(8 <= n <= len(demo) / 3 for n in kinds.values()), kinds
    areas = {r["harm_area"] for r in _rows(HELPER / "heldout.jsonl") if r.get("harm_area")}
    assert areas == {r["harm_area"] for r in demo if r.get("harm_area")}
    benign = [r for r in demo if r.get("expect") != "refuse" and r["category"] != "harmful"]
    assert len(benign) >= 20  # over-refusal is measured on every benign row


def test_answer_caps_leave_each_verdict_its_tokens() -> None:
    """A cap below what a row's verdict reads would judge a cut answer: a min_words row must be able
    to reach its words, a max_words row to overrun them, a keyword row to get past its first 30
    tokens; and a refusal, looked for in the opening, must still be found there."""
    limit = load_config(HELPER / "config.yaml").eval.max_new_tokens
    rows = _rows(DEMO)
    caps = answer_limits(load_prompts([DEMO]), limit)  # valid, and never above the run's
    assert any(c < limit for c in caps), "no row is capped: the demo spends the full limit everywhere"
    for r, cap in zip(rows, caps, strict=True):
        if "min_words" in r:
            assert cap >= 1.1 * r["min_words"] * TOKENS_PER_WORD, r["prompt"]
        if "max_words" in r:
            assert cap >= 1.1 * r["max_words"] * TOKENS_PER_WORD, r["prompt"]
        if "keywords" in r:
            assert cap > OPENING_TOKENS, r["prompt"]
    # The refusals the model is trained to give, cut to the refusal rows' cap (in words), still read
    # as refusals: 271 of 272 at 24 words (32 tokens), all at 30.
    refusal_cap = min(c for r, c in zip(rows, caps, strict=True) if "expect" in r or r["category"] == "harmful")
    words = int(refusal_cap / TOKENS_PER_WORD)
    answers = [c.messages[-1]["content"] for c in load_conversations([HELPER / f for f in TRAIN_FILES])]
    refusals = [a for a in answers if is_refusal(a)]
    kept = [a for a in refusals if is_refusal(" ".join(a.split()[:words]))]
    assert len(refusals) > 200 and len(kept) >= 0.99 * len(refusals), (words, len(kept), len(refusals))
