"""The fused LoRA linear layer computes PEFT's loss and gradients, and is PEFT outside training.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch

from equivalence import rendered_rows, tiny_llama
from tinysft.data.batching import Batch, pack
from tinysft.data.render import Rendered
from tinysft.losses import causal_lm_loss
from tinysft.models.packed_attention import use_packed_attention


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Rendered]:
    return rendered_rows(tokenizer)


def _fused_pair(tokenizer, dropout: float, dtype: torch.dtype):
    """Two identical LoRA models (all 7 linear layers, random B), the second through ``_LoraLinear``."""
    from tinysft.config import LoraConfig
    from tinysft.models.cpu.lora_dropout import use_fast_dropout
    from tinysft.models.cpu.lora_linear import use_fused_lora
    from tinysft.models.load import add_lora, keep_lora_inputs_in_compute_dtype

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = add_lora(tiny_llama(len(tokenizer)).to(dtype), LoraConfig(r=4, alpha=8, dropout=dropout,
                                                                           target_modules=targets))
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(i))
        use_fast_dropout(model)
        keep_lora_inputs_in_compute_dtype(model)
        use_packed_attention(model)
        if fused:
            assert use_fused_lora(model) == 2 * 7 and use_fused_lora(model) == 0  # once per layer
        models.append(model.train())
    return models


def _loss_and_grads(model, batch: Batch, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on both sides
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_equals_peft_in_fp32(rows, tokenizer, dropout) -> None:
    """Same masks, same sum: the fused layer's loss and adapter gradients are PEFT's (fp32)."""
    peft_model, fused_model = _fused_pair(tokenizer, dropout, torch.float32)
    batch = pack(rows, tokenizer.pad_token_id)
    loss, grads = _loss_and_grads(peft_model, batch, autocast=False)
    fused_loss, fused_grads = _loss_and_grads(fused_model, batch, autocast=False)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for k, g in grads.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(fused_grads[k], g, rtol=1e-4, atol=1e-6)


def test_fused_lora_is_as_close_to_fp32_as_peft_in_bf16(rows, tokenizer) -> None:
    """Under bf16 autocast only the rounding differs: against an fp32 reference with the same
    weights and masks, the fused layer's gradients are no further off than PEFT's own."""
    reference, _ = _fused_pair(tokenizer, 0.1, torch.float32)
    peft_model, fused_model = _fused_pair(tokenizer, 0.1, torch.bfloat16)
    for model in (peft_model, fused_model):  # the bf16-rounded base weights in both
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
    batch = pack(rows, tokenizer.pad_token_id)
    ref_loss, ref = _loss_and_grads(reference, batch, autocast=False)

    def error(grads: dict[str, torch.Tensor]) -> float:
        return float(sum((grads[k] - g).norm() ** 2 for k, g in ref.items()) ** 0.5
                     / sum(g.norm() ** 2 for g in ref.values()) ** 0.5)

    _, peft_grads = _loss_and_grads(peft_model, batch, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(fused_model, batch, autocast=True)
    assert abs(float(fused_loss - ref_loss)) < 0.01 * float(ref_loss)
    assert 0 < error(fused_grads) < 1.25 * error(peft_grads)


def test_fused_lora_outside_training_is_peft(rows, tokenizer) -> None:
    """Eval mode and a disabled adapter take PEFT's own forward: bit-identical logits."""
    peft_model, fused_model = _fused_pair(tokenizer, 0.1, torch.float32)
    batch = pack(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        for model in (peft_model, fused_model):
            model.eval()
        logits = [m(input_ids=batch.input_ids, position_ids=batch.position_ids).logits for m in (peft_model, fused_model)]
        assert torch.equal(logits[0], logits[1])
        with fused_model.disable_adapter():
            base = fused_model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        assert not torch.equal(base, logits[1])


def test_fused_lora_leaves_lora_bias_to_peft() -> None:
    """A LoRA B with a bias (PEFT's lora_bias) is not in the fused sum: PEFT's forward runs."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from tinysft.models.cpu.lora_linear import use_fused_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lora_bias on a layer without bias: no merging"
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_bias=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.train()
    x = torch.randn(3, 16)
    expected = model(x)
    assert use_fused_lora(model) == 1
    assert torch.equal(model(x), expected)
