"""Chat SFT with LoRA / QLoRA: build the data, the model and the loss, then ``loop.fit``.

The loss is the causal LM's cross-entropy on the assistant's tokens only (``data.render`` owns
the mask), summed per step and divided by the step's trained tokens over all processes, plus the
optional preference term (``training.preference``) on rows with a `rejected` answer.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysft.config import RunConfig
from tinysft.data.batching import Batch, append_rows, make_batches, share_prefixes, split_batch
from tinysft.data.render import render_all
from tinysft.data.rules import check_trainable
from tinysft.data.validate import DataError, Problem, load_conversations, weight_categories
from tinysft.files import mark_output
from tinysft.losses import evaluate_loss, lm_and_pair_loss
from tinysft.models.cpu import apply_speedups
from tinysft.models.identity import base_identity
from tinysft.models.load import add_lora, emulated_on_cpu, emulated_warning, load_causal_lm
from tinysft.models.packed_attention import use_packed_attention
from tinysft.training.checkpoints import TrainError, load_adapter_weights, resume_point, write_manifest
from tinysft.training.loop import (
    StepPlan,
    Task,
    TrainResult,
    fit,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    schedule_steps,
)
from tinysft.training.preference import (
    pair_row,
    preference_loss,
    preference_pairs,
    reference_margins,
    rejected_answers,
)

PASS_TOKENS_CPU = 1024  # tokens per forward/backward pass on a CPU in fp32, twice that in 16 bits


def packing_for(cfg: RunConfig, device: torch.device) -> bool:
    """``train.packing`` with "auto" resolved: packed on a CPU; padded batches on a GPU (their
    attention is one kernel call per layer, not one per conversation)."""
    if cfg.train.packing != "auto":
        return bool(cfg.train.packing)
    return device.type == "cpu"


def pass_tokens_for(device: torch.device, mixed_precision: str, weight_dtype: torch.dtype) -> int | None:
    """Most tokens per forward/backward pass (whole conversations; None = the micro-batch in one).

    On a CPU, 1,024 tokens computed in fp32 and 2,048 in bf16 / fp16 (autocast, or 16-bit weights
    without it): the same activation bytes. A micro-batch larger than that runs as several passes
    with the same gradients and a lower memory peak (docs/benchmarks.md). Elsewhere (GPUs) the
    micro-batch is one pass.
    """
    if device.type != "cpu":
        return None
    sixteen_bit = mixed_precision in ("bf16", "fp16") or weight_dtype in (torch.bfloat16, torch.float16)
    return PASS_TOKENS_CPU * 2 if sixteen_bit else PASS_TOKENS_CPU


def split_for_eval(convs: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): a seeded ``fraction`` of the rows held out, disjoint from the rest."""
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(len(idx) * fraction))
    return [convs[i] for i in idx[n_val:]], [convs[i] for i in idx[:n_val]]


def load_sft_data(cfg: RunConfig, say: Callable[[str], None]) -> tuple[list[Any], list[Any], list[Any]]:
    """(training conversations, eval conversations, the preference pool): files read and
    validated, the eval split held out, data weights applied after the split (so no eval row is
    repeated in training), and each row with a `rejected` answer that the weights kept, once."""
    if not cfg.data.train:
        raise DataError([Problem("(config)", None, "data.train", "no training file given", "pass --data FILE.jsonl")])
    train_convs = load_conversations(cfg.data.train)
    eval_convs = load_conversations(cfg.data.eval) if cfg.data.eval else []
    if not eval_convs and cfg.data.val_fraction > 0 and len(train_convs) > 4:
        train_convs, eval_convs = split_for_eval(train_convs, cfg.data.val_fraction, cfg.train.seed)
    if cfg.data.category_weights or cfg.data.file_weights:
        n_before = len(train_convs)
        train_convs = weight_categories(train_convs, cfg.data.category_weights, cfg.train.seed, cfg.data.file_weights)
        say(f"{'Category' if not cfg.data.file_weights else 'Category and file'} weights: "
            f"{n_before} training rows -> {len(train_convs)} per epoch.")
    pair_convs = (list({id(c): c for c in train_convs if rejected_answers(c)}.values())
                  if cfg.train.preference_weight > 0 else [])
    if cfg.train.preference_weight > 0 and not pair_convs:
        raise DataError([Problem("(config)", None, "train.preference_weight",
                                 "is set but no training row (after data weights) has a `rejected` answer",
                                 'add "rejected": "..." to rows, or set train.preference_weight=0')])
    return train_convs, eval_convs, pair_convs


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
          show_progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` with LoRA on ``cfg.data.train``; write the run directory.

    An unfinished run in ``run_dir`` (a checkpoint, no adapter/) is continued from its latest
    intact checkpoint when the config and data are the same, with or without ``resume``; a
    finished run or a changed config is refused (TrainError). ``resume=True`` only adds a note
    when there is nothing to continue. ``stop_after_steps``: see ``loop.fit``.
    """
    run_dir = Path(run_dir)
    accelerator = make_accelerator(cfg, run_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    world, rank = accelerator.num_processes, accelerator.process_index
    existing = resume_point(run_dir, cfg, world, log=say)
    if resume and existing is None:
        say(f"Nothing to resume in {run_dir} (no checkpoint yet): starting from step 0.")

    train_convs, eval_convs, pair_convs = load_sft_data(cfg, say)

    # ---- model --------------------------------------------------------------------------------
    accelerator.wait_for_everyone()  # every rank has read the run directory before rank 0 writes to it
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*run_dir.glob("checkpoints/.step-*"), *run_dir.glob(".adapter.*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    base, tokenizer, model_path = load_causal_lm(cfg.model, device=device, log=say)
    mp = accelerator.mixed_precision
    compute = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(mp, "fp32")
    say(f"Base weights in {str(base.dtype).removeprefix('torch.')}, computing in {compute} on {device.type}.")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    if autocast_dtype is not None and autocast_dtype != base.dtype and emulated_on_cpu(autocast_dtype, device):
        say(emulated_warning(autocast_dtype, f"train.mixed_precision={mp}"))
    packing = packing_for(cfg, device)
    if cfg.train.packing == "auto" and not packing:
        say("Padded batches (train.packing auto on a GPU; train.packing=true packs conversations).")
    # The same rules as `tinysft data check` (data.rules), from the same code.
    rows = check_trainable(train_convs, tokenizer, max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    eval_rows = render_all(eval_convs, tokenizer, cfg.data.max_length, cfg.data.system_prompt) if eval_convs else []
    pairs = preference_pairs(pair_convs, tokenizer, cfg.data.max_length, cfg.data.system_prompt,
                             cfg.train.preference_tokens)
    pair_order = list(range(len(pairs)))
    random.Random(cfg.train.seed).shuffle(pair_order)
    pairs_per_step = cfg.train.preference_pairs or max(1, cfg.train.batch_size // 2)
    if pairs:
        say(f"Preference term on {len(pairs)} rows with a `rejected` answer, {pairs_per_step} pairs per step "
            f"(weight {cfg.train.preference_weight}, beta {cfg.train.preference_beta}).")
    # DPO: each pair's margin under the base model, before LoRA (or a resumed adapter) changes it.
    reference = (reference_margins(base, pairs, tokenizer.pad_token_id, device, accelerator.autocast)
                 if pairs and cfg.train.preference_reference else None)
    if reference is not None:
        say(f"Preference margins measured against the base model's (DPO): mean base margin "
            f"{sum(reference) / len(reference):.1f} nats over {len(reference)} pairs.")
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = add_lora(base, cfg.lora)
    applied = apply_speedups(model, device, mp)
    if applied:
        say("Speed-ups: " + ", ".join(f"{name} ({n})" for name, n in applied.items()) + ".")
    # Attention per packed conversation, not over the whole row; with it, the step's pairs are
    # scored as branches inside the SFT pass (appended to its last piece).
    packed_attention = packing and use_packed_attention(model)
    pair_rows = ([pair_row(c, r, None if reference is None else reference[i]) for i, (c, r) in enumerate(pairs)]
                 if packed_attention else [])
    # CPU only: on a GPU the branches' attention runs torch's math kernel (not measured there).
    share = packed_attention and cfg.train.share_prefixes and device.type == "cpu"

    if is_main:
        cfg.save(run_dir / "config.yaml")
        mark_output(run_dir, "run")  # `train --force` may replace it later; nothing else tinysft writes may
        write_manifest(run_dir, cfg, model_path, {"train_rows": len(rows), "eval_rows": len(eval_rows),
                                                  "base": base_identity(cfg.model.name, base)})

    # ---- batches ------------------------------------------------------------------------------
    # Every rank builds the same list (same seed) and takes a disjoint, equally long slice, so all
    # ranks run the same number of steps.
    pad_id, bs = tokenizer.pad_token_id, cfg.train.batch_size
    group_by_length = cfg.train.group_by_length
    if group_by_length is None:
        group_by_length = not packing  # packed rows have no padding to save

    def epoch_batches(epoch: int) -> list[Batch]:
        batches = make_batches(rows, bs, pad_id, packing=packing, seed=cfg.train.seed + epoch,
                               group_by_length=group_by_length)
        if len(batches) < world:
            raise TrainError(f"only {len(batches)} micro-batch(es) per epoch for {world} processes: lower "
                             "train.batch_size, add data, or use fewer processes.")
        n = (len(batches) // world) * world
        return batches[rank:n:world]

    eval_batches = make_batches(eval_rows, bs, pad_id, packing=packing, shuffle=False) if eval_rows else []
    steps_per_epoch, total_steps = schedule_steps(len(epoch_batches(0)), cfg.train)
    if existing is not None:
        load_adapter_weights(model, existing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg.train.learning_rate, cfg.train.weight_decay, accelerator.distributed_type)
    scheduler = make_scheduler(cfg.train, optimizer, total_steps)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # tinysft's config is the one source of truth: DeepSpeed sees one micro-batch per backward
        # (fit accumulates and marks where each step ends) and clips at train.max_grad_norm.
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": bs, "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.train.max_grad_norm})
    # The scheduler is not prepared: total_steps is already per rank, and a prepared scheduler
    # would step once per process.
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- the step ------------------------------------------------------------------------------
    step_plan = SftStep(model, accelerator, pass_tokens_for(device, mp, base.dtype), pairs, pair_rows, pair_order,
                        pairs_per_step, cfg.train.preference_weight, cfg.train.preference_beta, pad_id, packing, share,
                        reference)

    def evaluate() -> dict[str, float]:
        loss = evaluate_loss(model, eval_batches, device, accelerator.autocast)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    task = Task(epoch_batches, step_plan.plan, evaluate if eval_batches else None, step_plan.log_extras)
    return fit(task, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg.train,
               run_dir=run_dir, steps_per_epoch=steps_per_epoch, total_steps=total_steps, resume_from=existing,
               log=log, show_progress=show_progress, stop_after_steps=stop_after_steps)


class SftStep:
    """One SFT optimizer step laid out as passes (``loop.StepPlan``), and the preference term's log.

    The step's loss is the mean over the trained tokens of the whole step on all ranks: each
    pass's summed loss is divided by the global token count, times ``world`` because DDP averages
    gradients over ranks, so 2 processes x grad_accum A == 1 process x grad_accum 2A. Each
    micro-batch runs as pieces of <= pass_tokens tokens (whole conversations): the same
    gradients, with activation memory set by the piece instead of the batch. The step's
    preference pairs are appended to its last piece (``pair_rows``, packed attention) or run as a
    pass of their own; ``reference``: each pair's base margin (DPO), or None (reference-free).
    """

    def __init__(self, model: Any, accelerator: Any, pass_tokens: int | None, pairs: list[tuple[Any, Any]],
                 pair_rows: list[Any], pair_order: list[int], pairs_per_step: int, weight: float, beta: float,
                 pad_id: int, packing: bool, share: bool, reference: list[float] | None = None) -> None:
        self.model, self.accelerator, self.pass_tokens, self.reference = model, accelerator, pass_tokens, reference
        self.pairs, self.pair_rows, self.pair_order, self.pairs_per_step = pairs, pair_rows, pair_order, pairs_per_step
        self.weight, self.beta, self.pad_id, self.packing, self.share = weight, beta, pad_id, packing, share
        self.device, self.world, self.rank = accelerator.device, accelerator.num_processes, accelerator.process_index
        self.window_pref, self.window_n = torch.zeros((), device=self.device), 0  # since the last log line

    def plan(self, group: list[Batch], step: int) -> StepPlan:
        pieces = [piece for b in group for piece in split_batch(b, self.pass_tokens)]
        passes: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = []
        if self.pairs:
            # The same pairs on a resumed run: picked from the step number and rank alone.
            first = (step * self.world + self.rank) * self.pairs_per_step
            chosen = [self.pair_order[(first + j) % len(self.pairs)] for j in range(self.pairs_per_step)]
            if self.pair_rows:  # scored in the last piece's pass: only their prompts and tokens added
                pieces[-1] = append_rows(pieces[-1], [self.pair_rows[i] for i in chosen])
            else:
                passes.append(self._pair_pass(chosen))
        if self.share:
            pieces = [share_prefixes(p) for p in pieces]
        counts = self.accelerator.reduce(torch.tensor([float(sum(b.n_trained for b in group)),
                                                       float(sum(p.n_pairs for p in pieces))], device=self.device), "sum")
        n_tokens, n_pairs = max(float(counts[0]), 1.0), max(float(counts[1]), 1.0)
        passes += [self._piece_pass(p, n_tokens, n_pairs) for p in pieces]
        return StepPlan(passes, count=sum(b.n_trained for b in group), tokens=sum(b.n_tokens for b in pieces),
                        passed_tokens=sum(b.input_ids.numel() for b in pieces))

    def _pair_pass(self, chosen: list[int]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        picked = [self.pairs[i] for i in chosen]
        reference = None if self.reference is None else [self.reference[i] for i in chosen]

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            pref = preference_loss(self.model, [c for c, _ in picked], [r for _, r in picked], self.pad_id, self.beta,
                                   self.device, packing=self.packing, reference=reference)
            self.window_pref += pref.detach().float()
            self.window_n += 1
            return pref * self.weight, torch.zeros((), device=self.device)
        return run

    def _piece_pass(self, b: Batch, n_tokens: float, n_pairs: float) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            loss_sum, _n, pref_sum = lm_and_pair_loss(self.model, b.to(self.device), self.beta)
            loss = loss_sum * (self.world / n_tokens)
            if b.n_pairs:
                loss = loss + pref_sum * (self.weight * self.world / n_pairs)
                self.window_pref += pref_sum.detach().float()
                self.window_n += b.n_pairs
            return loss, loss_sum
        return run

    def log_extras(self, elapsed: float) -> dict[str, float]:
        """The preference term's mean since the last log line (then reset); {} without one."""
        if not self.window_n:
            return {}
        out = {"preference_loss": round(float(self.window_pref) / self.window_n, 5)}
        self.window_pref, self.window_n = torch.zeros((), device=self.device), 0
        return out
