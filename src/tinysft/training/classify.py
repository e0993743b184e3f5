"""Sequence classification with LoRA on an encoder: build the data, the model and the loss, then
``loop.fit``.

Run directory: the SFT layout (``training.checkpoints``) plus labels.json (label names in
class-index order) and, when the head started from a linear probe, head_init.safetensors (that
starting head: the "base" of the report). The adapter is PEFT's SEQ_CLS format; the classification
head rides along in modules_to_save, so ``PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(base, num_labels=N), run/adapter)`` restores the tuned classifier of a plain encoder,
and ``PeftModel.from_pretrained(MeanPoolClassifier.from_pretrained(base, labels), run/adapter)`` that
of a sentence-transformers encoder (``models.encoder``).

Options the user leaves at the config's defaults (which are the SFT's) take the classification
defaults below, chosen by the sweep in benchmarks/classify_sweep.py (docs/classification.md).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from tinysft.config import DataConfig, RunConfig, TrainConfig
from tinysft.data.formats import LabeledText
from tinysft.data.rules import require_two_labels
from tinysft.data.validate import DataError, Problem, load_labeled
from tinysft.files import atomic_write_text, mark_output
from tinysft.models.encoder import (
    HEAD_INIT_FILE,
    EncodedBatch,
    choose_target_modules,
    class_logits,
    collate,
    encode,
    fit_linear_probe,
    head_features,
    is_decoder,
    load_encoder,
    max_length_for,
    probe_head,
)
from tinysft.models.identity import base_identity
from tinysft.models.load import add_lora, resolve_model_path
from tinysft.training.checkpoints import load_adapter_weights, resume_point, write_manifest
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


# Classification defaults, per kind of model, used where the config still holds the SFT default of
# the same field. Chosen by benchmarks/classify_sweep.py on two public sets (docs/classification.md).
@dataclass(frozen=True)
class ClassifyDefaults:
    learning_rate: float
    epochs: float
    max_length: int
    threads: int  # 0 = torch's default (all cores)


# A decoder (the embedded SmolLM2, the default): its own last-token head; three epochs of 100 rows
# already fit the training set. Both cores: its matmuls (576-wide, 30 layers) are large enough to split.
DECODER_DEFAULTS = ClassifyDefaults(learning_rate=1e-3, epochs=3.0, max_length=256, threads=0)
# An encoder (MiniLM, BERT, ...): ten epochs at the same rate; one torch thread, since a step's
# matmuls (8 rows of ~30 tokens through a 384-wide encoder) are too small to split.
ENCODER_DEFAULTS = ClassifyDefaults(learning_rate=1e-3, epochs=10.0, max_length=256, threads=1)
CLASSIFY_LEARNING_RATE = DECODER_DEFAULTS.learning_rate
HeadInit = Literal["probe", "random"]
# "probe": the head starts as a logistic regression on the frozen features it reads for the training
# rows (mean-pooling encoders and decoders' score heads; models.encoder.probe_head); "random": the
# layer's own random init.
CLASSIFY_HEAD_INIT: HeadInit = "probe"


def apply_classify_defaults(cfg: RunConfig, defaults: ClassifyDefaults = DECODER_DEFAULTS) -> list[str]:
    """Replace fields still at the (SFT) config defaults with ``defaults``, in place.

    Returns "field: old -> new" for each change, to log. A value the user set equal to the SFT
    default is indistinguishable from an unset one, so it is replaced too (the log says so).
    """
    changes = []
    for section, name, sft_default, value in (
            (cfg.train, "learning_rate", TrainConfig().learning_rate, defaults.learning_rate),
            (cfg.train, "epochs", TrainConfig().epochs, defaults.epochs),
            (cfg.data, "max_length", DataConfig().max_length, defaults.max_length),
            (cfg.train, "threads", TrainConfig().threads, defaults.threads)):
        if getattr(section, name) == sft_default and value != sft_default:
            setattr(section, name, value)
            prefix = "train" if isinstance(section, TrainConfig) else "data"
            changes.append(f"{prefix}.{name}: {sft_default:g} -> {value:g}")
    return changes


def chance_level_warning(losses: list[float], num_labels: int) -> str | None:
    """A warning when the training loss ended where it started, at chance (~ln(num_labels)), else None.

    ``losses``: the logged training losses in order. "Ended where it started": the last loss is
    within 10% of ln(num_labels) and no lower than 90% of the first.
    """
    if len(losses) < 2:
        return None
    chance = math.log(num_labels)
    first, last = losses[0], losses[-1]
    if abs(last - chance) <= 0.1 * chance and last >= 0.9 * first:
        return (f"Warning: the training loss ended at {last:.3f}, where it started ({first:.3f}) and at chance level "
                f"(ln {num_labels} = {chance:.3f}): the classifier learned nothing. Likely fixes: a higher "
                f"train.learning_rate (classification default {CLASSIFY_LEARNING_RATE:g}), more train.epochs, "
                "and check that the labels belong to their texts (a shuffled label column cannot be learned).")
    return None


def infer_labels(rows: list[LabeledText]) -> list[str]:
    """The label set of the training rows, sorted (a stable class-index order)."""
    return sorted({r.label for r in rows})


def split_rows(rows: list[LabeledText], fraction: float, seed: int) -> tuple[list[LabeledText], list[LabeledText]]:
    """(train, eval): a seeded ``fraction`` of the rows held out, disjoint from the rest."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(len(idx) * fraction))
    return [rows[i] for i in idx[n_val:]], [rows[i] for i in idx[:n_val]]


def load_data(cfg: RunConfig) -> tuple[list[LabeledText], list[LabeledText], list[str]]:
    """(train rows, eval rows, labels); every problem is one DataError."""
    if not cfg.data.train:
        raise DataError([Problem("(config)", None, "data.train", "no training file given",
                                 "pass --data FILE.jsonl with {\"text\", \"label\"} rows")])
    train_rows = load_labeled(cfg.data.train, cfg.data.labels or None)
    labels = list(cfg.data.labels) or infer_labels(train_rows)
    require_two_labels(labels, cfg.data.train)  # the same rule as `tinysft data check --task classify`
    eval_rows = load_labeled(cfg.data.eval, labels) if cfg.data.eval else []
    if not eval_rows and cfg.data.val_fraction > 0 and len(train_rows) > 4:
        train_rows, eval_rows = split_rows(train_rows, cfg.data.val_fraction, cfg.train.seed)
    return train_rows, eval_rows, labels


def init_head_from_probe(model: torch.nn.Module, tokenizer, texts: list[str], targets: list[int], *,
                         max_length: int, device: torch.device | str) -> float:
    """Set ``probe_head(model)`` to a logistic regression on the frozen features it reads for
    ``texts`` (a head without bias keeps none); returns the probe's training accuracy."""
    head = probe_head(model)
    assert head is not None, "init_head_from_probe needs a model with a probe-able head"
    features = head_features(model, tokenizer, texts, max_length=max_length, device=device)
    y = torch.tensor(targets)
    # Fit on features scaled to unit mean norm, then fold the scale into the weight: the penalty then
    # means the same for a decoder's raw final states (norms in the tens) as for a normalised sentence
    # embedding. Unscaled, 100 rows of 576-wide decoder states are separated with near-zero loss, and
    # a head that confident passes LoRA almost no gradient: fine-tuning stays at the probe.
    scale = float(features.norm(dim=-1).mean().clamp(min=1e-6))
    weight, bias = fit_linear_probe(features / scale, y, head.out_features, fit_bias=head.bias is not None)
    weight = weight / scale
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias)
    return float(((features @ weight.T + bias).argmax(-1) == y).float().mean())


def train_classifier(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
                     show_progress: bool = True, stop_after_steps: int | None = None,
                     head_init: HeadInit = CLASSIFY_HEAD_INIT, classify_defaults: bool = True) -> TrainResult:
    """Fine-tune an encoder with LoRA + a trained classification head on text/label rows.

    Resuming, refusing a finished or changed run, and ``stop_after_steps`` work as in
    ``training.sft.train``: the same loop (``loop.fit``) and checkpoints. ``head_init``: see
    CLASSIFY_HEAD_INIT ("probe" applies to mean-pooling encoders and decoders; others keep their random head).
    A run whose loss ends at chance level logs a warning with the likely fix. ``classify_defaults``
    False keeps ``cfg`` exactly as given (the sweep uses it to run the chat defaults).
    """
    run_dir = Path(run_dir)
    cfg = copy.deepcopy(cfg)  # resolved below (model, labels, targets) and saved with the run

    # ---- data (first: a bad file is reported before any model is fetched or extracted) --------------
    train_rows, eval_rows, labels = load_data(cfg)
    decoder = is_decoder(resolve_model_path(cfg.model.name, log=log))
    defaulted = apply_classify_defaults(cfg, DECODER_DEFAULTS if decoder else ENCODER_DEFAULTS) \
        if classify_defaults else []
    accelerator = make_accelerator(cfg, run_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg.data.labels = labels
    label_index = {label: i for i, label in enumerate(labels)}

    # ---- run directory and model --------------------------------------------------------------------
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # also fixes the untrained head = the "base" of the report
    base, tokenizer, model_path, head = load_encoder(cfg.model, labels, device, log=say)
    if cfg.train.gradient_checkpointing and getattr(base, "supports_gradient_checkpointing", False):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cfg.lora.target_modules = choose_target_modules(base, cfg.lora.target_modules)
    # The resolved config (targets, labels) is what a continued run is compared with.
    existing = resume_point(run_dir, cfg, world, log=say)
    if resume and existing is None:
        say(f"Nothing to resume in {run_dir} (no checkpoint yet): starting from step 0.")
    accelerator.wait_for_everyone()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    head_file = run_dir / HEAD_INIT_FILE
    head_layer = probe_head(base)
    if head_init == "probe" and head_layer is not None:
        if existing is not None and head_file.is_file():
            from safetensors.torch import load_file

            head_layer.load_state_dict(load_file(str(head_file)))
        else:
            probe_acc = init_head_from_probe(base, tokenizer, [r.text for r in train_rows],
                                             [label_index[r.label] for r in train_rows],
                                             max_length=max_length_for(cfg, base), device=device)
            say(f"Head initialised as a logistic regression on the frozen features it reads (training accuracy "
                f"{probe_acc:.2f}).")
        if is_main:
            from safetensors.torch import save_file

            tmp = head_file.with_suffix(".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in head_layer.state_dict().items()}, str(tmp))
            tmp.replace(head_file)
    elif is_main and head_file.is_file():
        head_file.unlink()  # a stale probe head from an earlier run in this folder is not this run's base
    # PEFT's SEQ_CLS task already trains and saves modules named classifier / score; add the others.
    model = add_lora(base, cfg.lora, task_type="SEQ_CLS",
                     modules_to_save=[h for h in head if h not in ("classifier", "score")] or None)
    saved = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"})
    max_length = max_length_for(cfg, base)
    train_ids, truncated = encode(tokenizer, [r.text for r in train_rows], max_length)
    train_targets = [label_index[r.label] for r in train_rows]
    eval_texts, eval_targets = [r.text for r in eval_rows], torch.tensor([label_index[r.label] for r in eval_rows])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if defaulted:
        say("Classification defaults (where the config had the chat defaults): " + "; ".join(defaulted) + ".")
    say(f"{cfg.model.name}: classifying into {len(labels)} labels ({', '.join(labels)}): {len(train_rows)} training rows, "
        f"{len(eval_rows)} eval rows; LoRA on {cfg.lora.target_modules}, trained head: {', '.join(saved)}; "
        f"{n_trainable:,} trainable parameters.")
    if truncated:
        say(f"{truncated} training rows are longer than {max_length} tokens and were truncated.")
    if is_main:
        cfg.save(run_dir / "config.yaml")
        mark_output(run_dir, "run")  # `train --force` may replace it later; nothing else tinysft writes may
        atomic_write_text(run_dir / "labels.json", json.dumps(labels, indent=2, ensure_ascii=False))
        write_manifest(run_dir, cfg, model_path, {"train_rows": len(train_rows), "eval_rows": len(eval_rows),
                                                  "labels": labels, "head_modules": saved,
                                                  "base": base_identity(cfg.model.name, base)})

    # ---- batches and schedule -------------------------------------------------------------------------
    bs = cfg.train.batch_size

    def epoch_batches(epoch: int) -> list[EncodedBatch]:
        """Shuffled with a per-epoch seed, so a resumed run sees the same order; sharded across ranks."""
        order = list(range(len(train_ids)))
        random.Random(cfg.train.seed + epoch).shuffle(order)
        batches = [collate([train_ids[i] for i in order[s : s + bs]], [train_targets[i] for i in order[s : s + bs]],
                           tokenizer.pad_token_id) for s in range(0, len(order), bs)]
        n = (len(batches) // world) * world or len(batches)
        return batches[rank:n:world]

    steps_per_epoch, total_steps = schedule_steps(len(epoch_batches(0)), cfg.train)
    if existing is not None:
        load_adapter_weights(model, existing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg.train.learning_rate, cfg.train.weight_decay, accelerator.distributed_type)
    scheduler = make_scheduler(cfg.train, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    # ---- the step: the mean cross-entropy over the step's rows ------------------------------------------
    rows_seen = {"n": 0}

    def plan_step(group: list[EncodedBatch], step: int) -> StepPlan:
        n_rows = sum(len(b.labels) for b in group)

        def batch_pass(b: EncodedBatch):
            def run() -> tuple[torch.Tensor, torch.Tensor]:
                b_dev = b.to(device)
                logits = model(input_ids=b_dev.input_ids, attention_mask=b_dev.attention_mask).logits.float()
                loss_sum = F.cross_entropy(logits, b_dev.labels, reduction="sum")
                return loss_sum / n_rows, loss_sum
            return run

        rows_seen["n"] += n_rows
        return StepPlan([batch_pass(b) for b in group], count=n_rows,
                        tokens=sum(int(b.attention_mask.sum()) for b in group),
                        passed_tokens=sum(b.input_ids.numel() for b in group))

    def log_extras(elapsed: float) -> dict[str, float]:
        return {"rows_per_s": round(rows_seen["n"] * world / max(elapsed, 1e-9), 1)}

    def evaluate() -> dict[str, float]:
        logits = class_logits(unwrapped, tokenizer, eval_texts, max_length=max_length, batch_size=max(bs, 32),
                              device=device)
        return {"eval_loss": float(F.cross_entropy(logits, eval_targets)),
                "eval_accuracy": float((logits.argmax(-1) == eval_targets).float().mean())}

    task = Task(epoch_batches, plan_step, evaluate if eval_texts else None, log_extras)
    result = fit(task, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg.train,
                 run_dir=run_dir, steps_per_epoch=steps_per_epoch, total_steps=total_steps, resume_from=existing,
                 log=log, show_progress=show_progress, stop_after_steps=stop_after_steps)
    warning = chance_level_warning([float(h["loss"]) for h in result.history if "loss" in h], len(labels))
    if warning:
        say(warning)
    return result
