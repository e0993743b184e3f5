"""Encoders for sequence classification: load with a new head, choose LoRA targets, batch, score.

Any Hugging Face model that ``AutoModelForSequenceClassification`` loads works (BERT, DistilBERT,
RoBERTa, DeBERTa, MiniLM, or a causal LM with a score head); the default is the embedded causal
LM, SmolLM2-135M-Instruct, through its own last-token head, which learned real text from 100 rows
where the embedded all-MiniLM-L6-v2 did not (docs/classification.md). Training is
``training.classify``; prediction and the report are ``evaluate.classification``.

The head fits the encoder. A sentence-transformers folder (``modules.json`` with a
``1_Pooling/config.json`` that asks for mean pooling, as all-MiniLM-L6-v2's does) was trained to be
read through the mean of its token states, so it gets ``MeanPoolClassifier``: ``AutoModel`` + that
mean (L2-normalised when the folder's pipeline normalises) + one Linear layer. Any other folder gets
its own ``AutoModelForSequenceClassification`` head (BERT's pooler + classifier, DistilBERT's
pre_classifier + classifier, a decoder's ``score`` on its last non-pad token), so a checkpoint
that already has a head keeps it. Heads that read pretrained features (the mean-pooling classifier,
a decoder's score) can start from a linear probe (``probe_head``, ``head_features``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from tinysft.models.registry import ModelError

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


def is_decoder(path: str | Path) -> bool:
    """Whether the model at ``path`` (folder or hub id) is a causal LM (its config's architectures
    name a ...ForCausalLM); such a model classifies through its own last-token ``score`` head."""
    from transformers import AutoConfig

    try:
        archs = AutoConfig.from_pretrained(str(path)).architectures or []
    except Exception:  # unreadable config: load_encoder's own error names the problem
        return False
    return any(a.endswith("ForCausalLM") for a in archs)


Pooling = Literal["mean", "model"]


def sentence_pooling(path: str | Path) -> tuple[Pooling, bool]:
    """(pooling, normalise) for a model folder: ("mean", True/False) for a sentence-transformers folder
    whose Pooling module asks for mean pooling (normalise = its pipeline has a Normalize module), else
    ("model", False): the model's own sequence-classification head."""
    folder = Path(path)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        pool_cfg = json.loads((folder / pooling.get("path", "1_Pooling") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return "model", False
    if not pool_cfg.get("pooling_mode_mean_tokens") or pool_cfg.get("pooling_mode_cls_token") \
            or pool_cfg.get("pooling_mode_max_tokens"):
        return "model", False
    normalise = any(str(m.get("type", "")).endswith(".Normalize") for m in modules if isinstance(m, dict))
    return "mean", normalise


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)


class MeanPoolClassifier(torch.nn.Module):
    """A sentence-transformers encoder read as it was trained: mean of the token states over the
    attention mask (B, T, H) -> (B, H), L2-normalised when ``normalise``, then ``classifier``
    (Linear H -> num_labels). Its ``config`` is the encoder's, with the label maps set, so PEFT's
    SEQ_CLS wrapper and ``class_logits`` treat it like any ``...ForSequenceClassification``.

    Plain PEFT reload: ``PeftModel.from_pretrained(MeanPoolClassifier.from_pretrained(base, labels),
    run/adapter)`` (see docs/classification.md).
    """

    def __init__(self, body: torch.nn.Module, num_labels: int, normalise: bool = True) -> None:
        super().__init__()
        self.body = body
        self.config = body.config
        self.normalise = normalise
        self.classifier = torch.nn.Linear(body.config.hidden_size, num_labels)

    @classmethod
    def from_pretrained(cls, path: str | Path, labels: list[str], *, normalise: bool | None = None,
                        **kwargs: Any) -> MeanPoolClassifier:
        """``AutoModel.from_pretrained(path, **kwargs)`` under a new head for ``labels``."""
        from transformers import AutoModel

        body = AutoModel.from_pretrained(str(path), **kwargs)
        if normalise is None:
            normalise = sentence_pooling(path)[1]
        model = cls(body, len(labels), normalise)
        model.config.num_labels = len(labels)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        return model.to(body.dtype)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sentence embedding (B, H), in float32."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1): padding adds nothing
        mean = (states * mask).sum(1).float() / mask.sum(1).float().clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1) if self.normalise else mean

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_ignored: Any) -> ClassifierOutput:
        # PEFT's SEQ_CLS wrapper passes labels / output_* / return_dict: the loss is the caller's.
        assert input_ids is not None, "MeanPoolClassifier needs input_ids"
        pooled = self.pooled(input_ids, attention_mask)
        return ClassifierOutput(self.classifier(pooled.to(self.classifier.weight.dtype)))

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.body, "supports_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        self.body.enable_input_require_grads()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.body.get_input_embeddings()


def load_encoder(cfg: ModelConfig, labels: list[str], device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print) -> tuple[Any, Any, str, list[str]]:
    """Load the encoder with a new ``len(labels)``-way head (see the module docstring for which), frozen.

    Returns (model, tokenizer, resolved path, names of the newly initialised head modules).
    """
    from transformers import AutoModelForSequenceClassification

    if cfg.quantize != "none":
        raise ConfigError("model.quantize is for causal LMs (QLoRA); classification encoders are small enough "
                          "to train in full precision — remove model.quantize.")
    path = resolve_model_path(cfg.name, log=log)
    # Encoders are small: keep fp32 weights unless asked (autocast still computes in bf16 where fast).
    # A decoder is the SFT model's size: "auto" means what it means there (bf16 where the CPU / GPU is
    # fast at it), which halves the weights' memory traffic of every pass.
    if cfg.dtype != "auto":
        dtype = resolve_dtype(cfg.dtype, device)
    else:
        dtype = resolve_dtype("auto", device) if is_decoder(path) else torch.float32
    if emulated_on_cpu(dtype, device):
        log(emulated_warning(dtype, f"model.dtype={cfg.dtype}"))
    pooling, normalise = sentence_pooling(path)
    try:
        if pooling == "mean":
            model = MeanPoolClassifier.from_pretrained(
                path, labels, normalise=normalise, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                use_safetensors=None if cfg.allow_pickle else True, **HUB_KERNELS_OFF)
            info = {"missing_keys": ["classifier.weight", "classifier.bias"]}
        else:
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


@torch.no_grad()
def sentence_embeddings(model: MeanPoolClassifier, tokenizer: Any, texts: list[str], *, max_length: int = 512,
                        batch_size: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The frozen encoder's pooled embeddings (N, H), float32, in the order of ``texts``."""
    was_training = model.training
    model.eval()
    ids, _ = encode(tokenizer, texts, max_length)
    out = torch.zeros((len(ids), model.config.hidden_size))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        b = collate([ids[i] for i in chunk], [0] * len(chunk), tokenizer.pad_token_id).to(device)
        out[chunk] = model.pooled(b.input_ids, b.attention_mask).cpu()
    model.train(was_training)
    return out


def probe_head(model: Any) -> torch.nn.Linear | None:
    """The head layer a linear probe can start, or None.

    A mean-pooling classifier's ``classifier`` reads the sentence embedding; a decoder's ``score``
    (Llama, Qwen2, ... ForSequenceClassification) reads the last non-pad token's final hidden state.
    Both read features the pretrained body already makes, so a logistic regression on them is a
    sensible start. Heads behind untrained layers (DistilBERT's pre_classifier, a never-trained BERT
    pooler) get None: a probe on random features would mean nothing.
    """
    if isinstance(model, MeanPoolClassifier):
        return model.classifier
    score = getattr(model, "score", None)
    score = getattr(score, "original_module", score)  # under PEFT: the layer the trained copy was made from
    return score if isinstance(score, torch.nn.Linear) else None


@torch.no_grad()
def head_features(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 512, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """What ``probe_head(model)`` reads for each text, (N, H) float32, in the order of ``texts``:
    the sentence embedding of a MeanPoolClassifier, or the final hidden state at a decoder's last
    non-pad token (the position its sequence-classification head pools; batches are right-padded)."""
    if isinstance(model, MeanPoolClassifier):
        return sentence_embeddings(model, tokenizer, texts, max_length=max_length, batch_size=batch_size, device=device)
    head = probe_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no head a linear probe can start")
    seen: list[torch.Tensor] = []
    hook = model.score.register_forward_pre_hook(  # under PEFT the wrapper: it runs whichever copy is active
        lambda _module, args: seen.append(args[0]))
    was_training = model.training
    model.eval()
    ids, _ = encode(tokenizer, texts, max_length)
    out = torch.zeros((len(ids), head.in_features))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            b = collate([ids[i] for i in chunk], [0] * len(chunk), tokenizer.pad_token_id).to(device)
            seen.clear()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            states = seen[0]  # (B, T, H): the head runs on every position, the model then picks the last
            last = b.attention_mask.sum(1) - 1
            out[chunk] = states[torch.arange(len(chunk), device=states.device), last].float().cpu()
    finally:
        hook.remove()
        model.train(was_training)
    return out


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, num_labels: int, *,
                     c: float = 1.0, steps: int = 100, fit_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on frozen features (N, H) -> (weight (K, H), bias (K,)).

    The objective is scikit-learn's ``LogisticRegression(C=c)``: summed cross-entropy + ||W||^2 / 2
    (bias unpenalised), minimised with L-BFGS. Used to start the head where a linear probe ends
    (LP-FT, Kumar et al. 2022): the LoRA updates then refine a sensible classifier instead of
    being pulled around by a random head, and the regularised head stays soft enough that its
    gradients still reach the encoder.
    """
    x, y = features.float(), targets.long()
    weight = torch.zeros((num_labels, x.shape[1]), requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=fit_bias)  # a head without bias (a decoder's score) keeps 0
    opt = torch.optim.LBFGS([weight, bias] if fit_bias else [weight], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="sum") * c \
            + 0.5 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


HEAD_INIT_FILE = "head_init.safetensors"
