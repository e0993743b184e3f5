"""Does a second, on-policy DPO stage make the demo recipe stable over seeds? (issue 34 item 2)

Run by hand (not a test), on the demo recipe's runs (recipe ``tax-r3l3`` of recipe_seeds.py):

    .venv/bin/python benchmarks/recipe_seeds.py --recipe tax-r3l3 --seeds 42,7,11,13,17 --threads 1
    .venv/bin/python benchmarks/recipe_two_stage.py --seeds 42,7,11,13,17 --threads 1 --batch-size 256
    .venv/bin/python benchmarks/recipe_seeds.py --table --results FILE

The second stage of the SmolLM2 alignment recipe (and of most since InstructGPT) is a DPO pass
whose reference is the SFT model itself, on pairs that model's own answers supply. Per seed:

1. the stage-1 run (``--out-root/tax-r3l3-sSEED``) is merged into a plain model folder
   (``tinysft merge``'s code, bf16): stage 2's base, and so its DPO reference;
2. that run answers the validation pool (more-refusals.jsonl's harmful requests, more-answers.jsonl's
   look-alikes; neither in the demo recipe's data, both checked against the held-out sets), and
   each mistake becomes a pair with the run's own answer as ``rejected``
   (examples/polite-helper/make_onpolicy.py's ``mistakes``, the rule onpolicy.jsonl was made by,
   here per seed);
3. stage 2 trains a new LoRA on the merged model: those pairs (x3) beside a lighter mix of the demo
   recipe's rows, with ``train.preference_reference`` (DPO against the merged model) and a fifth of
   the stage-1 learning rate;
4. it is scored on the held-out sets exactly as recipe_seeds.py scores a run (base figures: the
   original base model's cached answers), one JSON line per seed to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "polite-helper"))
from make_onpolicy import mistakes, write_rows

from recipe_seeds import DEMO_WEIGHTS, HELDOUT, ROOT, WITH_TAXONOMY, report, run_seed
from tinysft.export.merge import merge_run

# Stage 2: the on-policy pairs three times an epoch, the demo's refusals, look-alikes and length rows
# at half weight and its other rows as in stage 1 (0.25); 8 pool pairs per step, so each on-policy
# pair enters the DPO term about twice; lr 2e-4 against stage 1's 1e-3.
# Variants by name: the category weights of stage 2.
STAGE2_WEIGHTS = {
    "tax-r3l3-2dpo": {**DEMO_WEIGHTS, "refusal": 0.5, "lookalike": 0.5, "length_long": 0.5, "length_short": 0.5},
    # Look-alikes at full weight: stage 2's rows lean to answering (its on-policy pairs lean to refusing).
    "tax-r3l3-2dpo-l1": {**DEMO_WEIGHTS, "refusal": 0.5, "lookalike": 1, "length_long": 0.5, "length_short": 0.5},
}
ONPOLICY_WEIGHT = 6  # times the category's weight: with 0.5, each on-policy row three times


def stage2_overrides(name: str, merged: Path, pairs: Path) -> dict[str, dict[str, Any]]:
    """config.yaml overrides for stage 2 (variant ``name``) on ``merged`` with the seed's on-policy ``pairs``."""
    return {"model": {"name": str(merged)},
            "data": {"train": [*WITH_TAXONOMY, str(pairs)], "category_weights": STAGE2_WEIGHTS[name],
                     "file_weights": {pairs.name: ONPOLICY_WEIGHT}},
            "train": {"learning_rate": 2e-4, "preference_reference": True, "preference_pairs": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", default="tax-r3l3", help="recipe_seeds.py recipe whose runs are stage 1")
    ap.add_argument("--name", default="tax-r3l3-2dpo", choices=sorted(STAGE2_WEIGHTS),
                    help="the stage-2 variant: the recipe name of its runs and records")
    ap.add_argument("--seeds", default="42,7,11,13,17")
    ap.add_argument("--prompts", type=Path, nargs="+", default=HELDOUT)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--short-cap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out-root", type=Path, default=Path("/tmp/tinysft-seeds"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "recipe_seeds.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        stage1 = args.out_root / f"{args.stage1}-s{seed}"
        if not (stage1 / "adapter" / "adapter_config.json").is_file():
            sys.exit(f"{stage1}: no finished stage-1 run; train it with recipe_seeds.py --recipe {args.stage1}")
        merged = args.out_root / f"{args.stage1}-s{seed}-merged"
        if not (merged / "config.json").is_file():
            merge_run(stage1, merged, dtype="bfloat16", force=merged.exists(), log=lambda _m: None)
        pairs = args.out_root / f"{args.stage1}-s{seed}-onpolicy.jsonl"
        if not pairs.is_file():
            write_rows(pairs, mistakes(stage1))
        rows = [json.loads(x) for x in pairs.read_text().splitlines() if x.strip()]
        record = run_seed(args.name, stage2_overrides(args.name, merged, pairs), seed, args)
        record["stage1"] = str(stage1)
        record["onpolicy_pairs"] = {"refusal": sum(r["category"] == "refusal" for r in rows),
                                    "lookalike": sum(r["category"] == "lookalike" for r in rows)}
        report(f"{args.name}-s{seed} ({record['onpolicy_pairs']})", record, args.results)


if __name__ == "__main__":
    main()
