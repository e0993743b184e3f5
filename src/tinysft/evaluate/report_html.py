"""report.html: one self-contained file (styles inline, charts embedded as PNG data URIs, no
scripts, no network) that reads on a phone: tables scroll sideways, answer pairs stack below 700 px.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tinysft.evaluate.compare import Comparison
from tinysft.evaluate.compare import aggregate as aggregate_rows
from tinysft.evaluate.summary import (
    INTERVAL_RULE,
    METRICS,
    SHOWN_PER_FLIP,
    Flip,
    Rate,
    category_focus,
    category_rows,
    figures_change,
    flips,
    format_figure,
    format_value,
    rate_of,
    summary_rows,
)

BASE_COLOR, TUNED_COLOR = "#94a3b8", "#2563eb"


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


def _whiskers(values: list[float], intervals: list[Rate | None]) -> list[list[float]]:
    """matplotlib's xerr ([[below...], [above...]]) for the 95% intervals; 0 where a bar has none."""
    # matplotlib refuses a negative whisker; a plotted value can sit a rounding error outside its interval
    return [[max(0.0, v - r.low) if r else 0.0 for v, r in zip(values, intervals, strict=True)],
            [max(0.0, r.high - v) if r else 0.0 for v, r in zip(values, intervals, strict=True)]]


def _bars(title: str, labels: list[str], base: list[float], tuned: list[float], xlabel: str,
          intervals: tuple[list[Rate | None], list[Rate | None]] | None = None) -> str:
    """Horizontal grouped bars (base grey, tuned blue), values printed at the bar ends, the 95%
    intervals as whiskers when given; reads on a phone."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(6, 0.62 * n + 1.3))
    ys = list(range(n))[::-1]
    h = 0.38
    ib, it = intervals or ([None] * n, [None] * n)
    whisker = {"ecolor": "#334155", "capsize": 3, "error_kw": {"lw": 1}}
    ax.barh([y + h / 2 for y in ys], base, h, color=BASE_COLOR, label="base", xerr=_whiskers(base, ib), **whisker)
    ax.barh([y - h / 2 for y in ys], tuned, h, color=TUNED_COLOR, label="tuned", xerr=_whiskers(tuned, it), **whisker)
    for y, v, r in zip(ys, base, ib, strict=True):
        ax.text((r.high if r else v) + 0.015, y + h / 2, f"{100 * v:.0f}%", va="center", fontsize=11, color="#475569")
    for y, v, r in zip(ys, tuned, it, strict=True):
        ax.text((r.high if r else v) + 0.015, y - h / 2, f"{100 * v:.0f}%", va="center", fontsize=11,
                color="#1e3a8a", fontweight="bold")
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 1.2)
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
    groups = category_rows(comp)
    if not groups:
        return []
    out = []
    labels, base, tuned = [], [], []
    ib: list[Rate | None] = []
    it: list[Rate | None] = []
    for cat, rows in groups:
        key, label, better = category_focus(rows)
        fb, ft = aggregate_rows(rows, "base"), aggregate_rows(rows, "tuned")
        if fb.get(key) is None or ft.get(key) is None:
            continue
        arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
        labels.append(f"{cat}\n{label}{arrow}")
        base.append(fb[key])
        tuned.append(ft[key])
        ib.append(rate_of(fb, key))
        it.append(rate_of(ft, key))
    if labels:
        out.append(("What each category measures, base vs tuned, with 95% intervals (↑ higher is better, ↓ lower "
                    "is better)", _bars("Per category", labels, base, tuned, "share of prompts", (ib, it))))
    if len(groups) > 1:
        sides = {side: [aggregate_rows(rows, side) for _, rows in groups] for side in ("base", "tuned")}
        rb = [f.get("refusal_rate") or 0.0 for f in sides["base"]]
        rt = [f.get("refusal_rate") or 0.0 for f in sides["tuned"]]
        intervals = ([rate_of(f, "refusal_rate") for f in sides["base"]], [rate_of(f, "refusal_rate") for f in sides["tuned"]])
        out.append(("How often each category is refused, with 95% intervals (harmful prompts should be; the rest "
                    "should not)", _bars("Refusals by category", [c for c, _ in groups], rb, rt, "answers that refuse",
                                         intervals)))
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
.same,.neutral,.unclear{color:var(--muted)}
.tile .ci{color:var(--muted);font-size:.8rem;font-variant-numeric:tabular-nums}
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
        if flags["keywords_all"] and flags.get("keywords_in_opening") is False:
            tags.append("<span class='tag'>keywords after the first 30 tokens</span>")
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
        text, verdict = figures_change(m.key, b, t)
        rb, rt = rate_of(b, m.key), rate_of(t, m.key)
        ci = (f"<div class='ci'>n {rb.n} · 95% {rb.interval_text()} → {rt.interval_text()}</div>"
              if rb and rt and rb.n == rt.n else "")
        out.append(f"<div class='tile'><div class='k'>{html.escape(m.label)}</div><div class='v'>"
                   f"<span class='from'>{format_value(m.key, b[m.key])} →</span> {format_value(m.key, t[m.key])} "
                   f"<span class='chg {verdict}'>{html.escape(text)}</span></div>{ci}</div>")
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
    for cat, rows in category_rows(comp):
        key, label, better = category_focus(rows)
        fb, ft = aggregate_rows(rows, "base"), aggregate_rows(rows, "tuned")
        text, verdict = figures_change(key, fb, ft, better)  # the category's direction: refusals down is good on lookalikes
        arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
        cat_rows.append(f"<tr><td>{e(cat)}<br><small>{e(label + arrow)}</small></td><td class='num'>{len(rows)}</td>"
                        f"<td class='num'>{e(format_figure(fb, key))}</td><td class='num'>{e(format_figure(ft, key))}</td>"
                        f"<td class='num'><span class='chg {verdict}'>{e(text)}</span></td>"
                        f"<td class='num wide'>{e(format_figure(fb, 'refusal_rate'))} → "
                        f"{e(format_figure(ft, 'refusal_rate'))}</td></tr>")
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
    for cat, rows in category_rows(comp):
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
<p class="meta">{e(INTERVAL_RULE)}</p>
{loss_note}
{plots}
{categories}
{flips_html}
<h2>All answers</h2>
{''.join(sections)}
{extra}
<footer>Written by tinysft. Base = the same model with the LoRA adapter disabled. Refusal and politeness are
regex / phrase heuristics; a keyword counts in its regular word forms (plural, -ed, -ing) and as the tail of a
compound (light in sunlight), never inside another word (see docs/evaluation.md).</footer>
</body></html>
"""


# ---- json + files ---------------------------------------------------------------------------------
