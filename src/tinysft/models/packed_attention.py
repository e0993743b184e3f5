"""Attention for packed rows that costs what the conversations alone cost.

A packed row holds several conversations back to back, with position ids that restart at 0 for
each. transformers keeps them apart on its own (with no attention mask it turns restarting
position ids into a block-diagonal mask), but SDPA then scores all T x T pairs of the row: for a
4,096-token row of ~180-token conversations that is ~20x the attention work of the conversations
themselves, and more than the rest of the model. Here each conversation's span goes through SDPA
on its own with ``is_causal=True``: the same numbers, with work proportional to sum(len_i^2).

Everything that is not a packed training row (padding masks, a KV cache, generation) goes to
transformers' own SDPA path unchanged, so a model switched to this implementation behaves exactly
as with ``attn_implementation="sdpa"`` there.

A segment whose position ids start above 0 is a *branch* of the conversation before it (a
rejected answer laid out by ``data.batching.pack``): it attends to that conversation's first
tokens (as many as its first position id) and to itself. transformers' own mask has no notion
of branches, so rows with branches need this implementation (``use_packed_attention``).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "tinysft_packed"


def segment_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per batch row, the start offsets of its conversations plus the row length.

    A new conversation starts wherever the position id does not grow by exactly one (the rule
    transformers uses to detect packing): ``[[0,1,2,0,1]] -> [[0, 3, 5]]``.
    """
    length = position_ids.shape[-1]
    breaks = position_ids[:, 1:] - position_ids[:, :-1] != 1  # (B, T-1): True before a new segment
    return [[0, *(torch.nonzero(row).squeeze(-1) + 1).tolist(), length] for row in breaks]


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, H, T, D), k/v (B, Hkv, T, D) -> out (B, T, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
              and kwargs.get("is_causal") is not False and getattr(module, "is_causal", True))
    bounds = segment_bounds(position_ids.expand(query.shape[0], -1)) if packed else []
    if not packed or all(len(b) == 2 for b in bounds):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    starts = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, cuts in enumerate(bounds):
        # split (not slicing): its backward is one cat, where each slice's backward would write a
        # row-sized zero tensor.
        sizes = [e - s for s, e in pairwise(cuts)]
        first = starts[b, cuts[:-1]].tolist()  # each segment's first position id: 0, or a branch's offset
        qs, ks, vs = (t[b : b + 1].split(sizes, dim=2) for t in (query, key, value))
        parts = []
        root = 0
        for i, (q, k, v) in enumerate(zip(qs, ks, vs, strict=True)):
            is_branch = i > 0 and first[i] > 0
            if not is_branch:
                root = i
            branched = i + 1 < len(first) and first[i + 1] > 0  # rejected branches read this one's keys
            if not is_branch and not branched:
                # torch picks the kernel: on a CPU the flash kernel, which keeps only its output and
                # log-sum-exp for backward. Measured (1 epoch of the benchmark set, bf16 on AMX): 4%
                # faster and 100 MB less peak RSS than forcing the math kernel, which saves fp32
                # copies of q/k/v and of every conversation's (H, L, L) attention weights.
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                            is_causal=True, enable_gqa=gqa))
                continue
            # Conversations with branches, and branches, on the math kernel. Measured in training
            # (15 steps of the demo recipe): the CPU flash kernel's backward took ~3 ms per call on
            # these segments against ~1 ms on others (cause not found), so the pairs made the pass
            # slower than a pass of their own; on the math kernel they cost what their tokens cost.
            mask = None
            if is_branch:
                # A branch (see data.batching.pack): it continues its conversation's first first[i]
                # tokens, so it attends to those and, causally, to itself.
                p = first[i]
                k = torch.cat([ks[root][:, :, :p], k], dim=2)
                v = torch.cat([vs[root][:, :, :p], v], dim=2)
                n = q.shape[2]
                mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
            with sdpa_kernel(SDPBackend.MATH):
                parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                            is_causal=mask is None, enable_gqa=gqa))
        rows.append(torch.cat(parts, dim=2))  # (1, H, T, D)
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0, *,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a row without padding or cache (the attention above splits it); else SDPA's mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` (a transformers model, possibly inside PEFT) to the packed attention.

    Returns False, leaving the model as it is, where the model does not use transformers'
    attention interface (older or remote-code architectures); packed rows stay correct there
    through transformers' block-diagonal mask, only slower.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, _packed_mask)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        inner.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return inner.config._attn_implementation == NAME
