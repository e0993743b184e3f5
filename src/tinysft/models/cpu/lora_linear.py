"""One autograd function for a LoRA linear layer in training: fewer passes over the activations.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate operations, each a
pass over an (N, d) activation, forward and backward: the dropped-out copy of x (saved for
backward), the scaling multiply, the add, the gradient of each, and the sum of the two input
gradients. On a CPU these passes, not the rank-16 matmuls, are most of what LoRA costs
(docs/benchmarks.md, "Speed levers").

Here the same sum is one function:

    h = (x * m) @ A^T                      (N, r)   m: the 0/1 dropout mask, saved as 1 byte per element
    y = x @ W^T + b + h @ (c * B)^T        one matmul accumulating into the base output; c = scaling / keep
    gx = gy @ W + ((gy @ c B) @ A) * m     the LoRA part added in place
    gA = (gy @ c B)^T @ (x * m),  gB = c * gy^T @ h

Dropout's 1 / keep scale and LoRA's scaling are folded into B (r columns) instead of multiplying
(N, d) tensors, and x * m is recomputed in backward from the input (which the layer before keeps
anyway) instead of being saved. The masks are the ones ``FastDropout`` draws, in the same order.
Only the rounding differs from PEFT's sequence of bf16 operations (a test holds the two together).

It applies to plain LoRA on an ``nn.Linear`` base in training; everything else (eval, merged or
disabled adapters, several active adapters, DoRA and other variants, lora_bias, quantized bases, GPUs) goes
to PEFT's own forward, unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from tinysft.models.cpu.lora_dropout import int_dtype_of, keep_bits


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + ((x * m) A^T)(c B)^T; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, keep_prob: float) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, d)
        a = lora_a.to(dtype)  # (r, d)
        if keep_prob < 1.0:
            # -1 kept, 0 dropped, in x's integer type (int16 for bf16, int32 for fp32): masked in its storage.
            bits, q = keep_bits(x2.shape, keep_prob, device=x.device, dtype=int_dtype_of(x2))
            mask = bits.to(torch.int8)  # saved: 1 byte per element (-1 / 0 sign-extend back)
            xd = _masked(x2, bits)
        else:
            mask, q, xd = None, 1.0, x2
        c = scaling / q
        b_scaled = (lora_b * c).to(dtype)  # (d_out, r)
        h = xd @ a.t()  # (N, r)
        y = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
        y.addmm_(h, b_scaled.t())  # y += h (cB)^T, accumulated in the matmul
        ctx.save_for_backward(x2, mask, weight, a, b_scaled, h)
        ctx.c = c
        ctx.x_shape = x.shape
        ctx.weight_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, mask, weight, a, b_scaled, h = ctx.saved_tensors
        gy = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)  # (N, d_out)
        gh = gy @ b_scaled  # (N, r)
        gx = None
        m = None if mask is None else mask.to(int_dtype_of(x2))  # once, for both uses below
        if ctx.needs_input_grad[0]:
            lora_part = gh @ a  # (N, d): the gradient of x * m
            if m is not None:
                lora_part.view(m.dtype).bitwise_and_(m)  # a fresh tensor: masked in place
            gx = lora_part.addmm_(gy, weight.to(x2.dtype)).view(ctx.x_shape)  # + gy @ W, in the matmul
        xd = x2 if m is None else _masked(x2, m)  # m is not needed after this
        a_dtype, b_dtype = ctx.weight_dtype
        grad_a = (gh.t() @ xd).to(a_dtype)  # (r, d)
        grad_b = (gy.t() @ h).to(b_dtype).mul_(ctx.c)  # (d_out, r)
        return gx, None, None, grad_a, grad_b, None, None


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``apply_bits(x, mask)`` written into ``mask``'s storage, which must be x's integer type
    (``int_dtype_of``; both callers draw or widen it so): one allocation less per call, and the
    caller no longer needs ``mask``."""
    return mask.bitwise_and_(x.view(mask.dtype)).view(x.dtype)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` through ``_LoraLinear`` where it applies, else PEFT's own."""
    adapters = self.active_adapters
    base = self.base_layer
    if (args or kwargs or not self.training or self.disable_adapters or self.merged or len(adapters) != 1
            or x.device.type != "cpu" or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or self.lora_A[name].bias is not None or self.lora_B[name].bias is not None):  # lora_bias
        return self._peft_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = float(getattr(drop, "p", 0.0)) if drop.training else 0.0
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))  # what autocast's linear would compute in
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]), 1.0 - p)


def use_fused_lora(model: torch.nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` on an ``nn.Linear`` base through ``_LoraLinear`` in training.

    Returns how many layers; the rest (quantized bases, embeddings, convolutions) are left to PEFT.
    The adapters themselves, and so what is saved, are unchanged.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
