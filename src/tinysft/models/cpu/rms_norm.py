"""RMSNorm for training with a hand-written backward: fewer, fp32 passes over the activations.

transformers' Llama-family RMSNorm (fp32 up-cast, mean of squares, rsqrt, multiply, down-cast,
times the weight) leaves autograd a chain of saved tensors and eight gradient operations, half
of them in bf16, which a CPU computes element by element through fp32 and back. Its gradient
has a closed form: with xhat = x * rstd and gh = grad * weight,

    grad_x = rstd * (gh - xhat * mean(gh * xhat))          (per row, in fp32)

The forward is the same expression as transformers' (bit-identical output); only x and the
(N, 1) rstd are saved. It applies in training, on a CPU, with the norm's weight frozen (LoRA);
everything else takes the module's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

# Norms whose forward is transformers' LlamaRMSNorm, line for line ("Copied from" in each model).
_LLAMA_STYLE = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm"}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        # transformers: weight * (xf * rstd).to(x.dtype), computed in fresh tensors where it can
        # be (xf is a copy unless x is fp32; the product is one); a multiply commutes bit for bit.
        normed = (xf.mul_(rstd) if xf is not x else xf * rstd).to(x.dtype)
        return normed.mul_(weight) if weight.dtype == normed.dtype else weight * normed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32, copy=True).mul_(rstd)  # a copy also for fp32 x: the saved input stays
        gh = grad.to(torch.float32, copy=True).mul_(weight.to(torch.float32))
        dot = (gh * xhat).mean(-1, keepdim=True)
        gx = gh.sub_(xhat.mul_(dot)).mul_(rstd)
        return gx.to(x.dtype), None, None


def _forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if not self.training or self.weight.requires_grad or hidden_states.device.type != "cpu":
        return self._hf_forward(hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))


def use_fast_rms_norm(model: torch.nn.Module) -> int:
    """Route the model's Llama-style RMSNorm layers through ``_RMSNorm`` in training; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_STYLE and hasattr(module, "variance_epsilon") and not hasattr(module, "_hf_forward"):
            module._hf_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n
