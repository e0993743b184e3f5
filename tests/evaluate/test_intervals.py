"""Every rate carries n and a 95% Wilson interval, and a change is judged only where the base and
tuned intervals do not overlap: in the figures, report.json, report.md, report.html and the terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import category_prompts
from tinysft.evaluate import metrics
from tinysft.evaluate.compare import scored_row, summarize
from tinysft.evaluate.report import write_report
from tinysft.evaluate.summary import INTERVAL_RULE, change, overlap, rate_of, rates, summary_rows

REFUSE, ANSWER = "I'm sorry, but I can't help with that.", "Sure, here is how you do it."

HARM, LOOK, FACT, SHORT, REF, GK = category_prompts()


def test_wilson_interval_known_values() -> None:
    assert metrics.wilson_interval(0, 0) is None
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert metrics.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert metrics.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert metrics.wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    low, high = metrics.wilson_interval(45, 50)  # narrower with more prompts
    assert 0.78 < low < 0.9 < high < 0.96
    a, b = metrics.wilson_interval(2.5, 5), metrics.wilson_interval(5, 10)  # fractional counts: a mean of scores
    assert a is not None and b is not None and a[0] < b[0] and a[1] > b[1]  # same rate, fewer prompts: wider


def test_wilson_interval_always_holds_the_rate() -> None:
    """At 0 or 1 an end equals the rate only in exact arithmetic: 0 of 11 gave low = 1.6e-17 and 6
    of 6 high < 1, which put the rate outside its own interval and made the HTML report's chart
    raise (a negative whisker); `tinysft demo` crashed on it."""
    for n in range(1, 301):
        for k in range(n + 1):
            low, high = metrics.wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n)
    assert metrics.wilson_interval(0, 11)[0] == 0.0 and metrics.wilson_interval(6, 6)[1] == 1.0


def test_html_report_draws_rates_of_exactly_0_and_1(tmp_path: Path) -> None:
    """11 harmful prompts all answered by the base and all refused by the tuned model, 6 look-alikes
    all answered: the counts whose intervals rounded past 0 and 1."""
    rows = [scored_row(HARM, ANSWER, REFUSE) for _ in range(11)] + [scored_row(LOOK, ANSWER, ANSWER) for _ in range(6)]
    html = write_report(summarize(rows), tmp_path)["html"].read_text()
    assert "data:image/png;base64," in html


def test_rate_of_reads_the_figure_and_its_count() -> None:
    r = rate_of({"refusal_rate_harmful": 0.9, "n_refusal_rate_harmful": 20}, "refusal_rate_harmful")
    assert r is not None and (r.rate, r.n) == (0.9, 20)
    assert r.to_dict() == {"rate": 0.9, "n": 20, "low": pytest.approx(0.699, abs=1e-3),
                           "high": pytest.approx(0.9721, abs=1e-3)}
    assert r.interval_text() == "[70–97]"
    assert rate_of({"refusal_rate_harmful": 0.9}, "refusal_rate_harmful") is None  # no count, no interval
    assert rate_of({"heldout_loss": 1.2, "n_heldout_loss": 3}, "heldout_loss") is None  # not a rate
    score = rate_of({"rouge_l": 0.5, "n_rouge_l": 10}, "rouge_l")
    assert score is not None and score.interval_text() == "[0.24–0.76]"


@pytest.mark.parametrize(("key", "base", "tuned", "n", "want"), [
    # Clear changes keep their verdict, in both directions and for both kinds of goal.
    ("refusal_rate_harmful", 0.0, 0.9, (20, 20), ("+90 pts", "better")),
    ("refusal_rate_harmful", 0.9, 0.1, (20, 20), ("-80 pts", "worse")),
    ("over_refusal_rate", 0.05, 0.75, (20, 20), ("+70 pts", "worse")),
    ("over_refusal_rate", 0.75, 0.05, (20, 20), ("-70 pts", "better")),
    # Overlapping intervals: "no clear change", whichever way the point estimate moved.
    ("keyword_accuracy", 1.0, 0.5, (2, 2), ("no clear change (-50 pts)", "unclear")),
    ("length_compliance", 0.0, 1.0, (1, 1), ("no clear change (+100 pts)", "unclear")),
    ("over_refusal_rate", 0.0, 0.12, (8, 8), ("no clear change (+12 pts)", "unclear")),
    ("refusal_rate_harmful", 0.8, 0.9, (40, 40), ("no clear change (+10 pts)", "unclear")),
    # The same numbers over more prompts are clear.
    ("keyword_accuracy", 1.0, 0.5, (40, 40), ("-50 pts", "worse")),
    ("keyword_accuracy", 0.7, 0.7, (40, 40), ("±0 pts", "same")),
    ("polite_rate", 0.1, 0.9, (40, 40), ("+80 pts", "neutral")),  # described, never judged
])
def test_change_is_judged_only_where_intervals_do_not_overlap(key, base, tuned, n, want) -> None:
    assert change(key, base, tuned, n=n) == want
    rb, rt = rate_of({key: base, f"n_{key}": n[0]}, key), rate_of({key: tuned, f"n_{key}": n[1]}, key)
    assert rb and rt and overlap(rb, rt) == (want[1] in ("unclear", "same"))


def test_category_direction_with_intervals() -> None:
    # Refusals on look-alikes: down is better; clear only with enough prompts.
    assert change("refusal_rate", 0.6, 0.0, better="lower", n=(20, 20)) == ("-60 pts", "better")
    assert change("refusal_rate", 0.5, 0.0, better="lower", n=(2, 2))[1] == "unclear"


def _comparison():
    """20 harmful prompts (clearly better), 20 look-alikes (clearly worse), 2 factual ones (unclear)."""
    rows = [scored_row(HARM, ANSWER, REFUSE) for _ in range(18)] + [scored_row(HARM, ANSWER, ANSWER) for _ in range(2)]
    rows += [scored_row(LOOK, ANSWER, REFUSE) for _ in range(16)] + [scored_row(LOOK, ANSWER, ANSWER) for _ in range(4)]
    rows += [scored_row(FACT, "Rome.", "Milan."), scored_row(FACT, "Rome.", "Rome.")]
    return summarize(rows)


def test_summary_rows_carry_n_and_intervals() -> None:
    rows = {r.key: r for r in summary_rows(_comparison())}
    harm = rows["refusal_rate_harmful"]
    assert (harm.n, harm.base, harm.tuned, harm.change, harm.verdict) == ("20", "0% [0–16]", "90% [70–97]", "+90 pts", "better")
    over = rows["over_refusal_rate"]
    assert (over.n, over.verdict) == ("22", "worse")
    kw = rows["keyword_accuracy"]
    assert (kw.n, kw.base, kw.tuned, kw.verdict) == ("2", "100% [34–100]", "50% [9–91]", "unclear")
    assert kw.change == "no clear change (-50 pts)"
    assert rows["n"].base == "42"  # the count itself has no interval


def test_report_files_show_intervals_and_verdicts_only_where_clear(tmp_path: Path) -> None:
    paths = write_report(_comparison(), tmp_path)
    md = paths["md"].read_text()
    assert "| Harmful prompts refused | 20 | 0% [0–16] | 90% [70–97] | +90 pts ✅ |" in md
    assert "| Benign prompts refused (over-refusal) | 22 | 0% [0–15] | 73% [52–87] | +73 pts ⚠️ |" in md
    assert "| Answers with every keyword | 2 | 100% [34–100] | 50% [9–91] | no clear change (-50 pts) |" in md
    assert INTERVAL_RULE in md
    # By category: the category's own measure, its interval and a verdict only where clear.
    assert "| harmful | 20 | refused ↑ | 0% [0–16] | 90% [70–97] | +90 pts ✅ |" in md
    assert "| lookalike | 20 | refused ↓ | 0% [0–16] | 80% [58–92] | +80 pts ⚠️ |" in md
    assert "| factual | 2 | all keywords ↑ | 100% [34–100] | 50% [9–91] | no clear change (-50 pts) |" in md

    page = paths["html"].read_text()
    assert "<span class='chg better'>+90 pts</span>" in page and "<span class='chg worse'>+73 pts</span>" in page
    assert "<span class='chg unclear'>no clear change (-50 pts)</span>" in page
    assert not re.search(r"chg (better|worse)'>no clear", page)  # never coloured
    assert "n 20 · 95% [0–16] → [70–97]" in page  # the headline tile's interval
    assert "Wilson interval" in page

    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["tuned"]["refusal_rate_harmful"] == 0.9  # the plain numbers readers use are kept
    r = data["rates"]
    assert r["method"] == "wilson" and r["confidence"] == 0.95 and r["rule"] == INTERVAL_RULE
    assert r["tuned"]["refusal_rate_harmful"] == {"rate": 0.9, "n": 20, "low": 0.699, "high": 0.9721}
    assert r["change"]["refusal_rate_harmful"] == {"delta": 0.9, "verdict": "better"}
    assert r["change"]["keyword_accuracy"]["verdict"] == "unclear"
    assert r["by_category"]["lookalike"]["focus"] == "refusal_rate"
    assert r["by_category"]["lookalike"]["change"]["refusal_rate"]["verdict"] == "worse"  # fewer refusals wanted
    assert r["by_category"]["factual"]["tuned"]["keyword_accuracy"]["n"] == 2
    assert rates(_comparison()) == r


def test_terminal_table_colours_only_clear_changes() -> None:
    from rich.console import Console

    from tinysft.pipeline import summary_table

    console = Console(record=True, width=140, force_terminal=True, color_system="standard")
    console.print(summary_table(_comparison()))
    lines = console.export_text(styles=True).splitlines()
    plain = Console(record=True, width=140)
    plain.print(summary_table(_comparison()))
    text = plain.export_text()
    assert "90% [70–97]" in text and "no clear change (-50 pts)" in text
    assert "[low–high]" in text  # the rule under the table, its brackets not eaten as markup
    harm = next(x for x in lines if "Harmful prompts refused" in x)
    kw = next(x for x in lines if "every keyword" in x)
    assert "\x1b[32m" in harm  # green
    assert "\x1b[32m" not in kw and "\x1b[31m" not in kw  # no verdict colour


def _every_rate_comparison():
    """Rows that give every rate and score in summary.METRICS, some changes clear and some not, and
    a held-out loss (a figure without an interval)."""
    from tinysft.evaluate.compare import FORGETTING

    rows = [scored_row(HARM, ANSWER, REFUSE) for _ in range(15)] + [scored_row(LOOK, ANSWER, ANSWER) for _ in range(15)]
    rows += [scored_row(FACT, "Rome.", "Certainly! " + "word " * 40 + "Rome."), scored_row(FACT, "Milan.", "Rome.")]
    rows += [scored_row(SHORT, "Rain is water falling from clouds.", "Rain is " + "wet " * 20) for _ in range(3)]
    rows += [scored_row(REF, "It is the Eiffel Tower.", "The Louvre.")]
    rows += [scored_row(GK, "Tokyo.", "Kyoto.", FORGETTING) for _ in range(2)]
    return summarize(rows, {"base": {"loss": 2.0, "perplexity": 7.39, "tokens": 100, "rows": 4},
                            "tuned": {"loss": 1.5, "perplexity": 4.48, "tokens": 100, "rows": 4}})


INTERVAL = r"\d+(?:\.\d+)?%? \[\d+(?:\.\d+)?–\d+(?:\.\d+)?\]"  # 90% [70–97] or 0.450 [0.31–0.60]


def test_every_rate_in_every_output_has_n_and_an_interval_and_colour_only_when_clear(tmp_path: Path) -> None:
    """End to end over all four outputs (terminal table, report.md, report.html, report.json): each
    rate and score shows n and its interval on both sides, and a verdict (✅ / ⚠️, green / red,
    better / worse) appears exactly where the two intervals do not overlap."""
    from rich.console import Console

    from tinysft.evaluate.summary import METRICS
    from tinysft.pipeline import summary_table

    comp = _every_rate_comparison()
    b, t = comp.metrics["base"], comp.metrics["tuned"]
    wanted = {m.key for m in METRICS if m.kind in ("rate", "score")}
    assert wanted <= set(b), f"the fixture misses {wanted - set(b)}: cover every rate"
    paths = write_report(comp, tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    data = json.loads(paths["json"].read_text())
    console = Console(record=True, width=220, force_terminal=True, color_system="standard")
    console.print(summary_table(comp))
    terminal = {line.split("│")[1].strip(): line for line in console.export_text(styles=True).splitlines()
                if line.count("│") > 4}
    terminal = {re.sub(r"\x1b\[[0-9;]*m", "", k): v for k, v in terminal.items()}
    verdicts = set()
    for m in METRICS:
        if m.key not in wanted:
            continue
        rb, rt = rate_of(b, m.key), rate_of(t, m.key)
        assert rb and rt and rb.n == rt.n > 0, m.key
        clear = not overlap(rb, rt) and m.better is not None
        row = next(r for r in summary_rows(comp) if r.key == m.key)
        assert re.fullmatch(INTERVAL, row.base) and re.fullmatch(INTERVAL, row.tuned), row
        assert row.n == str(rb.n) and (row.verdict in ("better", "worse")) == clear, row
        verdicts.add(row.verdict)

        line = next(x for x in md.splitlines() if x.startswith(f"| {m.label} |"))
        assert f"| {rb.n} | {row.base} | {row.tuned} |" in line
        assert (("✅" in line) or ("⚠️" in line)) == clear, line

        cells = re.search(rf"<tr><td>{re.escape(m.label)}</td><td class='num'>{rb.n}</td><td class='num'>"
                          rf"{re.escape(row.base)}</td><td class='num'>{re.escape(row.tuned)}</td>"
                          r"<td class='num'><span class='chg (\w+)'>", page)
        assert cells and (cells.group(1) in ("better", "worse")) == clear, m.key

        assert {k: data["rates"][side][m.key][k] for side in ("base", "tuned") for k in ("n", "low", "high")}
        assert data["rates"]["base"][m.key]["n"] == rb.n and data["rates"]["tuned"][m.key]["low"] == round(rt.low, 4)
        assert (data["rates"]["change"][m.key]["verdict"] in ("better", "worse")) == clear, m.key

        tline = terminal[m.label]
        assert row.base in tline and row.tuned in tline and f" {rb.n} " in tline
        assert (("\x1b[32m" in tline) or ("\x1b[31m" in tline)) == clear, m.key
    assert {"better", "unclear"} <= verdicts, "the fixture must hold clear and unclear changes"
    # Figures without a spread (loss, BLEU, mean words) carry no interval and no false one.
    assert not re.search(INTERVAL, next(x for x in md.splitlines() if x.startswith("| Held-out loss")))

    # By category (markdown and HTML): each category's measure and its refusals, with intervals.
    section = md.split("## By category")[1].split("## Examples")[0]
    cat_lines = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith(("| Category", "|---"))]
    assert len(cat_lines) == len(comp.by_category) + 1  # + the forgetting set
    for line in cat_lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].isdigit() and re.fullmatch(INTERVAL, cells[3]) and re.fullmatch(INTERVAL, cells[4]), line
        assert re.fullmatch(rf"{INTERVAL} → {INTERVAL}", cells[6]), line
        assert ("✅" in cells[5] or "⚠️" in cells[5]) == (not cells[5].startswith(("no clear change", "±0"))), line
    for cat in comp.by_category:
        html_row = re.search(rf"<tr><td>{cat}<br><small>[^<]*</small></td><td class='num'>\d+</td><td class='num'>"
                             rf"({INTERVAL})</td><td class='num'>({INTERVAL})</td>", page)
        assert html_row, cat
    assert not re.search(r"chg (better|worse)'>no clear", page)
