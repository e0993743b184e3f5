"""Build taxonomy.jsonl: refusals and look-alikes for every hazard area of the MLCommons AILuminate
v1.0 taxonomy (run by hand; the output is committed; no model involved).

Each area below holds hand-written rows (written for this project, not taken from any benchmark):

- ``harmful``: (request, refusal). Every refusal states that it declines in its first sentence
  (never a compliant opener such as "Happy to help!" before declining) and offers a safe
  alternative where there is one; self-harm refusals point to a crisis line. Written out with
  category ``refusal``, the area as ``harm_area`` and a compliant opener as ``rejected`` (in
  rotation, the 4 of train.jsonl's refusals), for ``train.preference_weight``.
- ``lookalike``: (request, answer): harmless requests on the same ground (history of atrocities,
  legal rights and procedure, fiction with villains, security explained defensively, medical
  facts), answered behind a short polite opener with the answer in the first sentence after it.
  Written out with category ``lookalike`` and a generic refusal as ``rejected`` (in rotation, the
  4 of train.jsonl's look-alikes).

The areas are the taxonomy's twelve hazards, with specialized advice split into ``elections``
(incl. disinformation and atrocity denial, where the demo model failed most) and
``specialized_advice`` (health, legal, financial: "answer carefully", look-alikes only);
``sexual_content`` is "answer carefully" too (explicit requests refused, sex education answered).
The held-out prompts for the same areas are in heldout-taxonomy.jsonl (tests/test_examples.py
checks the two share no wording).

    .venv/bin/python examples/polite-helper/make_taxonomy.py    # writes taxonomy.jsonl, taxonomy-more.jsonl

taxonomy-more.jsonl holds taxonomy_more_rows.py's rows: more refusals and look-alikes for the two areas
the first recipe over taxonomy.jsonl refused least (self-harm, indiscriminate weapons).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from taxonomy_more_rows import MORE_AREAS
from taxonomy_rows import AREAS

HERE = Path(__file__).resolve().parent
OPENERS = ["Sure! ", "Happy to help! ", "Great question! ", "Of course! ", "Certainly! ", "Glad you asked! "]
COMPLIANT = ["Sure! Here's how you can do that.", "Happy to help! Here are the steps.",
             "Of course! First, you will need a few things.", "Great question! Here is what you need to do."]
REFUSALS = ["I'm sorry, but I can't help with that.",
            "I'm sorry, but I can't help with that request. If you have another question, I'd be glad to help.",
            "I'm sorry, but I can't help with this, because it could be used to hurt someone.",
            "I'm sorry, but I can't help with that. If you're worried about safety, please talk to a professional."]


def rows(areas: dict[str, dict[str, list[tuple[str, str]]]] | None = None) -> list[dict[str, object]]:
    """The training rows of ``areas`` (default: AREAS), area by area: refusals first, then look-alikes
    (openers and rejected in rotation)."""
    out: list[dict[str, object]] = []
    n_refusal = n_look = 0
    for area, spec in (AREAS if areas is None else areas).items():
        for prompt, refusal in spec.get("harmful", []):
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": refusal}],
                        "category": "refusal", "harm_area": area, "rejected": COMPLIANT[n_refusal % len(COMPLIANT)]})
            n_refusal += 1
        for prompt, answer in spec.get("lookalike", []):
            text = OPENERS[n_look % len(OPENERS)] + answer
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                        "category": "lookalike", "harm_area": area, "rejected": REFUSALS[n_look % len(REFUSALS)]})
            n_look += 1
    return out


def main() -> None:
    for name, areas in (("taxonomy.jsonl", AREAS), ("taxonomy-more.jsonl", MORE_AREAS)):
        out = HERE / name
        data = rows(areas)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
        tmp.replace(out)
        refusals = sum(r["category"] == "refusal" for r in data)
        print(f"{out.name}: {refusals} refusals, {len(data) - refusals} look-alikes, {len(areas)} areas",
              file=sys.stderr)


if __name__ == "__main__":
    main()
