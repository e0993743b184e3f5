"""Decoding engines behind ``tinysft.generation.decode``: a fast one for llama-shaped models and a
fixed-wave one over any transformers model.

``FastBackend`` runs its own forward pass over weights taken from the loaded model once per side
(``models.decode_weights``):

- the LoRA adapter merged in (W + scaling * B @ A) when it is enabled, so the tuned pass costs
  what the base pass costs; base and tuned weights are both kept, keyed by the adapter's on/off
  state and the parameters' versions, so switching sides needs no reload, and weights changed in
  place are noticed;
- q/k/v and gate/up fused into one matmul each; in bf16 on a CPU, every weight is reordered once
  into oneDNN's blocked layout (``pack``), so a step's matmuls skip the per-call reorder;
- a KV cache with one slot per batch row, [slots, kv_heads, tokens, head_dim] per layer: each row
  keeps its own length, so a finished row's slot is refilled by prefilling the next prompt (no
  padding between rows), and the active slots stay a prefix (the last one moves into a hole).
  A step attends over the active slots' whole cache, a contiguous block grown as rows need more
  positions (``_fit``); positions past each row's length are masked. The cache holds at most
  ``KV_CACHE_BYTES`` (fewer slots if need be);
- prompts admitted together are prefilled in chunks of similar length (``prefill_chunks``), after
  the shared prefix's keys and values are copied in.

Both engines answer ``admit(items) -> logits``, ``step(rows, tokens) -> logits`` (float32
[rows, vocab], in the order given), ``release(row)`` and ``free_slots()``; the scheduler in
``generation.decode`` owns sampling and stopping.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.models.decode_weights import base_layer, inner_model, linear, weights_for
from tinysft.models.load import fast_bf16_available

LLAMA_SHAPED = ("llama", "mistral", "qwen2")
"""Architectures whose layers are pre-norm RMSNorm + rotary GQA attention + SwiGLU MLP."""


def supported(model: Any) -> bool:
    """Whether ``FastBackend`` can decode this model: a transformers llama-shaped class (not a
    subclass) in plain Linear layers (optionally with plain LoRA), no sliding window, no quantization."""
    inner = inner_model(model)
    if not type(inner).__module__.startswith("transformers."):
        return False  # a subclass may change forward(), which this engine does not call
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LLAMA_SHAPED:
        return False
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < getattr(cfg, "max_position_embeddings", 0):
        return False
    if not isinstance(inner.get_input_embeddings(), torch.nn.Embedding):
        return False
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not layers or not hasattr(inner.model, "rotary_emb"):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        for parent, n in names:
            mod = getattr(parent, n, None)
            if mod is None or not isinstance(base_layer(mod), torch.nn.Linear) or type(base_layer(mod)) is not torch.nn.Linear:
                return False
            if any(getattr(mod, "use_dora", {}).values()):
                return False
        if hasattr(attn, "q_norm") or hasattr(layer, "pre_feedforward_layernorm"):
            return False
    return True


# ---- the forward pass ------------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: statistics in float32, scaled in the weights' dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding; q, k [B, heads, T, D], cos / sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def causal_bias(q_pos: torch.Tensor, width: int) -> torch.Tensor:
    """Additive float32 mask [B, T, W] for queries at positions q_pos [B, T] over keys at positions
    0..width-1: 0 where the key is at or before the query, -inf after it."""
    hidden = torch.arange(width, device=q_pos.device)[None, None, :] > q_pos[:, :, None]
    return torch.zeros(hidden.shape, device=q_pos.device).masked_fill_(hidden, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of queries q [B, q_heads, T, D] over keys and values k, v [B, kv_heads, W, D]
    (contiguous), masked by ``bias`` [B, T, W] (``causal_bias``). Grouped-query heads share their kv
    head (head h reads kv head h // group, as transformers' repeat_kv); scores and softmax in
    float32. Returns [B, q_heads, T, D].

    Written out rather than ``scaled_dot_product_attention`` with a mask: for one new token per row
    over a ragged cache, torch's CPU kernel for masked attention was several times slower than these
    two batched matmuls in bf16 (measured in docs/benchmarks.md, "Decoding").
    """
    b, hq, t, d = q.shape
    hkv, width = k.shape[1], k.shape[2]
    group = hq // hkv
    scores = torch.bmm(q.reshape(b * hkv, group * t, d), k.view(b * hkv, width, d).transpose(1, 2))
    scores = scores.view(b, hkv, group, t, width).float().mul_(d ** -0.5).add_(bias[:, None, None])
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(b * hkv, group * t, width)
    return torch.bmm(probs, v.view(b * hkv, width, d)).view(b, hq, t, d)


def prefill_chunks(lengths: list[int], tokens: int = 8192, waste: float = 1.25) -> list[int]:
    """Sizes of consecutive chunks of prompts (``lengths`` sorted longest first) to prefill
    together: a chunk takes the next prompt while its longest is at most ``waste`` times that
    prompt's length (little padding) and its padded size stays within ``tokens`` (bounded memory
    for the scores)."""
    sizes: list[int] = []
    longest = 0
    for n in lengths:
        if sizes and longest <= waste * n and longest * (sizes[-1] + 1) <= tokens:
            sizes[-1] += 1
        else:
            sizes.append(1)
            longest = n
    return sizes


def decode_dtype(model: Any) -> torch.dtype:
    """The dtype ``FastBackend`` decodes in unless told: the model's own dtype on a GPU; on a CPU,
    bfloat16 when the model is stored in it and this CPU has fast bf16 matmuls
    (``models.load.fast_bf16_available``: what ``model.dtype: auto`` loads in), else float32.

    bf16 halves the bytes of weights and KV cache read per step and runs the matmuls at the CPU's
    bf16 rate (docs/benchmarks.md, "Decoding", has the measurements). The price: bf16
    matmuls round differently for different batch shapes, so a greedy answer can flip at a near-tie
    depending on the batch it was decoded in (chat and eval may then differ after some tokens).
    fp32 keeps every answer independent of its batch: load the model in float32 (``model.dtype``)
    or set ``TINYSFT_FAST_BF16=0``. An fp16 model, or bf16 on a CPU without fast bf16, decodes in
    fp32 (upcast exactly).
    """
    weight = inner_model(model).get_input_embeddings().weight
    if weight.device.type != "cpu":
        return weight.dtype
    return torch.bfloat16 if weight.dtype == torch.bfloat16 and fast_bf16_available("cpu") else torch.float32


CACHE_GROWTH = 32
"""Positions the KV cache grows by when a row needs more (it starts at this size)."""

KV_CACHE_BYTES = 2 * 1024**3
"""The most memory ``FastBackend``'s KV cache takes: fewer slots than asked for when each must hold
a long context (SmolLM2-135M in bf16: ~5 MB a slot for 217 tokens, so ~400 slots)."""


class FastBackend:
    """Continuous batching over ``slots`` rows with a per-row KV cache (see the module docstring).

    ``prefix``: token ids that every prompt admitted starts with (for chat prompts, the template's
    system turn). Its keys and values are computed once and copied into each slot, so a prompt's
    prefill runs only over its own tokens.
    """

    def __init__(self, model: Any, slots: int, max_tokens: int, dtype: torch.dtype | None = None,
                 prefix: list[int] | None = None) -> None:
        device = next(model.parameters()).device
        self.dtype = dtype or decode_dtype(model)
        self.w = weights_for(model, self.dtype)
        w = self.w
        per_slot = 2 * len(w.layers) * w.kv_heads * max_tokens * w.head_dim * torch.finfo(self.dtype).bits // 8
        self.slots, self.device = max(1, min(slots, KV_CACHE_BYTES // per_slot)), device
        slots = self.slots
        self.max_tokens = max_tokens
        shape = (slots, w.kv_heads, min(max_tokens, CACHE_GROWTH), w.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in w.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in w.layers]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens cached per slot
        self.slot_of: dict[int, int] = {}
        self.row_at: list[int] = []  # row in each active slot; the active slots are 0..len-1
        self.prefix: list[int] = []
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prefix:
            self._cache_prefix(list(prefix))

    def free_slots(self) -> int:
        return self.slots - len(self.row_at)

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, write: Any, attend_to: Any) -> torch.Tensor:
        """Run every layer on x [B, T, hidden] at positions pos [B, T]; ``write(l, k, v)`` stores the
        new keys / values, ``attend_to(l, q)`` returns attention outputs [B, q_heads, T, D]."""
        w = self.w
        b, t, _ = x.shape
        cos, sin = w.rotary(x, pos)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        splits = [w.q_heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim]
        for i, lw in enumerate(w.layers):
            q, k, v = linear(_rms(x, lw.ln1, w.eps), lw.qkv, lw.qkv_bias).split(splits, dim=-1)
            q = q.view(b, t, w.q_heads, w.head_dim).transpose(1, 2)
            k = k.view(b, t, w.kv_heads, w.head_dim).transpose(1, 2)
            q, k = _rope(q, k, cos, sin)
            write(i, k, v.view(b, t, w.kv_heads, w.head_dim).transpose(1, 2))
            a = attend_to(i, q).transpose(1, 2).reshape(b, t, w.q_heads * w.head_dim)
            x = x + linear(a, lw.o, lw.o_bias)
            gate, up = linear(_rms(x, lw.ln2, w.eps), lw.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, lw.down)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(_rms(x, self.w.norm, self.w.eps), self.w.head, self.w.head_bias).float()

    def _cache_prefix(self, prefix: list[int]) -> None:
        """Keys and values of ``prefix`` [1, kv_heads, P, D] per layer, for ``admit`` to copy."""
        n = len(prefix)
        pos = torch.arange(n, device=self.device)[None]
        bias = causal_bias(pos, n)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            kv.append((k.contiguous(), v.contiguous()))

        def attend_to(i: int, q: torch.Tensor) -> torch.Tensor:
            return attend(q, *kv[i], bias)

        self._layers(self.w.embed[torch.tensor([prefix], device=self.device)], pos, write, attend_to)
        self.prefix, self.prefix_kv = prefix, kv

    def admit(self, items: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Prefill the prompts into free slots; logits [len(items), vocab] of each prompt's last
        position, in the order given.

        A prompt that starts with the shared prefix gets the prefix's keys and values copied into its
        slot and is prefilled from there on. Prompts are prefilled in chunks of similar length
        (``prefill_chunks``), each right-padded to its longest; padding positions are neither stored
        nor read (only a row's own positions are written to its slot, and each query sees keys up to
        its own position).
        """
        first, p = len(self.row_at), len(self.prefix)
        self._fit(max((len(prompt) for _, prompt in items), default=0))
        starts = [p if p and len(prompt) > p and prompt[:p] == self.prefix else 0 for _, prompt in items]
        order = sorted(range(len(items)), key=lambda j: starts[j] - len(items[j][1]))  # longest own part first
        for j in order:  # slots in that order, so that a chunk's slots are one range
            self.slot_of[items[j][0]] = len(self.row_at)
            self.row_at.append(items[j][0])
        with_prefix = [first + n for n, j in enumerate(order) if starts[j]]
        if with_prefix:
            idx = torch.tensor(with_prefix, device=self.device)
            for i, (k, v) in enumerate(self.prefix_kv):
                self.k[i][idx, :, :p] = k
                self.v[i][idx, :, :p] = v
        outs, done = [], 0
        for size in prefill_chunks([len(items[j][1]) - starts[j] for j in order]):
            chunk = order[done : done + size]
            outs.append(self._prefill(first + done, [items[j][1][starts[j]:] for j in chunk], [starts[j] for j in chunk]))
            done += size
        logits = torch.cat(outs) if outs else torch.empty(0)
        logits[torch.tensor(order, dtype=torch.long)] = logits.clone()  # back to the order given
        return logits

    def _prefill(self, first: int, parts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prefill slots first.. with the prompt parts that start at positions ``starts``."""
        b, t = len(parts), max(map(len, parts))
        ids = torch.zeros((b, t), dtype=torch.long)
        for j, part in enumerate(parts):
            ids[j, : len(part)] = torch.tensor(part)
        start_t = torch.tensor(starts, device=self.device)
        pos = start_t[:, None] + torch.arange(t, device=self.device)[None]  # [b, t]
        length_t = torch.tensor([len(part) for part in parts], device=self.device)
        real = torch.arange(t, device=self.device)[None] < length_t[:, None]
        row_idx, col_idx = real.nonzero(as_tuple=True)  # a row's own tokens, not its padding
        slot_idx, pos_idx = row_idx + first, pos[row_idx, col_idx]
        ends = start_t + length_t  # within the cache: admit fitted it to the longest prompt
        bias = causal_bias(pos, self.k[0].shape[2])
        rows = slice(first, first + b)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[i][slot_idx, :, pos_idx] = k.transpose(1, 2)[row_idx, col_idx]
            self.v[i][slot_idx, :, pos_idx] = v.transpose(1, 2)[row_idx, col_idx]

        def attend_to(i: int, q: torch.Tensor) -> torch.Tensor:
            return attend(q, self.k[i][rows], self.v[i][rows], bias)

        x = self._layers(self.w.embed[ids.to(self.device)], pos, write, attend_to)
        self.lengths[rows] = ends
        return self._logits(x[torch.arange(b, device=self.device), length_t - 1])

    def _fit(self, width: int) -> None:
        """Grow the cache (to a multiple of CACHE_GROWTH positions, at most ``max_tokens``) to hold
        ``width`` positions. Attention reads the active rows' whole block (a contiguous view: a
        slice of it by length would be strided, and torch's CPU batched matmul copies strided
        operands), so a block sized to what the rows hold keeps it from reading positions no row
        has reached yet; growing copies the cache once per CACHE_GROWTH positions."""
        size = self.k[0].shape[2]
        if width > size:
            grown = min(self.max_tokens, -(-width // CACHE_GROWTH) * CACHE_GROWTH)
            for caches in (self.k, self.v):
                for i, cache in enumerate(caches):
                    caches[i] = torch.zeros((*cache.shape[:2], grown, cache.shape[3]), dtype=cache.dtype,
                                            device=cache.device)
                    caches[i][:, :, :size] = cache

    def step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token to every active row (``rows`` must be all of them); logits
        [len(rows), vocab] in the order of ``rows``."""
        n = len(self.row_at)
        if len(rows) != n:
            raise RuntimeError("FastBackend.step needs a token for every active row")
        slots = torch.tensor([self.slot_of[r] for r in rows], device=self.device)
        fed = torch.empty(n, dtype=torch.long, device=self.device)
        fed[slots] = torch.tensor(tokens, device=self.device)
        pos = self.lengths[:n].clone()  # where each slot's new token goes
        self._fit(int(pos.max()) + 1)
        bias = causal_bias(pos[:, None], self.k[0].shape[2])
        every = torch.arange(n, device=self.device)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[i][every, :, pos] = k[:, :, 0]
            self.v[i][every, :, pos] = v[:, :, 0]

        def attend_to(i: int, q: torch.Tensor) -> torch.Tensor:
            return attend(q, self.k[i][:n], self.v[i][:n], bias)

        x = self._layers(self.w.embed[fed][:, None], pos[:, None], write, attend_to)
        self.lengths[:n] += 1
        return self._logits(x[slots, 0])

    def release(self, row: int) -> None:
        """Free a finished row's slot; the last active slot moves into it, keeping slots a prefix."""
        slot = self.slot_of.pop(row)
        last = len(self.row_at) - 1
        moved = self.row_at.pop()
        if slot != last:
            length = int(self.lengths[last])
            for cache in (*self.k, *self.v):
                cache[slot, :, :length] = cache[last, :, :length]
            self.lengths[slot] = length
            self.row_at[slot] = moved
            self.slot_of[moved] = slot


class WaveBackend:
    """Any transformers causal LM through its own forward: a wave of up to ``slots`` left-padded
    prompts is decoded until all its rows end, then the next wave is admitted."""

    def __init__(self, model: Any, slots: int, pad_id: int) -> None:
        self.model, self.slots, self.pad = model, slots, pad_id
        self.device = next(model.parameters()).device
        self.live: set[int] = set()
        self.index: dict[int, int] = {}

    def free_slots(self) -> int:
        return 0 if self.live else self.slots

    def _forward(self, ids: torch.Tensor, past: Any) -> torch.Tensor:
        # transformers renamed past_key_values to cache (5.2x); pass whichever this version takes
        name = "cache" if "cache" in inspect.signature(inner_model(self.model).forward).parameters else "past_key_values"
        out = self.model(input_ids=ids, attention_mask=self.attn, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1, **{name: past})
        self.past = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].float()

    def admit(self, items: list[tuple[int, list[int]]]) -> torch.Tensor:
        width = max(len(p) for _, p in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        self.attn = torch.zeros((len(items), width), dtype=torch.long)
        for b, (_, prompt) in enumerate(items):  # left padding: the last column is every row's last token
            ids[b, width - len(prompt):] = torch.tensor(prompt)
            self.attn[b, width - len(prompt):] = 1
        self.attn = self.attn.to(self.device)
        self.pos = (self.attn.cumsum(-1) - 1).clamp(min=0)
        self.index = {row: b for b, (row, _) in enumerate(items)}
        self.live = set(self.index)
        return self._forward(ids.to(self.device), None)

    def step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        ids = torch.full((len(self.index), 1), self.pad, dtype=torch.long)
        for row, tok in zip(rows, tokens, strict=True):
            ids[self.index[row], 0] = tok
        self.attn = torch.cat([self.attn, self.attn.new_ones((len(self.index), 1))], dim=1)
        self.pos = self.pos[:, -1:] + 1
        logits = self._forward(ids.to(self.device), self.past)
        return logits[torch.tensor([self.index[r] for r in rows], device=logits.device)]

    def release(self, row: int) -> None:
        self.live.discard(row)
