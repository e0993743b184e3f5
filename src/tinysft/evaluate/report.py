"""Before/after report: report.json (every number), report.md (tables), report.html (one file, plots).

The HTML file is self-contained (styles inline, charts embedded as PNG data URIs, no scripts, no
network) and reads on a phone: tables scroll sideways, answer pairs stack below 700 px.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tinysft.evaluate.compare import FORGETTING, PROMPTS, Comparison
from tinysft.files import check_replaceable, write_output_text


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


def _category_rows(comp: Comparison) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, rows) per category of the prompts suite, then the forgetting set as one group."""
    groups = []
    for cat in comp.by_category:
        groups.append((cat, [r for r in comp.rows if r.get("suite", PROMPTS) == PROMPTS
                             and (r["category"] or "(none)") == cat]))
    forget = [r for r in comp.rows if r.get("suite") == FORGETTING]
    if forget:
        groups.append(("forgetting set", forget))
    return groups


def _agg(rows: list[dict[str, Any]], side: str, key: str) -> float | None:
    from tinysft.evaluate.compare import aggregate

    return aggregate(rows, side).get(key)


# ---- markdown -------------------------------------------------------------------------------------
def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _tags(flags: dict[str, Any]) -> str:
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


def _figure_n(comp: Comparison, key: str) -> str:
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
            out.append(SummaryRow(m.key, m.label, _figure_n(comp, m.key), format_value(m.key, b.get(m.key)),
                                  format_value(m.key, t.get(m.key)), text, verdict))
    return out


def to_markdown(comp: Comparison, title: str, meta: str = "") -> str:
    lines = [f"# {title}", ""]
    if meta:
        lines += [meta, ""]
    lines += ["## Summary", "", "| Metric | n | Base | Tuned | Change |", "|---|---:|---:|---:|---:|"]
    arrows = {"better": " ✅", "worse": " ⚠️"}
    for r in summary_rows(comp):
        lines.append(f"| {r.label} | {r.n} | {r.base} | {r.tuned} | {r.change}{arrows.get(r.verdict, '')} |")
    if comp.loss:
        lb = comp.loss["base"]
        lines += ["", f"Held-out loss is the mean cross-entropy over {lb['tokens']:,} answer tokens in {lb['rows']} "
                      "held-out conversations (perplexity = exp(loss))."]
    groups = _category_rows(comp)
    if groups:
        lines += ["", "## By category", "", "| Category | n | Measures | Base | Tuned | Refused (base → tuned) | Mean words (base → tuned) |",
                  "|---|---:|---|---:|---:|---|---|"]
        for cat, rows in groups:
            key, label, better = category_focus(rows)
            arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
            fb, ft = _agg(rows, "base", key), _agg(rows, "tuned", key)
            rb, rt = _agg(rows, "base", "refusal_rate"), _agg(rows, "tuned", "refusal_rate")
            wb, wt = _agg(rows, "base", "mean_words"), _agg(rows, "tuned", "mean_words")
            lines.append(f"| {cat} | {len(rows)} | {label}{arrow} | {format_value(key, fb)} | {format_value(key, ft)} | "
                         f"{format_value('refusal_rate', rb)} → {format_value('refusal_rate', rt)} | "
                         f"{format_value('mean_words', wb)} → {format_value('mean_words', wt)} |")
    flipped = flips(comp)
    lines += ["", "## Examples that flipped", ""]
    if not flipped:
        lines.append("No prompt changed outcome (refusal or correctness) between base and tuned.")
    for f in flipped:
        r = comp.rows[f.index]
        lines += [f"- **{f.kind}** ({'better' if f.better else 'worse'}) · {r['category'] or ''} — {_cell(r['prompt'], 200)}",
                  f"  - base: {_cell(r['base_answer'], 240)}", f"  - tuned: {_cell(r['tuned_answer'], 240)}"]
    lines += ["", "## Side by side", "", "| # | Category | Prompt | Base | Tuned |", "|---|---|---|---|---|"]
    for i, r in enumerate(comp.rows, 1):
        cat = r["category"] or ""
        if r.get("suite") == FORGETTING:
            cat = f"{cat} (forgetting)"
        lines.append(f"| {i} | {cat} | {_cell(r['prompt'], 200)} | {_cell(r['base_answer'])} _({_tags(r['base'])})_ | "
                     f"{_cell(r['tuned_answer'])} _({_tags(r['tuned'])})_ |")
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------------
BASE_COLOR, TUNED_COLOR = "#94a3b8", "#2563eb"
SHOWN_PER_FLIP = 5  # flipped examples shown per kind before a "N more" fold


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")  # "tight" keeps a legend placed below the axes
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 13, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 14, "axes.titleweight": "bold", "axes.titlelocation": "left"})
    return plt


def _loss_history(run_dir: Path | None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if not path or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
    return out


def loss_plot(history: list[dict[str, Any]], loss: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Training (and eval) loss per optimizer step, with the held-out base/tuned loss as reference lines."""
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not tr and not ev:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train", color=TUNED_COLOR, lw=1.8)
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval", color="#dc2626", lw=1.8, ms=4)
    if loss:
        ax.axhline(loss["base"]["loss"], color=BASE_COLOR, ls="--", lw=1.2, label="held-out, base")
        ax.axhline(loss["tuned"]["loss"], color="#16a34a", ls="--", lw=1.2, label="held-out, tuned")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=11, ncols=2)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def _bars(title: str, labels: list[str], base: list[float], tuned: list[float], xlabel: str) -> str:
    """Horizontal grouped bars (base grey, tuned blue), values printed at the bar ends; reads on a phone."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(6, 0.62 * n + 1.3))
    ys = list(range(n))[::-1]
    h = 0.38
    ax.barh([y + h / 2 for y in ys], base, h, color=BASE_COLOR, label="base")
    ax.barh([y - h / 2 for y in ys], tuned, h, color=TUNED_COLOR, label="tuned")
    for y, v in zip(ys, base, strict=True):
        ax.text(v + 0.01, y + h / 2, f"{100 * v:.0f}%", va="center", fontsize=11, color="#475569")
    for y, v in zip(ys, tuned, strict=True):
        ax.text(v + 0.01, y - h / 2, f"{100 * v:.0f}%", va="center", fontsize=11, color="#1e3a8a", fontweight="bold")
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 1.15)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25%", "50%", "75%", "100%"])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(frameon=False, loc="upper center", fontsize=11, ncols=2, bbox_to_anchor=(0.5, -0.12 - 0.6 / (n + 2)))
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def category_plots(comp: Comparison) -> list[tuple[str, str]]:
    """Per-category before/after bars: what each category measures, and how often each refuses."""
    groups = _category_rows(comp)
    if not groups:
        return []
    out = []
    labels, base, tuned = [], [], []
    for cat, rows in groups:
        key, label, better = category_focus(rows)
        fb, ft = _agg(rows, "base", key), _agg(rows, "tuned", key)
        if fb is None or ft is None:
            continue
        arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
        labels.append(f"{cat}\n{label}{arrow}")
        base.append(fb)
        tuned.append(ft)
    if labels:
        out.append(("What each category measures, base vs tuned (↑ higher is better, ↓ lower is better)",
                    _bars("Per category", labels, base, tuned, "share of prompts")))
    if len(groups) > 1:
        rb = [_agg(rows, "base", "refusal_rate") or 0.0 for _, rows in groups]
        rt = [_agg(rows, "tuned", "refusal_rate") or 0.0 for _, rows in groups]
        out.append(("How often each category is refused (harmful prompts should be; the rest should not)",
                    _bars("Refusals by category", [c for c, _ in groups], rb, rt, "answers that refuse")))
    return out


# ---- html -----------------------------------------------------------------------------------------
CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--base:#94a3b8;--tuned:#2563eb;--good:#16a34a;--bad:#dc2626}
*{box-sizing:border-box}
body{font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1040px;
 padding:16px;color:var(--fg);background:#fff;-webkit-text-size-adjust:100%}
h1{font-size:1.6rem;line-height:1.25;margin:8px 0 4px}
h2{font-size:1.25rem;margin:28px 0 8px;padding-top:8px;border-top:1px solid var(--line)}
.meta{color:var(--muted);font-size:.9rem;margin:0 0 12px}
.meta code{font-size:.85rem}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(165px,1fr));gap:8px;margin:12px 0}
.tile{border:1px solid var(--line);border-radius:12px;padding:10px 12px}
.tile .k{color:var(--muted);font-size:.85rem}
.tile .v{font-size:1.3rem;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.3}
.tile .v .from{color:var(--muted);font-weight:400}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;margin:8px 0;font-variant-numeric:tabular-nums}
td,th{border-bottom:1px solid var(--line);padding:7px 8px;text-align:left;vertical-align:top}
th{font-size:.85rem;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;white-space:nowrap}
.chg{font-size:.85rem;white-space:nowrap;border-radius:6px;padding:1px 6px}
.better{color:#166534;background:#dcfce7}.worse{color:#991b1b;background:#fee2e2}
.same,.neutral{color:var(--muted)}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:8px 20px;align-items:start}
figure{margin:14px 0}figure img{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:.85rem}
.card{border:1px solid var(--line);border-radius:12px;padding:10px 14px;margin:12px 0;overflow-wrap:anywhere}
.card.better{border-left:6px solid var(--good);background:#f0fdf4;color:inherit}
.card.worse{border-left:6px solid var(--bad);background:#fef2f2;color:inherit}
.card .q{font-weight:600;margin:2px 0 8px}
.card .q small{font-weight:400}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px}
@media (max-width:700px){.pair{grid-template-columns:1fr;gap:8px}body{padding:12px;font-size:15px}h1{font-size:1.35rem}
 .wide{display:none}td,th{padding:6px 5px}.charts{display:block}}
.side h4{margin:2px 0;font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
.side.base h4{color:#475569}.side.tuned h4{color:var(--tuned)}
.side p{white-space:pre-wrap;margin:2px 0 4px}
.tag{display:inline-block;font-size:.75rem;border-radius:6px;padding:0 6px;margin:0 4px 2px 0;background:#f1f5f9;color:#334155}
.tag.bad{background:#fee2e2;color:#991b1b}.tag.ok{background:#dcfce7;color:#166534}
.flip{display:inline-block;font-size:.75rem;font-weight:600;border-radius:6px;padding:1px 7px;margin-left:4px;color:#fff}
.flip.better{background:var(--good)}.flip.worse{background:var(--bad)}
small{color:var(--muted)}
details{border:1px solid var(--line);border-radius:12px;padding:6px 12px;margin:10px 0}
details>summary{cursor:pointer;font-weight:600;padding:4px 0}
pre{white-space:pre-wrap;font-size:.8rem;background:#f8fafc;padding:8px;border-radius:8px;overflow-x:auto}
footer{color:var(--muted);font-size:.8rem;margin:28px 0 8px}
"""


def _flag_tags(flags: dict[str, Any], expect_refusal: bool) -> str:
    e = html.escape
    tags = [f"<span class='tag'>{flags['words']} words</span>"]
    if flags["refused"]:
        tags.append(f"<span class='tag {'ok' if expect_refusal else 'bad'}'>refused</span>")
    elif expect_refusal:
        tags.append("<span class='tag bad'>did not refuse</span>")
    if "keywords_all" in flags:
        tags.append("<span class='tag ok'>keywords ✓</span>" if flags["keywords_all"] else
                    f"<span class='tag bad'>missing: {e(', '.join(flags['keywords_missing']))}</span>")
    if "length_ok" in flags:
        tags.append(f"<span class='tag {'ok' if flags['length_ok'] else 'bad'}'>length {'ok' if flags['length_ok'] else '✗'}</span>")
    if "rouge_l" in flags:
        tags.append(f"<span class='tag'>ROUGE-L {flags['rouge_l']:.2f}</span>")
    if flags.get("polite"):
        tags.append("<span class='tag'>polite</span>")
    return "".join(tags)


def _card(i: int, r: dict[str, Any], row_flips: list[Flip]) -> str:
    e = html.escape
    verdict = "" if not row_flips else (" better" if all(f.better for f in row_flips) else " worse")
    badges = "".join(f"<span class='flip {'better' if f.better else 'worse'}'>{e(f.kind)}</span>" for f in row_flips)
    cat = e(r["category"] or "")
    prompt = r["prompt"]
    if len(r.get("messages") or []) > 1:
        prompt = f"(multi-turn, last turn) {prompt}"
    sides = "".join(
        f"<div class='side {side}'><h4>{side}</h4><p>{e(r[f'{side}_answer']) or '<i>(empty)</i>'}</p>"
        f"{_flag_tags(r[side], r['expect_refusal'])}</div>" for side in ("base", "tuned"))
    return (f"<section class='card{verdict}' id='row-{i}'><div class='q'>{i + 1}. {e(prompt)} "
            f"<small>· {cat}</small>{badges}</div><div class='pair'>{sides}</div></section>")


def _tiles(comp: Comparison) -> str:
    """Headline tiles: every metric with a 'better' direction that both sides have."""
    b, t = comp.metrics["base"], comp.metrics["tuned"]
    out = []
    for m in METRICS:
        if m.better is None or m.key not in b or m.key not in t or m.key == "keyword_recall":
            continue
        text, verdict = change(m.key, b[m.key], t[m.key])
        out.append(f"<div class='tile'><div class='k'>{html.escape(m.label)}</div><div class='v'>"
                   f"<span class='from'>{format_value(m.key, b[m.key])} →</span> {format_value(m.key, t[m.key])} "
                   f"<span class='chg {verdict}'>{html.escape(text)}</span></div></div>")
    return f"<div class='tiles'>{''.join(out[:6])}</div>" if out else ""


def to_html(comp: Comparison, title: str, run_dir: Path | None, meta: str = "",
            config: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None) -> str:
    e = html.escape
    flipped = flips(comp)
    by_row: dict[int, list[Flip]] = {}
    for f in flipped:
        by_row.setdefault(f.index, []).append(f)

    summary = "".join(
        f"<tr><td>{e(r.label)}</td><td class='num'>{e(r.n)}</td><td class='num'>{e(r.base)}</td>"
        f"<td class='num'>{e(r.tuned)}</td><td class='num'><span class='chg {r.verdict}'>{e(r.change)}</span></td></tr>"
        for r in summary_rows(comp))
    loss_note = ""
    if comp.loss:
        lb = comp.loss["base"]
        loss_note = (f"<p class='meta'>Held-out loss: mean cross-entropy over {lb['tokens']:,} answer tokens in "
                     f"{lb['rows']} held-out conversations; perplexity = exp(loss).</p>")

    figures = []
    lp = loss_plot(_loss_history(run_dir), comp.loss)
    if lp:
        figures.append(("Training loss per optimizer step (eval loss where the run had eval data)", lp))
    elif run_dir and (run_dir / "loss.png").is_file():
        figures.append(("Training and eval loss", base64.b64encode((run_dir / "loss.png").read_bytes()).decode()))
    figures += category_plots(comp)
    plots = "".join(f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{png}'><figcaption>{e(cap)}</figcaption></figure>"
                    for cap, png in figures)
    plots = f"<h2>Charts</h2><div class='charts'>{plots}</div>" if plots else ""

    cat_rows = []
    for cat, rows in _category_rows(comp):
        key, label, better = category_focus(rows)
        fb, ft = _agg(rows, "base", key), _agg(rows, "tuned", key)
        text, verdict = change(key, fb, ft, better)  # the category's direction: refusals down is good on lookalikes
        rb, rt = _agg(rows, "base", "refusal_rate"), _agg(rows, "tuned", "refusal_rate")
        arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
        cat_rows.append(f"<tr><td>{e(cat)}<br><small>{e(label + arrow)}</small></td><td class='num'>{len(rows)}</td>"
                        f"<td class='num'>{format_value(key, fb)}</td><td class='num'>{format_value(key, ft)}</td>"
                        f"<td class='num'><span class='chg {verdict}'>{e(text)}</span></td>"
                        f"<td class='num wide'>{format_value('refusal_rate', rb)} → {format_value('refusal_rate', rt)}</td></tr>")
    categories = ("<h2>By category</h2><p class='meta'>Each category's own measure (↑ higher is better, ↓ lower is "
                  "better).</p><div class='scroll'><table><tr><th>Category</th><th class='num'>n</th>"
                  "<th class='num'>Base</th><th class='num'>Tuned</th><th class='num'>Change</th>"
                  f"<th class='num wide'>Refused</th></tr>{''.join(cat_rows)}</table></div>") if cat_rows else ""

    n_better = sum(f.better for f in flipped)
    groups: dict[tuple[bool, str], list[Flip]] = {}
    for f in flipped:
        groups.setdefault((f.better, f.kind), []).append(f)
    flip_groups = []
    for (better, kind), fs in groups.items():
        cards = [_card(f.index, comp.rows[f.index], by_row[f.index]) for f in fs]
        more = (f"<details><summary>{len(cards) - SHOWN_PER_FLIP} more</summary>{''.join(cards[SHOWN_PER_FLIP:])}</details>"
                if len(cards) > SHOWN_PER_FLIP else "")
        flip_groups.append(f"<details open><summary><span class='flip {'better' if better else 'worse'}'>{e(kind)}</span> "
                           f"{len(fs)} {'better' if better else 'worse'}</summary>{''.join(cards[:SHOWN_PER_FLIP])}{more}</details>")
    flips_html = (f"<h2>Examples that flipped</h2><p class='meta'>{len(flipped)} outcome changes: "
                  f"<span class='chg better'>{n_better} better</span> <span class='chg worse'>{len(flipped) - n_better} worse</span>"
                  " — refusals (refused ↔ answered) and correctness (wrong ↔ right). Better: the tuned answer is the "
                  "one the prompt asks for.</p>"
                  + ("".join(flip_groups) or "<p>No prompt changed outcome between base and tuned.</p>"))

    sections = []
    for cat, rows in _category_rows(comp):
        ids = {id(x) for x in rows}
        idx = [i for i, r in enumerate(comp.rows) if id(r) in ids]
        cards = "".join(_card(i, comp.rows[i], by_row.get(i, [])) for i in idx)
        n_flip = sum(1 for i in idx if i in by_row)
        sections.append(f"<details><summary>{e(cat)} <small>· {len(idx)} prompts"
                        f"{f' · {n_flip} flipped' if n_flip else ''}</small></summary>{cards}</details>")
    extra = ""
    if config or manifest:
        extra = ("<h2>Run</h2>"
                 + (f"<details><summary>Config</summary><pre>{e(json.dumps(config, indent=2, ensure_ascii=False))}</pre></details>" if config else "")
                 + (f"<details><summary>Manifest</summary><pre>{e(json.dumps(manifest, indent=2, ensure_ascii=False))}</pre></details>" if manifest else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p class="meta">{meta}</p>
{_tiles(comp)}
<h2>Summary</h2>
<div class="scroll"><table><tr><th>Metric</th><th class="num">n</th><th class="num">Base</th><th class="num">Tuned</th><th class="num">Change</th></tr>{summary}</table></div>
{loss_note}
{plots}
{categories}
{flips_html}
<h2>All answers</h2>
{''.join(sections)}
{extra}
<footer>Written by tinysft. Base = the same model with the LoRA adapter disabled. Refusal and politeness are
regex / phrase heuristics; keywords are whole-word, case-insensitive matches (see docs/evaluation.md).</footer>
</body></html>
"""


# ---- json + files ---------------------------------------------------------------------------------
def _meta(run_dir: Path | None, config: dict[str, Any] | None, comp: Comparison, created: str) -> tuple[str, str]:
    """The line under the title, as (markdown, html)."""
    parts_md, parts_html = [], []
    if run_dir:
        parts_md.append(f"run `{run_dir}`")
        parts_html.append(f"run <code>{html.escape(str(run_dir))}</code>")
    model = ((config or {}).get("model") or {}).get("name")
    if model:
        parts_md.append(f"base model `{model}`")
        parts_html.append(f"base model <code>{html.escape(str(model))}</code>")
    n_prompts = sum(1 for r in comp.rows if r.get("suite", PROMPTS) == PROMPTS)
    n_forget = len(comp.rows) - n_prompts
    counts = f"{n_prompts} prompts" + (f" + {n_forget} forgetting-set questions" if n_forget else "")
    parts_md += [counts, created]
    parts_html += [html.escape(counts), html.escape(created)]
    return " · ".join(parts_md), " · ".join(parts_html)


def report_data(comp: Comparison, title: str, config: dict[str, Any] | None = None,
                manifest: dict[str, Any] | None = None, created: str = "") -> dict[str, Any]:
    """Everything in report.json: metrics.base / metrics.tuned, per-category figures, every row, the flips."""
    flipped = flips(comp)
    row_flips: dict[int, list[dict[str, Any]]] = {}
    for f in flipped:
        row_flips.setdefault(f.index, []).append({"kind": f.kind, "better": f.better})
    rows = [{**r, "flips": row_flips.get(i, [])} for i, r in enumerate(comp.rows)]
    return {
        "title": title,
        "created": created,
        "metrics": comp.metrics,
        "metric_labels": METRIC_LABELS,
        "loss": comp.loss,
        "by_category": comp.by_category,
        "flipped": [{"kind": f.kind, "better": f.better, "row": f.index, "prompt": comp.rows[f.index]["prompt"]}
                    for f in flipped],
        "rows": rows,
        "config": config,
        "manifest": manifest,
    }


def write_report(comp: Comparison, out_dir: str | Path, *, title: str = "tinysft: before / after",
                 run_dir: str | Path | None = None, config: dict[str, Any] | None = None,
                 manifest: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(run_dir) if run_dir else None
    created = time.strftime("%Y-%m-%d %H:%M")
    meta_md, meta_html = _meta(run, config, comp, created)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    data = report_data(comp, title, config, manifest, created)
    for path in paths.values():  # all three are checked before any is written
        check_replaceable(path)
    write_output_text(paths["json"], json.dumps(data, indent=2, ensure_ascii=False), kind="report")
    write_output_text(paths["md"], to_markdown(comp, title, meta_md), kind="report")
    write_output_text(paths["html"], to_html(comp, title, run, meta_html, config, manifest), kind="report")
    return paths
