"""LoRA dropout from integer keep-bits: the same distribution and the same products as torch's dropout.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch

from equivalence import tiny_llama


def test_fast_dropout_matches_dropout_in_distribution() -> None:
    from tinysft.models.cpu.lora_dropout import FastDropout, keep_mask

    keep, q = keep_mask((400, 500), 0.9)
    assert keep.dtype == torch.bool and keep.shape == (400, 500)
    assert q == pytest.approx(0.9, abs=1e-5)
    assert float(keep.float().mean()) == pytest.approx(q, abs=0.003)  # 200k draws: sd ~0.0007
    assert abs(float(keep[:, :250].float().mean()) - float(keep[:, 250:].float().mean())) < 0.005  # no pattern by column
    drop = FastDropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    assert float(y.detach().mean()) == pytest.approx(1.0, abs=0.01)  # the expectation is kept
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / q))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / q)  # the gradient goes through the kept elements only
    torch.manual_seed(1)
    assert torch.equal(drop(x) != 0, kept)  # reproducible from the seed
    drop.eval()
    assert drop(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_multiply_equals_the_masked_select(dtype) -> None:
    """The mask applied as a 0/1 multiply gives the values of torch.where(keep, x, 0) / q, both ways."""
    from tinysft.models.cpu.lora_dropout import MaskedScale, keep_mask

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 300, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(37, 300, generator=gen).to(dtype)
    keep, q = keep_mask(x.shape, 0.9, generator=gen)
    y = MaskedScale.apply(x, keep, 1.0 / q)
    assert y.dtype == dtype
    assert torch.equal(y, torch.where(keep, x.detach(), 0.0).mul_(1.0 / q))
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(keep, grad, 0.0).mul_(1.0 / q))


def test_use_fast_dropout_swaps_only_lora_dropout(tokenizer) -> None:
    from tinysft.config import LoraConfig
    from tinysft.models.cpu.lora_dropout import FastDropout, use_fast_dropout
    from tinysft.models.load import add_lora

    model = add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_dropout(model) == 2 * 4  # 2 layers x q/k/v/o
    drops = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(m, FastDropout) and m.p == 0.1 for m in drops)
    assert model.state_dict().keys() == state.keys()  # nothing to save or load changes
    assert use_fast_dropout(add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))) == 0


def test_keep_bits_are_keep_mask_decisions_as_integer_masks() -> None:
    from tinysft.models.cpu.lora_dropout import apply_bits, keep_bits, keep_mask

    keep, q = keep_mask((37, 300), 0.9, generator=torch.Generator().manual_seed(4))
    bits, q_bits = keep_bits((37, 300), 0.9, generator=torch.Generator().manual_seed(4))
    assert q_bits == q and bits.dtype == torch.int16
    assert torch.equal(bits != 0, keep) and set(bits.unique().tolist()) == {-1, 0}
    wide, _ = keep_bits((37, 300), 0.9, generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    assert wide.dtype == torch.int32 and torch.equal(wide, bits.to(torch.int32))  # the same draws, fp32's width
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(37, 300).to(dtype)
        out = apply_bits(x, bits.to(torch.int8))  # any integer type: -1 sign-extends to all bits set
        assert out.dtype == dtype and torch.equal(out, torch.where(keep, x, 0.0))
