"""Write a causal LM (float weights, adapter already merged) and its tokenizer as one GGUF file.

Written with the ``gguf`` package (llama.cpp's gguf-py), as llama.cpp's own ``convert_hf_to_gguf.py``
would write it, for the architectures in ``GGUF_ARCHS``: those of the embedded and test models
whose Hugging Face layout maps onto llama.cpp's tensor by tensor. Tensor names come from gguf-py's
own map (``gguf.get_tensor_name_map``), not from a table of ours, so they are llama.cpp's names
for each architecture. The tokenizer must be a byte-level BPE (GGUF tokenizer model ``gpt2``)
whose pre-tokenizer llama.cpp knows by name (``gguf_pre_tokenizer``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinysft.export.merge import ExportError

GgufType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values


@dataclass(frozen=True)
class GgufArch:
    """How one transformers ``model_type`` is written.

    ``permute_qk``: llama.cpp applies llama's rope to interleaved pairs, so q/k rows are reordered
    from transformers' rotate-half layout (``permute_qk``); qwen2 uses the NEOX (rotate-half) rope in
    llama.cpp too, so its rows are written as they are. ``biases``: whether the q/k/v projections
    carry biases (qwen2 always does; a llama with ``attention_bias`` is refused).
    """

    name: str  # gguf.MODEL_ARCH_NAMES value: general.architecture and the metadata key prefix
    permute_qk: bool
    biases: bool


GGUF_ARCHS = {
    "llama": GgufArch("llama", permute_qk=True, biases=False),
    "qwen2": GgufArch("qwen2", permute_qk=False, biases=True),
}


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_blocks)


def gguf_tensor_name(hf_name: str, arch: str = "llama", n_blocks: int | None = None) -> str | None:
    """Hugging Face parameter name -> llama.cpp tensor name for ``arch`` (gguf-py's map), or None for
    a tensor llama.cpp has no place for. ``n_blocks`` defaults to enough layers for ``hf_name``."""
    if n_blocks is None:
        parts = hf_name.split(".")
        n_blocks = int(parts[2]) + 1 if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else 1
    return _name_map(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's q/k row order: HF's rotate-half halves -> interleaved pairs (convert_hf_to_gguf.py).

    Rows of one head are [x0..x(d/2-1), y0..y(d/2-1)] in HF and [x0, y0, x1, y1, ...] in llama.cpp;
    transformers' GGUF reader applies the inverse. Works for a bias (1-D) as for a weight.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Split patterns of byte-level BPE pre-tokenizers, by the name llama.cpp gives them (its
# llm_tokenizer_bpe / convert_hf_to_gguf.py get_vocab_base_pre); followed by ByteLevel without regex.
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def gguf_pre_tokenizer(spec: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json's ``pre_tokenizer``), or
    None where it has none we can verify: GPT-2's own ByteLevel regex ("gpt-2"), or one split pattern
    of ``PRE_TOKENIZER_SPLITS`` then ByteLevel."""
    if spec is None:
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        pattern = steps[0].get("pattern", {}).get("Regex")
        return next((name for name, split in PRE_TOKENIZER_SPLITS.items() if split == pattern), None)
    return None


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Vocabulary, token types and merges for a byte-level BPE ("gpt2") GGUF tokenizer."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = gguf_pre_tokenizer(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or pre is None:
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 / SmolLM "
                             f"style); this model's tokenizer is {spec.get('model', {}).get('type')} with pre-tokenizer "
                             f"{(spec.get('pre_tokenizer') or {}).get('type')}. Use `tinysft merge` for a safetensors folder.")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings.")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows with no token (vocab padded for speed): llama.cpp's [PADn]
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None}


def gguf_arch(cfg: Any) -> GgufArch:
    """The ``GGUF_ARCHS`` entry for a transformers config; refuses what llama.cpp would run wrongly."""
    arch = GGUF_ARCHS.get(getattr(cfg, "model_type", None))
    if arch is None:
        raise ExportError(f"GGUF export supports {' and '.join(GGUF_ARCHS)} models; this one is "
                             f"{getattr(cfg, 'model_type', None)!r}. Use `tinysft merge` for a safetensors folder "
                             "that other tools can convert.")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet; use `tinysft merge`.")
    if getattr(cfg, "mlp_bias", False) or (getattr(cfg, "attention_bias", False) and not arch.biases):
        raise ExportError(f"GGUF export does not handle {arch.name} models with bias terms yet; use `tinysft merge`.")
    if getattr(cfg, "use_sliding_window", False):
        raise ExportError(f"GGUF export does not handle sliding-window attention ({arch.name}); llama.cpp would "
                             "attend to the whole context. Use `tinysft merge`.")
    return arch


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: GgufType, name: str = "") -> None:
    """Write a model of a ``GGUF_ARCHS`` architecture (float weights) and its tokenizer to ``path``.

    Metadata as llama.cpp's converter writes it (hyperparameters under the architecture's prefix,
    the tokenizer as ``gpt2`` BPE with its pre-tokenizer's name, the chat template). Weights in
    ``gguf_type``; 1-D tensors (norms, biases) stay float32 as llama.cpp keeps them. With tied
    embeddings no ``output.weight`` is written: llama.cpp then reuses ``token_embd``.
    """
    import gguf
    import numpy as np

    cfg = model.config
    arch = gguf_arch(cfg)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tok = _tokenizer_fields(tokenizer, cfg.vocab_size)

    w = gguf.GGUFWriter(str(path), arch.name)
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(GGUF_FILE_TYPE[gguf_type])
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(int(token_id))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_space_prefix(False)
    if isinstance(tokenizer.chat_template, str):
        w.add_chat_template(tokenizer.chat_template)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = gguf_tensor_name(hf_name, arch.name, cfg.num_hidden_layers)
        if gname is None:
            raise ExportError(f"GGUF export: llama.cpp has no {arch.name} tensor for {hf_name}; use `tinysft merge`.")
        data = tensor.detach().float().cpu().numpy()
        if arch.permute_qk and ".attn_q." in gname:
            data = permute_qk(data, n_head, n_head)
        elif arch.permute_qk and ".attn_k." in gname:
            data = permute_qk(data, n_head, n_kv)
        # q8_0 needs rows of 32k values; other rows fall back to f16.
        t = qtype
        if data.ndim == 1 or (t == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32):
            t = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(data), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
