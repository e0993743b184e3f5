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

A segment whose position ids start at p > 0 is a *branch*: it continues the first p tokens of the
latest segment before it that starts below p, and attends to those and to itself. Two layouts
make branches: a rejected answer after its conversation (``data.batching.pack``), and a
conversation that shares its opening with the one before it (``data.batching.share_prefixes``),
whose first p tokens lie in that conversation, or further back in the one that holds them.
transformers' own mask has no notion of branches, so rows with branches need this
implementation (``use_packed_attention``).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "tinysft_packed"
# On a CPU, training segments with at most this many query tokens (and queries x keys at most its
# square) go through ShortAttention; longer ones through torch's flash kernel, except a segment
# with branches, or a branch, which takes ShortAttention at any length: its other path is
# torch's math kernel, which keeps fp32 attention weights (twice the size) and was 1.3-1.9x
# slower (260-500 tokens, docs/benchmarks.md). 0 turns ShortAttention off (SDPA everywhere).
SHORT_ATTENTION_MAX = 512


@lru_cache(maxsize=64)
def _causal_bias(n: int, prefix: int, group: int, device: str) -> torch.Tensor:
    """(group * n, prefix + n) fp32: 0 where query i may read key j (j <= prefix + i), else -inf.

    The n-row pattern is repeated for the `group` query heads that share one key head (rows are
    (head, position) flattened, as ShortAttention lays them out). Cached: a pass reuses one
    conversation length in every layer.
    """
    hidden = torch.ones(n, prefix + n, dtype=torch.bool, device=device).triu_(prefix + 1)
    return torch.zeros(n, prefix + n, device=device).masked_fill_(hidden, float("-inf")).repeat(group, 1)


class ShortAttention(torch.autograd.Function):
    """Causal attention of one short segment as batched matmuls, its softmax kept for backward.

    q (1, H, n, D); k, v (1, Hkv, prefix + n, D), H a multiple of Hkv (grouped-query attention:
    query heads g*j .. g*j+g-1 read key head j, as ``repeat_interleave`` / ``enable_gqa`` do).
    Query i reads keys 0 .. prefix + i: prefix = 0 is plain causal attention; a branch reads its
    conversation's first `prefix` tokens too (``data.batching.pack``).

    Why: torch's CPU flash kernel spends its backward in many tiny block GEMMs, about ten times its
    forward at these lengths (docs/benchmarks.md). Here the whole segment is 2 batched matmuls forward and 4 backward,
    one per key head group: scores in fp32 (as flash accumulates them), products in the input
    dtype. It keeps the (H, n, prefix + n) probabilities, which is why it is for short segments
    only where flash is the alternative (SHORT_ATTENTION_MAX, set where the two kernels tied on the
    CPUs measured in docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,  # type: ignore[override]
                prefix: int) -> torch.Tensor:
        _, heads, n, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores even under bf16 autocast
            qg = q[0].reshape(kv_heads, group * n, dim)  # rows: (query head in group, position)
            k0, v0 = k[0], v[0]
            scores = torch.baddbmm(_causal_bias(n, prefix, group, str(q.device)), qg.float(),
                                   k0.float().transpose(1, 2), alpha=scale)  # (Hkv, g*n, prefix+n)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.bmm(probs, v0)  # (Hkv, g*n, D)
        ctx.save_for_backward(qg, k0, v0, probs, out)
        ctx.scale = scale
        return out.view(1, heads, n, dim)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        qg, k0, v0, probs, out = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            go = grad_out[0].reshape(qg.shape)
            grad_v = torch.bmm(probs.transpose(1, 2), go)  # sums over the group's query heads
            go32 = go.float()
            grad_p = torch.bmm(go32, v0.float().transpose(1, 2))  # (Hkv, g*n, prefix+n) fp32
            # Softmax backward: dS = P * (dP - rowsum(dO * O)) (rowsum(dO * O) == rowsum(P * dP)).
            delta = (go32.mul_(out) if go32 is not go else go32 * out).sum(-1, keepdim=True)
            grad_s = grad_p.sub_(delta).mul_(probs).mul_(ctx.scale).to(qg.dtype)
            grad_q = torch.bmm(grad_s, k0)
            grad_k = torch.bmm(grad_s.transpose(1, 2), qg)
        return grad_q.view(grad_out.shape), grad_k[None], grad_v[None], None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, dropout: float,
                       prefix: int, flash: bool) -> torch.Tensor:
    """One segment: q (1, H, n, D), k/v (1, Hkv, prefix + n, D) -> (1, H, n, D), causal after `prefix`.

    On a CPU, when a backward follows: ShortAttention for short segments, and for segments with
    branches and branches at any length (SHORT_ATTENTION_MAX). Otherwise torch's SDPA:
    with ``flash`` (a segment without branches) torch picks the kernel, on a CPU the flash kernel,
    which keeps only its output and log-sum-exp for backward (faster and smaller than the math
    kernel, which saves fp32 copies of q/k/v and of the attention weights). Conversations with branches, and branches, that do not take
    ShortAttention (a GPU, attention dropout, no backward) go to the math kernel: the CPU flash
    kernel's backward was several times slower on them than on others (cause not found;
    docs/benchmarks.md), and a branch needs a mask, which flash takes none of.
    """
    n = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    # The length bound applies only where the alternative is flash, which keeps no probabilities.
    short = SHORT_ATTENTION_MAX > 0 and (not flash or n * (prefix + n) <= SHORT_ATTENTION_MAX**2)
    # Only where a backward follows: for a forward alone, flash is faster.
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and backward and dropout == 0.0 and short and q.shape[1] % k.shape[1] == 0:
        # One dtype for the three, the one SDPA would take under autocast: with fp32 base weights and
        # bf16 autocast, rotary's fp32 cos / sin leave q and k in fp32 while v is bf16.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return ShortAttention.apply(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5, prefix)
    if flash:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa)
    mask = None if prefix == 0 else torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              is_causal=mask is None, enable_gqa=gqa)


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
    starts = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, cuts in enumerate(bounds):
        # split (not slicing): its backward is one cat, where each slice's backward would write a
        # row-sized zero tensor.
        sizes = [e - s for s, e in pairwise(cuts)]
        first = starts[b, cuts[:-1]].tolist()  # each segment's first position id: 0, or a branch's offset
        qs, ks, vs = (t[b : b + 1].split(sizes, dim=2) for t in (query, key, value))
        parts = []
        paths: list[tuple[torch.Tensor, torch.Tensor]] = []  # each segment's keys / values from position 0
        for i, (q, k, v) in enumerate(zip(qs, ks, vs, strict=True)):
            prefix = first[i] if i > 0 else 0
            branched = i + 1 < len(first) and first[i + 1] > 0  # a later segment reads this one's keys
            if prefix > 0:
                # A branch: it continues the first `prefix` tokens of the latest segment that starts
                # before it (its conversation, or for a shared opening the conversation that holds
                # it), so it attends to those and, causally, to itself.
                parent = next(j for j in range(i - 1, -1, -1) if first[j] < prefix)
                k = torch.cat([paths[parent][0][:, :, :prefix], k], dim=2)
                v = torch.cat([paths[parent][1][:, :, :prefix], v], dim=2)
            paths.append((k, v))
            parts.append(segment_attention(q, k, v, scaling, dropout, prefix, flash=prefix == 0 and not branched))
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
