"""Training speed-ups, all in one place: each one is applied by ``apply_speedups`` and nowhere else.

Every switch here changes how a result is computed, never the result: each has an equivalence
test (losses and gradients against the plain transformers / PEFT path) in tests/models/. What
they save, per CPU kind, is measured in docs/benchmarks.md.

    lora_dropout   LoRA dropout masks from a fast bit generator (nn.Dropout's CPU sampler costs
                   as much as the matmuls it feeds)
    lora_linear    one autograd function per LoRA Linear: fewer passes over the activations
    rms_norm       Llama-style RMSNorm with its closed-form backward, in fp32
    swiglu         the MLP saves gate and up for backward, not SiLU's output too
    (PEFT)         LoRA layers keep their input in the autocast dtype (no fp32 round trip)
    allocator      tcmalloc (process start) and a capped oneDNN primitive cache
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinysft.models.cpu.allocator import cap_onednn_cache

if TYPE_CHECKING:
    import torch

__all__ = ["apply_speedups", "cap_onednn_cache"]


def apply_speedups(model: Any, device: torch.device, mixed_precision: str) -> dict[str, int]:
    """Apply every training speed-up that fits ``model`` on ``device`` under ``mixed_precision``
    ("no", "bf16", "fp16"); returns {name: layers changed} for the ones that changed something.

    Call after LoRA is added and before ``accelerator.prepare``. The fused kernels are CPU-only
    (on a GPU, torch's own kernels are already fused where it matters); the dropout and the
    dtype switch apply everywhere.
    """
    # Imported here, not at the top: the CLI imports this package (allocator) at every start, and
    # these pull in torch, which a command that fails early never needs.
    from tinysft.models.cpu.lora_dropout import use_fast_dropout
    from tinysft.models.cpu.lora_linear import use_fused_lora
    from tinysft.models.cpu.rms_norm import use_fast_rms_norm
    from tinysft.models.cpu.swiglu import use_fused_silu_mul
    from tinysft.models.load import keep_lora_inputs_in_compute_dtype

    applied = {"fast LoRA dropout": use_fast_dropout(model)}
    if mixed_precision in ("bf16", "fp16"):
        applied["LoRA inputs in the compute dtype"] = keep_lora_inputs_in_compute_dtype(model)
    if device.type == "cpu":
        applied["fused LoRA linear"] = use_fused_lora(model)
        applied["fused RMSNorm"] = use_fast_rms_norm(model)
        applied["fused SiLU x up"] = use_fused_silu_mul(model)
    return {name: n for name, n in applied.items() if n}
