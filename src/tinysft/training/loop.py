"""fit(): the one training loop, for every task.

The task (``training.sft``, ``training.classify``) builds its data, model and loss and hands
``fit`` a ``Task``: its micro-batches per epoch and, per optimizer step, the forward passes to
run. ``fit`` owns everything else, the same for every task: the step loop and the data position,
accumulation (no gradient sync until the last pass), clipping, the NaN guard, Ctrl-C / SIGTERM
(finish the step, checkpoint, exit), logging and progress, eval and checkpoint cadence, resume,
and the final adapter.

Multi-process (``accelerate launch`` / ``torchrun``): every rank runs ``fit`` on its own shard of
the micro-batches; rank 0 alone logs, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinysft.config import TRACKERS, ConfigError, RunConfig, TrainConfig
from tinysft.files import atomic_save_dir
from tinysft.models.cpu import cap_onednn_cache
from tinysft.models.load import fast_bf16_available
from tinysft.training.checkpoints import (
    MetricsLog,
    TrainError,
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    plot_losses,
    rng_state,
    set_rng_state,
)

# accelerate's distributed types where each rank holds every trainable parameter whole (no FSDP / ZeRO).
_PLAIN_DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU")

__all__ = ["StepPlan", "Task", "TrainError", "TrainResult", "fit", "make_accelerator", "make_optimizer",
           "mixed_precision_for", "schedule_steps"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # Tokens the training passes ran through the model (all processes): padding, pair rows and
    # rejected branches in, shared openings (train.share_prefixes) once.
    passed_tokens: int = 0


@dataclass
class StepPlan:
    """One optimizer step of one process, as the task lays it out.

    ``passes`` run in order, each under autocast; each returns (the loss to backpropagate, the
    summed loss to log). Gradients are synchronised across processes on the last pass only.
    """

    passes: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]]
    count: float  # what the logged sum is a sum over on this process (trained tokens, rows)
    tokens: int = 0  # real tokens of the step (throughput)
    passed_tokens: int = 0  # tokens through the model, padding and pair rows included


@dataclass
class Task:
    """What ``fit`` needs from a task."""

    epoch_batches: Callable[[int], list[Any]]  # this process's micro-batches of an epoch (same on a resumed run)
    plan_step: Callable[[list[Any], int], StepPlan]  # (the step's micro-batches, step index) -> passes
    evaluate: Callable[[], dict[str, float]] | None = None  # held-out figures, e.g. {"eval_loss": ...}
    log_extras: Callable[[float], dict[str, float]] = lambda elapsed: {}  # the task's own log fields (then reset)


def schedule_steps(micro_batches_per_epoch: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): train.epochs, capped by train.max_steps."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.grad_accum))
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def mixed_precision_for(cfg: RunConfig, device: torch.device) -> str:
    """``train.mixed_precision`` with "auto" resolved for ``device`` (models.load.fast_bf16_available)."""
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if fast_bf16_available(device) else "no"
    return mp


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   distributed_type: str = "NO") -> torch.optim.AdamW:
    """AdamW over ``params``, as torch's fused kernel where it can run: float parameters, all on
    the CPU or all on CUDA GPUs, not sharded (``distributed_type``, accelerate's, is not FSDP or
    DeepSpeed). The same update rule as the default implementation, which loops over the hundreds
    of small LoRA tensors op by op (docs/benchmarks.md has the measurement)."""
    kinds = {p.device.type for p in params}
    fused = (distributed_type in _PLAIN_DATA_PARALLEL and kinds in ({"cpu"}, {"cuda"})
             and all(p.is_floating_point() for p in params))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)


def make_accelerator(cfg: RunConfig, run_dir: Path | None = None) -> Any:
    """An ``accelerate.Accelerator`` with the run's mixed precision.

    accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with
    another ``mixed_precision``. Within one process (a notebook, a sweep, the tests) runs may
    differ in precision, so the single-process state is reset when it disagrees; a launched
    multi-process run is never touched (its state comes from ``accelerate launch``). Without
    ``cpu=True`` accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU and every
    process would train alone; with it, CPU processes join one gloo group. The oneDNN primitive
    cache is capped here too, before training's first matmul (``models.cpu.cap_onednn_cache``).
    ``train.report_to`` trackers log into ``run_dir`` (TensorBoard: run_dir/tensorboard).
    """
    import importlib.util

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    for name in cfg.train.report_to:
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to={name} needs the {package} package, which is not installed: "
                              f"pip install {package} (or remove {name} from train.report_to).")

    cap_onednn_cache()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = mixed_precision_for(cfg, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mp) != mp and world == 1:
        AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)) if run_dir else None
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available() and world > 1,
                       log_with=list(cfg.train.report_to) or None, project_config=project)


def nonfinite_message(what: str, value: float, step: int, run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    kept = f"The last good checkpoint, {last}, is kept." if last else "No checkpoint was written before it."
    return (f"the {what} became {value} at step {step}: training diverged. Lower train.learning_rate (or raise "
            f"train.warmup_ratio), keep train.max_grad_norm > 0, and check the data. {kept}")


class _EarlyStop(Exception):
    pass


def _sharding(accelerator: Any) -> tuple[bool, bool]:
    """(optimizer state sharded per rank: FSDP, DeepSpeed; weights sharded too: FSDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharded = kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    weights = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)
    return sharded, weights


def adapter_weights(accelerator: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """The adapter's state dict gathered from every rank where the weights are sharded (a
    collective: all ranks call it); None elsewhere (PEFT takes the weights from the model)."""
    return accelerator.get_state_dict(model) if _sharding(accelerator)[1] else None


def write_checkpoint(accelerator: Any, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, run_dir: Path,
                     step: int, keep: int, state: dict[str, Any]) -> Path:
    """checkpoints/step-N through the one protocol (``checkpoints.begin_checkpoint`` /
    ``commit_checkpoint``); every rank calls it. Rank 0 writes the adapter, optimizer, scheduler and
    every rank's RNG state; with a sharded optimizer each rank writes its own part."""
    from accelerate.utils import gather_object

    sharded, _ = _sharding(accelerator)
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    optimizer_file = f"optimizer-{rank}.pt" if sharded else "optimizer.pt"
    rng_states = gather_object([rng_state()])  # one entry per rank (dropout streams differ)
    weights = adapter_weights(accelerator, model)
    tmp = run_dir / "checkpoints" / f".step-{step}.tmp"
    if is_main:
        begin_checkpoint(run_dir, step)
    accelerator.wait_for_everyone()
    if sharded:
        torch.save(optimizer.state_dict(), tmp / optimizer_file)
    final = tmp.parent / f"step-{step}"
    if is_main:
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter", state_dict=weights)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / optimizer_file)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for r, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng-{r}.pt")
    accelerator.wait_for_everyone()  # every rank's files are in before state.json marks it complete
    if is_main:
        final = commit_checkpoint(tmp, state, keep)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                        ckpt: Path) -> dict[str, Any]:
    """Restore this rank's optimizer, scheduler and RNG from ``ckpt``; returns its state.json."""
    import json

    sharded, _ = _sharding(accelerator)
    rank = accelerator.process_index
    optimizer.load_state_dict(torch.load(ckpt / (f"optimizer-{rank}.pt" if sharded else "optimizer.pt"),
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt / f"rng-{rank}.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


def fit(task: Task, *, accelerator: Any, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
        cfg: TrainConfig, run_dir: Path, steps_per_epoch: int, total_steps: int, resume_from: Path | None = None,
        log: Callable[[str], None] = print, show_progress: bool = True,
        stop_after_steps: int | None = None) -> TrainResult:
    """Train ``model`` (prepared by ``accelerator``) for ``total_steps`` optimizer steps.

    ``resume_from``: a checkpoint (``checkpoints.resume_point``) whose adapter weights the caller
    already loaded; the optimizer, scheduler, RNG, data position and metrics continue from it.
    ``stop_after_steps`` ends early after writing a checkpoint (tests). Ctrl-C (SIGINT) or SIGTERM
    finishes the current step, writes a checkpoint and raises KeyboardInterrupt; a second Ctrl-C
    aborts at once. The final adapter (``run_dir/adapter``, written last) marks the run finished.
    """
    device, is_main = accelerator.device, accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    world = accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    state = load_training_state(accelerator, optimizer, scheduler, resume_from) if resume_from is not None else {}
    step, seen_tokens, passed_tokens = state.get("step", 0), state.get("seen_tokens", 0), state.get("passed_tokens", 0)
    # The loss since the last log line (global sum, global count).
    window_loss, window_count = state.get("window_loss", 0.0), state.get("window_count", 0.0)
    elapsed_before = state.get("elapsed_s", 0.0)
    if resume_from is not None:
        say(f"Resuming from {resume_from} (step {step}/{total_steps}).")
    metrics = MetricsLog(run_dir, is_main, step if resume_from is not None else None)
    if accelerator.log_with:  # train.report_to: the same lines to TensorBoard / W&B / MLflow / trackio
        accelerator.init_trackers("tensorboard" if cfg.report_to == ["tensorboard"] else "tinysft",
                                  config={k: v for k, v in vars(cfg).items() if isinstance(v, int | float | str | bool)})

    def record(entry: dict[str, Any]) -> None:
        metrics.record(entry)
        if accelerator.log_with:
            accelerator.log({k: v for k, v in entry.items() if k != "step" and isinstance(v, int | float)},
                            step=entry["step"])

    start = time.time()

    def save_checkpoint() -> Path:
        return write_checkpoint(accelerator, model, optimizer, scheduler, run_dir, step, cfg.keep_checkpoints, {
            "step": step, "total_steps": total_steps, "world_size": world, "seen_tokens": seen_tokens,
            "passed_tokens": passed_tokens, "window_loss": window_loss, "window_count": window_count,
            "elapsed_s": elapsed_before + time.time() - start})

    # Ctrl-C / SIGTERM (what schedulers send before preemption): finish the current step, save a
    # checkpoint, exit. Every rank catches it; the ranks agree on stopping through the per-step
    # all-reduce below, so they all save together. A second Ctrl-C aborts at once.
    interrupted = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        say("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to abort)...")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}

    model.train()
    eval_every = cfg.eval_every or steps_per_epoch
    last_eval: float | None = None
    progress = TrainProgress(show_progress and is_main, total_steps, step)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batches = task.epoch_batches(epoch)
            # Data position: skip the micro-batches this epoch already consumed before the checkpoint.
            first = (step - epoch * steps_per_epoch) * cfg.grad_accum
            for s in range(first, len(batches), cfg.grad_accum):
                plan = task.plan_step(batches[s : s + cfg.grad_accum], step)
                step_loss = torch.zeros((), device=device)
                for j, run_pass in enumerate(plan.passes):
                    sync = j == len(plan.passes) - 1
                    accelerator.sync_gradients = sync  # DeepSpeed steps its engine only on the last one
                    with (accelerator.no_sync(model) if not sync else contextlib.nullcontext()), accelerator.autocast():
                        loss, logged = run_pass()
                    accelerator.backward(loss)
                    step_loss += logged.detach().float()
                seen_tokens += plan.tokens
                passed_tokens += plan.passed_tokens
                # One all-reduce per step: the global loss sum and count (for logging and the NaN
                # check, so all ranks stop together) and whether any rank was interrupted.
                totals = accelerator.reduce(torch.stack([
                    step_loss, torch.tensor(float(plan.count), device=device),
                    torch.tensor(float(interrupted["flag"]), device=device)]), "sum")
                value = float(totals[0])
                if not math.isfinite(value):
                    raise TrainError(nonfinite_message("loss", value, step + 1, run_dir))
                if cfg.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if norm is not None and not math.isfinite(float(norm)):
                        raise TrainError(nonfinite_message("gradient norm", float(norm), step + 1, run_dir))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_loss += value
                window_count += float(totals[1])
                elapsed = elapsed_before + time.time() - start
                tps = seen_tokens * world / max(elapsed, 1e-9)
                if step % cfg.log_every == 0 or step == total_steps:
                    entry = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                             "loss": round(window_loss / max(window_count, 1), 5),
                             "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1),
                             "elapsed_s": round(elapsed, 2), **task.log_extras(elapsed)}
                    record(entry)
                    window_loss, window_count = 0.0, 0.0
                    progress.update(step, entry["loss"], tps)
                else:
                    progress.update(step, None, tps)
                if task.evaluate is not None and (step % eval_every == 0 or step == total_steps):
                    figures = task.evaluate()
                    last_eval = figures.get("eval_loss")
                    record({"step": step, **{k: round(v, 5) for k, v in figures.items()}})
                stop = bool(totals[2] > 0) or (stop_after_steps is not None and step >= stop_after_steps)
                if step == total_steps or stop or (cfg.save_every and step % cfg.save_every == 0):
                    saved = save_checkpoint()
                    if stop and step < total_steps:
                        progress.close()
                        say(f"Saved {saved}; rerun the same command to continue from step {step}.")
                        if totals[2] > 0:
                            raise KeyboardInterrupt
                        raise _EarlyStop
                if step >= total_steps:
                    break
    except _EarlyStop:
        pass
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        progress.close()
        if accelerator.log_with:
            accelerator.end_training()

    seconds = time.time() - start
    history = metrics.history
    train_losses = [h["loss"] for h in history if "loss" in h]
    result = TrainResult(run_dir, step, train_losses[-1] if train_losses else float("nan"), last_eval, seconds,
                         seen_tokens * world / max(elapsed_before + seconds, 1e-9), history, passed_tokens * world)
    if step < total_steps:
        return result
    # The final adapter: gathered on all ranks (FSDP / ZeRO-3), written by rank 0; its presence
    # marks the run as finished.
    weights = adapter_weights(accelerator, model)
    if is_main:
        atomic_save_dir(run_dir / "adapter", lambda tmp: unwrapped.save_pretrained(tmp, state_dict=weights))
        plot_losses(history, run_dir / "loss.png")
    accelerator.wait_for_everyone()
    return result


class TrainProgress:
    """A rich progress bar with loss, tokens/s and ETA; does nothing when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task("train", total=total, completed=completed, loss="-", tps="-")
        self.bar.start()

    def update(self, step: int, loss: float | None, tps: float) -> None:
        if not self.enabled:
            return
        fields = {"tps": f"{tps:,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.bar.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False
