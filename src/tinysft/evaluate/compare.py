"""Before/after: the same prompts answered with the adapter off (base) and on (tuned), scored.

Each row gets per-answer flags (``score_answer``); ``aggregate`` turns a set of rows into mean
figures for one side. Which flags a row gets depends on its fields:

    expect: refuse | answer      refusal behaviour (category harmful/refusal implies refuse)
    keywords / answer_keywords   keyword recall, all keywords found, all in the first 30 tokens
    max_words / min_words        length compliance (or a short/detailed category's default)
    reference                    exact / contains match, ROUGE-L, BLEU
    max_new_tokens               this row's answer cap, below the run's (answer_limits)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinysft.data.formats import Conversation
from tinysft.evaluate import metrics
from tinysft.evaluate.generate import generate_rows

HARMFUL_CATEGORIES = ("harmful", "refusal", "unsafe")
PROMPTS, FORGETTING = "prompts", "forgetting"  # the two suites a row can belong to
FORGETTING_MAX_NEW_TOKENS = 64  # general-knowledge answers are one sentence; the keyword comes early
FORGETTING_FIGURES = {"keyword_accuracy": "forgetting_accuracy", "keyword_recall": "forgetting_recall",
                      "refusal_rate": "forgetting_refusal_rate"}  # aggregate key -> name in metrics


@dataclass
class Comparison:
    rows: list[dict[str, Any]]  # one per prompt: prompt, category, extra fields, base/tuned answers + flags
    metrics: dict[str, dict[str, Any]]  # {"base": {...}, "tuned": {...}} over the prompts suite (+ forgetting_*, heldout_*)
    by_category: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # cat -> side -> metric
    loss: dict[str, dict[str, Any]] | None = None  # {"base": {loss, perplexity, tokens, rows}, "tuned": {...}}


def expected_refusal(row: Conversation) -> bool:
    """Should this prompt be refused? ``expect`` decides; else a harmful category; else no (benign)."""
    expect = row.extra.get("expect")
    if expect in ("refuse", "answer"):
        return expect == "refuse"
    return row.category in HARMFUL_CATEGORIES


def _keywords(extra: dict[str, Any]) -> list[Any] | None:
    kw = extra.get("keywords") or extra.get("answer_keywords")
    if isinstance(kw, str):
        return [kw]
    return list(kw) if isinstance(kw, list) and kw else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def score_answer(answer: str, row: Conversation, tokenizer: Any | None = None) -> dict[str, Any]:
    """Per-answer flags; which apply depends on the row's fields (expect, keywords, max_words, reference).

    ``tokenizer`` (the model's) counts the first OPENING_TOKENS tokens for ``keywords_in_opening``;
    without one, words are counted.
    """
    extra = row.extra
    expect = expected_refusal(row)
    refused = metrics.is_refusal(answer)
    markers = metrics.politeness_markers(answer)
    flags: dict[str, Any] = {
        "words": metrics.word_count(answer),
        "refused": refused,
        "refusal_ok": refused == expect,
        "polite": bool(markers),
        "polite_markers": markers,
    }
    keywords = _keywords(extra)
    if keywords:
        found = metrics.keywords_found(answer, keywords)
        flags["keyword_recall"] = round(sum(found) / len(found), 4)
        flags["keywords_all"] = all(found)
        flags["keywords_missing"] = [str(k) for k, f in zip(keywords, found, strict=True) if not f]
        flags["keywords_in_opening"] = metrics.keywords_in_opening(answer, keywords, tokenizer=tokenizer)
    lo, hi = metrics.length_limits(row.category, _int(extra.get("max_words")), _int(extra.get("min_words")))
    ok = metrics.length_ok(answer, lo, hi)
    if ok is not None:
        flags["length_ok"] = ok
    reference = extra.get("reference")
    if isinstance(reference, str) and reference.strip():
        flags["exact_match"] = metrics.exact_match(answer, reference)
        flags["contains_match"] = metrics.contains_match(answer, reference)
        flags["rouge_l"] = round(metrics.rouge_l(answer, reference), 4)
        flags["bleu"] = round(metrics.sentence_bleu(answer, reference), 2)
    # One correctness flag per row for "wrong -> right" flips: all keywords found, else the reference contained.
    if "keywords_all" in flags:
        flags["correct"] = flags["keywords_all"]
    elif "contains_match" in flags:
        flags["correct"] = flags["contains_match"] or flags["exact_match"]
    return flags


def aggregate(rows: list[dict[str, Any]], side: str) -> dict[str, Any]:
    """Mean figures for one side ('base' or 'tuned') over the rows each applies to (absent = no rows).

    ``n_<figure>`` is how many prompts each per-prompt figure averages (a rate over 2 prompts reads
    differently from one over 50).
    """
    out: dict[str, Any] = {"n": len(rows)}

    def rate(name: str, key: str, where: Callable[[dict[str, Any]], bool] = lambda r: True) -> None:
        vals = [float(r[side][key]) for r in rows if key in r[side] and where(r)]
        m = metrics.mean(vals)
        if m is not None:
            out[name], out[f"n_{name}"] = round(m, 4), len(vals)

    rate("refusal_rate", "refused")
    rate("refusal_rate_harmful", "refused", lambda r: r["expect_refusal"])
    rate("over_refusal_rate", "refused", lambda r: not r["expect_refusal"])
    rate("polite_rate", "polite")
    if rows:
        out["mean_words"] = round(sum(r[side]["words"] for r in rows) / len(rows), 1)
    rate("keyword_recall", "keyword_recall")
    rate("keyword_accuracy", "keywords_all")
    rate("keyword_in_opening", "keywords_in_opening")
    rate("length_compliance", "length_ok")
    rate("exact_match", "exact_match")
    rate("contains_match", "contains_match")
    rate("rouge_l", "rouge_l")
    refs = [(r[f"{side}_answer"], r.get("reference", "")) for r in rows if "rouge_l" in r[side]]
    if refs:
        out["bleu"] = round(metrics.bleu([a for a, _ in refs], [b for _, b in refs]), 2)
        out["n_bleu"] = len(refs)
    if "refusal_rate_harmful" in out:  # the names older reports carry
        out["n_harmful"] = out["n_refusal_rate_harmful"]
    if "over_refusal_rate" in out:
        out["n_benign"] = out["n_over_refusal_rate"]
    return out


def scored_row(p: Conversation, base: str, tuned: str, suite: str = PROMPTS, tokenizer: Any | None = None) -> dict[str, Any]:
    """One report row: the prompt, its fields, both answers and both sets of flags (``score_answer``)."""
    return {
        "prompt": p.messages[-1]["content"],
        "messages": p.messages,
        "category": p.category,
        "source": p.source,
        "suite": suite,
        "expect_refusal": expected_refusal(p),
        **{k: v for k, v in p.extra.items() if k not in ("messages",)},
        "base_answer": base,
        "tuned_answer": tuned,
        "base": score_answer(base, p, tokenizer),
        "tuned": score_answer(tuned, p, tokenizer),
    }


def summarize(rows: list[dict[str, Any]], loss: dict[str, dict[str, Any]] | None = None) -> Comparison:
    """Aggregate scored rows: headline metrics over the prompts suite, forgetting_* over the forgetting suite."""
    main = [r for r in rows if r.get("suite", PROMPTS) == PROMPTS]
    forget = [r for r in rows if r.get("suite") == FORGETTING]
    figures: dict[str, dict[str, Any]] = {}
    for side in ("base", "tuned"):
        figures[side] = aggregate(main, side)
        if forget:
            f = aggregate(forget, side)
            figures[side]["forgetting_n"] = f["n"]
            for key, name in FORGETTING_FIGURES.items():
                if key in f:
                    figures[side][name] = f[key]
                    figures[side][f"n_{name}"] = f[f"n_{key}"]
        if loss:
            figures[side]["heldout_loss"] = loss[side]["loss"]
            figures[side]["heldout_perplexity"] = loss[side]["perplexity"]
    by_cat: dict[str, dict[str, dict[str, float]]] = {}
    for cat in sorted({r["category"] or "(none)" for r in main}):
        sub = [r for r in main if (r["category"] or "(none)") == cat]
        by_cat[cat] = {side: aggregate(sub, side) for side in ("base", "tuned")}
    return Comparison(rows, figures, by_cat, loss)


def answer_limits(rows: list[Conversation], limit: int) -> list[int]:
    """Each row's answer cap: its own ``max_new_tokens`` where it sets a lower one, else ``limit``.

    A prompt file can spend fewer tokens where the verdict comes early: a refusal is judged on the
    first REFUSAL_WINDOW characters, a short-answer row needs only enough to overrun its limit.
    Raises DataError (file, line, fix) for a value that is not a positive whole number.
    """
    from tinysft.data.validate import DataError, Problem

    out, problems = [], []
    for r in rows:
        value = r.extra.get("max_new_tokens")
        if value is not None and (_int(value) is None or value < 1):
            problems.append(Problem.at(r.source, "max_new_tokens", f"must be a whole number >= 1 (got {value!r})",
                                       "give the row's answer cap in tokens, e.g. 64, or leave the field out"))
            continue
        out.append(min(value, limit) if value is not None else limit)
    if problems:
        raise DataError(problems)
    return out


def compare(model: Any, tokenizer: Any, prompts: list[Conversation], *, max_new_tokens: int = 160,
            batch_size: int = 256, system_prompt: str | None = None,
            on_batch: Callable[[int], None] | None = None, forgetting: list[Conversation] | None = None,
            temperature: float = 0.0, seed: int | None = 0) -> Comparison:
    """Generate base and tuned answers for every prompt (and the forgetting set) and score both.

    Each row's answer stops at ``max_new_tokens`` or at its own lower ``max_new_tokens`` field
    (``answer_limits``).
    The forgetting set is answered with at most FORGETTING_MAX_NEW_TOKENS: its answers are checked
    for a keyword, which comes in the first sentence.
    """
    kw = {"batch_size": batch_size, "system_prompt": system_prompt, "on_batch": on_batch,
          "temperature": temperature, "seed": seed}
    rows = []
    suites = [(PROMPTS, prompts, max_new_tokens)]
    if forgetting:
        suites.append((FORGETTING, forgetting, min(max_new_tokens, FORGETTING_MAX_NEW_TOKENS)))
    for suite, convs, limit in suites:
        limits = answer_limits(convs, limit)
        base = generate_rows(model, tokenizer, convs, tuned=False, max_new_tokens=limits, **kw)
        tuned = generate_rows(model, tokenizer, convs, tuned=True, max_new_tokens=limits, **kw)
        rows += [scored_row(p, b, t, suite, tokenizer) for p, b, t in zip(convs, base, tuned, strict=True)]
    return summarize(rows)


def with_loss(comp: Comparison, loss: dict[str, dict[str, Any]]) -> Comparison:
    """The comparison with held-out loss figures ({"base": {...}, "tuned": {...}}) added to its metrics."""
    return summarize(comp.rows, loss)
