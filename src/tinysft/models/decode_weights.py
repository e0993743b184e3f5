"""The weights ``llama_decode.FastBackend`` decodes with, taken from a loaded model once per side:
the LoRA adapter merged in when it is enabled, q/k/v and gate/up fused, and (bf16 on a CPU) each
weight reordered once for oneDNN (``pack``); ``linear`` multiplies by a plain or packed weight.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def inner_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_layer(module: Any) -> Any:
    """The layer under a PEFT LoRA wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def linear_weight(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of a Linear layer as it computes now: with a PEFT LoRA wrapper whose
    adapter is enabled, the adapter is merged in (in float32)."""
    base = base_layer(module)
    weight, bias = base.weight, base.bias
    if hasattr(module, "lora_A") and not module.disable_adapters and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
            weight = weight.float() + (b @ a) * module.scaling[name]
            if getattr(module.lora_B[name], "bias", None) is not None:
                bias = module.lora_B[name].bias if bias is None else bias + module.lora_B[name].bias
    return weight, bias


def _mkldnn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 64)  # 64: the batch it is tuned for


@functools.lru_cache(maxsize=1)
def packing_works() -> bool:
    """Whether this torch can reorder a bf16 weight for oneDNN and multiply by it with the same
    result as ``F.linear`` (checked once per process on a small probe; these ops are torch-internal,
    so any failure or difference turns packing off instead of breaking decoding)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
        x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
        return bool(torch.equal(linear(x, _mkldnn_pack(w)), F.linear(x, w)))
    except Exception:  # an op missing or refused in this build
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered for oneDNN where that is exact and available: bf16 on a CPU
    (not under ``TINYSFT_PACK=0``); otherwise the weight itself. ``linear`` takes either.

    Why: for bf16, torch hands each ``F.linear`` to oneDNN, which reorders the plain weight into its
    blocked layout on every call; reordered once, the matmuls of a decode step run faster, most at
    small batches (docs/benchmarks.md, "Decoding", has the measurements). Results are identical."""
    if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or os.environ.get("TINYSFT_PACK", "1") == "0" or not packing_works()):
        return weight
    return _mkldnn_pack(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over x [..., in] for a plain weight or one from ``pack``."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv: torch.Tensor  # [(q_heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclass
class Weights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: torch.Tensor  # [vocab, hidden]
    head_bias: torch.Tensor | None
    eps: float
    q_heads: int
    kv_heads: int
    head_dim: int
    rotary: Any  # the model's own rotary embedding module (all RoPE scaling types)


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor | None]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([w.to(dtype) for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, torch.cat([(b if b is not None else w.new_zeros(w.shape[0])).to(dtype) for w, b in parts])


def build_weights(model: Any, dtype: torch.dtype) -> Weights:
    """The weights ``FastBackend`` decodes with, as the model computes now (adapter on or off)."""
    inner = inner_model(model)
    cfg = inner.config
    layers = []
    for layer in inner.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _cat([linear_weight(at.q_proj), linear_weight(at.k_proj), linear_weight(at.v_proj)], dtype)
        o, o_bias = linear_weight(at.o_proj)
        gate_up, _ = _cat([linear_weight(mlp.gate_proj), linear_weight(mlp.up_proj)], dtype)
        down, _ = linear_weight(mlp.down_proj)
        layers.append(LayerWeights(layer.input_layernorm.weight.to(dtype), pack(qkv), qkv_bias, pack(o.to(dtype)),
                                   None if o_bias is None else o_bias.to(dtype),
                                   layer.post_attention_layernorm.weight.to(dtype), pack(gate_up), pack(down.to(dtype))))
    head, head_bias = linear_weight(inner.get_output_embeddings())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Weights(inner.get_input_embeddings().weight.to(dtype), layers, inner.model.norm.weight.to(dtype),
                   pack(head.to(dtype)), None if head_bias is None else head_bias.to(dtype), float(cfg.rms_norm_eps),
                   cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   head_dim, inner.model.rotary_emb)


_CACHE: weakref.WeakKeyDictionary[Any, OrderedDict[Any, Weights]] = weakref.WeakKeyDictionary()


def weights_for(model: Any, dtype: torch.dtype) -> Weights:
    """``build_weights``, kept per model for its two sides (base, tuned): rebuilt only when the
    adapter's on/off state, a parameter's storage or its in-place version changes."""
    flags = tuple(bool(m.disable_adapters) for m in model.modules() if hasattr(m, "lora_A"))
    key = (dtype, flags, tuple((p.data_ptr(), p._version) for p in model.parameters()))
    kept = _CACHE.setdefault(model, OrderedDict())
    if key not in kept:
        kept[key] = build_weights(model, dtype)
        while len(kept) > 2:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]
