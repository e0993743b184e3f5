"""tinysft's decoder vs a plain transformers generate loop vs llama.cpp, on the same prompts.

Run by hand (not a test); record the figures in docs/benchmarks.md:

    .venv/bin/python benchmarks/generate_vs_llamacpp.py --run runs/demo \\
        --out benchmarks/results/generate_vs_llamacpp.json

``--run`` is a tinysft run of the embedded model (``tinysft demo`` or ``tinysft train``). In one
process, one after another:

1. tinysft: ``load_run`` + base answers + tuned answers for every prompt (greedy, at most
   ``--max-new-tokens``, ``--batch-size`` rows, continuous batching): the wall time includes the load.
   Then time to first token for one stream (one prompt, one new token), the median of 5 prompts.
2. transformers: ``model.generate`` on the same loaded run (PEFT adapter on), batches of
   ``--batch-size`` left-padded prompts sorted by length, as a user would write it; on the first
   ``--hf-prompts`` prompts (it is the slow one).
3. llama.cpp (llama-cpp-python) on tinysft's own f16 GGUF export of the run (``tinysft export``,
   the adapter merged): one prompt at a time, as a user of its Python API would, fed the same
   prompt token ids; time to first token per prompt.

Answer tokens/s counts the answer tokens (up to and excluding the end-of-turn token) over the wall
time of that side's decoding. Greedy agreement: answers identical to tinysft's tuned answers, and
the share of tokens before the first difference. The machine's load (``os.getloadavg``) is recorded
before and after each side: on a shared CPU, compare figures only within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    same, prefix, total = 0, 0, 0
    for a, b in zip(ref, got, strict=False):
        same += a == b
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        prefix += n
        total += max(len(a), len(b), 1)
    return {"identical_answers": same / max(len(got), 1), "tokens_before_first_difference": prefix / max(total, 1)}


def tinysft_side(args: argparse.Namespace, prompts_text: list[str]) -> tuple[dict[str, Any], Any, list[list[int]]]:
    from tinysft.generation import Sampling, adapter_state, decode, encode_prompt
    from tinysft.models.load import load_run

    t0 = time.perf_counter()
    loaded = load_run(args.run, log=lambda m: None)
    model, tok = loaded.model, loaded.tokenizer
    load_s = time.perf_counter() - t0
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], loaded.config.data.system_prompt) for p in prompts_text]
    greedy = Sampling(max_new_tokens=args.max_new_tokens)
    from tinysft.models.llama_decode import decode_dtype

    result: dict[str, Any] = {"load_s": round(load_s, 2), "dtype": str(next(model.parameters()).dtype),
                              "decode_dtype": str(decode_dtype(model)),
                              "load_before": load()}
    answers: dict[str, list[list[int]]] = {}
    for side, tuned in (("base", False), ("tuned", True)):
        t = time.perf_counter()
        with adapter_state(model, tuned):
            out = decode(model, tok, prompts, greedy, batch_size=args.batch_size)
        wall = time.perf_counter() - t
        n = sum(len(a.tokens) for a in out)
        answers[side] = [a.tokens for a in out]
        result[side] = {"wall_s": round(wall, 2), "answer_tokens": n, "tokens_per_s": round(n / wall, 1),
                        "ms_per_answer_token": round(1000 * wall / max(n, 1), 2)}
    result["total_with_load_s"] = round(load_s + result["base"]["wall_s"] + result["tuned"]["wall_s"], 2)
    ttft = []
    for p in prompts[:5]:
        t = time.perf_counter()
        decode(model, tok, [p], Sampling(max_new_tokens=1), batch_size=1)
        ttft.append(time.perf_counter() - t)
    result["ttft_s_median"] = round(statistics.median(ttft), 3)
    result["load_after"] = load()
    return result, loaded, answers["tuned"]


def transformers_side(args: argparse.Namespace, loaded: Any, prompts_text: list[str],
                      ref: list[list[int]]) -> dict[str, Any]:
    from tinysft.generation import encode_prompt, stop_ids

    model, tok = loaded.model, loaded.tokenizer
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], loaded.config.data.system_prompt)
               for p in prompts_text[: args.hf_prompts]]
    stops = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    before = load()
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attn[r, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=stops, pad_token_id=pad)
            for r, i in enumerate(idx):
                row = out[r, width:].tolist()
                cut = next((k for k, x in enumerate(row) if x in stops), len(row))
                answers[i] = row[:cut]
    wall = time.perf_counter() - t
    n = sum(len(a) for a in answers)
    return {"prompts": len(prompts), "wall_s": round(wall, 2), "answer_tokens": n, "tokens_per_s": round(n / wall, 1),
            "agreement_with_tinysft_tuned": agreement(ref[: len(prompts)], answers), "load_before": before,
            "load_after": load()}


def llamacpp_side(args: argparse.Namespace, loaded: Any, prompts_text: list[str], ref: list[list[int]]) -> dict[str, Any]:
    deadline = time.time() + args.wait_for_llamacpp  # llama-cpp-python may still be building (~4 min of CPU)
    while True:
        try:
            from llama_cpp import Llama
            break
        except ImportError:
            if time.time() > deadline:
                raise
            time.sleep(20)

    from tinysft.generation import encode_prompt, stop_ids

    gguf = Path(args.gguf)
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "tinysft", "export", str(args.run), "--format", "gguf",
                        "--out", str(gguf)], check=True)
    tok = loaded.tokenizer
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], loaded.config.data.system_prompt)
               for p in prompts_text[: args.llama_prompts]]
    stops = set(stop_ids(tok))
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
    answers, ttft = [], []
    before = load()
    t = time.perf_counter()
    for p in prompts:
        start, row = time.perf_counter(), []
        for k, token in enumerate(llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)):
            if k == 0:
                ttft.append(time.perf_counter() - start)
            if token in stops or len(row) >= args.max_new_tokens:
                break
            row.append(token)
            if len(row) >= args.max_new_tokens:
                break
        answers.append(row)
    wall = time.perf_counter() - t
    n = sum(len(a) for a in answers)
    return {"prompts": len(prompts), "gguf": gguf.name, "wall_s": round(wall, 2), "answer_tokens": n,
            "tokens_per_s": round(n / wall, 1), "ttft_s_median": round(statistics.median(ttft), 3),
            "agreement_with_tinysft_tuned": agreement(ref[: len(prompts)], answers), "load_before": before,
            "load_after": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a tinysft run of the embedded model")
    ap.add_argument("--prompts", type=Path, default=ROOT / "examples/polite-helper/heldout.jsonl")
    ap.add_argument("--n", type=int, default=0, help="use only the first N prompts (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0: torch's default)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hf-prompts", type=int, default=48, help="prompts for the (slow) transformers loop")
    ap.add_argument("--llama-prompts", type=int, default=10**6, help="prompts for llama.cpp (default: all)")
    ap.add_argument("--gguf", default="", help="f16 GGUF of the run (default: exported next to --out)")
    ap.add_argument("--wait-for-llamacpp", type=int, default=0, help="seconds to wait for llama_cpp to be importable")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp"])
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.prompts.read_text().splitlines() if x.strip()]
    texts = [r["prompt"] for r in rows][: args.n or None]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gguf:
        args.gguf = str((args.out.parent if args.out else Path(".")) / "generate_vs_llamacpp.f16.gguf")
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "prompts": len(texts), "max_new_tokens": args.max_new_tokens,
                              "batch_size": args.batch_size, "run": str(args.run)}
    report["tinysft"], loaded, ref = tinysft_side(args, texts)
    print(json.dumps(report["tinysft"]), flush=True)
    if "transformers" not in args.skip:
        report["transformers"] = transformers_side(args, loaded, texts, ref)
        print(json.dumps(report["transformers"]), flush=True)
    if "llamacpp" not in args.skip:
        report["llamacpp"] = llamacpp_side(args, loaded, texts, ref)
        print(json.dumps(report["llamacpp"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
