"""A cheaper dropout for the LoRA inputs during training.

PEFT applies ``nn.Dropout`` to the input of every adapted layer (4 per decoder layer for
q/k/v/o). On a CPU, ``nn.Dropout`` draws one 32-bit random number per element through a scalar
Bernoulli sampler, which takes about as long as the matmul it feeds (docs/benchmarks.md). This module draws 64 random
bits at a time and cuts them into four 16-bit uniforms, one per element, so the same masks cost
a quarter of the generator calls and no per-element float sampling.

The masks are still independent Bernoulli draws, reproducible with ``torch.manual_seed``: on a
CPU the bits come from NumPy's PCG64 (``random_raw``, faster than torch's mt19937 on the CPUs measured),
seeded by one draw from torch's generator, so torch's seed, its saved RNG state (resume) and
gradient checkpointing's RNG replay fix them; elsewhere from torch's generator directly. The keep
probability is rounded to a multiple of 1/65536 (p=0.1 keeps
58,982/65,536 = 0.899994) and the kept values are scaled by its exact inverse, so the output's
expectation is the input, as with ``nn.Dropout``. Dropout has no weights: saved adapters are
unchanged, and ``tinysft`` outside training (eval mode) does not drop anything.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], keep_prob: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A bool mask, True with probability ~keep_prob, and the exact keep probability it uses."""
    halves, threshold, q = _draw(shape, keep_prob, device, generator)
    return halves < threshold, q


def keep_bits(shape: torch.Size | tuple[int, ...], keep_prob: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.int16) -> tuple[torch.Tensor, float]:
    """``keep_mask``'s decisions (the same draws) as an integer mask: -1 (all bits set) where kept, 0 where dropped.

    ``apply_bits(x, mask)`` is then x with the dropped elements zeroed by integer operations,
    faster on a CPU than a bf16 multiply by a 0 / 1 factor (which converts every element to fp32
    and back); and ``lt`` writing int16 is faster than writing bool. ``dtype``
    (int16 by default) is best x's own integer type (``int_dtype_of``): the mask can then be
    applied in its own storage, with no conversion (int32 for an fp32 x).
    """
    halves, threshold, q = _draw(shape, keep_prob, device, generator)
    mask = torch.empty(halves.shape, dtype=dtype, device=device)
    torch.lt(halves, threshold, out=mask)  # 1 where kept
    return mask.neg_(), q


def _draw(shape: torch.Size | tuple[int, ...], keep_prob: float, device: torch.device | str,
          generator: torch.Generator | None) -> tuple[torch.Tensor, int, float]:
    """Uniform int16 values of ``shape``, the threshold below which an element is kept, and the
    keep probability that threshold gives (a multiple of 1/65536, never 0 or 1)."""
    level = min(max(round(keep_prob * _LEVELS), 1), _LEVELS - 1)
    n = math.prod(shape)
    words = (n + 3) // 4  # 64 random bits cut into four int16 values
    if torch.device(device).type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))  # [0, 2^63)
        bits = torch.from_numpy(np.random.PCG64(seed).random_raw(words))  # uint64
    else:
        bits = torch.empty(words, dtype=torch.int64, device=device)
        bits.random_(-(1 << 63), None, generator=generator)  # the full 64-bit range
    halves = bits.view(torch.int16)[:n].view(shape)  # signed: [-32768, 32767]
    return halves, level - _LEVELS // 2, level / _LEVELS


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The integer dtype of x's element size (the view ``apply_bits`` masks through)."""
    return _INT_OF_SIZE[x.element_size()]


def apply_bits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with the elements where ``mask`` is 0 set to +0.0 (mask from ``keep_bits``, any integer type:
    -1 sign-extends to all bits set)."""
    int_dtype = int_dtype_of(x)
    return (x.view(int_dtype) & mask.to(int_dtype)).view(x.dtype)


def _as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0 / 1 in ``dtype`` (through uint8: a plain, vectorised conversion)."""
    return keep.view(torch.uint8).to(dtype)


class MaskedScale(torch.autograd.Function):
    """out = x * keep / q; saves only the bool mask (1 byte per element) for backward.

    A multiply by the mask as 0 / 1 instead of ``torch.where(keep, x, 0)``: the same values
    (x * 1 is x, x * 0 is 0; only the sign of a zero differs), and on a CPU faster for bf16
    (``where`` on a bool mask is not vectorised there).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * _as_factor(keep, x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return (grad * _as_factor(keep, grad.dtype)).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Dropout):
    """Drop-in for ``nn.Dropout`` (same ``p``, same train/eval behaviour) with cheaper masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":  # GPUs sample fast already (Philox, fused)
            return super().forward(x)
        keep, q = keep_mask(x.shape, 1.0 - self.p, x.device)
        return MaskedScale.apply(x, keep, 1.0 / q)


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every ``nn.Dropout`` inside LoRA layers (``lora_dropout``) for ``FastDropout``; returns how many."""
    swapped = 0
    for name, module in model.named_modules():
        if not name.endswith("lora_dropout") or not isinstance(module, torch.nn.ModuleDict):
            continue
        for key, drop in module.items():
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                module[key] = FastDropout(drop.p)
                swapped += 1
    return swapped
