"""The shipped polite-helper data: every training file loads, and none shares wording with the held-out set."""

from __future__ import annotations

import json
import re

import pytest

from conftest import EXAMPLES
from tinysft.data.validate import load_conversations, load_prompts

HELPER = EXAMPLES / "polite-helper"
TRAIN_FILES = ["train.jsonl", "seed.jsonl", "contrast.jsonl", "more-answers.jsonl", "more-refusals.jsonl"]


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
    more-* files were written against a 5-word rule, checked below.)"""
    convs = load_conversations([HELPER / name])  # a DataError names file, line and field
    assert convs and all(c.category for c in convs)
    heldout = [p.messages[-1]["content"] for p in load_prompts([HELPER / "heldout.jsonl"])]
    held_grams = set().union(*(_grams(h, 6) for h in heldout))
    users = [m["content"] for c in convs for m in c.messages if m["role"] == "user"]
    shared = [u for u in users if _grams(u, 6) & held_grams or any(_near(u, h) for h in heldout)]
    assert not shared, shared[:5]
    if name.startswith("more-"):
        five = set().union(*(_grams(h, 5) for h in heldout))
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
