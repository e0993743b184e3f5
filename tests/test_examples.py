"""The shipped polite-helper data: every training file loads, and none shares wording with the held-out set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import EXAMPLES
from tinysft.data.validate import load_conversations, load_prompts
from tinysft.evaluate.metrics import is_polite, is_refusal

HELPER = EXAMPLES / "polite-helper"
TRAIN_FILES = ["train.jsonl", "seed.jsonl", "contrast.jsonl", "more-answers.jsonl", "more-refusals.jsonl",
               "taxonomy.jsonl", "taxonomy-more.jsonl", "onpolicy.jsonl"]
HELDOUT_FILES = ["heldout.jsonl", "heldout-taxonomy.jsonl"]
# The MLCommons AILuminate v1.0 hazard areas (docs/recipe.md), specialized advice split in two.
HAZARDS = {"violent_crimes", "non_violent_crimes", "sex_related_crimes", "child_sexual_exploitation",
           "suicide_self_harm", "indiscriminate_weapons", "hate", "privacy", "intellectual_property", "defamation",
           "elections", "specialized_advice", "sexual_content"}
ANSWER_ONLY = {"specialized_advice"}  # "answer carefully": look-alikes only
COMPLIANT_OPENERS = ("sure", "happy to help", "of course", "certainly", "great question", "glad you asked",
                     "absolutely", "here's", "here is")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _near(a: str, b: str) -> bool:
    """Near-duplicate prompts: most of their words in common (stock openings alone are not)."""
    wa, wb = set(_words(a)), set(_words(b))
    return len(wa & wb) / max(len(wa | wb), 1) >= 0.7


@pytest.mark.parametrize("name", TRAIN_FILES)
def test_training_file_loads_and_is_disjoint_from_heldout(name: str) -> None:
    """No training prompt repeats 6 words in a row of a held-out prompt or most of its words.

    Measured, longest run of words a training prompt shares with a held-out one: train.jsonl 5 (13
    prompts, all stock openings such as "what's the best way to"), the other files 4; most words in
    common (Jaccard) at most 0.60 against the 0.7 of `_near`. Three train.jsonl look-alikes shared 6
    ("what's the best way to kill", "how can i break into the") and were reworded. (The newer
    more-* files were written against a 5-word rule with heldout.jsonl, checked below.) The held-out
    prompts are heldout.jsonl's and heldout-taxonomy.jsonl's (taxonomy.jsonl and heldout-taxonomy.jsonl
    were written together: within an area, a topic is either trained or held out, never both)."""
    convs = load_conversations([HELPER / name])  # a DataError names file, line and field
    assert convs and all(c.category for c in convs)
    heldout = [p.messages[-1]["content"] for p in load_prompts([HELPER / f for f in HELDOUT_FILES])]
    held_grams = set().union(*(_grams(h, 6) for h in heldout))
    users = [m["content"] for c in convs for m in c.messages if m["role"] == "user"]
    shared = [u for u in users if _grams(u, 6) & held_grams or any(_near(u, h) for h in heldout)]
    assert not shared, shared[:5]
    if name.startswith("more-"):
        five = set().union(*(_grams(p.messages[-1]["content"], 5) for p in load_prompts([HELPER / "heldout.jsonl"])))
        assert not [u for u in users if _grams(u, 5) & five]


def test_more_prompts_match_the_generated_files() -> None:
    """make_more.py's inputs and outputs agree: every harmful request is in more-refusals.jsonl,
    every kept harmless prompt comes from more-prompts.jsonl."""
    source = [json.loads(x) for x in (HELPER / "more-prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = {r["prompt"] for r in source if "prompt" in r}
    requests = [r["messages"][0]["content"] for r in source if "messages" in r]
    refusals = [c.messages[0]["content"] for c in load_conversations([HELPER / "more-refusals.jsonl"])]
    answers = load_conversations([HELPER / "more-answers.jsonl"])
    assert refusals == requests
    assert {c.messages[0]["content"] for c in answers} <= prompts and len(answers) >= 0.95 * len(prompts)
    assert all("rejected" in c.extra for c in answers)


def _held(name: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in (HELPER / name).read_text().splitlines() if x.strip()]


def test_heldout_files_share_no_wording_with_each_other() -> None:
    """The two held-out files are separate samples: no 6-word run or near duplicate across them."""
    first = [r["prompt"] for r in _held("heldout.jsonl")]
    second = [r["prompt"] for r in _held("heldout-taxonomy.jsonl")]
    grams = set().union(*(_grams(p, 6) for p in first))
    assert not [p for p in second if _grams(p, 6) & grams or any(_near(p, q) for q in first)]
    assert len(set(second)) == len(second)


def test_taxonomy_heldout_covers_every_hazard_area() -> None:
    """heldout-taxonomy.jsonl: at least 5 harmful prompts (expect refuse) and 3 look-alikes (expect answer)
    in every hazard area (look-alikes only where the taxonomy says "answer carefully"), none elsewhere;
    heldout.jsonl's harmful prompts are mapped onto the same areas (`hazard`)."""
    rows = _held("heldout-taxonomy.jsonl")
    assert {r["harm_area"] for r in rows} == HAZARDS
    for area in HAZARDS:
        harmful = [r for r in rows if r["harm_area"] == area and r["category"] == "harmful"]
        looks = [r for r in rows if r["harm_area"] == area and r["category"] == "lookalike"]
        assert all(r["expect"] == "refuse" for r in harmful) and all(r["expect"] == "answer" for r in looks)
        assert len(looks) >= 3, area
        assert len(harmful) >= (0 if area in ANSWER_ONLY else 5), area
    assert {r["category"] for r in rows} == {"harmful", "lookalike"}
    old = [r for r in _held("heldout.jsonl") if r["category"] == "harmful"]
    assert old and all(r.get("hazard") in HAZARDS for r in old)


def test_taxonomy_training_rows_refuse_first_and_cover_every_area() -> None:
    """taxonomy.jsonl: every hazard area has refusals (except answer-only ones) and look-alikes; every
    refusal is detected as one, is polite and states the refusal in its first sentence (no compliant
    opener before it); every look-alike answer is polite and not a refusal; both sides carry `rejected`."""
    convs = load_conversations([HELPER / "taxonomy.jsonl"])
    for area in HAZARDS:
        cats = [c.category for c in convs if c.extra.get("harm_area") == area]
        assert "lookalike" in cats and ("refusal" in cats or area in ANSWER_ONLY), area
    more = load_conversations([HELPER / "taxonomy-more.jsonl"])
    assert more and {c.extra.get("harm_area") for c in more} <= HAZARDS
    for c in convs + more:
        answer = c.messages[-1]["content"]
        first = re.split(r"(?<=[.!?])\s", answer, maxsplit=1)[0]
        assert is_polite(answer) and c.extra.get("rejected"), answer
        if c.category == "refusal":
            assert is_refusal(first) and not first.lower().startswith(COMPLIANT_OPENERS), first
        else:
            assert not is_refusal(answer), answer


def test_taxonomy_jsonl_matches_its_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """taxonomy.jsonl and taxonomy-more.jsonl are exactly what make_taxonomy.py writes from taxonomy_rows.py
    and taxonomy_more_rows.py (no hand edits)."""
    monkeypatch.syspath_prepend(str(HELPER))
    import make_taxonomy

    written = [json.loads(x) for x in (HELPER / "taxonomy.jsonl").read_text().splitlines() if x.strip()]
    assert written == make_taxonomy.rows()
    more = [json.loads(x) for x in (HELPER / "taxonomy-more.jsonl").read_text().splitlines() if x.strip()]
    assert more == make_taxonomy.rows(make_taxonomy.MORE_AREAS)


def test_factual_answers_state_the_answer_right_after_a_short_opener() -> None:
    """Factual training answers (train.jsonl, seed.jsonl) open with at most a 3-word polite phrase, and
    the sentence after it carries the answer (issue 34: an opener must not crowd the answer out of the
    first tokens). Checked as: the second sentence shares a content word with the question."""
    convs = load_conversations([HELPER / "train.jsonl", HELPER / "seed.jsonl"])
    stop = {"what", "which", "who", "how", "many", "is", "the", "a", "an", "of", "in", "does", "do", "are", "did",
            "when", "please", "could", "you", "me", "tell", "explain", "would", "kindly", "for", "to", "my", "can"}
    rows = [c for c in convs if c.category == "factual"]
    assert len(rows) >= 50
    for c in rows:
        opener, rest = re.split(r"(?<=[!])\s", c.messages[-1]["content"], maxsplit=1)
        assert len(opener.split()) <= 3, opener
        asked = set(_words(c.messages[0]["content"])) - stop
        assert asked & set(_words(rest.split(". ")[0])), (c.messages[0]["content"], rest)


def test_demo_recipe_trains_on_the_taxonomy_and_no_heldout_file() -> None:
    """config.yaml (the `make demo` recipe) trains on taxonomy.jsonl, and only on files the disjointness
    test above checks; no held-out file is among them."""
    from tinysft.config import load_config

    cfg = load_config(HELPER / "config.yaml")
    names = [Path(f).name for f in cfg.data.train]
    assert "taxonomy.jsonl" in names
    assert set(names) <= set(TRAIN_FILES) and not set(names) & set(HELDOUT_FILES)
    assert cfg.data.category_weights["refusal"] > 0 and cfg.data.category_weights["lookalike"] > 0
