"""The training loop: one function, top to bottom, on accelerate.

Run directory layout (the contract with the other stages, see DESIGN.md):
    config.yaml, manifest.json  written first (what is needed to resume or reproduce)
    metrics.jsonl               one JSON object per log / eval line
    checkpoints/step-N/         adapter + optimizer + scheduler + RNG + data position
    adapter/                    final PEFT adapter, written last via a temp folder + rename;
                                a run without it is unfinished and resumable with --resume
    loss.png                    training / eval loss curves
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.allocator import cap_onednn_cache
from tinysft.config import RunConfig
from tinysft.data.batching import (
    IGNORE,
    Batch,
    answer_start_weights,
    append_rows,
    collate,
    make_batches,
    pack,
    share_prefixes,
    split_batch,
)
from tinysft.data.formats import Conversation
from tinysft.data.render import Rendered, RenderError, render, render_problem
from tinysft.data.rules import check_trainable
from tinysft.data.validate import DataError, Problem, load_conversations, weight_categories
from tinysft.files import atomic_save_dir, atomic_write_text
from tinysft.models.chunked_head import head_cross_entropy, plain_lm_head
from tinysft.models.identity import base_identity
from tinysft.models.load import (
    add_lora,
    emulated_on_cpu,
    emulated_warning,
    fast_bf16_available,
    keep_lora_inputs_in_compute_dtype,
    load_causal_lm,
)
from tinysft.models.lora_dropout import use_fast_dropout
from tinysft.models.lora_linear import use_fused_lora
from tinysft.models.packed_attention import use_packed_attention
from tinysft.models.rms_norm import use_fast_rms_norm
from tinysft.models.swiglu import use_fused_silu_mul

# accelerate's distributed types where each rank holds every trainable parameter whole (no FSDP / ZeRO).
_PLAIN_DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU")
PASS_TOKENS_CPU = 1024  # tokens per forward/backward pass on a CPU in fp32, twice that in 16 bits (see train())
NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep that computes no logits


class TrainError(RuntimeError):
    """Training stopped for a reason the user can act on (NaN loss, bad resume state, ...)."""


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


def render_all(convs: list[Conversation], tokenizer: Any, max_length: int, system_prompt: str | None = None) -> list[Rendered]:
    """Render every conversation; all failures are collected into one DataError."""
    out, problems = [], []
    for c in convs:
        try:
            out.append(render(c, tokenizer, max_length, system_prompt))
        except RenderError as e:
            problems.append(render_problem(c, "messages", e))
    if problems:
        raise DataError(problems)
    return out


def causal_lm_loss(model: Any, batch: Batch, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens, and their count.

    ``weights`` (B, T), aligned with ``batch.labels`` (see ``answer_start_weights``), weighs each
    trained token's loss; the count stays the number of trained tokens.

    Only positions whose *next* token is trained go through the LM head: a quarter to a half of
    the tokens are prompt context, and the 49k-wide head is a large share of the FLOPs. Where the
    head is a plain frozen Linear (``plain_lm_head``), it runs in chunks that never hold all the
    logits (``head_cross_entropy``); otherwise the model's own head runs on those positions only
    (``logits_to_keep``). labels[:, 1:] lines up with logits[:, :-1].
    """
    loss, n, _ = lm_and_pair_loss(model, batch, weights)
    return loss, n


def lm_and_pair_loss(model: Any, batch: Batch, weights: torch.Tensor | None = None,
                     beta: float = 0.1) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``causal_lm_loss`` plus, from the same forward pass, the preference term of the batch's
    in-row pairs (rows packed with rejected branches, ``data.batching.pack``): the sum over those
    rows of the mean over their rejected answers of -log sigmoid(beta * (log p(chosen) - log
    p(rejected))); 0 for a batch without pairs.

    The chosen side is the conversation's own answer (its first ``pair_tokens`` tokens), the
    rejected side the branch, scored in the same prompt's context: the same numbers as
    ``preference_loss`` on separate (chosen, rejected) conversations, without computing either
    prompt again.
    """
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE
    pairs = batch.n_pairs > 0 and batch.rejected_targets is not None
    zero = torch.zeros((), device=batch.input_ids.device)
    if pairs:
        chosen_t, rejected_t = batch.chosen_targets[0], batch.rejected_targets[0]  # (T,) per predicting position
        at_c, at_r = (chosen_t != IGNORE).nonzero().squeeze(-1), (rejected_t != IGNORE).nonzero().squeeze(-1)
        pos = batch.position_ids[0]
        segment = F.pad((pos[1:] - pos[:-1] != 1).cumsum(0), (1, 0))  # the conversation or branch of each position
        # A rejected branch is a segment with rejected targets; each branch belongs to the latest
        # conversation before it (which, after data.batching.share_prefixes, need not start at 0).
        n_seg = int(segment[-1]) + 1
        is_branch = torch.zeros(n_seg, dtype=torch.bool, device=pos.device).index_fill_(0, segment[at_r], True)
        seg_idx = torch.arange(n_seg, device=pos.device)
        conv_of = torch.where(is_branch, -1, seg_idx).cummax(0).values  # segment -> its conversation's segment
    head = plain_lm_head(model)
    if head is not None:
        # logits_to_keep=[] (no position): the model's own head does no work (with 1 position it
        # still copies the whole 28M-weight head, measured ~140 ms per pass on a CPU); the last
        # hidden state (after the final norm) feeds the chunked head.
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=NO_POSITIONS.to(batch.input_ids.device), output_hidden_states=True, use_cache=False)
        full = out.hidden_states[-1]
        hidden = full[:, :-1]  # (B, T-1, d): position t predicts token t+1
        row_weights = None if weights is None else weights[:, 1:][trained]
        loss = head_cross_entropy(hidden[trained], head.weight, targets[trained], row_weights=row_weights)
        if not pairs:
            return loss, int(trained.sum()), zero
        # A few positions per pair (~2 x preference_tokens): their full logits are small.
        at = torch.cat([at_c, at_r])
        logprobs = F.linear(full[0, at], head.weight).float().log_softmax(-1)
    else:
        # Aligned with the positions (the last one has no next token in the row, but can score a
        # branch's last rejected token).
        targets = F.pad(targets, (0, 1), value=IGNORE)
        keep = (targets != IGNORE).any(0)
        if pairs:  # the pair positions need logits too
            keep = keep | (chosen_t != IGNORE) | (rejected_t != IGNORE)
        keep = keep.nonzero().squeeze(-1)  # positions t whose target t+1 is trained or paired
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=keep, use_cache=False)
        logits = out.logits.float()  # (B, K, V)
        tgt = targets[:, keep]  # (B, K)
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=IGNORE,
                                    reduction="none")
        if weights is not None:
            per_token = per_token * F.pad(weights[:, 1:], (0, 1))[:, keep].reshape(-1)
        loss = per_token.sum()
        if not pairs:
            return loss, int(trained.sum()), zero
        slot = torch.full_like(chosen_t, -1)
        slot[keep] = torch.arange(len(keep), device=keep.device)  # position -> row of `logits`
        at = torch.cat([at_c, at_r])
        logprobs = logits[0, slot[at]].log_softmax(-1)
    # Summed log-probability of each conversation's chosen tokens and of each branch's rejected ones.
    lp = logprobs.gather(1, torch.cat([chosen_t[at_c], rejected_t[at_r]])[:, None]).squeeze(1)
    n_c = len(at_c)
    chosen = lp.new_zeros(n_seg).index_add(0, conv_of[segment[at_c]], lp[:n_c])  # per conversation segment
    branches = segment[at_r].unique()  # one pair per branch
    rejected = lp.new_zeros(n_seg).index_add(0, segment[at_r], lp[n_c:])[branches]
    conv = conv_of[branches]  # each branch's conversation
    # A conversation with several rejected answers is one example: the mean of its pairs' terms.
    per_conv = lp.new_zeros(len(chosen)).index_add(0, conv, torch.ones_like(rejected))
    terms = -F.logsigmoid(beta * (chosen[conv] - rejected)) / per_conv[conv]
    return loss, int(trained.sum()), terms.sum()


def sequence_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each conversation's trained tokens, differentiable: (B,) for a
    padded batch, one per packed conversation (in order) for a packed (1, T) row."""
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE
    if batch.attention_mask is None:  # packed: conversations split where packed attention splits them
        breaks = batch.position_ids[:, 1:] - batch.position_ids[:, :-1] != 1  # segment_bounds' rule
        seq = breaks.cumsum(-1)  # owner of each target token (token t+1): 0 = the first conversation
        n_seq = int(breaks.sum()) + 1
    else:
        seq = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        n_seq = targets.shape[0]
    head = plain_lm_head(model)
    if head is not None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=NO_POSITIONS.to(batch.input_ids.device), output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, :-1][trained]  # (N, d), trained target positions in order
        tgt, owner = targets[trained], seq[trained]
        return -torch.stack([head_cross_entropy(hidden[owner == k], head.weight, tgt[owner == k])
                             for k in range(n_seq)])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    return -torch.zeros(n_seq, device=nll.device, dtype=nll.dtype).index_add(0, seq[trained], nll[trained])


def preference_loss(model: Any, chosen: list[Rendered], rejected: list[Rendered], pad_id: int, beta: float,
                    device: torch.device, packing: bool = False) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta * (log p(chosen) - log p(rejected))), reference-free.

    The CPO form (Xu et al., 2024; TRL's CPOTrainer): added to the SFT loss, it pushes each
    rejected answer below the chosen one for the same prompt, where SFT alone only pulls the
    chosen one up. Chosen and rejected share the prompt and earlier turns, so only the last
    answer differs in the margin. ``packing``: all of them in one padding-free row (the model
    must attend per conversation, as ``models.packed_attention`` makes it).
    """
    layout = pack if packing else collate
    logp = sequence_logprobs(model, layout([*chosen, *rejected], pad_id).to(device))
    n = len(chosen)
    return -F.logsigmoid(beta * (logp[:n] - logp[n:]).float()).mean()


def answer_prefix(rendered: Rendered, tokens: int) -> Rendered:
    """The conversation up to the first ``tokens`` trained tokens of its last answer; only those
    are trained (earlier answers are shared by chosen and rejected, so their terms cancel)."""
    if not any(rendered.loss_mask):
        return rendered
    start, end = rendered.last_answer()
    end = min(end, start + tokens)
    return Rendered(rendered.input_ids[:end], [0] * start + [1] * (end - start), rendered.source, rendered.truncated)


def with_rejected(chosen: Rendered, rejected: list[Rendered], tokens: int = 0) -> Rendered:
    """``chosen`` carrying the first ``tokens`` (0 = all) of each ``rejected`` rendering's last
    answer, for the in-row preference term (``lm_and_pair_loss``). All share everything before it."""
    def answer(x: Rendered) -> list[int]:
        start, end = x.last_answer()
        return x.input_ids[start:end][: tokens or None]

    c, _ = chosen.last_answer()
    for r in rejected:
        if r.last_answer()[0] != c or r.input_ids[:c] != chosen.input_ids[:c]:
            raise RenderError(f"{chosen.source}: a `rejected` answer's prompt renders differently from the answer's, "
                              "so the two cannot share it; check the row's messages.")
    return dataclasses.replace(chosen, rejected=[answer(r) for r in rejected], pair_tokens=len(answer(chosen)))


def preference_pairs(convs: list[Conversation], tokenizer: Any, max_length: int,
                     system_prompt: str | None, answer_tokens: int = 0) -> list[tuple[Rendered, Rendered]]:
    """(chosen, rejected) renderings for every conversation with a `rejected` answer; failures are one DataError.

    ``answer_tokens`` > 0 keeps only the first that many tokens of both answers (where the model
    decides to refuse or to answer), which also makes the pair pass shorter.
    """
    chosen = [c for c in convs for _ in rejected_answers(c)]  # one pair per rejected answer
    pairs = list(zip(render_all(chosen, tokenizer, max_length, system_prompt),
                     render_all([a for c in convs for a in _rejected_conversations(c)], tokenizer, max_length,
                                system_prompt),
                     strict=True))
    if answer_tokens > 0:
        pairs = [(answer_prefix(c, answer_tokens), answer_prefix(r, answer_tokens)) for c, r in pairs]
    return pairs


def rejected_answers(conv: Conversation) -> list[str]:
    """The row's `rejected` answers (one string or a list of them); [] for a row without."""
    rejected = conv.extra.get("rejected")
    return [] if rejected is None else rejected if isinstance(rejected, list) else [rejected]


def _rejected_conversations(conv: Conversation) -> list[Conversation]:
    return [Conversation([*conv.messages[:-1], {"role": "assistant", "content": answer}], conv.source, conv.format,
                         conv.category) for answer in rejected_answers(conv)]


def rows_with_rejected(convs: list[Conversation], rows: list[Rendered], tokenizer: Any, max_length: int,
                       system_prompt: str | None, answer_tokens: int = 0) -> list[Rendered]:
    """``rows`` (the renderings of ``convs``), each conversation with `rejected` answers carrying
    them (``with_rejected``) for the in-row preference term; failures are one DataError."""
    paired = [i for i, c in enumerate(convs) if rejected_answers(c)]
    flat = render_all([a for i in paired for a in _rejected_conversations(convs[i])], tokenizer, max_length,
                      system_prompt)
    out = list(rows)
    problems = []
    at = 0
    for i in paired:
        n = len(rejected_answers(convs[i]))
        try:
            out[i] = with_rejected(rows[i], flat[at : at + n], answer_tokens)
        except RenderError as e:
            problems.append(render_problem(convs[i], "rejected", e))
        at += n
    if problems:
        raise DataError(problems)
    return out


@torch.no_grad()
def evaluate_loss(model: Any, batches: list[Batch], device: torch.device, autocast: Any) -> float:
    """Token-weighted mean loss over the batches (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast():
            loss, n = causal_lm_loss(model, b.to(device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _sha256_files(paths: list[str]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        out[str(p)] = h
    return out


def write_manifest(run_dir: Path, cfg: RunConfig, model_path: str, extra: dict[str, Any] | None = None) -> None:
    import accelerate
    import peft
    import transformers

    manifest = {
        "tinysft": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "accelerate": accelerate.__version__},
        "model_path": model_path,
        "seed": cfg.train.seed,
        "data_sha256": _sha256_files(cfg.data.train + cfg.data.eval),
        **(extra or {}),
    }
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinysft")
    except PackageNotFoundError:
        return "dev"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (``state.json`` is written last, inside the temporary folder)."""
    ckpts = _checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpts = [p for p in (run_dir / "checkpoints").glob("step-*")
             if p.is_dir() and p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(ckpts, key=lambda p: int(p.name[5:]))


@contextlib.contextmanager
def discard_unfinished(run_dir: str | Path) -> Iterator[None]:
    """On any failure (error, disk full, Ctrl-C), leave nothing half-written in ``run_dir``.

    Temporary files and folders of an interrupted write are removed. A run directory that did not
    exist before is removed entirely unless it holds a complete checkpoint to resume from: a run
    that failed before its first checkpoint has nothing worth keeping. Used by ``tinysft train``.
    """
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0 and run_dir.is_dir():
            if fresh and latest_checkpoint(run_dir) is None and not (run_dir / "adapter").is_dir():
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for tmp in [*run_dir.glob(".*.tmp*"), *run_dir.glob("checkpoints/.*.tmp*")]:
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


# train.* keys that may differ between a run and its continuation: they change how often things
# are logged or saved, or how fast it runs, never what is computed. The eval section is only used
# after training (generation settings for the report).
RUN_CONTROL_KEYS = {"train.threads", "train.save_every", "train.keep_checkpoints", "train.log_every"}


def _config_changes(run_dir: Path, cfg: RunConfig) -> list[str]:
    """What differs between the run's saved config / data and ``cfg`` (empty = same run)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ["config.yaml is missing or unreadable"]
    now = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # same round trip as the saved file
    changes = []
    for section, values in now.items():
        if section == "eval":
            continue
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, "(unset)")
            if f"{section}.{key}" not in RUN_CONTROL_KEYS and old != value:
                changes.append(f"{section}.{key} was {old!r}, now {value!r}")
    try:
        hashes = json.loads((run_dir / "manifest.json").read_text()).get("data_sha256", {})
    except (OSError, ValueError):
        hashes = {}
    for path, digest in hashes.items():
        if Path(path).is_file() and _sha256_files([path])[path] != digest:
            changes.append(f"the data file {path} changed since the run started")
    return changes


def resume_point(run_dir: Path, cfg: RunConfig, world_size: int = 1) -> Path | None:
    """The checkpoint an unfinished run in ``run_dir`` continues from; None to start from step 0.

    Refuses (TrainError) a finished run, and an unfinished one whose config, data or number of
    processes differ: continuing it would silently mix two different trainings.
    """
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        raise TrainError(f"{run_dir} already holds a run that finished (its adapter/ is written). Choose another "
                         "--out, or delete that folder to train again.")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    changes = _config_changes(run_dir, cfg)
    if changes:
        raise TrainError(f"{run_dir} holds an unfinished run (last checkpoint {ckpt.name}) started with other "
                         f"settings: {'; '.join(changes)}. Rerun with the same settings to continue it, or choose "
                         "another --out.")
    saved_world = json.loads((ckpt / "state.json").read_text()).get("world_size", 1)
    if saved_world != world_size:
        raise TrainError(f"{ckpt} was written by {saved_world} process(es) but this run has {world_size}: the data "
                         f"is sharded per process, so resume with {saved_world} process(es) (or choose another --out).")
    return ckpt


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def mixed_precision_for(cfg: RunConfig, device: torch.device) -> str:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if fast_bf16_available(device) else "no"
    return mp


def packing_for(cfg: RunConfig, device: torch.device) -> bool:
    """``train.packing`` with "auto" resolved: packed on a CPU, and where train.preference_in_batch needs
    it; padded batches on a GPU (their attention is one kernel call per layer, not one per conversation)."""
    if cfg.train.packing != "auto":
        return bool(cfg.train.packing)
    return cfg.train.preference_in_batch or device.type == "cpu"


def pass_tokens_for(device: torch.device, mixed_precision: str, weight_dtype: torch.dtype) -> int | None:
    """Most tokens per forward/backward pass (whole conversations; None = the micro-batch in one).

    On a CPU, 1,024 tokens computed in fp32 and 2,048 in bf16 / fp16 (autocast, or 16-bit weights
    without it): the same activation bytes. Measured on SmolLM2-135M in fp32: a 2,300-token batch
    peaked at 5.5 GB RSS in one pass and 2.8 GB in 1,024-token pieces, at the same speed; in bf16
    the benchmark's ~1,460-token steps ran 13-20% faster as one pass than as two, for ~440 MB more
    peak RSS (docs/benchmarks.md). Elsewhere (GPUs) the micro-batch is one pass.
    """
    if device.type != "cpu":
        return None
    sixteen_bit = mixed_precision in ("bf16", "fp16") or weight_dtype in (torch.bfloat16, torch.float16)
    return PASS_TOKENS_CPU * 2 if sixteen_bit else PASS_TOKENS_CPU


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   distributed_type: str = "NO") -> torch.optim.AdamW:
    """AdamW over ``params``, as torch's fused kernel where it can run: float parameters, all on
    the CPU or all on CUDA GPUs, not sharded (``distributed_type``, accelerate's, is not FSDP or
    DeepSpeed). The same update rule as the default implementation; on a CPU that one loops over
    the ~400 LoRA tensors of a SmolLM2 adapter op by op: measured 28.8 ms per step there against
    4.4 ms fused (4.9M parameters, 2 threads)."""
    kinds = {p.device.type for p in params}
    fused = (distributed_type in _PLAIN_DATA_PARALLEL and kinds in ({"cpu"}, {"cuda"})
             and all(p.is_floating_point() for p in params))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_accelerator(cfg: RunConfig, *, cpu: bool = False) -> Any:
    """An ``accelerate.Accelerator`` with the run's mixed precision.

    accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with
    another ``mixed_precision`` ("AcceleratorState has already been initialized"). Within one
    process (a notebook, a sweep, the tests) runs may differ in precision, so the single-process
    state is reset when it disagrees; a launched multi-process run is never touched (its state
    comes from ``accelerate launch`` and holds the process group). The oneDNN primitive cache is
    capped here too, before training's first matmul (``allocator.cap_onednn_cache``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cap_onednn_cache()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = mixed_precision_for(cfg, device)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mp) != mp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mp, cpu=cpu)


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
          show_progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` with LoRA on ``cfg.data.train``; write the run directory.

    An unfinished run in ``run_dir`` (a checkpoint, no adapter/) is continued from its latest
    checkpoint when the config and data are the same, with or without ``resume``; a finished run or
    a changed config is refused (TrainError). ``resume=True`` only adds a note when there is
    nothing to continue. ``stop_after_steps`` ends the run early after writing a checkpoint (used by
    tests); Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and raises
    KeyboardInterrupt.

    Multi-process (``accelerate launch`` / ``torchrun``): every rank runs this function on its own
    shard of the micro-batches; rank 0 alone logs, shows progress and writes files.
    """
    from transformers import get_scheduler

    run_dir = Path(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Accumulation is done by hand below (token-weighted across micro-batches, no_sync under DDP),
    # so accelerate is not told about it; it provides the device, DDP/FSDP/DeepSpeed wrapping and
    # autocast. Without `cpu=True` accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU
    # and every process would train alone; with it, CPU processes join one gloo group.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = make_accelerator(cfg, cpu=multi_cpu)
    device = accelerator.device
    is_main = accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    world, rank = accelerator.num_processes, accelerator.process_index
    existing = resume_point(run_dir, cfg, world)
    if resume and existing is None:
        say(f"Nothing to resume in {run_dir} (no checkpoint yet): starting from step 0.")

    # ---- data ---------------------------------------------------------------------------------
    if not cfg.data.train:
        raise DataError([Problem("(config)", None, "data.train", "no training file given", "pass --data FILE.jsonl")])
    train_convs = load_conversations(cfg.data.train)
    eval_convs = load_conversations(cfg.data.eval) if cfg.data.eval else []
    if not eval_convs and cfg.data.val_fraction > 0 and len(train_convs) > 4:
        rng = random.Random(cfg.train.seed)
        idx = list(range(len(train_convs)))
        rng.shuffle(idx)
        n_val = max(1, int(len(idx) * cfg.data.val_fraction))
        eval_convs = [train_convs[i] for i in idx[:n_val]]
        train_convs = [train_convs[i] for i in idx[n_val:]]
    if cfg.data.category_weights or cfg.data.file_weights:  # after the split: no repeated row in the eval set
        n_before = len(train_convs)
        train_convs = weight_categories(train_convs, cfg.data.category_weights, cfg.train.seed, cfg.data.file_weights)
        say(f"{'Category' if not cfg.data.file_weights else 'Category and file'} weights: "
            f"{n_before} training rows -> {len(train_convs)} per epoch.")
    # The pool of preference pairs: each row with a `rejected` answer that the weights kept, once.
    pair_convs = (list({id(c): c for c in train_convs if rejected_answers(c)}.values())
                  if cfg.train.preference_weight > 0 else [])
    if cfg.train.preference_weight > 0 and not pair_convs:
        raise DataError([Problem("(config)", None, "train.preference_weight",
                                 "is set but no training row (after data weights) has a `rejected` answer",
                                 'add "rejected": "..." to rows, or set train.preference_weight=0')])

    # ---- model --------------------------------------------------------------------------------
    accelerator.wait_for_everyone()  # every rank has read the run directory before rank 0 writes to it
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*run_dir.glob("checkpoints/.step-*"), *run_dir.glob(".adapter.*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    base, tokenizer, model_path = load_causal_lm(cfg.model, device=device, log=say)
    # dtype / mixed_precision "auto" depend on the hardware (on some CPUs on a measurement): say what was picked.
    compute = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(accelerator.mixed_precision, "fp32")
    say(f"Base weights in {str(base.dtype).removeprefix('torch.')}, computing in {compute} on {device.type}.")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if autocast_dtype is not None and autocast_dtype != base.dtype and emulated_on_cpu(autocast_dtype, device):
        say(emulated_warning(autocast_dtype, f"train.mixed_precision={accelerator.mixed_precision}"))
    packing = packing_for(cfg, device)
    if cfg.train.packing == "auto" and not packing:
        say("Padded batches (train.packing auto on a GPU; train.packing=true packs conversations).")
    rows = check_trainable(train_convs, tokenizer, max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    eval_rows = render_all(eval_convs, tokenizer, cfg.data.max_length, cfg.data.system_prompt) if eval_convs else []
    in_batch = cfg.train.preference_weight > 0 and cfg.train.preference_in_batch
    if in_batch:  # each paired row carries its rejected answer; no pair pool
        rows = rows_with_rejected(train_convs, rows, tokenizer, cfg.data.max_length, cfg.data.system_prompt,
                                  cfg.train.preference_tokens)
        pairs = []
        say(f"Preference term in the SFT pass: {sum(len(r.rejected or []) for r in rows)} rejected answers on "
            f"{sum(bool(r.rejected) for r in rows)} rows per epoch (weight {cfg.train.preference_weight}, "
            f"beta {cfg.train.preference_beta}).")
    else:
        pairs = preference_pairs(pair_convs, tokenizer, cfg.data.max_length, cfg.data.system_prompt,
                                 cfg.train.preference_tokens)
    pair_order = list(range(len(pairs)))
    random.Random(cfg.train.seed).shuffle(pair_order)
    pairs_per_step = cfg.train.preference_pairs or max(1, cfg.train.batch_size // 2)
    if pairs:
        say(f"Preference term on {len(pairs)} rows with a `rejected` answer, {pairs_per_step} pairs per step "
            f"(weight {cfg.train.preference_weight}, beta {cfg.train.preference_beta}).")
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = add_lora(base, cfg.lora)
    use_fast_dropout(model)  # nn.Dropout's CPU sampler costs as much as the matmuls it feeds
    if accelerator.mixed_precision in ("bf16", "fp16"):
        keep_lora_inputs_in_compute_dtype(model)  # autocast computes the adapters in bf16 anyway
    if device.type == "cpu":
        use_fused_lora(model)  # one autograd function per LoRA linear: fewer passes over activations
        use_fast_rms_norm(model)  # the norm's closed-form backward in fp32
        use_fused_silu_mul(model)  # the MLP saves gate and up for backward, not SiLU's output too
    # Attention per packed conversation, not over the whole row; with it, pairs are scored as
    # branches inside the SFT pass (in-batch pairs, or the step's pool pairs appended to its last piece).
    packed_attention = packing and use_packed_attention(model)
    if in_batch and not packed_attention:
        raise TrainError("train.preference_in_batch needs tinysft's packed attention, which this model's "
                         "architecture does not use; set train.preference_in_batch=false (a separate pair pass).")
    pair_rows = ([dataclasses.replace(with_rejected(c, [r]), pair_only=True) for c, r in pairs]
                 if packed_attention else [])
    row_pairs = in_batch or bool(pair_rows)
    # CPU only: on a GPU the branches' attention runs torch's math kernel (not measured there).
    share = packed_attention and cfg.train.share_prefixes and device.type == "cpu"

    if is_main:
        cfg.save(run_dir / "config.yaml")
        write_manifest(run_dir, cfg, model_path, {"train_rows": len(rows), "eval_rows": len(eval_rows),
                                                  "base": base_identity(cfg.model.name, base)})

    # Shard micro-batches across processes: every rank builds the same list (same seed) and takes
    # a disjoint, equally long slice, so all ranks run the same number of steps.
    pad_id = tokenizer.pad_token_id
    bs = cfg.train.batch_size

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

    def token_weights(b: Batch) -> torch.Tensor | None:
        if cfg.train.answer_start_tokens == 0 or cfg.train.answer_start_weight == 1.0:
            return None
        return answer_start_weights(b.labels, cfg.train.answer_start_tokens, cfg.train.answer_start_weight)

    def loss_weight(b: Batch) -> float:
        w = token_weights(b)
        return float(b.n_trained) if w is None else float(w.sum())

    eval_batches = make_batches(eval_rows, bs, pad_id, packing=packing, shuffle=False) if eval_rows else []
    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.train.grad_accum))
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
    if existing is not None:
        # Adapter weights go in before `prepare`, so FSDP / ZeRO-3 shard the resumed values.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(existing / "adapter" / "adapter_model.safetensors")))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg.train.learning_rate, cfg.train.weight_decay, accelerator.distributed_type)
    scheduler = get_scheduler(cfg.train.schedule if cfg.train.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    from accelerate.utils import DistributedType, gather_object

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # tinysft's config is the one source of truth: DeepSpeed sees one micro-batch per backward
        # (the loop below accumulates and marks where each step ends) and clips at train.max_grad_norm.
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": bs, "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.train.max_grad_norm})
    # The scheduler is not prepared: total_steps is already per rank, and a prepared scheduler
    # would step once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # FSDP and DeepSpeed ZeRO shard the optimizer state: each rank saves and loads its own part.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    optimizer_file = f"optimizer-{rank}.pt" if sharded else "optimizer.pt"
    # FSDP and ZeRO-3 also shard the weights: saving gathers them first (a collective on all ranks).
    # Elsewhere every rank holds the LoRA weights and PEFT takes them from the model itself.
    gather_weights = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)

    def adapter_weights() -> dict[str, torch.Tensor] | None:
        return accelerator.get_state_dict(model) if gather_weights else None

    step = 0
    history: list[dict[str, Any]] = []
    seen_tokens = passed_tokens = 0
    window_loss, window_count = 0.0, 0  # the loss since the last log line (global sum, global tokens)
    # The preference term since the last log line (this rank), kept on the device until logged.
    window_pref, window_pref_n = torch.zeros((), device=device), 0
    elapsed_before = 0.0
    metrics_path = run_dir / "metrics.jsonl"
    if existing is not None:
        state = json.loads((existing / "state.json").read_text())
        optimizer.load_state_dict(torch.load(existing / optimizer_file, weights_only=True))
        scheduler.load_state_dict(torch.load(existing / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(existing / f"rng-{rank}.pt", weights_only=True))
        step = state["step"]
        window_loss, window_count = state.get("window_loss", 0.0), state.get("window_count", 0)
        seen_tokens, elapsed_before = state.get("seen_tokens", 0), state.get("elapsed_s", 0.0)
        passed_tokens = state.get("passed_tokens", 0)
        say(f"Resuming from {existing} (step {step}/{total_steps}).")
        # Lines logged after the checkpoint are dropped: the continued run writes them again. A line
        # cut short by a kill is skipped.
        history = [h for h in _read_jsonl(metrics_path) if h.get("step", 0) <= step]
        if is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    elif is_main:
        metrics_path.write_text("")

    def save_checkpoint() -> Path:
        """Write checkpoints/step-N via a temporary folder + rename; all ranks must call it.

        Rank 0 writes the adapter, optimizer, scheduler, every rank's RNG state and the data
        position (= the step: the batch order of each epoch is a function of the seed). state.json
        is written last, so a folder without it is never taken for a checkpoint.
        """
        rng_states = gather_object([_rng_state()])  # one entry per rank (dropout streams differ)
        weights = adapter_weights()
        folder = run_dir / "checkpoints"
        tmp, final = folder / f".step-{step}.tmp", folder / f"step-{step}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if sharded:
            torch.save(optimizer.state_dict(), tmp / optimizer_file)
        if is_main:
            unwrapped.save_pretrained(tmp / "adapter", state_dict=weights)
            if not sharded:
                torch.save(optimizer.state_dict(), tmp / optimizer_file)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for r, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng-{r}.pt")
            (tmp / "state.json").write_text(json.dumps({
                "step": step, "total_steps": total_steps, "world_size": world, "seen_tokens": seen_tokens,
                "passed_tokens": passed_tokens,
                "window_loss": window_loss, "window_count": window_count,
                "elapsed_s": elapsed_before + time.time() - start}))
        accelerator.wait_for_everyone()
        if is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in _checkpoints(run_dir)[: -max(1, cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    # Ctrl-C / SIGTERM (what schedulers send before preemption): finish the current step, save a
    # checkpoint, exit. Every rank catches it; the ranks agree on stopping through the per-step
    # all-reduce below, so they all save together. A second Ctrl-C aborts at once.
    interrupted = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        say("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to abort)...")

    previous_handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
                         if _in_main_thread() else {})

    model.train()
    autocast = accelerator.autocast
    pass_tokens = pass_tokens_for(device, accelerator.mixed_precision, base.dtype)
    eval_every = cfg.train.eval_every or steps_per_epoch
    start = time.time()
    last_eval: float | None = None
    progress = TrainProgress(show_progress and is_main, total_steps, step)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batches = epoch_batches(epoch)
            # Data position: skip the micro-batches this epoch already consumed before the checkpoint.
            first = (step - epoch * steps_per_epoch) * cfg.train.grad_accum
            for s in range(first, len(batches), cfg.train.grad_accum):
                group = batches[s : s + cfg.train.grad_accum]
                # One optimizer step over `group` on every rank. The loss is the mean over the
                # trained tokens of the whole step on all ranks: each micro-batch's summed loss is
                # divided by the global token count, times `world` because DDP averages gradients
                # over ranks. So 2 processes x grad_accum A == 1 process x grad_accum 2A.
                # With train.answer_start_weight the "count" is the total weight of the step's tokens.
                # Each micro-batch runs as pieces of <= pass_tokens tokens (whole conversations): the
                # same gradients, with activation memory set by the piece instead of the batch.
                pieces = [piece for b in group for piece in split_batch(b, pass_tokens)]
                if pairs:
                    # The same pairs on a resumed run: picked from the step number and rank alone.
                    first_pair = (step * world + rank) * pairs_per_step
                    chosen_idx = [pair_order[(first_pair + j) % len(pairs)] for j in range(pairs_per_step)]
                    if pair_rows:  # scored in the last piece's pass: only their prompts and tokens added
                        pieces[-1] = append_rows(pieces[-1], [pair_rows[i] for i in chosen_idx])
                if share:
                    pieces = [share_prefixes(p) for p in pieces]
                counts = accelerator.reduce(torch.tensor([float(sum(loss_weight(b) for b in group)),
                                                          float(sum(p.n_pairs for p in pieces))], device=device), "sum")
                n_step_tokens = max(float(counts[0]), 1.0)
                n_step_pairs = max(float(counts[1]), 1.0)  # in-row pairs: the term is their mean over the step
                step_loss = torch.zeros((), device=device)
                if pairs and not pair_rows:  # a pass of their own
                    picked = [pairs[i] for i in chosen_idx]
                    accelerator.sync_gradients = False
                    with accelerator.no_sync(model), autocast():  # the SFT pass below syncs the step
                        pref = preference_loss(model, [c for c, _ in picked], [r for _, r in picked], pad_id,
                                               cfg.train.preference_beta, device, packing=packing)
                    accelerator.backward(pref * cfg.train.preference_weight)
                    window_pref += pref.detach().float()
                    window_pref_n += 1
                for j, b in enumerate(pieces):
                    b = b.to(device)
                    sync = j == len(pieces) - 1
                    accelerator.sync_gradients = sync  # DeepSpeed steps its engine only on the last one
                    with (accelerator.no_sync(model) if not sync else contextlib.nullcontext()), autocast():
                        if row_pairs:
                            loss_sum, _n, pref_sum = lm_and_pair_loss(model, b, token_weights(b),
                                                                      cfg.train.preference_beta)
                            loss = (loss_sum * (world / n_step_tokens)
                                    + pref_sum * (cfg.train.preference_weight * world / n_step_pairs))
                            window_pref += pref_sum.detach().float()
                            window_pref_n += b.n_pairs
                        else:
                            loss_sum, _n = causal_lm_loss(model, b, token_weights(b))
                            loss = loss_sum * (world / n_step_tokens)
                    accelerator.backward(loss)
                    step_loss += loss_sum.detach().float()
                    seen_tokens += b.n_tokens
                    passed_tokens += b.input_ids.numel()
                # One all-reduce per step: the global loss sum (for logging and the NaN check, so all
                # ranks stop together) and whether any rank was interrupted.
                totals = accelerator.reduce(torch.stack([step_loss, torch.tensor(float(interrupted["flag"]), device=device)]), "sum")
                value = float(totals[0])
                if not math.isfinite(value):
                    raise TrainError(_nonfinite_message("loss", value, step + 1, run_dir))
                if cfg.train.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    if norm is not None and not math.isfinite(float(norm)):
                        raise TrainError(_nonfinite_message("gradient norm", float(norm), step + 1, run_dir))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_loss += value
                window_count += int(n_step_tokens)
                elapsed = elapsed_before + time.time() - start
                tps = seen_tokens * world / max(elapsed, 1e-9)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    entry = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                             "loss": round(window_loss / max(window_count, 1), 5),
                             "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1),
                             "elapsed_s": round(elapsed, 2)}
                    if window_pref_n:
                        entry["preference_loss"] = round(float(window_pref) / window_pref_n, 5)
                    record(entry)
                    window_loss, window_count = 0.0, 0
                    window_pref, window_pref_n = torch.zeros((), device=device), 0
                    if progress:
                        progress.update(step, entry["loss"], tps)
                elif progress:
                    progress.update(step, None, tps)
                if eval_batches and (step % eval_every == 0 or step == total_steps):
                    last_eval = evaluate_loss(model, eval_batches, device, autocast)
                    record({"step": step, "eval_loss": round(last_eval, 5), "eval_ppl": round(math.exp(min(last_eval, 50)), 3)})
                stop = bool(totals[1] > 0) or (stop_after_steps is not None and step >= stop_after_steps)
                if step == total_steps or stop or (cfg.train.save_every and step % cfg.train.save_every == 0):
                    saved = save_checkpoint()
                    if stop and step < total_steps:
                        if progress:
                            progress.close()
                        say(f"Saved {saved}; rerun the same command to continue from step {step}.")
                        if totals[1] > 0:
                            raise KeyboardInterrupt
                        raise _EarlyStop
                if step >= total_steps:
                    break
    except _EarlyStop:
        pass
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if progress:
            progress.close()

    seconds = time.time() - start
    train_losses = [h["loss"] for h in history if "loss" in h]
    result = TrainResult(run_dir, step, train_losses[-1] if train_losses else float("nan"), last_eval, seconds,
                         seen_tokens * world / max(elapsed_before + seconds, 1e-9), history, passed_tokens * world)
    if step < total_steps:
        return result
    # The final adapter: gathered on all ranks (FSDP / ZeRO-3), written by rank 0; its presence
    # marks the run as finished.
    weights = adapter_weights()
    if is_main:
        atomic_save_dir(run_dir / "adapter", lambda tmp: unwrapped.save_pretrained(tmp, state_dict=weights))
        plot_losses(history, run_dir / "loss.png")
    accelerator.wait_for_everyone()
    return result


def _nonfinite_message(what: str, value: float, step: int, run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    kept = f"The last good checkpoint, {last}, is kept." if last else "No checkpoint was written before it."
    return (f"the {what} became {value} at step {step}: training diverged. Lower train.learning_rate (or raise "
            f"train.warmup_ratio), keep train.max_grad_norm > 0, and check the data. {kept}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is empty and a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class _EarlyStop(Exception):
    pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TrainProgress:
    """A rich progress bar with loss, tokens/s and ETA; a no-op (falsy) when disabled."""

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

    def __bool__(self) -> bool:
        return self.enabled

    def update(self, step: int, loss: float | None, tps: float) -> None:
        fields = {"tps": f"{tps:,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.bar.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training and eval loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", color="#2563eb")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss", color="#dc2626")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
