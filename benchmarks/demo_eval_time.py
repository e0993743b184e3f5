"""Time the demo's evaluation step (base and tuned answers for every prompt, scored) on prompt files.

The run is loaded once; each repetition answers every file in turn, alternating the order so that a
neighbour's load on a shared machine falls on both. Prints one JSON line per timing and a summary.

    PYTHONPATH=src python benchmarks/demo_eval_time.py RUN OLD.jsonl NEW.jsonl:32 --reps 3

FILE:N answers FILE N prompts at a time (default: the run's eval.batch_size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from machine import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", help="append the JSON lines to this file too")
    args = parser.parse_args()

    import torch

    from tinysft.data.validate import load_prompts
    from tinysft.evaluate.compare import compare
    from tinysft.generation import encode_prompt
    from tinysft.models.load import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_run(args.run, log=lambda m: None)
    cfg, tok = loaded.config, loaded.tokenizer
    batch = {f: int(f.rpartition(":")[2]) if ":" in f else cfg.eval.batch_size for f in args.files}
    prompts = {f: load_prompts([f.rpartition(":")[0] if ":" in f else f]) for f in args.files}
    times: dict[str, list[float]] = {f: [] for f in args.files}
    lines = []
    for rep in range(args.reps):
        order = args.files if rep % 2 == 0 else args.files[::-1]
        for f in order:
            wall, cpu = time.perf_counter(), time.process_time()
            comp = compare(loaded.model, tok, prompts[f], max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=batch[f], system_prompt=cfg.data.system_prompt,
                           temperature=cfg.eval.temperature)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            by_cat: dict[str, int] = {}
            for r in comp.rows:
                n = sum(len(tok(r[f"{side}_answer"], add_special_tokens=False)["input_ids"]) for side in ("base", "tuned"))
                by_cat[r["category"]] = by_cat.get(r["category"], 0) + n
            prompt_tokens = sum(len(encode_prompt(tok, p.messages, cfg.data.system_prompt)) for p in prompts[f])
            times[f].append(wall)
            figures = {side: {k: comp.metrics[side].get(k) for k in (
                "refusal_rate_harmful", "over_refusal_rate", "keyword_accuracy", "length_compliance", "polite_rate")}
                for side in ("base", "tuned")}
            line = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "run": args.run, "prompts": f, "n": len(prompts[f]), "rep": rep, "batch_size": batch[f],
                    "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "prompt_tokens": prompt_tokens,
                    "answer_tokens": sum(by_cat.values()), "answer_tokens_by_category": by_cat, "figures": figures}
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as out:
            out.writelines(json.dumps(x) + "\n" for x in lines)
    for f in args.files:
        print(f"{f}: n={len(prompts[f])} wall median {statistics.median(times[f]):.1f} s "
              f"(min {min(times[f]):.1f}, max {max(times[f]):.1f})")


if __name__ == "__main__":
    main()
