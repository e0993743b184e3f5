"""LoRA vs QLoRA on the embedded model: time per optimizer step and peak memory of a short run.

Each configuration trains in a fresh Python process (``tinysft.training.train`` with
``stop_after_steps``), so its peak memory is its own: max RSS on CPU, and
``torch.cuda.max_memory_allocated`` as well on CUDA. The size of the loaded model (frozen base +
LoRA, ``get_memory_footprint``) is measured in another fresh process. Results are printed as a
Markdown table and written as JSON.

    .venv/bin/python benchmarks/qlora_vs_lora.py --steps 12 --batch-size 2 --interleaved 16 \
        --out benchmarks/results/qlora_vs_lora.json

``--interleaved N`` adds a timing in which LoRA and QLoRA alternate steps inside one process, so
that a changing load on a shared machine affects both alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (model.quantize, train.gradient_checkpointing)
    "LoRA": ("none", False),
    "LoRA + grad. ckpt": ("none", True),
    "QLoRA (NF4)": ("nf4", False),
    "QLoRA (NF4) + grad. ckpt": ("nf4", True),
}


def overrides(quantize: str, ckpt: bool, steps: int, data: str, batch_size: int) -> list[str]:
    return [f"model.quantize={quantize}", f"train.gradient_checkpointing={str(ckpt).lower()}",
            f"data.train={data}", "data.max_length=512", f"train.batch_size={batch_size}", "train.packing=false",
            f"train.epochs={steps}", "train.log_every=1", "train.save_every=0", "lora.r=16", "lora.alpha=32"]


def one_run(quantize: str, ckpt: bool, steps: int, data: str, batch_size: int) -> dict:
    """Runs in the child process: train `steps` steps, report times and peaks."""
    import torch

    import tinysft.training.sft as train_module
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    # CPU time is less disturbed than wall time by other work on a shared machine: note the
    # process time at each loss call (one per step here: no accumulation).
    cpu_at_call: list[float] = []
    loss_fn = train_module.lm_and_pair_loss

    def timed_loss(*args, **kwargs):
        cpu_at_call.append(time.process_time())
        return loss_fn(*args, **kwargs)

    train_module.lm_and_pair_loss = timed_loss
    cfg = load_config(None, parse_overrides(overrides(quantize, ckpt, steps, data, batch_size)))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = train(cfg, Path(tmp) / "run", show_progress=False, log=lambda m: None, stop_after_steps=steps)
        wall = time.time() - t0
    logged = [h for h in result.history if "loss" in h]
    # Steps 1-2 include one-off costs (first allocations, bitsandbytes kernels); time the rest.
    per_step = (logged[-1]["elapsed_s"] - logged[1]["elapsed_s"]) / (logged[-1]["step"] - logged[1]["step"])
    cpu_per_step = (cpu_at_call[-1] - cpu_at_call[1]) / (len(cpu_at_call) - 2)  # steps 2 .. N-1, whole
    return {"steps": result.steps, "s_per_step": round(per_step, 3), "cpu_s_per_step": round(cpu_per_step, 3),
            "wall_s": round(wall, 1),
            "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}


def footprint(quantize: str) -> dict:
    """Runs in the child process: size of the loaded base + LoRA, and the RSS after loading."""
    from tinysft.config import LoraConfig, ModelConfig
    from tinysft.models.load import add_lora, load_causal_lm

    base, _, _ = load_causal_lm(ModelConfig(quantize=quantize), log=lambda m: None)
    model = add_lora(base, LoraConfig(r=16, alpha=32))
    return {"model_mb": round(model.get_memory_footprint() / 2**20, 1),
            "rss_after_load_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def interleaved(steps: int, data: str, batch_size: int) -> dict:
    """Runs in the child process: LoRA and QLoRA side by side, one training step of each in turn.

    On a shared machine the load changes over minutes; alternating steps exposes both models to
    the same load, so their ratio holds even when the absolute times do not. Same batches, same
    loss function and optimizer as tinysft.training; no accumulation.
    """
    import statistics

    import torch

    from tinysft.config import LoraConfig, ModelConfig
    from tinysft.data.batching import make_batches
    from tinysft.data.render import render_all
    from tinysft.data.validate import load_conversations
    from tinysft.losses import causal_lm_loss
    from tinysft.models.load import add_lora, load_causal_lm

    models, optims = {}, {}
    for q in ("none", "nf4"):
        torch.manual_seed(0)
        base, tok, _ = load_causal_lm(ModelConfig(quantize=q), log=lambda m: None)
        models[q] = add_lora(base, LoraConfig(r=16, alpha=32)).train()
        optims[q] = torch.optim.AdamW([p for p in models[q].parameters() if p.requires_grad], lr=2e-4)
    rows = render_all(load_conversations([data]), tok, 512)
    batches = make_batches(rows, batch_size, tok.pad_token_id, seed=0)
    times: dict[str, list[tuple[float, float]]] = {"none": [], "nf4": []}
    for i in range(steps):
        b = batches[i % len(batches)]
        for q in ("none", "nf4") if i % 2 == 0 else ("nf4", "none"):
            w0, c0 = time.perf_counter(), time.process_time()
            loss, n = causal_lm_loss(models[q], b)
            (loss / n).backward()
            optims[q].step()
            optims[q].zero_grad(set_to_none=True)
            times[q].append((time.perf_counter() - w0, time.process_time() - c0))
    out = {}
    for q, name in (("none", "LoRA"), ("nf4", "QLoRA (NF4)")):
        rest = times[q][1:]  # the first step of each pays one-off costs
        out[name] = {"median_s_per_step": round(statistics.median(w for w, _ in rest), 3),
                     "median_cpu_s_per_step": round(statistics.median(c for _, c in rest), 3)}
    out["qlora_over_lora_wall"] = round(out["QLoRA (NF4)"]["median_s_per_step"] / out["LoRA"]["median_s_per_step"], 2)
    out["threads"] = torch.get_num_threads()
    return out


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT / "examples/polite-helper/seed.jsonl"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--interleaved", type=int, default=0, metavar="N",
                    help="also time N alternating steps of LoRA and QLoRA in one process")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "QUANTIZE", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, quantize, ckpt = args.child
        if kind == "run":
            res = one_run(quantize, ckpt == "1", args.steps, args.data, args.batch_size)
        elif kind == "interleaved":
            res = interleaved(args.steps, args.data, args.batch_size)
        else:
            res = footprint(quantize)
        print(json.dumps(res))
        return
    if args.interleaved:
        side_by_side = child(["--child", "interleaved", "-", "-", "--steps", str(args.interleaved), "--data", args.data,
                              "--batch-size", str(args.batch_size)])
        print(json.dumps(side_by_side), flush=True)
    rows = []
    sizes = {q: child(["--child", "size", q, "0"]) for q in ("none", "nf4")}
    for name, (quantize, ckpt) in CONFIGS.items():
        res = child(["--child", "run", quantize, "1" if ckpt else "0", "--steps", str(args.steps), "--data", args.data,
                     "--batch-size", str(args.batch_size)])
        rows.append({"config": name, **sizes[quantize], **res})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| config | model in memory (MB) | peak RSS (MB) | s / step | CPU s / step | loss first -> last |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['model_mb']} | {r['peak_rss_mb']} | {r['s_per_step']} | {r['cpu_s_per_step']} | "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps({"runs": rows, "interleaved": side_by_side if args.interleaved else None}, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
