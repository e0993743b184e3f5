"""The first-sentence figure: every keyword within the answer's first 30 tokens (issue 34: the
tuned model states the answer first, not after a polite opener)."""

from __future__ import annotations

from conftest import user_prompt
from tinysft.evaluate import metrics
from tinysft.evaluate.compare import score_answer, scored_row, summarize
from tinysft.evaluate.summary import summary_rows, tags

LATE = ("Bonjour! What a wonderful question, and thank you so much for asking it. France is the second "
        "largest European country, famous for its food, its wine, its art and its long and rich history. "
        "Its capital is Paris.")
EARLY = "The capital of France is Paris. It is also the largest city of the country."


def test_opening_in_words_without_a_tokenizer() -> None:
    assert metrics.opening("one two three four", limit=2) == "one two"
    assert metrics.opening("short answer") == "short answer"
    assert metrics.keywords_in_opening(EARLY, ["Paris"]) is True
    assert metrics.keywords_in_opening(LATE, ["Paris"]) is False  # the 38th word: past the opening
    assert metrics.keywords_found(LATE, ["Paris"]) == [True]  # while the whole answer has it
    assert metrics.keywords_in_opening(LATE, ["Paris"], limit=40) is True
    assert metrics.keywords_in_opening("Plants use sunlight to grow.", ["light", "plants"]) is True  # the same matching


def test_opening_in_tokens_of_the_model_tokenizer(tokenizer) -> None:
    ids = tokenizer.encode(LATE, add_special_tokens=False)
    assert len(ids) > 30
    head = metrics.opening(LATE, tokenizer=tokenizer)
    assert LATE.startswith(head) and len(tokenizer.encode(head, add_special_tokens=False)) == 30
    assert metrics.opening(EARLY, tokenizer=tokenizer) == EARLY  # shorter than 30 tokens: all of it
    assert metrics.keywords_in_opening(EARLY, ["Paris"], tokenizer=tokenizer)
    assert not metrics.keywords_in_opening(LATE, ["Paris"], tokenizer=tokenizer)


def test_opening_figure_per_side(tokenizer) -> None:
    fact = user_prompt("What is the capital of France?", "factual", keywords=["Paris"])
    flags = score_answer(LATE, fact, tokenizer)
    assert flags["keywords_all"] is True and flags["keywords_in_opening"] is False
    assert "keywords after the first 30 tokens" in tags(flags)
    assert "keywords_in_opening" not in score_answer("Sure.", user_prompt("Tell me about dogs.", "general"))

    rows = [scored_row(fact, EARLY, LATE, tokenizer=tokenizer), scored_row(fact, EARLY, EARLY, tokenizer=tokenizer),
            scored_row(fact, "Lyon.", EARLY, tokenizer=tokenizer)]
    comp = summarize(rows)
    base, tuned = comp.metrics["base"], comp.metrics["tuned"]
    assert (base["keyword_in_opening"], tuned["keyword_in_opening"]) == (round(2 / 3, 4), round(2 / 3, 4))
    assert base["keyword_accuracy"] == round(2 / 3, 4) and tuned["keyword_accuracy"] == 1.0
    assert base["n_keyword_in_opening"] == 3
    row = next(r for r in summary_rows(comp) if r.key == "keyword_in_opening")
    assert row.label == "Every keyword in the first 30 tokens" and row.n == "3" and row.base.startswith("67% [")
