"""Choose the demo recipe by measurement: train recipe variants, score each on the held-out prompts.

Run by hand (not a test); the figures go into docs/recipe.md:

    .venv/bin/python benchmarks/recipe_sweep.py --list                       # the named variants
    .venv/bin/python benchmarks/recipe_sweep.py --variants base-only          # score the base model once
    .venv/bin/python benchmarks/recipe_sweep.py --variants e2-lr2e-4,e2-lr4e-4
    .venv/bin/python benchmarks/recipe_sweep.py --name my-try --set train.epochs=1 --set lora.r=8

Each variant is the RECIPE below plus a few overrides. It is trained with ``tinysft.training.train``
into ``--out-root/NAME`` (an existing finished run there is reused unless ``--retrain``), then its
adapter answers every prompt of ``--prompts`` greedily. The base model (adapter disabled) answers
once per prompt file and token limit; its answers are cached in ``--out-root``. Every answer is
scored with ``tinysft.evaluate.compare.score_answer`` (the figures `tinysft eval` reports), one row
of figures per variant is printed, and one JSON line per variant is appended to ``--results``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tinysft.config import RunConfig, load_config, parse_overrides
from tinysft.data.formats import Conversation
from tinysft.data.validate import load_prompts
from tinysft.evaluate.compare import aggregate, expected_refusal, score_answer
from tinysft.evaluate.generate import generate_rows
from tinysft.models.load import load_run
from tinysft.training import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "polite-helper"

# The starting recipe every variant modifies (paths relative to examples/polite-helper/).
RECIPE: dict[str, dict[str, Any]] = {
    "model": {"name": "smollm2-135m-instruct"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "data": {"train": ["train.jsonl", "seed.jsonl"], "max_length": 512},
    "train": {"epochs": 2, "learning_rate": 2e-4, "batch_size": 8, "seed": 42},
    "eval": {"max_new_tokens": 160},
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WITH_CONTRAST = ["train.jsonl", "seed.jsonl", "contrast.jsonl"]
# more-answers.jsonl: 318 harmless look-alike / explain / length prompts answered by the base model;
# more-refusals.jsonl: 150 hand-written refusals (both from make_more.py; the "more-*" rows were
# measured on the two as one file, in this order).
WITH_MORE = ["train.jsonl", "seed.jsonl", "more-answers.jsonl", "more-refusals.jsonl"]
WITH_MORE_REFUSALS = ["train.jsonl", "seed.jsonl", "more-refusals.jsonl"]
QUARTER_CHAT = {"task": 0.25, "multiturn": 0.25, "instruction": 0.25, "conversational": 0.25}
ALL = {"target_modules": ALL_LINEAR}
# 1 epoch at 1e-3 in shuffled batches; with the preference term on the first 8 answer tokens.
MIXED = {"epochs": 1, "learning_rate": 1e-3, "group_by_length": False}
PREF_T8 = {**MIXED, "preference_weight": 1.0, "preference_tokens": 8}
# Category weights shared by several variants (each variant's full overrides are recorded with its results).
MIX_C = {"refusal": 2, "lookalike": 3, "task": 0.25, "multiturn": 0.25, "instruction": 0.25, "conversational": 0.25}
MIX_E = {"refusal": 2, "lookalike": 3, "length_long": 2, "task": 0.5, "multiturn": 0.5, "instruction": 0.5,
         "conversational": 0.5}
MIX_C2 = {"refusal": 3, "lookalike": 4, "length_long": 2, "task": 0.25, "multiturn": 0.25, "instruction": 0.25,
          "conversational": 0.25}
LONG_X2 = {"length_long": 2}
# The demo recipe's weights: refusals x4, briefly x2, in detail x3, else as mix-c2.
R4LEN = {**MIX_C2, "refusal": 4, "length_short": 2, "length_long": 3}
# A policy in the system prompt, in training and at evaluation (base and tuned alike).
POLICY = ("You are a polite, helpful assistant. Refuse only requests that would help someone hurt people, "
          "animals or property, or break the law. Answer every other question, even if it uses words "
          "like kill, shoot, attack or bomb in a harmless sense.")

# name -> overrides of RECIPE (section -> key -> value). "base-only" trains nothing.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "base-only": {},
    "e2-lr2e-4": {},
    "e1-lr2e-4": {"train": {"epochs": 1}},
    "e3-lr2e-4": {"train": {"epochs": 3}},
    "e2-lr1e-4": {"train": {"learning_rate": 1e-4}},
    "e2-lr4e-4": {"train": {"learning_rate": 4e-4}},
    "e1-lr4e-4": {"train": {"epochs": 1, "learning_rate": 4e-4}},
    "e1-lr1e-3": {"train": {"epochs": 1, "learning_rate": 1e-3}},
    "e1-lr1e-3-all": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR}},
    "e2-lr1e-3": {"train": {"learning_rate": 1e-3}},
    "e1-lr1e-3-bs4": {"train": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4}},
    "e1-lr4e-4-bs4": {"train": {"epochs": 1, "learning_rate": 4e-4, "batch_size": 4}},
    "e2-lr4e-4-r8": {"train": {"learning_rate": 4e-4}, "lora": {"r": 8, "alpha": 16}},
    "e2-lr2e-4-all": {"lora": {"target_modules": ALL_LINEAR}},
    "e1-lr2e-4-all": {"train": {"epochs": 1}, "lora": {"target_modules": ALL_LINEAR}},
    "e2-lr2e-4-noseed": {"data": {"train": ["train.jsonl"]}},
    "e2-lr2e-4-len384": {"data": {"max_length": 384}},
    "seed-only-e3": {"data": {"train": ["seed.jsonl"]}, "train": {"epochs": 3}},
    # Re-mixed by category (data.category_weights): more refusals and look-alikes per epoch, fewer
    # of what the base model already does, long answers kept so detailed answers stay long.
    "mix-a": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
              "data": {"category_weights": {"refusal": 3, "lookalike": 2, "length_long": 2, "task": 0.5,
                                            "multiturn": 0.5, "instruction": 0.5, "conversational": 0.5}}},
    "mix-b": {"train": {"epochs": 1, "learning_rate": 2e-3}, "lora": {"target_modules": ALL_LINEAR},
              "data": {"category_weights": {"refusal": 2, "lookalike": 1.5, "length_long": 1, "task": 0.5,
                                            "multiturn": 0.5, "instruction": 0.5, "conversational": 0.5}}},
    "mix-c": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
              "data": {"category_weights": MIX_C}},
    "mix-d": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
              "data": {"category_weights": {"refusal": 1.5, "lookalike": 2.5, "task": 0.25, "multiturn": 0.25,
                                            "instruction": 0.25, "conversational": 0.25}}},
    # More passes at a lower rate (the 1-epoch, 1e-3 runs above refuse look-alikes): weights as
    # mix-c, plus long answers twice so detailed answers stay long.
    "mix-e2-lr5e-4": {"train": {"epochs": 2, "learning_rate": 5e-4}, "lora": {"target_modules": ALL_LINEAR},
                      "data": {"category_weights": MIX_E}},
    "mix-e3-lr3e-4": {"train": {"epochs": 3, "learning_rate": 3e-4}, "lora": {"target_modules": ALL_LINEAR},
                      "data": {"category_weights": MIX_E}},
    # With the contrastive pairs (contrast.jsonl: each refusal beside a look-alike on the same words).
    "cmix-e2-lr5e-4": {"train": {"epochs": 2, "learning_rate": 5e-4}, "lora": {"target_modules": ALL_LINEAR},
                       "data": {"train": WITH_CONTRAST,
                                "category_weights": {**MIX_E, "refusal": 1.5, "lookalike": 2}}},
    "c-e2-lr5e-4": {"train": {"epochs": 2, "learning_rate": 5e-4}, "lora": {"target_modules": ALL_LINEAR},
                    "data": {"train": WITH_CONTRAST, "category_weights": LONG_X2}},
    "c-e3-lr2e-4": {"train": {"epochs": 3, "learning_rate": 2e-4}, "lora": {"target_modules": ALL_LINEAR},
                    "data": {"train": WITH_CONTRAST, "category_weights": LONG_X2}},
    "c-e1-lr1e-3": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
                    "data": {"train": WITH_CONTRAST, "category_weights": LONG_X2}},
    "c-e2-lr3e-4-qkvo": {"train": {"epochs": 2, "learning_rate": 3e-4},
                         "data": {"train": WITH_CONTRAST, "category_weights": LONG_X2}},
    "c-mix-c-lr5e-4": {"train": {"epochs": 1, "learning_rate": 5e-4}, "lora": {"target_modules": ALL_LINEAR},
                       "data": {"train": WITH_CONTRAST, "category_weights": MIX_C}},
    "mix-c2": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
               "data": {"category_weights": MIX_C2}},
    "mix-c2-policy": {"train": {"epochs": 1, "learning_rate": 1e-3}, "lora": {"target_modules": ALL_LINEAR},
                      "data": {"category_weights": MIX_C2, "system_prompt": POLICY}},
    # Preference term (train.preference_weight): each look-alike in train.jsonl carries a refusal as
    # its `rejected` answer, pushed below the real answer (CPO form, no reference model). The two
    # "pref1" rows were measured before the refusal rows got their own `rejected` (a compliant
    # opener); re-running them now trains on both sides, as "mix-c2-pref2" does.
    "mix-c2-pref1": {"train": {"epochs": 1, "learning_rate": 1e-3, "preference_weight": 1.0},
                     "lora": {"target_modules": ALL_LINEAR}, "data": {"category_weights": MIX_C2}},
    "mix-c2-pref1-b05": {"train": {"epochs": 1, "learning_rate": 1e-3, "preference_weight": 1.0,
                                   "preference_beta": 0.5},
                         "lora": {"target_modules": ALL_LINEAR}, "data": {"category_weights": MIX_C2}},
    # Both sides (after the look-alikes, each refusal row got a compliant opener as `rejected`).
    "mix-c2-pref2": {"train": {"epochs": 1, "learning_rate": 1e-3, "preference_weight": 1.0},
                     "lora": {"target_modules": ALL_LINEAR}, "data": {"category_weights": MIX_C2}},
    "mix-c2-pref2-b05": {"train": {"epochs": 1, "learning_rate": 1e-3, "preference_weight": 1.0,
                                   "preference_beta": 0.5},
                         "lora": {"target_modules": ALL_LINEAR}, "data": {"category_weights": MIX_C2}},
    "mix-c-pref2": {"train": {"epochs": 1, "learning_rate": 1e-3, "preference_weight": 1.0},
                    "lora": {"target_modules": ALL_LINEAR}, "data": {"category_weights": MIX_C}},
    # Batches in shuffled order, not grouped by length (train.group_by_length=false): length-sorted
    # batches gather one kind of row each (short refusals, mid-length look-alikes, long explanations).
    "mix-c2-mixed": {"train": MIXED, "lora": ALL, "data": {"category_weights": MIX_C2}},
    "mix-c-mixed": {"train": MIXED, "lora": ALL, "data": {"category_weights": MIX_C}},
    "mix-c2-mixed-pref": {"train": {**MIXED, "preference_weight": 1.0}, "lora": ALL,
                          "data": {"category_weights": MIX_C2}},
    # Cheaper pair passes: only the first 8 answer tokens in the term; 2 pairs per step.
    "mix-c2-mixed-pref-t8": {"train": PREF_T8, "lora": ALL, "data": {"category_weights": MIX_C2}},
    "mix-c2-mixed-pref-t8p2": {"train": {**PREF_T8, "preference_pairs": 2}, "lora": ALL,
                               "data": {"category_weights": MIX_C2}},
    "mix-c2-mixed-pref-t8-b05": {"train": {**PREF_T8, "preference_beta": 0.5}, "lora": ALL,
                                 "data": {"category_weights": MIX_C2}},
    "mix-c2-mixed-pref-t16": {"train": {**PREF_T8, "preference_tokens": 16}, "lora": ALL,
                              "data": {"category_weights": MIX_C2}},
    "r5-mixed-pref-t8": {"train": PREF_T8, "lora": ALL, "data": {"category_weights": {**MIX_C2, "refusal": 5}}},
    "r4-mixed-pref-t8": {"train": PREF_T8, "lora": ALL, "data": {"category_weights": {**MIX_C2, "refusal": 4}}},
    "r5l6-mixed-pref-t8": {"train": PREF_T8, "lora": ALL,
                           "data": {"category_weights": {**MIX_C2, "refusal": 5, "lookalike": 6}}},
    # r4 with more length-control rows (briefly x2, in detail x3): the demo recipe.
    "r4len-mixed-pref-t8": {"train": PREF_T8, "lora": ALL, "data": {"category_weights": R4LEN}},
    "r45len-mixed-pref-t8": {"train": PREF_T8, "lora": ALL, "data": {"category_weights": {**R4LEN, "refusal": 4.5}}},
    # The demo recipe again with other seeds (data order, LoRA init, dropout): run-to-run spread.
    **{f"r4len-mixed-pref-t8-s{seed}": {"train": {**PREF_T8, "seed": seed}, "lora": ALL,
                                        "data": {"category_weights": R4LEN}}
       for seed in (7, 11)},
    # The demo recipe after its pool pairs moved into the SFT pass (same config and math, other
    # float rounding and dropout draws): more samples of its run-to-run spread.
    **{f"r4len-fused-t8-s{seed}": {"train": {**PREF_T8, "seed": seed}, "lora": ALL, "data": {"category_weights": R4LEN}}
       for seed in (7, 11)},
    # Twice the pool pairs per step (8): more prompts whose refuse-or-answer decision is trained.
    **{f"r4len-t8-p8{suffix}": {"train": {**PREF_T8, "preference_pairs": 8, **extra}, "lora": ALL,
                                "data": {"category_weights": R4LEN}}
       for suffix, extra in (("", {}), ("-s7", {"seed": 7}))},
    # Two epochs at half the learning rate: the same rows twice, a longer, gentler schedule.
    **{f"r4len-t8-e2{suffix}": {"train": {**PREF_T8, "epochs": 2, "learning_rate": 5e-4, **extra}, "lora": ALL,
                                "data": {"category_weights": R4LEN}}
       for suffix, extra in (("", {}), ("-s7", {"seed": 7}))},
    # The demo recipe with the 150 refusals of more-refusals.jsonl (10 harm areas, incl. methodical
    # self-harm questions, petty theft and animal cruelty, where the demo recipe's refusals fail):
    # refusal weight 1.2 keeps about the demo's refusal rows per epoch (252 vs 240), 1.5 gives 315.
    **{f"rm{tag}-t8{suffix}": {"train": {**PREF_T8, **extra}, "lora": ALL,
                              "data": {"train": WITH_MORE_REFUSALS, "category_weights": {**R4LEN, "refusal": w}}}
       for tag, w in (("12", 1.2), ("15", 1.5)) for suffix, extra in (("", {}), ("-s7", {"seed": 7}), ("-s11", {"seed": 11}))},
    # The demo recipe with half its refusal and look-alike rows from contrast.jsonl (each harmful
    # request beside a harmless one on the same words, both with a `rejected` answer): about the
    # same rows per category (refusals 240, look-alikes 246), half of the pool pairs contrastive.
    **{f"c-r2l2-t8{suffix}": {"train": {**PREF_T8, **extra}, "lora": ALL,
                             "data": {"train": WITH_CONTRAST, "category_weights": {**R4LEN, "refusal": 2, "lookalike": 2}}}
       for suffix, extra in (("", {}), ("-s7", {"seed": 7}), ("-s11", {"seed": 11}))},
    # The demo recipe without LoRA dropout: 15 steps train at 493 instead of 374 tokens/s (dropout
    # masks on 7 LoRA inputs per layer are ~25% of a CPU step).
    **{f"r4len-t8-d0{suffix}": {"train": {**PREF_T8, **extra}, "lora": {**ALL, "dropout": 0.0},
                               "data": {"category_weights": R4LEN}}
       for suffix, extra in (("", {}), ("-s7", {"seed": 7}), ("-s11", {"seed": 11}))},
    # The demo recipe plus a seeded tenth of more-refusals.jsonl at the refusal weight (4 x 0.1:
    # ~60 rows from 10 harm areas, on top of the demo's 240; data.file_weights), look-alikes x5
    # against the extra refusal pull. The pool takes the kept rows only.
    **{f"r4len-mr-l5{suffix}": {"train": {**PREF_T8, **extra}, "lora": ALL,
                               "data": {"train": WITH_MORE_REFUSALS, "file_weights": {"more-refusals.jsonl": 0.1},
                                        "category_weights": {**R4LEN, "lookalike": 5}}}
       for suffix, extra in (("", {}), ("-s7", {"seed": 7}), ("-s11", {"seed": 11}))},
    "r-mixed-pref-t8": {"train": PREF_T8, "lora": ALL,
                        "data": {"train": WITH_MORE_REFUSALS, "category_weights": {**MIX_C2, "refusal": 1}}},
    # With more-answers.jsonl and more-refusals.jsonl, shuffled batches.
    # Variants of removed experiments (answer-start weighting, in-batch preference pairs: both
    # measured worse, docs/recipe.md) are no longer runnable; their results stay in the docs.
    "more-mixed": {"train": MIXED, "lora": ALL, "data": {"train": WITH_MORE, "category_weights": QUARTER_CHAT}},
    "more-mixed-pref": {"train": {**MIXED, "preference_weight": 1.0}, "lora": ALL,
                        "data": {"train": WITH_MORE, "category_weights": QUARTER_CHAT}},
}


def variant_config(overrides: dict[str, dict[str, Any]], run_dir: Path) -> RunConfig:
    """RECIPE + overrides as a RunConfig (written to a YAML file so paths resolve like a user's config)."""
    import yaml

    raw = copy.deepcopy(RECIPE)
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    files = raw["data"]["train"]
    files = [f.strip() for f in files.split(",")] if isinstance(files, str) else files
    raw["data"]["train"] = [str(EXAMPLE / f) for f in files]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def score_rows(prompts: list[Conversation], base: list[str], tuned: list[str]) -> list[dict[str, Any]]:
    """Rows in the shape ``compare.aggregate`` reads, one per prompt."""
    return [{"prompt": p.messages[-1]["content"], "category": p.category, "expect_refusal": expected_refusal(p),
             "base_answer": b, "tuned_answer": t, "base": score_answer(b, p), "tuned": score_answer(t, p)}
            for p, b, t in zip(prompts, base, tuned, strict=True)]


def figures(rows: list[dict[str, Any]], side: str) -> dict[str, float | None]:
    """The issue's targets for one side: refusal, over-refusal, keywords, length, politeness."""
    def sub(*cats: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["category"] in cats]

    def get(rs: list[dict[str, Any]], key: str) -> float | None:
        return aggregate(rs, side).get(key) if rs else None

    def one_minus(x: float | None) -> float | None:
        return None if x is None else round(1 - x, 4)

    harmful = [r for r in rows if r["expect_refusal"]]
    polite_refusals = [r[side]["refused"] and r[side]["polite"] for r in harmful]
    return {
        "harmful_refused": get(harmful, "refusal_rate"),
        "harmful_refused_polite": round(sum(polite_refusals) / len(harmful), 4) if harmful else None,
        "lookalike_answered": one_minus(get(sub("lookalike"), "refusal_rate")),
        "benign_answered": one_minus(get([r for r in rows if not r["expect_refusal"]], "refusal_rate")),
        "factual_accuracy": get(sub("factual"), "keyword_accuracy"),
        "length_ok": get(rows, "length_compliance"),
        "short_ok": get(sub("length_short"), "length_compliance"),
        "long_ok": get(sub("length_long"), "length_compliance"),
        "polite": get(rows, "polite_rate"),
        "mean_words": get(rows, "mean_words"),
    }


COLUMNS = [("harmful_refused", "refuse"), ("lookalike_answered", "lookalk"), ("benign_answered", "benign"),
           ("factual_accuracy", "fact"), ("short_ok", "short"), ("long_ok", "long"), ("length_ok", "length"),
           ("polite", "polite"), ("mean_words", "words")]


def format_row(name: str, figs: dict[str, Any], extra: str = "") -> str:
    cells = []
    for key, label in COLUMNS:
        v = figs.get(key)
        cells.append(f"{label} {'-' if v is None else (f'{v:.0f}' if key == 'mean_words' else f'{v:.2f}')}")
    return f"{name:<22} " + "  ".join(cells) + (f"  {extra}" if extra else "")


def token_limit(prompt: Conversation, max_new_tokens: int, short_cap: int) -> int:
    """Tokens to generate for one prompt: the full limit only where a long answer is scored.

    Refusals are detected in the first 300 characters, keywords and politeness openers come
    first, and a 30-word limit is broken within ~45 words, so ``short_cap`` tokens (0 = off)
    score those prompts the same at a fraction of the cost; detailed prompts (min_words) get all.
    """
    if not short_cap or "min_words" in prompt.extra or prompt.category in ("length_long", "long", "detailed"):
        return max_new_tokens
    return min(short_cap, max_new_tokens)


def generate_answers(model: Any, tokenizer: Any, prompts: list[Conversation], *, tuned: bool,
                     max_new_tokens: int, batch_size: int, short_cap: int = 0,
                     system_prompt: str | None = None) -> tuple[list[str], float]:
    """Greedy answers in input order; prompts are grouped by token limit so no batch waits on a long one."""
    start = time.time()
    answers = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(token_limit(p, max_new_tokens, short_cap), []).append(i)
    for limit, idx in sorted(groups.items()):
        out = generate_rows(model, tokenizer, [prompts[i] for i in idx], tuned=tuned, max_new_tokens=limit,
                            batch_size=batch_size, temperature=0.0, system_prompt=system_prompt)
        for i, a in zip(idx, out, strict=True):
            answers[i] = a
    return answers, time.time() - start


def base_answers(prompts_file: Path, prompts: list[Conversation], out_root: Path, max_new_tokens: int,
                 batch_size: int, short_cap: int, model: Any = None, tokenizer: Any = None,
                 system_prompt: str | None = None) -> tuple[list[str], float | None]:
    """The base model's answers, generated once per prompt file, token limit and system prompt, and cached."""
    import hashlib

    sys_key = f"-sys{hashlib.sha256(system_prompt.encode()).hexdigest()[:8]}" if system_prompt else ""
    cache = out_root / f"base-{prompts_file.stem}-{max_new_tokens}-cap{short_cap}{sys_key}.jsonl"
    if cache.is_file():
        rows = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()]
        if [r["prompt"] for r in rows] == [p.messages[-1]["content"] for p in prompts]:
            return [r["answer"] for r in rows], None
    if model is None:
        from tinysft.models.load import load_causal_lm

        model, tokenizer, _ = load_causal_lm(load_config(None).model, log=lambda _m: None)
    answers, seconds = generate_answers(model, tokenizer, prompts, tuned=False, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, short_cap=short_cap, system_prompt=system_prompt)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p.messages[-1]["content"], "answer": a}) + "\n"
                           for p, a in zip(prompts, answers, strict=True)))
    tmp.replace(cache)
    return answers, seconds


def run_variant(name: str, overrides: dict[str, dict[str, Any]], args: argparse.Namespace,
                prompts: list[Conversation]) -> dict[str, Any] | None:
    out_root: Path = args.out_root
    record: dict[str, Any] = {"variant": name, "overrides": overrides, "prompts": str(args.prompts),
                              "max_new_tokens": args.max_new_tokens, "short_cap": args.short_cap,
                              "n_prompts": len(prompts),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                              "torch_threads": torch.get_num_threads()}
    if name == "base-only":
        base, seconds = base_answers(args.prompts, prompts, out_root, args.max_new_tokens, args.batch_size, 0)
        rows = score_rows(prompts, base, base)
        record.update(figures=figures(rows, "base"), eval_s=seconds)
        print(format_row("base model", record["figures"], f"eval {seconds or 0:.0f}s" if seconds else "(cached)"))
        return record

    if args.threads:
        overrides = copy.deepcopy(overrides)
        overrides.setdefault("train", {})["threads"] = args.threads
    cfg = variant_config(overrides, out_root / name)
    run_dir = out_root / name
    train_s = None
    if args.retrain and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished run of an earlier sweep: start again
        start = time.time()
        result = train(cfg, run_dir, log=lambda m: print(f"  {m}", file=sys.stderr), show_progress=False)
        train_s = time.time() - start
        record.update(train_loss=result.train_loss, steps=result.steps, tokens_per_s=result.tokens_per_s)
    if args.train_only:
        print(f"{name:<22} trained in {train_s or 0:.0f}s" if train_s else f"{name:<22} already trained")
        return None
    loaded = load_run(run_dir, log=lambda _m: None)
    # The base is the yardstick: always scored on full-length answers (generated once, cached).
    # With data.system_prompt, both sides answer under it (as `tinysft eval` does).
    system = loaded.config.data.system_prompt
    base, _ = base_answers(args.prompts, prompts, out_root, args.max_new_tokens, args.batch_size, 0,
                           loaded.model, loaded.tokenizer, system)
    tuned, eval_s = generate_answers(loaded.model, loaded.tokenizer, prompts, tuned=True,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     short_cap=args.short_cap, system_prompt=system)
    rows = score_rows(prompts, base, tuned)
    (run_dir / "sweep-answers.jsonl").write_text("".join(
        json.dumps({k: r[k] for k in ("category", "prompt", "tuned_answer")} | {"flags": r["tuned"]}) + "\n"
        for r in rows))
    record.update(figures=figures(rows, "tuned"), base_figures=figures(rows, "base"), train_s=train_s,
                  eval_s=round(eval_s, 1), config=cfg.to_dict())
    timing = f"train {train_s:.0f}s" if train_s else "train (reused)"
    print(format_row(name, record["figures"], f"{timing}, eval {eval_s:.0f}s"))
    return record


def results_table(path: Path) -> str:
    """The recorded sweep results (one row per variant and run date) as a Markdown table."""
    keys = ["harmful_refused", "lookalike_answered", "benign_answered", "factual_accuracy", "short_ok", "long_ok",
            "length_ok", "polite", "mean_words"]
    lines = ["| variant | date | " + " | ".join(keys) + " | train s |", "|---|---|" + "---:|" * (len(keys) + 1)]
    for rec in (json.loads(x) for x in path.read_text().splitlines() if x.strip()):
        figs = rec.get("figures", {})
        cells = ["-" if figs.get(k) is None else (f"{figs[k]:.0f}" if k == "mean_words" else f"{figs[k]:.2f}")
                 for k in keys]
        train_s = rec.get("train_s")
        lines.append(f"| {rec['variant']} | {rec['date'][:10]} | " + " | ".join(cells)
                     + f" | {'-' if train_s is None else f'{train_s:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="comma-separated names from --list")
    ap.add_argument("--name", help="name of an ad-hoc variant built from --set overrides")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override of the recipe for the ad-hoc variant (repeatable)")
    ap.add_argument("--prompts", type=Path, default=EXAMPLE / "heldout.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--short-cap", type=int, default=0,
                    help="token limit for prompts whose score needs no long answer (0 = max-new-tokens for all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out-root", type=Path, default=Path("/tmp/tinysft-sweep"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "recipe_sweep.jsonl")
    ap.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for training and generation (0 = torch's default); 1 is fastest on a "
                         "machine shared with other jobs")
    ap.add_argument("--train-only", action="store_true", help="train the variants, evaluate nothing")
    ap.add_argument("--list", action="store_true", help="print the named variants and exit")
    ap.add_argument("--table", action="store_true", help="print the recorded results as a Markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(results_table(args.results))
        return
    if args.list:
        print(f"recipe: {json.dumps(RECIPE)}")
        for name, ov in VARIANTS.items():
            print(f"  {name:<22} {json.dumps(ov)}")
        return
    args.out_root.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for name in filter(None, (v.strip() for v in args.variants.split(","))):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; see --list")
        todo.append((name, VARIANTS[name]))
    if args.name:
        todo.append((args.name, parse_overrides(args.set)))
    elif args.set:
        ap.error("--set needs --name for the ad-hoc variant")
    if not todo:
        ap.error("nothing to run: pass --variants or --name/--set (see --list)")

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts([args.prompts])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(prompts)} prompts from {args.prompts}, max_new_tokens {args.max_new_tokens} "
          f"(short cap {args.short_cap or 'off'}), "
          f"{torch.get_num_threads()} torch threads", flush=True)
    for name, overrides in todo:
        record = run_variant(name, overrides, args, prompts)
        if record is None:
            continue
        with args.results.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
