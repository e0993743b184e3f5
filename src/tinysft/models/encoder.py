"""Encoders for sequence classification: load with a new head, choose LoRA targets, batch, score.

Any Hugging Face model that ``AutoModelForSequenceClassification`` loads works (BERT, DistilBERT,
RoBERTa, DeBERTa, MiniLM, or a causal LM with a score head); the embedded default is
all-MiniLM-L6-v2. Training is ``training.classify``; prediction and the report are
``evaluate.classification``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tinysft.config import ConfigError, LoraConfig, ModelConfig, RunConfig
from tinysft.models.load import (
    HUB_KERNELS_OFF,
    emulated_on_cpu,
    emulated_warning,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from tinysft.models.registry import DEFAULT_CAUSAL, DEFAULT_ENCODER, ModelError

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


def new_head_modules(model: torch.nn.Module, missing_keys: Iterable[str]) -> list[str]:
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
    return model, tokenizer, path, new_head_modules(model, info.get("missing_keys", ()))


def max_length_for(cfg: RunConfig, model: Any) -> int:
    """data.max_length, capped by what the encoder's position embeddings allow."""
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.data.max_length
    return min(cfg.data.max_length, int(limit))


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
