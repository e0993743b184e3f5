"""Packed attention: several conversations in one row, each attending only to itself, give every
conversation the loss, gradients and log-probabilities it gets alone; the short-attention path
equals SDPA; generation is untouched.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from equivalence import per_conversation, per_token_loss, rendered_rows, tiny_llama
from tinysft.data.batching import Batch, collate, make_batches, pack
from tinysft.data.render import Rendered
from tinysft.losses import causal_lm_loss, evaluate_loss
from tinysft.models.packed_attention import NAME, segment_bounds, use_packed_attention


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Rendered]:
    return rendered_rows(tokenizer)


def test_segment_bounds() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segment_bounds(pos) == [[0, 3, 5, 9], [0, 9]]


@pytest.mark.parametrize("attention", ["sdpa", "eager", NAME])
def test_packed_loss_equals_unpacked_per_example(rows, tokenizer, attention) -> None:
    """Every conversation in a packed row has exactly the loss it has on its own (no cross-talk)."""
    model = tiny_llama(len(tokenizer))
    if attention == NAME:
        assert use_packed_attention(model) and model.config._attn_implementation == NAME
    else:
        model.set_attn_implementation(attention)
    with torch.no_grad():
        alone = [float(per_token_loss(model, collate([r], tokenizer.pad_token_id)).sum()) for r in rows]
        packed = per_conversation(per_token_loss(model, pack(rows, tokenizer.pad_token_id)),
                                  [len(r.input_ids) for r in rows])
        padded = per_token_loss(model, collate(rows, tokenizer.pad_token_id)).sum(-1).tolist()
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-4)
    assert padded == pytest.approx(alone, rel=1e-5, abs=1e-4)
    # The check can fail: without restarting position ids the rows would attend across conversations.
    b = pack(rows, tokenizer.pad_token_id)
    crossed = Batch(b.input_ids, b.labels, None, torch.arange(b.input_ids.shape[1])[None], b.n_tokens, b.n_trained)
    with torch.no_grad():
        leaky = per_conversation(per_token_loss(model, crossed), [len(r.input_ids) for r in rows])
    assert leaky[1:] != pytest.approx(alone[1:], rel=1e-3)


@pytest.mark.parametrize("short", [True, False], ids=["short-attention", "sdpa"])
def test_packed_gradients_equal_padded_gradients(rows, tokenizer, short, monkeypatch) -> None:
    """Backward through the per-conversation attention gives the padded batch's LoRA gradients,
    on both attention paths (the short segments' matmul kernel and torch's SDPA)."""
    import tinysft.models.packed_attention as packed_attention
    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora

    if not short:
        monkeypatch.setattr(packed_attention, "SHORT_ATTENTION_MAX", 0)

    grads = {}
    for layout in ("padded", "packed"):
        model = add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
        for i, (name, p) in enumerate(model.named_parameters()):  # lora_B starts at 0: make every path carry a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
        if layout == "packed":
            assert use_packed_attention(model)
        batch = (pack if layout == "packed" else collate)(rows, tokenizer.pad_token_id)
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        grads[layout] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads["packed"].keys() == grads["padded"].keys() and grads["packed"]
    for k, g in grads["padded"].items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(grads["packed"][k], g, rtol=1e-4, atol=1e-6)


def test_eval_loss_packed_equals_padded(rows, tokenizer) -> None:
    import contextlib

    model = tiny_llama(len(tokenizer))
    padded = evaluate_loss(model, make_batches(rows, 2, tokenizer.pad_token_id, shuffle=False), torch.device("cpu"),
                           contextlib.nullcontext)
    assert use_packed_attention(model)
    packed = evaluate_loss(model, make_batches(rows, 2, tokenizer.pad_token_id, packing=True, shuffle=False),
                           torch.device("cpu"), contextlib.nullcontext)
    assert packed == pytest.approx(padded, rel=1e-5)


@pytest.mark.parametrize("chunked_head", [True, False])
def test_packed_sequence_logprobs_equal_padded(rows, tokenizer, chunked_head, monkeypatch) -> None:
    """The preference term's per-conversation log-probabilities are the same from one packed row."""
    import tinysft.losses as losses

    model = tiny_llama(len(tokenizer))
    assert use_packed_attention(model)
    if not chunked_head:
        monkeypatch.setattr(losses, "plain_lm_head", lambda _m: None)
    with torch.no_grad():
        padded = losses.sequence_logprobs(model, collate(rows, tokenizer.pad_token_id))
        packed = losses.sequence_logprobs(model, pack(rows, tokenizer.pad_token_id))
        alone = [float(losses.sequence_logprobs(model, collate([r], tokenizer.pad_token_id))[0]) for r in rows]
    assert packed.shape == padded.shape == (len(rows),)
    assert packed.tolist() == pytest.approx(alone, rel=1e-5, abs=1e-4)
    assert padded.tolist() == pytest.approx(alone, rel=1e-5, abs=1e-4)
    assert len(set(round(x, 3) for x in alone)) > 1  # distinct conversations, so a mix-up would show


def test_generation_unchanged_by_packed_attention(tokenizer) -> None:
    """The switch is for training; batched (left-padded) generation with a KV cache stays the same."""
    model = tiny_llama(len(tokenizer))
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    before = model.generate(ids, **kw)
    assert use_packed_attention(model)
    after = model.generate(ids, **kw)
    assert torch.equal(before, after)


def _attention_reference(q, k, v, prefix):
    """float64 SDPA with k/v repeated per query head; query i reads keys 0 .. prefix + i."""
    n, lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = torch.ones(n, lk, dtype=torch.bool).tril(prefix)
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1),
                                          v.double().repeat_interleave(group, 1), attn_mask=mask)


@pytest.mark.parametrize("prefix", [0, 5])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_short_attention_equals_sdpa(prefix, heads) -> None:
    """The short-segment kernel: output and q/k/v gradients of causal (and branch) attention, with
    grouped and plain heads, as float64 SDPA gives them; strided q/k/v as the model passes them."""
    from tinysft.models.packed_attention import ShortAttention

    gen = torch.Generator().manual_seed(0)
    h, hkv = heads
    n, d = 11, 8
    # (1, T, H, D) transposed to (1, H, T, D): the layout the attention layers hand over.
    q = torch.randn(1, n, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(1, prefix + n, hkv, d, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(1, prefix + n, hkv, d, generator=gen).transpose(1, 2).requires_grad_()
    grad = torch.randn(1, h, n, d, generator=gen)
    out = ShortAttention.apply(q, k, v, d**-0.5, prefix)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = _attention_reference(q, k, v, prefix)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)
    # The check can fail: off by one in the mask (query i reading key prefix + i + 1) shows.
    leaky = _attention_reference(q, k, v, prefix + 1)
    assert not torch.allclose(out, leaky.float(), atol=1e-3)


def test_short_attention_only_where_a_backward_follows(monkeypatch) -> None:
    """Training passes take the short-segment kernel; forward-only passes (eval loss, scoring) and
    long segments without branches take torch's SDPA (flash is faster without a backward), and
    segments with branches take it at any length; all give the same output."""
    import tinysft.models.packed_attention as packed_attention

    calls = []
    real = packed_attention.ShortAttention.apply
    monkeypatch.setattr(packed_attention.ShortAttention, "apply", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        forward_only = packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=True)
    assert calls == []
    trained = packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=True)
    assert calls == [1]
    torch.testing.assert_close(trained.detach(), forward_only, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(packed_attention, "SHORT_ATTENTION_MAX", 8)  # 9 tokens: too long
    packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=True)
    assert calls == [1]
    # A segment with branches (no flash) takes it at any length: its other path is the math kernel.
    branched = packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=False)
    assert calls == [1, 1]
    torch.testing.assert_close(branched.detach(), forward_only, rtol=1e-5, atol=1e-6)
    qb = q[:, :, 4:].detach().requires_grad_()  # a 5-token branch reading 4 tokens before it
    packed_attention.segment_attention(qb, k, v, None, 0.0, 4, flash=False)
    assert calls == [1, 1, 1]
    monkeypatch.setattr(packed_attention, "SHORT_ATTENTION_MAX", 0)  # off: torch's SDPA everywhere
    packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=False)
    assert calls == [1, 1, 1]


def test_short_attention_takes_mixed_dtypes_under_autocast() -> None:
    """fp32 base weights under bf16 autocast (`train.mixed_precision=bf16` where `dtype: auto` picked
    fp32): rotary leaves q and k in fp32 and v in bf16. The kernel computes in autocast's dtype, as
    torch's SDPA does there, and hands back gradients in each input's own dtype."""
    import tinysft.models.packed_attention as packed_attention

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, generator=gen).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_attention.segment_attention(q, k, v, None, 0.0, 0, flash=False)
        with torch.no_grad():
            want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.detach(), want, rtol=2e-2, atol=2e-2)
    gq, gk, gv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert (gq.dtype, gk.dtype, gv.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in (gq, gk, gv))


def test_short_attention_bf16_as_close_as_flash() -> None:
    """In bf16 (training's dtype on AMX) the kernel is as close to float64 as torch's flash kernel."""
    from tinysft.models.packed_attention import ShortAttention

    gen = torch.Generator().manual_seed(1)
    n, d = 96, 64
    q, k, v = (torch.randn(1, n, h, d, generator=gen).transpose(1, 2).bfloat16().requires_grad_() for h in (9, 3, 3))
    grad = torch.randn(1, 9, n, d, generator=gen).bfloat16()
    ref = _attention_reference(q, k, v, 0)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())

    def errors(out: torch.Tensor) -> list[float]:
        got = torch.autograd.grad(out, (q, k, v), grad)
        return [float((out.detach().double() - ref.detach()).abs().max())] + [
            float((g.double() - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True)]

    ours = errors(ShortAttention.apply(q, k, v, d**-0.5, 0))
    flash = errors(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    for o, f in zip(ours, flash, strict=True):
        assert o <= 2 * f + 1e-3, (ours, flash)
