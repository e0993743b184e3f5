"""Classification before/after report: report.json (all numbers), report.md, report.html (one file).

Input is the plain dict built by ``classify.evaluate_classifier``: labels, ``metrics.base`` /
``metrics.tuned`` (from classification_metrics) and one row per example with both predictions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tinysft.files import check_replaceable, write_output_text

SUMMARY = [("accuracy", "Accuracy"), ("f1_weighted", "F1 (weighted)"), ("f1_macro", "F1 (macro)"),
           ("precision_weighted", "Precision (weighted)"), ("recall_weighted", "Recall (weighted)"), ("n", "Rows")]
MAX_SAMPLES_MD = 20
MAX_ROWS_HTML = 500


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return (text[: limit - 1] + "…" if len(text) > limit else text).replace("|", "\\|")


def sample_rows(result: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Rows worth reading first: the tuned model's mistakes, then rows the tuning fixed, then the rest."""
    def rank(r: dict[str, Any]) -> int:
        if r["tuned"] != r["label"]:
            return 0
        return 1 if r["base"] != r["label"] else 2

    return sorted(result["rows"], key=rank)[:limit]


def to_markdown(result: dict[str, Any], title: str) -> str:
    base, tuned, labels = result["metrics"]["base"], result["metrics"]["tuned"], result["labels"]
    lines = [f"# {title}", "", f"Model `{result['model']}`, data {', '.join(f'`{d}`' for d in result['data'])}. "
             "Base = the encoder with its untrained head (adapter disabled); tuned = adapter and trained head.", "",
             "## Summary", "", "| Metric | Base | Tuned |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(base[key])} | {_fmt(tuned[key])} |" for key, label in SUMMARY]
    lines += ["", "## Per class (tuned; base F1 for comparison)", "",
              "| Class | Precision | Recall | F1 | Base F1 | Support |", "|---|---|---|---|---|---|"]
    for label in labels:
        t, b = tuned["per_class"][label], base["per_class"][label]
        lines.append(f"| {label} | {t['precision']:.3f} | {t['recall']:.3f} | {t['f1']:.3f} | {b['f1']:.3f} | {t['support']} |")
    lines += ["", "## Confusion matrix (tuned; rows = true, columns = predicted)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(c) for c in row) + " |"
              for label, row in zip(labels, tuned["confusion_matrix"], strict=True)]
    lines += ["", "## Sample predictions (tuned mistakes first)", "", "| Text | True | Base | Tuned |", "|---|---|---|---|"]
    for r in sample_rows(result, MAX_SAMPLES_MD):
        mark = "✓" if r["tuned"] == r["label"] else "✗"
        lines.append(f"| {_cell(r['text'])} | {r['label']} | {r['base']} | {r['tuned']} {mark} |")
    return "\n".join(lines) + "\n"


def confusion_plot(result: dict[str, Any]) -> str:
    """Base and tuned confusion matrices side by side, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["labels"]
    size = max(3.2, 0.7 * len(labels) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), dpi=110)
    for ax, side in zip(axes, ("base", "tuned"), strict=True):
        matrix = result["metrics"][side]["confusion_matrix"]
        top = max(max(row) for row in matrix) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
                        color="white" if count > top / 2 else "#0f172a")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{side} (accuracy {result['metrics'][side]['accuracy']:.2f})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def to_html(result: dict[str, Any], title: str, run_dir: Path | None = None) -> str:
    e = html.escape
    base, tuned, labels = result["metrics"]["base"], result["metrics"]["tuned"], result["labels"]
    summary = "".join(f"<tr><td>{e(label)}</td><td>{_fmt(base[key])}</td><td>{_fmt(tuned[key])}</td></tr>"
                      for key, label in SUMMARY)
    per_class = "".join(
        f"<tr><td>{e(label)}</td><td>{tuned['per_class'][label]['precision']:.3f}</td>"
        f"<td>{tuned['per_class'][label]['recall']:.3f}</td><td>{tuned['per_class'][label]['f1']:.3f}</td>"
        f"<td>{base['per_class'][label]['f1']:.3f}</td><td>{tuned['per_class'][label]['support']}</td></tr>"
        for label in labels)
    figures = [("Confusion matrices: base (untrained head) and tuned", confusion_plot(result))]
    loss_png = run_dir / "loss.png" if run_dir else None
    if loss_png and loss_png.is_file():
        figures.append(("Training and eval loss", base64.b64encode(loss_png.read_bytes()).decode()))
    plots = "".join(f"<figure><img alt='{e(t)}' src='data:image/png;base64,{b}'><figcaption>{e(t)}</figcaption></figure>"
                    for t, b in figures)
    shown = sample_rows(result, MAX_ROWS_HTML)
    rows = "".join(
        f"<tr class='{'wrong' if r['tuned'] != r['label'] else ''}'><td>{e(r['text'])}</td><td>{e(r['label'])}</td>"
        f"<td class='{'ok' if r['base'] == r['label'] else 'bad'}'>{e(r['base'])}</td>"
        f"<td class='{'ok' if r['tuned'] == r['label'] else 'bad'}'>{e(r['tuned'])} "
        f"<small>{r['tuned_confidence']:.2f}</small></td></tr>" for r in shown)
    more = f"<p>Showing {len(shown)} of {len(result['rows'])} rows.</p>" if len(shown) < len(result["rows"]) else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>
<style>
body{{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1000px;padding:16px;color:#0f172a}}
table{{border-collapse:collapse;width:100%;margin:8px 0}}td,th{{border-bottom:1px solid #e2e8f0;padding:6px;text-align:left}}
figure{{margin:12px 0}}img{{max-width:100%;height:auto}} small{{color:#64748b}}
td.ok{{color:#15803d}} td.bad{{color:#b91c1c}} tr.wrong{{background:#fef2f2}}
</style></head><body><h1>{e(title)}</h1>
<p>Model <code>{e(result['model'])}</code> on {e(', '.join(result['data']))}. Base = the encoder with its untrained
head (adapter disabled); tuned = LoRA adapter and trained head.</p>
<h2>Summary</h2><table><tr><th>Metric</th><th>Base</th><th>Tuned</th></tr>{summary}</table>
{plots}
<h2>Per class (tuned)</h2><table><tr><th>Class</th><th>Precision</th><th>Recall</th><th>F1</th><th>Base F1</th>
<th>Support</th></tr>{per_class}</table>
<h2>Sample predictions (tuned mistakes first)</h2>{more}
<table><tr><th>Text</th><th>True</th><th>Base</th><th>Tuned</th></tr>{rows}</table>
</body></html>
"""


def write_classification_report(result: dict[str, Any], out_dir: Path, title: str,
                                run_dir: Path | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    for path in paths.values():  # all three are checked before any is written
        check_replaceable(path)
    write_output_text(paths["json"], json.dumps(result, indent=2, ensure_ascii=False), kind="report")
    write_output_text(paths["md"], to_markdown(result, title), kind="report")
    write_output_text(paths["html"], to_html(result, title, run_dir), kind="report")
    return paths
