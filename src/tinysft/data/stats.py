"""`tinysft data check`: validate, then describe the data (formats, categories, lengths, duplicates)."""

from __future__ import annotations

import hashlib
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinysft.data.formats import Conversation
from tinysft.data.render import show_mask as render_mask
from tinysft.data.rules import check_trainable, require_two_labels
from tinysft.data.validate import DataError, Problem, load_conversations, load_labeled


@dataclass
class CheckReport:
    files: list[str]
    stats: DataStats | None = None
    token_lengths: list[int] = field(default_factory=list)
    trained_tokens: list[int] = field(default_factory=list)
    max_length: int = 0
    truncated: int = 0
    labels: Counter | None = None
    masks: list[Any] = field(default_factory=list)  # rich Texts for --show-mask


def check_chat(files: list[str], *, tokenizer: Callable[[], Any] | None = None, max_length: int = 512,
               show_mask: int = 0, strict: bool = False, system_prompt: str | None = None) -> CheckReport:
    """Validate chat files (raises DataError), then, with the tokenizer if given, apply the
    trainer's row rules (``rules.check_trainable``: rendered and truncated to ``max_length`` as in
    training) and measure. Token counts are after truncation (what training sees).

    ``tokenizer`` is a function that returns one (the caller loads it: data/ loads no model),
    called only once the files are valid, so data errors come before any model download.

    Exact duplicate rows are reported in the stats; with ``strict`` they are errors.
    """
    convs = load_conversations(files)
    report = CheckReport(files, conversation_stats(convs), max_length=max_length)
    if strict:
        _refuse_duplicates(report.stats)
    if tokenizer is None:
        return report
    tokenizer = tokenizer()
    # The trainer's own rules, with its options: what passes here, trains.
    for c, r in zip(convs, check_trainable(convs, tokenizer, max_length=max_length, system_prompt=system_prompt),
                    strict=True):
        report.token_lengths.append(len(r.input_ids))
        report.trained_tokens.append(r.n_trained)
        report.truncated += r.truncated
        if len(report.masks) < show_mask:
            report.masks.append((c.source, render_mask(r, tokenizer)))
    return report


def _refuse_duplicates(stats: DataStats | None) -> None:
    if stats is not None and stats.exact_duplicates:
        raise DataError([Problem.at(second, "(row)", f"exact duplicate of {first}",
                                     "drop one of the two rows (or check without --strict to only count them)")
                         for first, second in stats.exact_duplicates])


def check_labeled(files: list[str], strict: bool = False) -> CheckReport:
    """Validate classification files (raises DataError; a single class too, as training does);
    with ``strict``, duplicate texts are errors."""
    rows = load_labeled(files)
    report = CheckReport(files, labels=Counter(r.label for r in rows))
    require_two_labels(sorted(report.labels), files)  # the trainer's rule
    report.stats = DataStats(rows=len(rows))
    seen: dict[str, str] = {}
    for r in rows:
        key = " ".join(r.text.lower().split())
        if key in seen:
            report.stats.exact_duplicates.append((seen[key], r.source))
        seen.setdefault(key, r.source)
        report.stats.formats[r.format] += 1
    if strict:
        _refuse_duplicates(report.stats)
    return report


def _summary(values: list[int]) -> str:
    if not values:
        return "—"
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return f"min {min(values)} · median {int(statistics.median(values))} · p95 {int(q[18])} · max {max(values)}"


def print_report(report: CheckReport, console: Any) -> None:
    from rich.table import Table

    s = report.stats
    assert s is not None
    console.print(f"[bold green]OK[/bold green] {s.rows} rows in {', '.join(report.files)}")
    table = Table(show_header=True)
    table.add_column("what")
    table.add_column("value")
    table.add_row("formats", ", ".join(f"{k}: {v}" for k, v in s.formats.most_common()))
    if report.labels is not None:
        total = sum(report.labels.values())
        table.add_row("labels", ", ".join(f"{k}: {v} ({v / total:.0%})" for k, v in sorted(report.labels.items())))
    else:
        total = sum(s.categories.values())
        table.add_row("categories", ", ".join(f"{k}: {v} ({v / total:.0%})" for k, v in s.categories.most_common()))
        table.add_row("assistant turns", ", ".join(f"{k}: {v}" for k, v in sorted(s.turns.items())))
    if report.token_lengths:
        table.add_row("tokens per row", _summary(report.token_lengths))
        table.add_row("trained tokens per row", _summary(report.trained_tokens))
        table.add_row(f"rows over {report.max_length} tokens", f"{report.truncated} (would be truncated)")
        table.add_row("total tokens", f"{sum(report.token_lengths):,} ({sum(report.trained_tokens):,} trained)")
    table.add_row("exact duplicates", str(len(s.exact_duplicates)))
    table.add_row("near duplicates", str(len(s.near_duplicates)))
    console.print(table)
    for a, b in s.exact_duplicates[:10]:
        console.print(f"  duplicate: {a} == {b}", highlight=False)
    for a, b, sim in s.near_duplicates[:10]:
        console.print(f"  near duplicate ({sim:.2f}): {a} ~ {b}", highlight=False)
    for source, text in report.masks:
        console.print(f"\n[bold]{source}[/bold] (trained tokens highlighted)")
        console.print(text)


# ---- duplicates and near-duplicates --------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9']+")


def _norm_key(conv: Conversation) -> str:
    text = "\x1f".join(f"{m['role']}:{' '.join(m['content'].lower().split())}" for m in conv.messages)
    return hashlib.sha1(text.encode()).hexdigest()


def _shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + 2]) for i in range(max(1, len(words) - 1))} if words else set()


@dataclass
class DataStats:
    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    exact_duplicates: list[tuple[str, str]] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)


def conversation_stats(convs: list[Conversation], near_threshold: float = 0.8, max_pairs: int = 5000) -> DataStats:
    """Counts per format/category, exact duplicates (same normalised messages) and near duplicates
    (Jaccard similarity of word bigrams of the first user message >= ``near_threshold``)."""
    stats = DataStats(rows=len(convs))
    seen: dict[str, str] = {}
    for c in convs:
        stats.formats[c.format] += 1
        stats.categories[c.category or "(none)"] += 1
        stats.turns[sum(m["role"] == "assistant" for m in c.messages)] += 1
        key = _norm_key(c)
        if key in seen:
            stats.exact_duplicates.append((seen[key], c.source))
        else:
            seen[key] = c.source
    firsts = [(c.source, _shingles(next((m["content"] for m in c.messages if m["role"] == "user"), ""))) for c in convs]
    # O(n^2) over rows, fine for the few thousand rows an SFT set of this size has; capped.
    n = min(len(firsts), max_pairs)
    for i in range(n):
        a_src, a = firsts[i]
        if not a:
            continue
        for j in range(i + 1, n):
            b_src, b = firsts[j]
            if not b:
                continue
            sim = len(a & b) / len(a | b)
            if near_threshold <= sim < 1.0 or (sim == 1.0 and not _same(convs[i], convs[j])):
                stats.near_duplicates.append((a_src, b_src, round(sim, 2)))
    return stats


def _same(a: Conversation, b: Conversation) -> bool:
    return _norm_key(a) == _norm_key(b)
