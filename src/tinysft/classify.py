"""Sequence classification with LoRA on an encoder: train, predict, and evaluate base vs tuned.

The classification counterpart of train.py (chat SFT). Any Hugging Face model that
``AutoModelForSequenceClassification`` loads works (BERT, DistilBERT, RoBERTa, DeBERTa, MiniLM, or a
causal LM with a score head); the embedded default is all-MiniLM-L6-v2.

Run directory (same contract as train.py, plus labels.json):
    config.yaml, manifest.json  resolved config (task classify, model, lora targets, data.labels)
    labels.json                 label names in class-index order
    metrics.jsonl               train loss per log line; eval loss and accuracy per eval
    checkpoints/step-N/         adapter + optimizer + scheduler + RNG (with train.save_every)
    adapter/                    PEFT adapter (task SEQ_CLS); the classification head rides along in
                                modules_to_save, so ``PeftModel.from_pretrained(
                                AutoModelForSequenceClassification.from_pretrained(base, num_labels=N),
                                run/adapter)`` restores the tuned classifier
    loss.png                    training / eval loss curves
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.config import ConfigError, LoraConfig, ModelConfig, RunConfig
from tinysft.data.formats import LABEL_FORMATS, LabeledText
from tinysft.data.rules import require_two_labels
from tinysft.data.validate import DataError, Problem, load_labeled, read_rows
from tinysft.evaluate.classification_metrics import classification_metrics
from tinysft.evaluate.classification_report import write_classification_report
from tinysft.files import atomic_save_dir, atomic_write_text
from tinysft.models.load import (
    HUB_KERNELS_OFF,
    add_lora,
    emulated_on_cpu,
    emulated_warning,
    load_run_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from tinysft.models.registry import DEFAULT_CAUSAL, DEFAULT_ENCODER, ModelError
from tinysft.train import (
    TrainError,
    TrainProgress,
    TrainResult,
    latest_checkpoint,
    make_accelerator,
    make_optimizer,
    plot_losses,
    write_manifest,
)

# Attention query / value projections, by their leaf module names, in the order tried. LoRA on
# query + value is the classic recipe (LoRA paper; seed 002 used q_lin/v_lin on DistilBERT).
ATTENTION_TARGETS: list[tuple[str, ...]] = [
    ("q_lin", "v_lin"),  # DistilBERT
    ("query", "value"),  # BERT, MiniLM, RoBERTa, XLM-R, ELECTRA, ALBERT, CamemBERT
    ("query_proj", "value_proj"),  # DeBERTa-v2 / v3
    ("q_proj", "v_proj"),  # llama-style decoders, BART
    ("q", "v"),  # MPNet, T5
    ("in_proj",),  # DeBERTa (v1): fused qkv
    ("Wqkv",),  # ModernBERT: fused qkv
]


# ---------------------------------------------------------------------------------------------------
# Model


def classifier_model_name(name: str) -> str:
    """The model to classify with: the embedded encoder when the config still names the causal default."""
    return DEFAULT_ENCODER if name == DEFAULT_CAUSAL else name


def choose_target_modules(model: torch.nn.Module, requested: list[str] | str) -> list[str] | str:
    """LoRA targets for ``model``: the user's choice, else the attention query/value projections.

    ``requested`` equal to the config default (the causal LM's q/k/v/o_proj) counts as "not chosen"
    unless the model has all of those layers.
    """
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if requested != LoraConfig().target_modules or set(requested) <= linear:
        return requested
    for names in ATTENTION_TARGETS:
        if set(names) <= linear:
            return list(names)
    raise ModelError(f"no known attention projections in {type(model).__name__}; set lora.target_modules "
                     f"(Linear layers in this model: {', '.join(sorted(linear))}, or all-linear).")


def _new_modules(model: torch.nn.Module, missing_keys: Iterable[str]) -> list[str]:
    """Modules the checkpoint did not hold at all: the new classification head (classifier,
    DistilBERT's pre_classifier, a BERT pooler the checkpoint lacks, a decoder's score). They are
    randomly initialised, so they must be trained and saved with the adapter, or a reload would start
    from different random weights. Only wholly missing modules count, so a checkpoint missing a stray
    tensor of the body never makes the body trainable."""
    missing = set(missing_keys)
    out: list[str] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if not name or not params or any(name.startswith(t + ".") for t in taken):
            continue
        if all(p in missing for p in params):
            taken.append(name)
            out.append(name.rsplit(".", 1)[-1])  # PEFT matches modules_to_save by the last name part
    return out


def load_encoder(cfg: ModelConfig, labels: list[str], device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print) -> tuple[Any, Any, str, list[str]]:
    """Load ``AutoModelForSequenceClassification`` with ``len(labels)`` outputs, frozen.

    Returns (model, tokenizer, resolved path, names of the newly initialised head modules).
    """
    from transformers import AutoModelForSequenceClassification

    if cfg.quantize != "none":
        raise ConfigError("model.quantize is for causal LMs (QLoRA); classification encoders are small enough "
                          "to train in full precision — remove model.quantize.")
    path = resolve_model_path(classifier_model_name(cfg.name), log=log)
    # Encoders are small: keep fp32 weights unless asked (autocast still computes in bf16 where fast).
    dtype = torch.float32 if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, device)
    if emulated_on_cpu(dtype, device):
        log(emulated_warning(dtype, f"model.dtype={cfg.dtype}"))
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, problem_type="single_label_classification",
            dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if cfg.allow_pickle else True, output_loading_info=True, **HUB_KERNELS_OFF)
    except Exception as e:  # transformers raises many types for an unusable folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"{path}: could not load it as a sequence classifier ({first}). Pass an encoder "
                         "folder (BERT, RoBERTa, DeBERTa, ...) with safetensors weights, or an embedded name "
                         "(see `tinysft models`).") from None
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    # Decoder classifiers read the last non-pad token; they need the pad id to find it.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.requires_grad_(False)
    return model, tokenizer, path, _new_modules(model, info.get("missing_keys", ()))


def _max_length(cfg: RunConfig, model: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.data.max_length
    return min(cfg.data.max_length, int(limit))


# ---------------------------------------------------------------------------------------------------
# Batches and prediction


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    labels: torch.Tensor  # (B,) class indices

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(ids: list[list[int]], targets: list[int], pad_id: int) -> EncodedBatch:
    """Right-pad token lists to the longest in the batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return EncodedBatch(input_ids, mask, torch.tensor(targets, dtype=torch.long))


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text (with the model's special tokens), and how many were truncated."""
    ids = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
    truncated = sum(len(x) > max_length for x in ids)
    if truncated:
        ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return ids, truncated


@torch.no_grad()
def class_logits(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 512, batch_size: int = 32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, num_labels) in the order of ``texts``. Batches are grouped by length to pad little."""
    was_training = model.training
    model.eval()
    ids, _ = encode(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        b = collate([ids[i] for i in chunk], [0] * len(chunk), tokenizer.pad_token_id).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float().cpu()
        for i, row in zip(chunk, logits, strict=True):
            out[i] = row
    model.train(was_training)
    return torch.stack(out) if out else torch.zeros((0, model.config.num_labels))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Training


def infer_labels(rows: list[LabeledText]) -> list[str]:
    """The label set of the training rows, sorted (a stable class-index order)."""
    return sorted({r.label for r in rows})


def _split(rows: list[LabeledText], fraction: float, seed: int) -> tuple[list[LabeledText], list[LabeledText]]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(len(idx) * fraction))
    return [rows[i] for i in idx[n_val:]], [rows[i] for i in idx[:n_val]]


def _load_data(cfg: RunConfig) -> tuple[list[LabeledText], list[LabeledText], list[str]]:
    if not cfg.data.train:
        raise DataError([Problem("(config)", None, "data.train", "no training file given",
                                 "pass --data FILE.jsonl with {\"text\", \"label\"} rows")])
    train_rows = load_labeled(cfg.data.train, cfg.data.labels or None)
    labels = list(cfg.data.labels) or infer_labels(train_rows)
    require_two_labels(labels, cfg.data.train)  # the same rule as `tinysft data check --task classify`
    eval_rows = load_labeled(cfg.data.eval, labels) if cfg.data.eval else []
    if not eval_rows and cfg.data.val_fraction > 0 and len(train_rows) > 4:
        train_rows, eval_rows = _split(train_rows, cfg.data.val_fraction, cfg.train.seed)
    return train_rows, eval_rows, labels


def train_classifier(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
                     show_progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Fine-tune an encoder with LoRA + a trained classification head on text/label rows.

    Writes the run directory described in the module docstring. ``stop_after_steps`` ends the run
    early after writing a checkpoint (tests); ``resume=True`` continues from the latest checkpoint.
    """
    from transformers import get_scheduler

    run_dir = Path(run_dir)
    cfg = copy.deepcopy(cfg)  # resolved below (model, labels, targets) and saved with the run
    cfg.model.name = classifier_model_name(cfg.model.name)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    accelerator = make_accelerator(cfg)
    device, is_main = accelerator.device, accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)

    # ---- data -------------------------------------------------------------------------------------
    train_rows, eval_rows, labels = _load_data(cfg)
    cfg.data.labels = labels
    label_index = {label: i for i, label in enumerate(labels)}

    # ---- run directory and model --------------------------------------------------------------------
    if (run_dir / "adapter").exists():
        raise TrainError(f"{run_dir} already holds a finished run. Choose another --out (or delete the folder).")
    existing = latest_checkpoint(run_dir) if resume else None
    if not resume and latest_checkpoint(run_dir):
        raise TrainError(f"{run_dir} already holds a run. Pass --resume to continue it, or choose another --out.")
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # also fixes the untrained head = the "base" of the report
    base, tokenizer, model_path, head = load_encoder(cfg.model, labels, device, log=say)
    if cfg.train.gradient_checkpointing and getattr(base, "supports_gradient_checkpointing", False):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cfg.lora.target_modules = choose_target_modules(base, cfg.lora.target_modules)
    # PEFT's SEQ_CLS task already trains and saves modules named classifier / score; add the others.
    model = add_lora(base, cfg.lora, task_type="SEQ_CLS",
                     modules_to_save=[h for h in head if h not in ("classifier", "score")] or None)
    saved = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"})
    max_length = _max_length(cfg, base)
    train_ids, truncated = encode(tokenizer, [r.text for r in train_rows], max_length)
    train_targets = [label_index[r.label] for r in train_rows]
    eval_texts, eval_targets = [r.text for r in eval_rows], torch.tensor([label_index[r.label] for r in eval_rows])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{cfg.model.name}: classifying into {len(labels)} labels ({', '.join(labels)}): {len(train_rows)} training rows, "
        f"{len(eval_rows)} eval rows; LoRA on {cfg.lora.target_modules}, trained head: {', '.join(saved)}; "
        f"{n_trainable:,} trainable parameters.")
    if truncated:
        say(f"{truncated} training rows are longer than {max_length} tokens and were truncated.")

    if is_main:
        cfg.save(run_dir / "config.yaml")
        atomic_write_text(run_dir / "labels.json", json.dumps(labels, indent=2, ensure_ascii=False))
        write_manifest(run_dir, cfg, model_path, {"train_rows": len(train_rows), "eval_rows": len(eval_rows),
                                                  "labels": labels, "head_modules": saved})

    # ---- schedule -----------------------------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    bs = cfg.train.batch_size

    def epoch_batches(epoch: int) -> list[EncodedBatch]:
        """Shuffled with a per-epoch seed, so a resumed run sees the same order; sharded across ranks."""
        order = list(range(len(train_ids)))
        random.Random(cfg.train.seed + epoch).shuffle(order)
        batches = [collate([train_ids[i] for i in order[s : s + bs]], [train_targets[i] for i in order[s : s + bs]],
                           tokenizer.pad_token_id) for s in range(0, len(order), bs)]
        n = (len(batches) // world) * world or len(batches)
        return batches[rank:n:world]

    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.train.grad_accum))
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg.train.learning_rate, cfg.train.weight_decay, accelerator.distributed_type)
    scheduler = get_scheduler(cfg.train.schedule if cfg.train.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    history: list[dict[str, Any]] = []
    if existing is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(unwrapped, load_file(str(existing / "adapter" / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(existing / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(existing / "scheduler.pt", weights_only=True))
        rng = torch.load(existing / f"rng-{rank}.pt", weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        step = json.loads((existing / "state.json").read_text())["step"]
        say(f"Resuming from {existing} (step {step}/{total_steps})")
        metrics_path = run_dir / "metrics.jsonl"
        if metrics_path.exists():
            history = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            history = [h for h in history if h.get("step", 0) <= step]
            if is_main:
                atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    elif is_main:
        (run_dir / "metrics.jsonl").write_text("")

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if is_main:
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        ckpts = run_dir / "checkpoints"
        if is_main:
            def write(tmp: Path) -> None:
                unwrapped.save_pretrained(tmp / "adapter")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps({"step": step, "total_steps": total_steps}))
            ckpts.mkdir(exist_ok=True)
            atomic_save_dir(ckpts / f"step-{step}", write)
        accelerator.wait_for_everyone()
        # Each rank its own RNG (dropout streams differ); written after the folder exists.
        torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, ckpts / f"step-{step}" / f"rng-{rank}.pt")
        if is_main:
            done = sorted((p for p in ckpts.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
            for old in done[: -max(1, cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)

    def evaluate_now() -> float:
        logits = class_logits(unwrapped, tokenizer, eval_texts, max_length=max_length, batch_size=max(bs, 32),
                              device=device)
        loss = float(F.cross_entropy(logits, eval_targets))
        accuracy = float((logits.argmax(-1) == eval_targets).float().mean())
        record({"step": step, "eval_loss": round(loss, 5), "eval_accuracy": round(accuracy, 4)})
        return loss

    # ---- loop ---------------------------------------------------------------------------------------
    model.train()
    eval_every = cfg.train.eval_every or steps_per_epoch
    start = time.time()
    seen_tokens = seen_rows = 0
    window_loss, window_rows = 0.0, 0
    last_eval: float | None = None
    progress = TrainProgress(show_progress and is_main, total_steps, step)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batches = epoch_batches(epoch)
            # Data position: skip the micro-batches this epoch consumed before a resumed checkpoint.
            first = (step - epoch * steps_per_epoch) * cfg.train.grad_accum
            for s in range(first, len(batches), cfg.train.grad_accum):
                group = batches[s : s + cfg.train.grad_accum]
                # One optimizer step; the loss is the mean over the group's rows.
                n_rows = sum(len(b.labels) for b in group)
                for b in group:
                    b = b.to(device)
                    with accelerator.autocast():
                        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
                        loss_sum = F.cross_entropy(logits, b.labels, reduction="sum")
                    (loss_sum / n_rows).backward()
                    value = float(loss_sum.detach())
                    if not math.isfinite(value):
                        raise TrainError(f"loss became {value} at step {step + 1}. Lower train.learning_rate "
                                         "(e.g. 5e-4) or check the data.")
                    window_loss += value
                    window_rows += len(b.labels)
                    seen_tokens += int(b.attention_mask.sum())
                    seen_rows += len(b.labels)
                if cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.time() - start
                tps = seen_tokens * world / max(elapsed, 1e-9)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    entry = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                             "loss": round(window_loss / max(window_rows, 1), 5), "lr": scheduler.get_last_lr()[0],
                             "rows_per_s": round(seen_rows * world / max(elapsed, 1e-9), 1),
                             "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 2)}
                    record(entry)
                    window_loss, window_rows = 0.0, 0
                    if progress:
                        progress.update(step, entry["loss"], tps)
                elif progress:
                    progress.update(step, None, tps)
                if eval_texts and (step % eval_every == 0 or step == total_steps):
                    last_eval = evaluate_now()
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                    save_checkpoint()
                if stop_after_steps is not None and step >= stop_after_steps and step < total_steps:
                    save_checkpoint()
                    raise _EarlyStop
                if step >= total_steps:
                    break
    except _EarlyStop:
        pass
    finally:
        if progress:
            progress.close()

    seconds = time.time() - start
    train_losses = [h["loss"] for h in history if "loss" in h]
    result = TrainResult(run_dir, step, train_losses[-1] if train_losses else float("nan"), last_eval, seconds,
                         seen_tokens * world / max(seconds, 1e-9), history)
    if step < total_steps:
        return result
    accelerator.wait_for_everyone()
    if is_main:
        atomic_save_dir(run_dir / "adapter", lambda tmp: unwrapped.save_pretrained(tmp))
        plot_losses(history, run_dir / "loss.png")
    accelerator.wait_for_everyone()
    return result


class _EarlyStop(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# Loading a run, predicting, evaluating


@dataclass
class LoadedClassifier:
    model: Any  # PeftModel: adapter enabled = tuned, `with model.disable_adapter()` = base (untrained head)
    tokenizer: Any
    labels: list[str]
    config: RunConfig
    run_dir: Path
    max_length: int
    device: torch.device


def load_classifier_run(run_dir: str | Path, device: torch.device | str | None = None,
                        log: Callable[[str], None] = print) -> LoadedClassifier:
    """Load a classification run directory: the base encoder with its adapter and head."""
    import peft

    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{run_dir}: not a tinysft run directory (no config.yaml) — pass the folder `tinysft train --out` wrote.")
    cfg = load_run_config(run_dir, log=log)  # never trust_remote_code / allow_pickle from the run folder
    if cfg.train.task != "classify":
        raise ModelError(f"{run_dir}: this is a chat (sft) run; use `tinysft generate` or `tinysft eval --prompts`.")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{run_dir}: no adapter/adapter_config.json — the run did not finish; rerun `tinysft train` "
                         "with --resume (or train again).")
    labels_file = run_dir / "labels.json"
    labels = json.loads(labels_file.read_text(encoding="utf-8")) if labels_file.is_file() else cfg.data.labels
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not labels:
        raise ModelError(f"{run_dir}: no labels.json and no data.labels in config.yaml — the run is incomplete.")
    # Same seed as training: the base's untrained head is the one training started from.
    torch.manual_seed(cfg.train.seed)
    base, tokenizer, _, _ = load_encoder(cfg.model, labels, device, log=log)
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"{adapter}: the adapter does not fit the base model {cfg.model.name} ({first}).") from None
    model.eval()
    return LoadedClassifier(model, tokenizer, list(labels), cfg, run_dir, _max_length(cfg, base), device)


def predict_texts(loaded: LoadedClassifier, texts: list[str], *, tuned: bool = True,
                  batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) per text; ``tuned=False`` = adapter and trained head disabled."""
    def run() -> torch.Tensor:
        return class_logits(loaded.model, loaded.tokenizer, texts, max_length=loaded.max_length,
                            batch_size=batch_size, device=loaded.device)

    if tuned:
        logits = run()
    else:
        with loaded.model.disable_adapter():
            logits = run()
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return [(loaded.labels[int(i)], round(float(p[i]), 4)) for i, p in zip(best, probs, strict=True)]


def read_texts(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """Rows to classify (JSONL or CSV) with ``text`` or ``question``; a label is optional.

    Returns (row, text) pairs; every problem is collected into one DataError.
    """
    problems: list[Problem] = []
    out = []
    text_keys = [text_key for text_key, _ in LABEL_FORMATS.values()]
    for line, row in read_rows(path, problems):
        key = next((k for k in text_keys if isinstance(row, dict) and k in row), None)
        if key is None:
            problems.append(Problem(str(path), line, "(row)", "has no text to classify",
                                    'write {"text": "..."} (a "label" is optional)'))
        elif not isinstance(row[key], str) or not row[key].strip():
            problems.append(Problem(str(path), line, key, "must be a non-empty string", f'write "{key}": "..."'))
        else:
            out.append((row, row[key]))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([Problem(str(path), None, "(data)", "no rows found", "add rows to classify")])
    return out


def predict_rows(run_dir: str | Path, data_file: str | Path, *, tuned: bool = True,
                 log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], float | None]:
    """Each input row with ``prediction`` and ``confidence`` added, and the accuracy when every row
    carries a known label (``label``, or ``answer`` in seed-002 rows), else None."""
    items = read_texts(data_file)
    loaded = load_classifier_run(run_dir, log=log)
    predictions = predict_texts(loaded, [text for _, text in items], tuned=tuned)
    rows = [{**row, "prediction": label, "confidence": p} for (row, _), (label, p) in zip(items, predictions, strict=True)]
    gold = [str(r.get("label", r.get("answer", ""))).strip() for r, _ in items]
    accuracy = None
    if all(g in loaded.labels for g in gold):
        accuracy = sum(g == r["prediction"] for g, r in zip(gold, rows, strict=True)) / len(rows)
    return rows, accuracy


def evaluate_classifier(run_dir: str | Path, data_files: list[str], out_dir: str | Path,
                        log: Callable[[str], None] = print) -> dict[str, Path]:
    """Base (adapter off, untrained head) vs tuned on labelled rows; writes report.md/.json/.html."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not data_files:
        raise DataError([Problem("(command line)", None, "--data", "no labelled evaluation file given, and the run's "
                                 "config has no data.eval", "pass --data FILE.jsonl with {\"text\", \"label\"} rows")])
    loaded = load_classifier_run(run_dir, log=log)
    rows = load_labeled(data_files, loaded.labels)
    texts, gold = [r.text for r in rows], [r.label for r in rows]
    log(f"Classifying {len(rows)} rows with the base (untrained head) and the tuned model...")
    base = predict_texts(loaded, texts, tuned=False)
    tuned = predict_texts(loaded, texts, tuned=True)
    result = {
        "task": "classify",
        "run_dir": str(run_dir),
        "model": loaded.config.model.name,
        "data": [str(f) for f in data_files],
        "labels": loaded.labels,
        "metrics": {"base": classification_metrics(gold, [p for p, _ in base], loaded.labels),
                    "tuned": classification_metrics(gold, [p for p, _ in tuned], loaded.labels)},
        "rows": [{"text": r.text, "label": r.label, "source": r.source, "base": b, "base_confidence": bc,
                  "tuned": t, "tuned_confidence": tc} for r, (b, bc), (t, tc) in zip(rows, base, tuned, strict=True)],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_classification_report(result, out_dir, title=f"Classification report: {run_dir.name}", run_dir=run_dir)
