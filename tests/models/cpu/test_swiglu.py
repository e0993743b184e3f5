"""The fused SiLU-multiply MLP equals transformers' and saves one activation fewer.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul_equals_transformers(dtype) -> None:
    """The gated MLP with SiLU recomputed in backward: output and input gradient bit for bit
    transformers', with one activation fewer saved for backward."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tinysft.models.cpu.swiglu import use_fused_silu_mul

    config = LlamaConfig(hidden_size=48, intermediate_size=128, num_attention_heads=4, hidden_act="silu")
    mlps = []
    for _ in range(2):
        torch.manual_seed(7)
        mlps.append(LlamaMLP(config).to(dtype).train().requires_grad_(False))  # frozen, as under LoRA
    assert use_fused_silu_mul(mlps[1]) == 1 and use_fused_silu_mul(mlps[1]) == 0
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(2, 30, 48, generator=gen).to(dtype)
    grad = torch.randn(2, 30, 48, generator=gen).to(dtype)
    outs, grads, saved = [], [], []
    for mlp in mlps:
        x = x0.clone().requires_grad_()
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mlp(x)
        y.backward(grad)
        outs.append(y.detach())
        grads.append(x.grad)
        saved.append(sum(s for s in sizes if s == 2 * 30 * 128))  # the (tokens, intermediate) activations
    assert torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])
    assert saved == [3 * 2 * 30 * 128, 2 * 2 * 30 * 128]
    mlps[1].eval()  # outside training: transformers' own forward
    assert mlps[1].forward.__func__ is not type(mlps[1]).forward and torch.equal(mlps[1](x0), mlps[0](x0))
    assert use_fused_silu_mul(LlamaMLP(LlamaConfig(hidden_size=48, intermediate_size=128, num_attention_heads=4, hidden_act="gelu"))) == 0
