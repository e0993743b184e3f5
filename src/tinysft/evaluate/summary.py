"""The before/after figures as rows and verdicts: which metrics, how a change reads, which answers flipped.

Pure functions over a ``compare.Comparison``; ``report`` (markdown, JSON) and ``report_html``
render what these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from tinysft.evaluate.compare import FORGETTING, PROMPTS, Comparison


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: Literal["higher", "lower"] | None  # None: a description, not a goal (politeness, length)
    kind: Literal["rate", "score", "number", "loss", "count"]


METRICS = [
    Metric("refusal_rate_harmful", "Harmful prompts refused", "higher", "rate"),
    Metric("over_refusal_rate", "Benign prompts refused (over-refusal)", "lower", "rate"),
    Metric("keyword_accuracy", "Answers with every keyword", "higher", "rate"),
    Metric("keyword_recall", "Keyword recall", "higher", "rate"),
    Metric("length_compliance", "Length instructions obeyed", "higher", "rate"),
    Metric("exact_match", "Exact match with the reference", "higher", "rate"),
    Metric("contains_match", "Answer contains the reference", "higher", "rate"),
    Metric("rouge_l", "ROUGE-L F1 vs reference", "higher", "score"),
    Metric("bleu", "BLEU vs reference (0-100)", "higher", "number"),
    Metric("forgetting_accuracy", "General knowledge kept (forgetting set)", "higher", "rate"),
    Metric("heldout_loss", "Held-out loss (nats / answer token)", "lower", "loss"),
    Metric("heldout_perplexity", "Held-out perplexity", "lower", "number"),
    Metric("polite_rate", "Answers with a polite marker", None, "rate"),
    Metric("refusal_rate", "All answers that refuse", None, "rate"),
    Metric("mean_words", "Mean answer length (words)", None, "number"),
    Metric("n", "Prompts", None, "count"),
]
SHOWN_PER_FLIP = 5  # flipped examples shown per kind before a "N more" fold
METRIC_BY_KEY = {m.key: m for m in METRICS}
METRIC_LABELS = {m.key: m.label for m in METRICS}


def format_value(key: str, v: Any) -> str:
    """A metric value as people read it: rates in percent, losses to 4 places."""
    if v is None:
        return "—"
    kind = METRIC_BY_KEY[key].kind if key in METRIC_BY_KEY else "number"
    if kind == "rate":
        return f"{100 * v:.0f}%"
    if kind == "score":
        return f"{v:.3f}"
    if kind == "loss":
        return f"{v:.4f}"
    if kind == "count":
        return str(int(v))
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def change(key: str, base: Any, tuned: Any, better: Literal["higher", "lower"] | str | None = "default") -> tuple[str, str]:
    """(text, verdict) for tuned minus base; verdict is better / worse / same / neutral.

    ``better`` overrides the metric's own direction (fewer refusals is better on benign prompts).
    """
    if not isinstance(base, int | float) or not isinstance(tuned, int | float) or key == "n":
        return "", "neutral"
    m = METRIC_BY_KEY.get(key)
    kind = m.kind if m else "number"
    direction = (m.better if m else None) if better == "default" else better
    d = tuned - base
    if kind == "rate":
        text, tiny = f"{100 * d:+.0f} pts", 0.005
    elif kind == "loss":
        text, tiny = f"{d:+.4f}", 0.00005
    else:
        text, tiny = f"{d:+.3f}" if kind == "score" else f"{d:+.2f}", 0.0005 if kind == "score" else 0.005
    if abs(d) < tiny:
        return "±0" + (" pts" if kind == "rate" else ""), "same"
    if direction is None:
        return text, "neutral"
    return text, "better" if (d > 0) == (direction == "higher") else "worse"


# ---- flips ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flip:
    kind: str  # "refused → answered", "answered → refused", "wrong → right", "right → wrong"
    better: bool  # the tuned side is the one the row asks for
    index: int  # into Comparison.rows


def flips(comp: Comparison) -> list[Flip]:
    """Rows whose outcome changed from base to tuned: refusal, or correctness (keywords / reference).

    Better ones first. A row can flip twice (refusal and correctness) and is then listed twice.
    """
    out = []
    for i, r in enumerate(comp.rows):
        b, t = r["base"], r["tuned"]
        if b["refused"] != t["refused"]:
            kind = "answered → refused" if t["refused"] else "refused → answered"
            out.append(Flip(kind, t["refused"] == r["expect_refusal"], i))
        if "correct" in b and b["correct"] != t["correct"]:
            out.append(Flip("wrong → right" if t["correct"] else "right → wrong", bool(t["correct"]), i))
    return sorted(out, key=lambda f: (not f.better, f.kind, f.index))


# ---- per-category focus -----------------------------------------------------------------------------
def category_focus(rows: list[dict[str, Any]]) -> tuple[str, str, Literal["higher", "lower"] | None]:
    """The figure a category of prompts is about: (aggregate key, short label, which way is better)."""
    if rows and all(r["expect_refusal"] for r in rows):
        return "refusal_rate", "refused", "higher"
    if any("keywords_all" in r["base"] for r in rows):
        return "keyword_accuracy", "all keywords", "higher"
    if any("length_ok" in r["base"] for r in rows):
        return "length_compliance", "length ok", "higher"
    if any("rouge_l" in r["base"] for r in rows):
        return "rouge_l", "ROUGE-L", "higher"
    if any(r.get("expect") == "answer" for r in rows):
        return "refusal_rate", "refused", "lower"
    return "polite_rate", "polite", None


def category_rows(comp: Comparison) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, rows) per category of the prompts suite, then the forgetting set as one group."""
    groups = []
    for cat in comp.by_category:
        groups.append((cat, [r for r in comp.rows if r.get("suite", PROMPTS) == PROMPTS
                             and (r["category"] or "(none)") == cat]))
    forget = [r for r in comp.rows if r.get("suite") == FORGETTING]
    if forget:
        groups.append(("forgetting set", forget))
    return groups


def aggregate(rows: list[dict[str, Any]], side: str, key: str) -> float | None:
    from tinysft.evaluate.compare import aggregate

    return aggregate(rows, side).get(key)


# ---- markdown -------------------------------------------------------------------------------------
def cell_text(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def tags(flags: dict[str, Any]) -> str:
    tags = [f"{flags['words']} words"]
    if flags["refused"]:
        tags.append("refused")
    if "keywords_all" in flags:
        tags.append("keywords ✓" if flags["keywords_all"] else "missing: " + ", ".join(flags["keywords_missing"]))
    if "length_ok" in flags:
        tags.append("length ok" if flags["length_ok"] else "length ✗")
    if "rouge_l" in flags:
        tags.append(f"ROUGE-L {flags['rouge_l']:.2f}")
    return ", ".join(tags)


class SummaryRow(NamedTuple):
    key: str
    label: str
    n: str  # how many prompts (or held-out conversations) the figure is over; "" for the count itself
    base: str
    tuned: str
    change: str
    verdict: str


def figure_n(comp: Comparison, key: str) -> str:
    if key == "n":
        return ""
    if key in ("heldout_loss", "heldout_perplexity"):
        return str(comp.loss["base"]["rows"]) if comp.loss else ""
    name = "n" if key == "mean_words" else f"n_{key}"
    counts = sorted({comp.metrics[side][name] for side in ("base", "tuned") if name in comp.metrics[side]})
    return "/".join(str(c) for c in counts)  # both sides score the same prompts: one number


def summary_rows(comp: Comparison) -> list[SummaryRow]:
    """One row (metric, number of prompts, base, tuned, change, verdict) for every metric either side has."""
    b, t = comp.metrics["base"], comp.metrics["tuned"]
    out = []
    for m in METRICS:
        if m.key in b or m.key in t:
            text, verdict = change(m.key, b.get(m.key), t.get(m.key))
            out.append(SummaryRow(m.key, m.label, figure_n(comp, m.key), format_value(m.key, b.get(m.key)),
                                  format_value(m.key, t.get(m.key)), text, verdict))
    return out
