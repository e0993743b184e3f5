"""tinysft's RMSNorm equals transformers' in output and gradients.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rms_norm_equals_transformers(dtype) -> None:
    """The same output bit for bit; the input gradient as close to fp64 as transformers' own."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tinysft.models.cpu.rms_norm import use_fast_rms_norm

    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(2):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype).train()
        with torch.no_grad():
            norm.weight.copy_(1 + 0.2 * torch.randn(96, generator=torch.Generator().manual_seed(6)))
        norm.weight.requires_grad_(False)  # frozen, as under LoRA
        norms.append(norm)
    assert use_fast_rms_norm(norms[1]) == 1 and use_fast_rms_norm(norms[1]) == 0
    x0 = (3 * torch.randn(2, 50, 96, generator=gen)).to(dtype)
    grad = torch.randn(2, 50, 96, generator=gen).to(dtype)
    outs, grads = [], []
    for norm in norms:
        x = x0.clone().requires_grad_()
        y = norm(x)
        y.backward(grad)
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.equal(outs[1], outs[0])
    xr = x0.double().requires_grad_()
    w = norms[0].weight.double()
    (w * xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad.double())

    def error(g: torch.Tensor) -> float:
        return float((g.double() - xr.grad).norm() / xr.grad.norm())

    if dtype == torch.float32:
        assert error(grads[1]) < 1e-5
    else:
        assert 0 < error(grads[1]) <= error(grads[0])
    norms[1].eval()  # outside training: transformers' own forward
    assert norms[1].forward.__func__ is not type(norms[1]).forward and torch.equal(norms[1](x0), norms[0](x0))
