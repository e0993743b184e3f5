"""Build onpolicy.jsonl: the mistakes a tuned run makes on prompts it was not trained on, as preference pairs.

Run by hand (outputs committed); issue 34 names on-policy data as a lever for a stable recipe:

    .venv/bin/python examples/polite-helper/make_onpolicy.py --run /tmp/tinysft-seeds/tax-r3l3-s42

The run (a tuned adapter of the demo's recipe) answers, greedily, the harmful requests of
more-refusals.jsonl and the harmless look-alikes of more-answers.jsonl (neither is in the demo
recipe's training data; both are checked against the held-out sets like every training file).
tinysft's own refusal detector (``tinysft.evaluate.metrics.is_refusal``) judges each answer, and
every mistake becomes a row whose ``rejected`` answer is the run's own:

- a harmful request it answered behind a compliant opener ("Sure!", "Happy to help!", ...: the
  failure issue 34 describes): the hand-written refusal as the answer, the run's answer as
  ``rejected`` (category ``refusal``, its ``harm_area`` kept). Answers the detector does not count
  as refusals but that do not comply either ("I'm really sorry you're feeling this way ...") are
  not pushed down;
- a look-alike it refused (and did not open as a compliant answer): the base model's answer from
  more-answers.jsonl as the answer, the run's refusal as ``rejected`` (category ``lookalike``).

Answers it got right are left out: the recipe already teaches those. With ``preference_tokens: 8``
only the first 8 tokens of a rejected answer are used, so answers are generated to 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tinysft.data.formats import Conversation
from tinysft.evaluate.generate import generate_rows
from tinysft.evaluate.metrics import is_refusal
from tinysft.models.load import load_run

HERE = Path(__file__).resolve().parent
ANSWER_TOKENS = 32
COMPLIANT = re.compile(r"(sure|of course|certainly|absolutely|happy to help|glad you asked|great question)\b", re.I)


def pool() -> list[dict]:
    """The rows it answers: more-refusals.jsonl's harmful requests and more-answers.jsonl's look-alikes
    (also the validation split of benchmarks/recipe_checkpoints.py)."""
    rows = [json.loads(x) for name in ("more-refusals.jsonl", "more-answers.jsonl")
            for x in (HERE / name).read_text().splitlines() if x.strip()]
    return [r for r in rows if r["category"] in ("refusal", "lookalike")]


def prompt_of(row: dict) -> Conversation:
    """The row's first user turn as a prompt, its category kept (``expected_refusal`` reads it)."""
    return Conversation([row["messages"][0]], category=row["category"])


def mistakes(run: Path) -> list[dict]:
    """The pool rows the run gets wrong, each with the run's own answer as ``rejected``."""
    rows_in = pool()
    prompts = [prompt_of(r) for r in rows_in]
    loaded = load_run(run, log=lambda _m: None)
    answers = generate_rows(loaded.model, loaded.tokenizer, prompts, tuned=True, max_new_tokens=ANSWER_TOKENS,
                            batch_size=256, temperature=0.0)
    rows = []
    for row, answer in zip(rows_in, answers, strict=True):
        harmful, complies = row["category"] == "refusal", bool(COMPLIANT.match(answer.strip()))
        if (harmful and complies and not is_refusal(answer)) or (not harmful and not complies and is_refusal(answer)):
            rows.append({**row, "rejected": answer.strip()})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as a JSONL training file (UTF-8 kept as is)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a tuned run of the demo recipe")
    ap.add_argument("--out", type=Path, default=HERE / "onpolicy.jsonl")
    args = ap.parse_args()
    rows_in = pool()
    rows = mistakes(args.run)
    write_rows(args.out, rows)
    n_harm = sum(r["category"] == "refusal" for r in rows)
    print(f"{args.out}: {n_harm} harmful requests answered, {len(rows) - n_harm} look-alikes refused "
          f"(of {sum(r['category'] == 'refusal' for r in rows_in)} and {sum(r['category'] == 'lookalike' for r in rows_in)})")


if __name__ == "__main__":
    main()
