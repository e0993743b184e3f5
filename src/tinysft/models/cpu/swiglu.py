"""The gated MLP's ``silu(gate) * up`` for training, saving two activations for backward instead of three.

transformers' Llama-family MLP computes ``down(act(gate(x)) * up(x))``. Autograd keeps the
gate's output (for SiLU's backward), SiLU's output and the up projection's output (for the
product's): three (tokens, intermediate) tensors per layer, the largest activations a decoder
layer saves (SmolLM2-135M: 3 x 1,536 values per token against 576 for the hidden state).
``_SiluMul`` keeps gate and up only and recomputes SiLU in backward, one elementwise pass.
The gradients use the same operations as autograd's, in the same order, so they are bit for bit
transformers' (tested). It applies in training, on a CPU, to MLPs whose activation is SiLU;
everything else takes the module's own forward.

One (tokens, 1,536) bf16 tensor less per layer of SmolLM2-135M: ~92 KB per token over its 30
layers, for one extra elementwise pass (the memory and speed figures are in docs/benchmarks.md).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

# MLPs whose forward is transformers' LlamaMLP, line for line ("Copied from" in each model).
_LLAMA_STYLE = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP"}


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        # Autograd's: the product's backward (grad * other for each side), then SiLU's.
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not self.training or x.device.type != "cpu" or not torch.is_grad_enabled():
        return self._hf_forward(x)
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def use_fused_silu_mul(model: torch.nn.Module) -> int:
    """Route the model's Llama-style SiLU MLPs through ``_SiluMul`` in training; returns how many."""
    n = 0
    for module in model.modules():
        if (type(module).__name__ in _LLAMA_STYLE and not hasattr(module, "_hf_forward")
                and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
                and getattr(getattr(module, "config", None), "hidden_act", None) == "silu"):
            module._hf_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n
