"""Cross-entropy through the LM head in chunks, without keeping the (positions x vocab) logits.

The plain way (``logits -> F.cross_entropy``) keeps the logits and their log-softmax for backward
and then builds two more tensors of the same size for the gradient: for 1,800 trained positions
and SmolLM2's 49,152-token vocabulary that is ~350 MB each, ~1 GB at the peak of a step. Here
each chunk of positions computes its logits, its loss and, right away, the gradient with respect
to its hidden states ((softmax - onehot) @ W); only that (positions x hidden) gradient is kept.
The FLOPs are the same as autograd's (one matmul forward, one for the input gradient). The head's
weight gets no gradient: with LoRA it is frozen (callers check, see ``plain_lm_head``).
"""

from __future__ import annotations

from typing import Any

import torch

# Positions per chunk: 128 x 49,152 logits = 25 MB fp32 + 13 MB bf16, reused for every chunk. Fewer
# rows run the head's matmuls below the matmul peak; more tie at twice the buffers (the measurement
# is in docs/benchmarks.md).
CHUNK = 128

# Config fields that change logits after the head's matmul (soft-capping, scaling); a model with
# any of them set keeps the ordinary logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def plain_lm_head(model: Any) -> torch.nn.Linear | None:
    """The LM head if logits are exactly ``hidden @ head.weight.T`` and the head is frozen; else None.

    ``model`` may be wrapped by DDP and/or PEFT.
    """
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None  # LoRA / quantized / biased / trained heads: the ordinary path handles them
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden (N, d), weight (V, d), targets (N,) -> summed loss (fp32 scalar).
        # Two (chunk, V) buffers, the matmul's dtype and fp32, are reused by every chunk, and each
        # step works in place: a fresh chunk x vocab tensor per chunk costs far more in page faults
        # and cache misses than the arithmetic on a reused buffer.
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], w.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            low = torch.empty(min(chunk, n), vocab, dtype=dtype, device=h.device)  # matmul in/out
            shared = dtype == torch.float32  # then one buffer serves as both
            buf = low if shared else torch.empty_like(low, dtype=torch.float32)
            for s in range(0, n, chunk):
                c = min(chunk, n - s)
                logits, t = buf[:c], targets[s : s + c]
                torch.mm(h[s : s + c], w.t(), out=low[:c])
                if not shared:
                    logits.copy_(low[:c])
                target_logit = logits.gather(1, t[:, None])  # (c, 1), before the buffer is overwritten
                top = logits.amax(1, keepdim=True)  # (c, 1): exp never overflows
                probs = logits.sub_(top).exp_()  # unnormalised softmax, in place
                z = probs.sum(1, keepdim=True)  # (c, 1)
                row_loss = z.log() + top - target_logit  # (c, 1): logsumexp - target logit
                total += row_loss.sum()
                if grad is not None:
                    probs.div_(z)
                    probs[torch.arange(c, device=t.device), t] -= 1.0  # d loss / d logits
                    if not shared:
                        low[:c].copy_(probs)
                    torch.mm(low[:c], w, out=grad[s : s + c])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk: int = CHUNK) -> torch.Tensor:
    """Sum over rows of cross-entropy(hidden @ weight.T, targets); hidden (N, d), targets (N,)."""
    return _HeadCrossEntropy.apply(hidden, weight, targets, chunk)
