"""Training throughput: tinysft vs TRL's SFTTrainer + PEFT, side by side in one invocation.

Run by hand (never a timed test); record the figures in docs/benchmarks.md:

    .venv/bin/python benchmarks/train_vs_trl.py                    # 1 epoch per side, the defaults
    .venv/bin/python benchmarks/train_vs_trl.py --max-steps 4      # a quick look
    .venv/bin/python benchmarks/train_vs_trl.py --trl-configs fp32,fp32-packed,bf16   # TRL's candidates

Both sides train the embedded SmolLM2-135M-Instruct with the same LoRA (r=16, alpha=32, dropout
0.1 on q/k/v/o), the same tokens (each conversation rendered once by tinysft, so the trained
tokens are identical; TRL gets input_ids + assistant_masks), the same epochs, learning rate,
cosine schedule with 5% warmup, batch of 8 conversations per optimizer step, and seed. Every run
is a fresh subprocess; the sides alternate (TRL's candidates, then tinysft, per round), so other
load on the machine hits both alike.

Throughput is real (non-padding) tokens of the data set per second of the training loop (model
loading, data preparation and evaluation are not timed). Peak RSS is the process's high-water
mark at the end of training. Eval loss is computed the same way for both, after training: the
token-weighted cross-entropy on the assistant tokens of the validation file, in fp32, by
``tinysft.losses.evaluate_loss``. Final train loss is the mean of the last 5 logged step losses.

MFU counts the useful work of a LoRA step per token: forward 2 and input-gradient 2 FLOPs per
frozen weight (4 x the decoder's linear parameters), 6 per LoRA parameter (their weight gradient
too), 4 x the LM head only at positions whose next token is trained, and exact causal attention
(QK^T and PV, forward + 2x backward, over each conversation's own length). It is divided by the
best matmul rate measured in this run for the dtype tinysft computed in (fp32 where bf16 is
emulated); the bf16 peak is printed as well. tinysft computes the openings that packed
conversations share (the template's system prompt) once (``train.share_prefixes``), so it runs
fewer tokens through the model than the data holds: the share is printed, with the MFU of the
work actually done (about MFU x that share).

With a CUDA GPU both sides train on it: TRL's default candidates are bf16 with and without packing,
the matmul peak is measured there (8192^3), and memory is compared as the peak GPU memory of tensors
(``torch.cuda.max_memory_allocated``), with RSS printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# TRL configurations: autocast dtype, packing (TRL's BFD packing into max_length rows, padding-free).
TRL_CONFIGS = {
    "fp32": {"bf16": False, "packing": False},
    "bf16": {"bf16": True, "packing": False},
    "fp32-packed": {"bf16": False, "packing": True},
    "bf16-packed": {"bf16": True, "packing": True},
}
# Any TRL configuration may also run on tcmalloc ("bf16-packed+tcmalloc"), the allocator tinysft's
# command picks by itself (tinysft/models/cpu/allocator.py): that isolates what the allocator is worth from
# what tinysft's own code is worth. The tinysft worker runs as the `tinysft` command does.
# Likewise "+onednn64" caps oneDNN's primitive cache at 64 as tinysft's training does
# (tinysft/models/cpu/allocator.py: cap_onednn_cache), e.g. "bf16-packed+tcmalloc+onednn64".
TCMALLOC = "+tcmalloc"
ONEDNN64 = "+onednn64"
DEFAULT_TRL = "bf16-packed,bf16-packed+tcmalloc,bf16-packed+tcmalloc+onednn64"
# On a CPU where bf16 matmuls are not faster than fp32 (tinysft then trains in fp32), TRL's fp32 run was
# its fastest too (Intel Xeon VM without AMX: fp32 + packing 135.5 tokens/s, bf16 + packing 92.5).
DEFAULT_TRL_FP32 = "fp32-packed+tcmalloc+onednn64"
# On a CPU with no bf16 instructions at all (no AVX512-BF16, no AMX) bf16 is emulated, ~100x slower than fp32
# on an AVX2-only AMD EPYC VM: a TRL bf16 run would take hours, so only fp32 runs there by default.
DEFAULT_TRL_GPU = "bf16,bf16-packed"


def on_tcmalloc(side: str) -> bool:
    """Whether a worker side ("tinysft", "trl:NAME" or "trl:NAME+tcmalloc...") runs on tcmalloc."""
    return side == "tinysft" or TCMALLOC in side


def trl_base(name: str) -> str:
    """The TRL configuration without its environment suffixes: "bf16-packed+tcmalloc" -> "bf16-packed"."""
    return name.split("+", 1)[0]


# ---- shared --------------------------------------------------------------------------------------


def train_device() -> torch.device:
    """Where both sides train: the GPU when there is one (tinysft and TRL both pick it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_gflops(dtype: torch.dtype, device: torch.device | None = None, reps: int = 5,
                  budget_s: float = 0.5) -> float:
    """Best-of-``reps`` rate of an n x n x n matmul on ``device``, in GFLOP/s (n = 2,048 on a CPU,
    8,192 on a GPU, which a 2,048 product does not fill).

    Where a dtype is emulated (bf16 on a CPU without AVX512-BF16 or AMX: an AMD EPYC VM with AVX2
    only ran a 2,048^3 bf16 product at 0.3 GFLOP/s, a minute a product) n is halved until one
    product fits ``budget_s``, down to 256, so the peak check never costs minutes.
    """
    device = device or train_device()
    n = 8192 if device.type == "cuda" else 2048
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cpu":
        probe = torch.randn(256, 256, dtype=dtype)
        probe @ probe  # warm-up
        per_flop = math.inf
        for _ in range(3):  # best of 3: one slow call must not shrink a fast dtype's product
            t = time.perf_counter()
            probe @ probe
            per_flop = min(per_flop, (time.perf_counter() - t) / (2 * 256**3))
        while n > 256 and 2 * n**3 * per_flop > budget_s:
            n //= 2
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    sync()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def load_rows(spec: dict[str, Any], tokenizer: Any, file: str) -> list[Any]:
    from tinysft.data.render import render_all
    from tinysft.data.validate import load_conversations

    return render_all(load_conversations([file]), tokenizer, spec["max_length"])


def eval_loss(model: Any, tokenizer: Any, spec: dict[str, Any]) -> float:
    """The same held-out loss for both sides: padded batches, plain SDPA, fp32, no autocast."""
    import contextlib

    from tinysft.data.batching import make_batches
    from tinysft.losses import evaluate_loss

    rows = load_rows(spec, tokenizer, spec["val"])
    batches = make_batches(rows, spec["batch_size"], tokenizer.pad_token_id, shuffle=False)
    model.float()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_attn_implementation("sdpa")
    return evaluate_loss(model, batches, next(model.parameters()).device, contextlib.nullcontext)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_gpu_mb() -> float:
    """The most GPU memory torch held for tensors in this process (0 without a GPU)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def final_train_loss(losses: list[float]) -> float:
    tail = losses[-5:]
    return sum(tail) / len(tail) if tail else float("nan")


# ---- workers (each in its own subprocess) --------------------------------------------------------


def run_tinysft(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from tinysft.config import load_config, parse_overrides
    from tinysft.models.load import load_run, resolve_dtype
    from tinysft.training import train
    from tinysft.training.loop import mixed_precision_for
    from tinysft.training.sft import packing_for

    overrides = [f"model.name={spec['model']}", f"data.train={spec['train']}", f"data.max_length={spec['max_length']}",
                 f"train.epochs={spec['epochs']}", f"train.learning_rate={spec['lr']}",
                 f"train.batch_size={spec['batch_size']}", f"train.seed={spec['seed']}", "train.log_every=1",
                 "train.warmup_ratio=0.05", "train.schedule=cosine", *[f"lora.{k}={v if not isinstance(v, list) else ','.join(v)}"
                                                                    for k, v in LORA.items()], *spec["tinysft_set"]]
    cfg = load_config(None, parse_overrides(overrides))
    device = train_device()
    result = train(cfg, out / "run", show_progress=False, log=lambda m: None)
    rss, gpu = peak_rss_mb(), peak_gpu_mb()
    tokens = result.tokens_per_s * result.seconds
    loaded = load_run(out / "run", device=device, log=lambda m: None)
    return {"tokens": tokens, "seconds": result.seconds, "steps": result.steps, "peak_rss_mb": rss, "peak_gpu_mb": gpu,
            "passed_tokens": result.passed_tokens,
            "train_loss": final_train_loss([h["loss"] for h in result.history if "loss" in h]),
            "eval_loss": eval_loss(loaded.model, loaded.tokenizer, spec),
            # What training computed in (the reloaded model is cast to fp32 for the eval loss).
            "dtype": str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", ""),
            "mixed_precision": mixed_precision_for(cfg, device), "packing": packing_for(cfg, device)}


def run_trl(spec: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tinysft.models.load import HUB_KERNELS_OFF, load_tokenizer, resolve_model_path

    conf = TRL_CONFIGS[trl_base(name)]
    path = resolve_model_path(spec["model"], log=lambda m: None)
    tokenizer = load_tokenizer(path)
    rows = load_rows(spec, tokenizer, spec["train"])
    data = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "assistant_masks": [r.loss_mask for r in rows]})
    # Packed rows hold several conversations: size them so a step sees about as many tokens as
    # batch_size conversations do (the "same effective batch" in tokens).
    mean_len = sum(len(r.input_ids) for r in rows) / len(rows)
    packed_rows = max(1, round(spec["batch_size"] * mean_len / spec["max_length"]))
    args = SFTConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=packed_rows if conf["packing"] else spec["batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=spec["epochs"], max_steps=spec["max_steps"] or -1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], data_seed=spec["seed"], optim="adamw_torch", bf16=conf["bf16"],
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,  # TRL's default (True) is ~30% slower
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        max_length=spec["max_length"], packing=conf["packing"], packing_strategy="bfd", dataloader_num_workers=0,
    )
    # As tinysft loads its models: no layers fetched from the Hub (offline, model.train() raised on a GPU).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **HUB_KERNELS_OFF)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock["end"] = time.perf_counter()

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    rss, gpu = peak_rss_mb(), peak_gpu_mb()
    logs = trainer.state.log_history
    tokens = max((h["num_tokens"] for h in logs if "num_tokens" in h), default=0)
    return {"tokens": tokens, "seconds": clock["end"] - clock["start"], "steps": trainer.state.global_step,
            "peak_rss_mb": rss, "peak_gpu_mb": gpu, "train_loss": final_train_loss([h["loss"] for h in logs if "loss" in h]),
            "eval_loss": eval_loss(trainer.model, tokenizer, spec), "dtype": "float32",
            "mixed_precision": "bf16" if conf["bf16"] else "no", "packing": conf["packing"]}


def worker(side: str, spec_path: Path, result_path: Path) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="train-vs-trl-") as tmp:
        out = Path(tmp)
        result = run_tinysft(spec, out) if side == "tinysft" else run_trl(spec, out, side.split(":", 1)[1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result_path.write_text(json.dumps(result))


# ---- driver --------------------------------------------------------------------------------------


def model_flops(spec: dict[str, Any]) -> dict[str, float]:
    """Useful training FLOPs for one pass over the data (see the module docstring)."""
    from transformers import AutoConfig

    from tinysft.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(spec["model"], log=lambda m: None)
    c = AutoConfig.from_pretrained(path)
    d, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q_width, kv_width = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    attn = d * q_width * 2 + d * kv_width * 2  # q, o ; k, v
    body = layers * (attn + 3 * d * inter)
    lora = layers * LORA["r"] * ((d + q_width) * 2 + (d + kv_width) * 2)
    head = d * c.vocab_size
    rows = load_rows(spec, load_tokenizer(path), spec["train"])
    tokens = sum(len(r.input_ids) for r in rows)
    # Head positions: t whose target t+1 is trained (loss_mask[1:]).
    head_positions = sum(sum(r.loss_mask[1:]) for r in rows)
    # Causal attention: QK^T and PV, 2 FLOPs per multiply-add, sum over queries of their context.
    attn_fwd = sum(2 * 2 * q_width * len(r.input_ids) * (len(r.input_ids) + 1) / 2 for r in rows) * layers
    total = 4 * body * tokens + 6 * lora * tokens + 4 * head * head_positions + 3 * attn_fwd
    return {"flops_per_token": total / tokens, "tokens": tokens, "body_params": body, "head_params": head,
            "lora_params": lora}


def run_side(side: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_path, result_path = tmp / "spec.json", tmp / f"result-{side.replace(':', '-')}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    from tinysft.models.cpu.allocator import ONEDNN_CACHE, preload_env

    if on_tcmalloc(side):
        env = preload_env()
    else:  # glibc malloc, even if this driver was started with tcmalloc preloaded
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if "tcmalloc" not in p)
    if side.startswith("trl:"):  # tinysft sets its own cap; TRL gets it only where asked for
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if ONEDNN64 in side:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_CACHE)
    proc = subprocess.run([sys.executable, __file__, "--worker", side, str(spec_path), str(result_path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--train", default=str(ROOT / "examples/chat-bench/train.jsonl"))
    ap.add_argument("--val", default=str(ROOT / "examples/chat-bench/val.jsonl"))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop both sides after this many optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="conversations per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    ap.add_argument("--trl-configs", default=None,
                    help="comma-separated TRL configurations to run, the fastest is compared: "
                         f"{', '.join(TRL_CONFIGS)} (default: {DEFAULT_TRL}, plus {DEFAULT_TRL_FP32} where "
                         f"bf16 is not fast on this machine; only {DEFAULT_TRL_FP32} on a CPU without bf16 "
                         "instructions)")
    ap.add_argument("--tinysft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra tinysft overrides, e.g. train.packing=false")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch's default)")
    ap.add_argument("--out", type=Path, help="also write every figure as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tinysft.models.load import emulated_on_cpu, fast_bf16_available

    device = train_device()
    if args.trl_configs is None and device.type == "cuda":  # the allocator variants are about CPU memory
        args.trl_configs = DEFAULT_TRL_GPU
    elif args.trl_configs is None and emulated_on_cpu(torch.bfloat16, "cpu"):
        args.trl_configs = DEFAULT_TRL_FP32
    elif args.trl_configs is None:  # where tinysft computes in fp32, TRL's fp32 may be its best too
        args.trl_configs = DEFAULT_TRL + ("" if fast_bf16_available("cpu") else f",{DEFAULT_TRL_FP32}")
    trl_names = [n.strip() for n in args.trl_configs.split(",") if n.strip()]
    for n in trl_names:
        if trl_base(n) not in TRL_CONFIGS or set(n.split("+")[1:]) - {TCMALLOC[1:], ONEDNN64[1:]}:
            ap.error(f"--trl-configs: unknown '{n}'; choose from {', '.join(TRL_CONFIGS)}")

    spec = {"model": args.model, "train": args.train, "val": args.val, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "max_length": args.max_length, "threads": args.threads, "tinysft_set": args.tinysft_set,
            "max_steps": args.max_steps, "epochs": args.epochs}
    flops = model_flops(spec)
    steps_per_epoch = math.ceil(sum(1 for line in Path(args.train).read_text().splitlines() if line.strip())
                                / args.batch_size)
    if args.max_steps:  # tinysft has no max-steps: the same schedule as a fraction of an epoch
        spec["tinysft_set"] = [*spec["tinysft_set"], f"train.epochs={args.max_steps / steps_per_epoch}"]
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks: dict[str, list[float]] = {"float32": [], "bfloat16": []}

    def measure_peaks() -> None:
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            peaks[name].append(matmul_gflops(dt))

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fast bf16: {fast_bf16_available('cpu')}", flush=True)
    if device.type == "cuda":
        print(f"GPU: {gpu_name()} (both sides train there; memory is compared on the GPU)", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="train-vs-trl-") as tmp:
        for rnd in range(args.rounds):
            measure_peaks()
            sides = [f"trl:{n}" for n in trl_names] + ["tinysft"]
            if rnd % 2:
                sides.reverse()
            for side in sides:
                r = run_side(side, spec, Path(tmp))
                results.setdefault(side, []).append(r)
                gpu_mem = f"  gpu {r['peak_gpu_mb']:6.0f} MB" if device.type == "cuda" else ""
                print(f"round {rnd + 1} {side:16s} {r['tokens_per_s']:8.1f} tok/s  {r['seconds']:7.1f} s  "
                      f"rss {r['peak_rss_mb']:6.0f} MB{gpu_mem}  train {r['train_loss']:.4f}  eval {r['eval_loss']:.4f}",
                      flush=True)
        measure_peaks()

    def summary(side: str) -> dict[str, float]:
        rs = results[side]
        return {k: median([r[k] for r in rs]) for k in ("tokens_per_s", "seconds", "peak_rss_mb", "peak_gpu_mb",
                                                           "train_loss", "eval_loss", "steps", "tokens")}

    table = {side: summary(side) for side in results}
    best_trl = max((s for s in table if s.startswith("trl:")), key=lambda s: table[s]["tokens_per_s"])
    ours = table["tinysft"]
    tiny_dtype = "bfloat16" if results["tinysft"][0]["mixed_precision"] == "bf16" or results["tinysft"][0]["dtype"] == "bfloat16" else "float32"
    peak = {k: max(v) for k, v in peaks.items()}
    achieved = ours["tokens_per_s"] * flops["flops_per_token"]
    mfu = achieved / (peak[tiny_dtype] * 1e9)
    # Shared openings (train.share_prefixes) pass through the model once: the FLOPs done are about
    # this share of the data's (the same per-token cost assumed).
    passed = median([r["passed_tokens"] for r in results["tinysft"]]) / ours["tokens"]

    print()
    on_gpu = device.type == "cuda"
    gpu_head = f" {'peak GPU MB':>12s}" if on_gpu else ""
    print(f"{'side':18s} {'tok/s':>8s} {'train s':>8s} {'steps':>6s} {'peak RSS MB':>12s}{gpu_head} {'train loss':>11s} {'eval loss':>10s}")
    for side, s in table.items():
        gpu_cell = f" {s['peak_gpu_mb']:12.0f}" if on_gpu else ""
        print(f"{side:18s} {s['tokens_per_s']:8.1f} {s['seconds']:8.1f} {s['steps']:6.0f} {s['peak_rss_mb']:12.0f}{gpu_cell} "
              f"{s['train_loss']:11.4f} {s['eval_loss']:10.4f}")
    t = table[best_trl]
    memory = (f"{ours['peak_gpu_mb'] / t['peak_gpu_mb']:.2f}x peak GPU memory" if on_gpu
              else f"{ours['peak_rss_mb'] / t['peak_rss_mb']:.2f}x peak RSS")
    print(f"\ntinysft vs {best_trl}: {ours['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
          f"{memory}, eval loss {ours['eval_loss']:.4f} vs "
          f"{t['eval_loss']:.4f} ({(ours['eval_loss'] / t['eval_loss'] - 1) * 100:+.1f}%)")
    size = 8192 if on_gpu else 2048
    print(f"matmul peak on the {device.type.upper()} ({size}^3, smaller for an emulated dtype; best of the run): "
          f"fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s; "
          f"tinysft computes in {tiny_dtype}: {achieved / 1e9:.1f} GFLOP/s achieved "
          f"({flops['flops_per_token'] / 1e6:.0f} MFLOP per token) = MFU {mfu:.1%}")
    print(f"tokens through the model: {passed:.1%} of the data's (shared openings once): "
          f"MFU of the work done about {mfu * passed:.1%}")
    line = {"tinysft_tokens_per_s": round(ours["tokens_per_s"], 1), "trl_tokens_per_s": round(t["tokens_per_s"], 1),
            "tinysft_eval_loss": round(ours["eval_loss"], 4), "trl_eval_loss": round(t["eval_loss"], 4),
            "tinysft_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(t["peak_rss_mb"]),
            "bf16_matmul_gflops": round(peak["bfloat16"], 1), "mfu": round(mfu, 4),
            "fp32_matmul_gflops": round(peak["float32"], 1), "mfu_dtype": tiny_dtype, "trl_config": best_trl,
            "tinysft_passed_share": round(passed, 4), "mfu_of_passed": round(mfu * passed, 4),
            "device": gpu_name() if on_gpu else cpu_model()}
    if on_gpu:
        line |= {"tinysft_peak_gpu_mb": round(ours["peak_gpu_mb"]), "trl_peak_gpu_mb": round(t["peak_gpu_mb"])}
    if args.out:
        args.out.write_text(json.dumps({"summary": line, "table": table, "runs": results, "peaks": peaks,
                                        "flops": flops, "cpu": cpu_model(), "gpu": gpu_name(), "args": vars(args) | {"out": str(args.out)}},
                                       indent=2))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
