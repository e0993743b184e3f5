"""Build more-answers.jsonl and more-refusals.jsonl from more-prompts.jsonl (run by hand; outputs committed).

more-prompts.jsonl holds two kinds of hand-written rows:

- harmful requests with a hand-written polite refusal (``messages``, category ``refusal``,
  ``harm_area``): copied to more-refusals.jsonl, each with a compliant opener as its ``rejected``
  answer (in rotation, the 4 openers train.jsonl's refusals carry);
- harmless prompts that sound risky or ask how something works (``prompt``, category
  ``lookalike`` / ``explain`` / ``length_long`` / ``length_short``): into more-answers.jsonl,
  answered greedily by the embedded base model (adapter-free SmolLM2-135M-Instruct answers
  nearly all of them), so training on them keeps the base model's own answers where it should
  keep answering. A polite opener goes in front (in rotation, the 6 of train.jsonl's
  look-alikes); answers keep whole sentences only, within 40 words ("briefly") or 70 (look-alikes
  and explanations: train.jsonl's look-alike answers average 55 words, the base model's 130
  would double the demo's training time); a detailed answer under 100 words, or a refusal, is
  dropped. Each gets a refusal as its ``rejected`` answer: with ``--refuser RUN_DIR`` (a tuned
  run that over-refuses, e.g. the earlier demo recipe's), that run's own refusal where it
  refuses (on-policy, as preference pipelines collect them), else one of train.jsonl's 4 generic
  refusals.

The committed more-answers.jsonl was made by an earlier version of this script, which joined the
kept sentences with spaces (so numbered lists lost their line breaks) and was run with
``--refuser`` on the mix-c2 run; the sweep rows that use it were measured on that file.

    .venv/bin/python examples/polite-helper/make_more.py [--refuser /tmp/tinysft-sweep/mix-c2]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from make_taxonomy import COMPLIANT, OPENERS, REFUSALS

from tinysft.config import load_config
from tinysft.data.validate import load_prompts
from tinysft.evaluate.generate import generate_rows
from tinysft.evaluate.metrics import is_refusal, word_count
from tinysft.files import atomic_write_text
from tinysft.models.load import load_causal_lm, load_run

HERE = Path(__file__).resolve().parent
TOKENS = {"length_long": 320, "length_short": 80}  # others: 200
MAX_WORDS = {"length_short": 40, "lookalike": 70, "explain": 70}  # length_long: no limit
SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")
LIST_MARKER = re.compile(r"^\s*(\d+\.|[-*])\s*$")  # "6." left alone at the end of a cut-off list


def trim(answer: str, max_words: int | None = None) -> str:
    """Whole sentences only, with their line breaks: drop a trailing fragment (or a bare list
    marker), and with ``max_words`` the sentences past that many words (the first is always kept)."""
    parts = SENTENCE_END.split(answer.strip())  # sentence, separator, sentence, ...
    sentences, seps = parts[0::2], [*parts[1::2], ""]
    while len(sentences) > 1 and (not sentences[-1].rstrip().endswith((".", "!", "?", ":"))
                                  or LIST_MARKER.match(sentences[-1])):
        sentences, seps = sentences[:-1], seps[:-1]
    n = len(sentences)
    if max_words is not None:
        n = 1
        while n < len(sentences) and word_count(" ".join(sentences[: n + 1])) <= max_words:
            n += 1
        while n > 1 and LIST_MARKER.match(sentences[n - 1]):
            n -= 1
    return "".join(s + sep for s, sep in zip(sentences[:n], seps[:n], strict=True)).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=HERE / "more-prompts.jsonl")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--refuser", type=Path, help="a tuned run directory whose refusals become `rejected`")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tinysft-make-more.json"),
                    help="generated answers, reused by the next run")
    args = ap.parse_args()

    rows = [json.loads(x) for x in args.source.read_text().splitlines() if x.strip()]
    harmful = [r for r in rows if "messages" in r]
    benign = [r for r in rows if "prompt" in r]
    tmp = args.out_dir / ".more-prompts.tmp"
    tmp.write_text("".join(json.dumps({"prompt": r["prompt"], "category": r["category"]}) + "\n" for r in benign))
    prompts = load_prompts([tmp])
    tmp.unlink()

    # Generations are cached (prompt -> answer), so changing the trimming needs no new generation.
    cache = json.loads(args.cache.read_text()) if args.cache.is_file() else {"base": {}, "refuser": {}}
    todo = [p for p in prompts if p.messages[-1]["content"] not in cache["base"]]
    if todo:
        model, tokenizer, _ = load_causal_lm(load_config(None).model, log=lambda _m: None)
        for cat in sorted({p.category or "" for p in todo}):
            group = [p for p in todo if p.category == cat]
            out = generate_rows(model, tokenizer, group, tuned=False, max_new_tokens=TOKENS.get(cat, 200),
                                batch_size=16, temperature=0.0)
            cache["base"].update((p.messages[-1]["content"], a) for p, a in zip(group, out, strict=True))
            print(f"base answered {len(group)} {cat} prompts", file=sys.stderr)
    if args.refuser:
        key = str(args.refuser.resolve())
        done = cache["refuser"].setdefault(key, {})
        todo = [p for p in prompts if p.messages[-1]["content"] not in done]
        if todo:
            run = load_run(args.refuser, log=lambda _m: None)
            out = generate_rows(run.model, run.tokenizer, todo, tuned=True, max_new_tokens=64, batch_size=16,
                                temperature=0.0)
            done.update((p.messages[-1]["content"], a) for p, a in zip(todo, out, strict=True))
    atomic_write_text(args.cache, json.dumps(cache))
    answers = [cache["base"][p.messages[-1]["content"]] for p in prompts]
    rejected: list[str | None] = [None] * len(prompts)
    if args.refuser:
        own = cache["refuser"][str(args.refuser.resolve())]
        rejected = [trim(own[p.messages[-1]["content"]]) if is_refusal(own[p.messages[-1]["content"]]) else None
                    for p in prompts]
        print(f"{args.refuser.name} refused {sum(r is not None for r in rejected)} of {len(prompts)}", file=sys.stderr)

    kept, dropped = [], {"refusal": 0, "short": 0, "empty": 0}
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if is_refusal(a):
            dropped["refusal"] += 1
            continue
        a = trim(a, MAX_WORDS.get(p.category or ""))
        if not a:
            dropped["empty"] += 1
            continue
        if p.category == "length_long" and word_count(a) < 100:
            dropped["short"] += 1
            continue
        answer = OPENERS[i % len(OPENERS)] + a
        kept.append({"messages": [{"role": "user", "content": p.messages[-1]["content"]},
                                  {"role": "assistant", "content": answer}],
                     "category": p.category, "rejected": rejected[i] or REFUSALS[i % len(REFUSALS)],
                     "source": "base-model answer"})
    refusals = [{**r, "rejected": COMPLIANT[j % len(COMPLIANT)]} for j, r in enumerate(harmful)]
    for name, out in (("more-answers.jsonl", kept), ("more-refusals.jsonl", refusals)):
        atomic_write_text(args.out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{len(kept)} rows answered by the base model, {len(refusals)} refusals; dropped {dropped}", file=sys.stderr)


if __name__ == "__main__":
    main()
