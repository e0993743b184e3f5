"""Where the base and tuned passes of an evaluation spend their time, per answer token (issue 33).

Run by hand (not a test); record the figures in docs/benchmarks.md:

    .venv/bin/python benchmarks/decode_sides.py --run /tmp/tinysft-seeds/tax-r3l3-s42 \\
        --out benchmarks/results/decode_sides.json

Both passes answer the same prompts (default: the 158 of heldout.jsonl, greedy, at most 160 new
tokens, 256 rows, as ``tinysft eval`` does), alternating which goes first. The decoder's ``admit``
(the prompts' prefill) and ``step`` (one token for every active row) are timed, and each step's
number of active rows is kept, so a pass's time per answer token splits into

- prefill: the same prompts, so the same work on both sides, spread over each side's answer tokens;
- decode steps, and among them the steps with few active rows (the batch's tail, when most answers
  have ended and a step costs nearly what a full one does).

``--fixed`` adds a second measurement in which every answer runs to exactly ``--max-new-tokens``
(end-of-turn tokens not special), so both passes do the same work token for token: the per-token
cost of the passes themselves, apart from how long their answers are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model
from tinysft import generation
from tinysft.data.validate import load_prompts
from tinysft.models import llama_decode
from tinysft.models.load import load_run

ROOT = Path(__file__).resolve().parents[1]
TAIL_ROWS = 16  # a step with fewer active rows than this counts as the batch's tail


class Timed(llama_decode.FastBackend):
    """FastBackend that times its admits and steps and keeps each step's active rows."""

    log: ClassVar[dict[str, Any]] = {}

    def admit(self, items: list[tuple[int, list[int]]]) -> torch.Tensor:
        t = time.perf_counter()
        out = super().admit(items)
        self.log["prefill_s"] += time.perf_counter() - t
        return out

    def step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        t = time.perf_counter()
        out = super().step(rows, tokens)
        self.log["steps"].append((len(rows), time.perf_counter() - t))
        return out


def one_pass(model: Any, tokenizer: Any, prompts: list[list[int]], tuned: bool, args: argparse.Namespace,
             fixed: bool) -> dict[str, Any]:
    Timed.log = {"prefill_s": 0.0, "steps": []}
    start = time.perf_counter()
    with generation.adapter_state(model, tuned):
        answers = generation.decode(model, generation._NoStops() if fixed else tokenizer, prompts,
                                    generation.Sampling(max_new_tokens=args.max_new_tokens),
                                    batch_size=args.batch_size)
    wall = time.perf_counter() - start
    tokens = sum(len(a.tokens) for a in answers)
    steps = Timed.log["steps"]
    step_s = sum(s for _, s in steps)
    tail = [(r, s) for r, s in steps if r < TAIL_ROWS]
    ms = 1000 / max(tokens, 1)
    return {"side": "tuned" if tuned else "base", "fixed_length": fixed, "wall_s": round(wall, 2),
            "answer_tokens": tokens, "steps": len(steps), "mean_rows": round(sum(r for r, _ in steps) / max(len(steps), 1), 1),
            "prefill_s": round(Timed.log["prefill_s"], 2), "step_s": round(step_s, 2),
            "tail_steps": len(tail), "tail_s": round(sum(s for _, s in tail), 2),
            "ms_per_token": round(wall * ms, 3), "prefill_ms_per_token": round(Timed.log["prefill_s"] * ms, 3),
            "step_ms_per_token": round(step_s * ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a tinysft run of a llama-shaped model (its adapter is the tuned side)")
    ap.add_argument("--prompts", type=Path, default=ROOT / "examples" / "polite-helper" / "heldout.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="passes per side (alternating which side goes first)")
    ap.add_argument("--fixed", action="store_true", help="also time both sides with every answer exactly --max-new-tokens long")
    ap.add_argument("--out", type=Path, help="a JSON file for the results")
    args = ap.parse_args()
    llama_decode.FastBackend = Timed  # decode() builds its backend through the module
    loaded = load_run(args.run, log=lambda _m: None)
    prompts = [generation.encode_prompt(loaded.tokenizer, p.messages) for p in load_prompts([args.prompts])]
    passes = []
    for fixed in (False, True) if args.fixed else (False,):
        for rep in range(args.repeats):
            for tuned in (False, True) if rep % 2 == 0 else (True, False):
                res = one_pass(loaded.model, loaded.tokenizer, prompts, tuned, args, fixed)
                passes.append(res)
                print(json.dumps(res), flush=True)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
           "torch_threads": torch.get_num_threads(), "run": str(args.run), "prompts": str(args.prompts),
           "n_prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "passes": passes}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
