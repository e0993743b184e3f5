"""The before/after figures as rows and verdicts: which metrics, how a change reads, which answers flipped.

Pure functions over a ``compare.Comparison``; ``report`` (markdown, JSON) and ``report_html``
render what these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from tinysft.evaluate import metrics
from tinysft.evaluate.compare import FORGETTING, PROMPTS, Comparison
from tinysft.evaluate.compare import aggregate as aggregate_rows


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
    Metric("keyword_in_opening", "Every keyword in the first 30 tokens", "higher", "rate"),
    Metric("keyword_recall", "Keyword recall", "higher", "rate"),
    Metric("length_compliance", "Length instructions obeyed", "higher", "rate"),
    Metric("exact_match", "Exact match with the reference", "higher", "rate"),
    Metric("contains_match", "Answer contains the reference", "higher", "rate"),
    Metric("rouge_l", "ROUGE-L F1 vs reference", "higher", "score"),
    # Corpus BLEU has no per-prompt spread to give it an interval, so its change is described, not judged.
    Metric("bleu", "BLEU vs reference (0-100)", None, "number"),
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


INTERVAL_RULE = ("Rates and scores show n and a 95% Wilson interval [low–high]; a change is called better or "
                 "worse only where the base and tuned intervals do not overlap, otherwise it reads “no clear change”.")
"""The rule every report states in one line (docs/evaluation.md explains it)."""


@dataclass(frozen=True)
class Rate:
    """A rate (or a mean of per-prompt scores in [0, 1]) over ``n`` prompts with its 95% Wilson
    interval [low, high] (conservative for a mean of scores: see ``metrics.wilson_interval``)."""

    rate: float
    n: int
    low: float
    high: float
    percent: bool = True  # shown as 45% [31–60]; a score as 0.450 [0.31–0.60]

    def to_dict(self) -> dict[str, float | int]:
        return {"rate": self.rate, "n": self.n, "low": round(self.low, 4), "high": round(self.high, 4)}

    def interval_text(self) -> str:
        """The interval as "[31–60]" (percent) or "[0.31–0.60]" (a score)."""
        if self.percent:
            return f"[{100 * self.low:.0f}–{100 * self.high:.0f}]"
        return f"[{self.low:.2f}–{self.high:.2f}]"


def rate_of(figures: dict[str, Any], key: str) -> Rate | None:
    """The rate ``key`` of one side's figures (``compare.aggregate``'s dict: the value and its
    ``n_<key>``) with its interval; None for a figure that is not a rate or score, or has no count."""
    m = METRIC_BY_KEY.get(key)
    value, n = figures.get(key), figures.get(f"n_{key}")
    if m is None or m.kind not in ("rate", "score") or not isinstance(value, int | float) or not isinstance(n, int):
        return None
    interval = metrics.wilson_interval(value * n, n)
    return Rate(float(value), n, *interval, percent=m.kind == "rate") if interval else None


def overlap(a: Rate, b: Rate) -> bool:
    """Whether two intervals share a point: the data cannot tell the two rates apart."""
    return a.low <= b.high and b.low <= a.high


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


def format_figure(figures: dict[str, Any], key: str) -> str:
    """One side's figure as shown in the tables: a rate with its interval ("45% [31–60]")."""
    r = rate_of(figures, key)
    return f"{format_value(key, figures.get(key))} {r.interval_text()}" if r else format_value(key, figures.get(key))


def change(key: str, base: Any, tuned: Any, better: Literal["higher", "lower"] | str | None = "default",
           n: tuple[Any, Any] | None = None) -> tuple[str, str]:
    """(text, verdict) for tuned minus base; verdict is better / worse / same / unclear / neutral.

    ``better`` overrides the metric's own direction (fewer refusals is better on benign prompts).
    ``n`` (prompts behind the base and the tuned rate) gives a rate its intervals: where they
    overlap the change is "unclear" and its text says "no clear change" (INTERVAL_RULE).
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
    if n is not None:
        rb, rt = rate_of({key: base, f"n_{key}": n[0]}, key), rate_of({key: tuned, f"n_{key}": n[1]}, key)
        if rb and rt and overlap(rb, rt):
            return f"no clear change ({text})", "unclear"
    if direction is None:
        return text, "neutral"
    return text, "better" if (d > 0) == (direction == "higher") else "worse"


def figures_change(key: str, base: dict[str, Any], tuned: dict[str, Any],
                   better: Literal["higher", "lower"] | str | None = "default") -> tuple[str, str]:
    """``change`` between two sides' figures (``compare.aggregate`` dicts), with their counts."""
    return change(key, base.get(key), tuned.get(key), better, (base.get(f"n_{key}"), tuned.get(f"n_{key}")))


def rates(comp: Comparison) -> dict[str, Any]:
    """report.json's ``rates``: every rate as {rate, n, low, high} per side, and each change's
    verdict, overall and per category (INTERVAL_RULE)."""

    def block(b: dict[str, Any], t: dict[str, Any], focus: str | None = None,
              better: Literal["higher", "lower"] | None = None) -> dict[str, Any]:
        keys = [m.key for m in METRICS if rate_of(b, m.key) or rate_of(t, m.key)]
        out: dict[str, Any] = {side: {k: r.to_dict() for k in keys if (r := rate_of(figs, k))}
                               for side, figs in (("base", b), ("tuned", t))}
        out["change"] = {}
        for k in keys:
            text, verdict = figures_change(k, b, t, better if k == focus else "default")
            if text:
                out["change"][k] = {"delta": round(t[k] - b[k], 4), "verdict": verdict}
        return out

    by_cat = {}
    for cat, rows in category_rows(comp):
        key, _, better = category_focus(rows)
        b, t = aggregate_rows(rows, "base"), aggregate_rows(rows, "tuned")
        by_cat[cat] = {"focus": key, "better": better, **block(b, t, key, better)}
    return {"method": "wilson", "confidence": 0.95, "rule": INTERVAL_RULE,
            **block(comp.metrics["base"], comp.metrics["tuned"]), "by_category": by_cat}


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
    """One figure of one side over some rows (None where no row has it)."""
    return aggregate_rows(rows, side).get(key)


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
        if flags["keywords_all"] and flags.get("keywords_in_opening") is False:
            tags.append("keywords after the first 30 tokens")
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
    """One row (metric, number of prompts, base, tuned, change, verdict) for every metric either side has;
    rates carry their 95% interval and read "no clear change" where the intervals overlap."""
    b, t = comp.metrics["base"], comp.metrics["tuned"]
    out = []
    for m in METRICS:
        if m.key in b or m.key in t:
            text, verdict = figures_change(m.key, b, t)
            out.append(SummaryRow(m.key, m.label, figure_n(comp, m.key), format_figure(b, m.key),
                                  format_figure(t, m.key), text, verdict))
    return out
