"""Before/after report: report.json (every number), report.md (tables), report.html (``report_html``)."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from tinysft.evaluate.compare import FORGETTING, PROMPTS, Comparison
from tinysft.evaluate.compare import aggregate as aggregate_rows
from tinysft.evaluate.report_html import to_html
from tinysft.evaluate.summary import (
    INTERVAL_RULE,
    METRIC_LABELS,
    category_focus,
    category_rows,
    cell_text,
    figures_change,
    flips,
    format_figure,
    format_value,
    rates,
    summary_rows,
    tags,
)
from tinysft.files import check_replaceable, write_output_text


def to_markdown(comp: Comparison, title: str, meta: str = "") -> str:
    lines = [f"# {title}", ""]
    if meta:
        lines += [meta, ""]
    lines += ["## Summary", "", "| Metric | n | Base | Tuned | Change |", "|---|---:|---:|---:|---:|"]
    arrows = {"better": " ✅", "worse": " ⚠️"}
    for r in summary_rows(comp):
        lines.append(f"| {r.label} | {r.n} | {r.base} | {r.tuned} | {r.change}{arrows.get(r.verdict, '')} |")
    lines += ["", INTERVAL_RULE]
    if comp.loss:
        lb = comp.loss["base"]
        lines += ["", f"Held-out loss is the mean cross-entropy over {lb['tokens']:,} answer tokens in {lb['rows']} "
                      "held-out conversations (perplexity = exp(loss))."]
    groups = category_rows(comp)
    if groups:
        lines += ["", "## By category", "", "| Category | n | Measures | Base | Tuned | Change | Refused (base → tuned) | "
                  "Mean words (base → tuned) |", "|---|---:|---|---:|---:|---:|---|---|"]
        for cat, rows in groups:
            key, label, better = category_focus(rows)
            arrow = {"higher": " ↑", "lower": " ↓"}.get(better or "", "")
            fb, ft = aggregate_rows(rows, "base"), aggregate_rows(rows, "tuned")
            text, verdict = figures_change(key, fb, ft, better)
            lines.append(f"| {cat} | {len(rows)} | {label}{arrow} | {format_figure(fb, key)} | {format_figure(ft, key)} | "
                         f"{text}{arrows.get(verdict, '')} | {format_figure(fb, 'refusal_rate')} → "
                         f"{format_figure(ft, 'refusal_rate')} | "
                         f"{format_value('mean_words', fb.get('mean_words'))} → {format_value('mean_words', ft.get('mean_words'))} |")
    flipped = flips(comp)
    lines += ["", "## Examples that flipped", ""]
    if not flipped:
        lines.append("No prompt changed outcome (refusal or correctness) between base and tuned.")
    for f in flipped:
        r = comp.rows[f.index]
        lines += [f"- **{f.kind}** ({'better' if f.better else 'worse'}) · {r['category'] or ''} — {cell_text(r['prompt'], 200)}",
                  f"  - base: {cell_text(r['base_answer'], 240)}", f"  - tuned: {cell_text(r['tuned_answer'], 240)}"]
    lines += ["", "## Side by side", "", "| # | Category | Prompt | Base | Tuned |", "|---|---|---|---|---|"]
    for i, r in enumerate(comp.rows, 1):
        cat = r["category"] or ""
        if r.get("suite") == FORGETTING:
            cat = f"{cat} (forgetting)"
        lines.append(f"| {i} | {cat} | {cell_text(r['prompt'], 200)} | {cell_text(r['base_answer'])} _({tags(r['base'])})_ | "
                     f"{cell_text(r['tuned_answer'])} _({tags(r['tuned'])})_ |")
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------------


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
    """Everything in report.json: metrics.base / metrics.tuned (plain numbers, with ``n_<figure>``),
    ``rates`` (each rate as {rate, n, low, high} and each change's verdict, overall and per
    category), per-category figures, every row, the flips."""
    flipped = flips(comp)
    row_flips: dict[int, list[dict[str, Any]]] = {}
    for f in flipped:
        row_flips.setdefault(f.index, []).append({"kind": f.kind, "better": f.better})
    rows = [{**r, "flips": row_flips.get(i, [])} for i, r in enumerate(comp.rows)]
    return {
        "title": title,
        "created": created,
        "metrics": comp.metrics,
        "rates": rates(comp),
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
