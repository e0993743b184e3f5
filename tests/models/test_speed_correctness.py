"""Each speed optimisation of the training loop computes what the plain version computes.

Packing (several conversations in one row, attention kept per conversation) must give every
conversation the loss and gradients it gets alone; the LM head on trained positions only
(``logits_to_keep``) must give the full-logit loss; a packed training run must follow the
unpacked run's loss curve.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinysft.data.batching import IGNORE, Batch, collate, make_batches, pack
from tinysft.data.render import Rendered, render
from tinysft.losses import causal_lm_loss, evaluate_loss
from tinysft.models.packed_attention import NAME, segment_bounds, use_packed_attention


def _tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Rendered]:
    """Conversations of different lengths and turn counts, rendered with the real chat template."""
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "user", "content": "Name three colours of the rainbow, please."},
         {"role": "assistant", "content": "Red, orange and yellow."}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6."}],
        [{"role": "user", "content": "Write one sentence about the sea " * 3},
         {"role": "assistant", "content": "The sea is wide, deep and never quite still, " * 2}],
        [{"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Sure."}],
    ]
    return [render(c, tokenizer) for c in convs]


def per_token_loss(model, batch: Batch) -> torch.Tensor:
    """(B, T-1) cross-entropy of every position against its next token, 0 where not trained."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits[:, :-1]
    targets = batch.labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")


def per_conversation(losses: torch.Tensor, lengths: list[int]) -> list[float]:
    """Split a packed row's (1, T-1) per-token losses back into per-conversation sums."""
    flat = torch.cat([losses[0], losses.new_zeros(1)])  # position T-1 has no target
    out, start = [], 0
    for n in lengths:
        out.append(float(flat[start : start + n].sum()))
        start += n
    return out


def test_segment_bounds() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segment_bounds(pos) == [[0, 3, 5, 9], [0, 9]]


@pytest.mark.parametrize("attention", ["sdpa", "eager", NAME])
def test_packed_loss_equals_unpacked_per_example(rows, tokenizer, attention) -> None:
    """Every conversation in a packed row has exactly the loss it has on its own (no cross-talk)."""
    model = _tiny_llama(len(tokenizer))
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
        model = add_lora(_tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
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


@pytest.mark.parametrize("head", ["chunked", "logits_to_keep"])
def test_trained_positions_loss_equals_full_logit_loss(rows, tokenizer, head) -> None:
    """Both head paths of causal_lm_loss (chunked for a frozen plain head, logits_to_keep else) give the full-logit loss."""
    from tinysft.models.chunked_head import plain_lm_head

    model = _tiny_llama(len(tokenizer))
    if head == "chunked":
        model.requires_grad_(False)  # as under LoRA: the head is frozen
    assert (plain_lm_head(model) is not None) == (head == "chunked")
    for batch in (collate(rows, tokenizer.pad_token_id), pack(rows, tokenizer.pad_token_id)):
        with torch.no_grad():
            loss, n = causal_lm_loss(model, batch)
            full = per_token_loss(model, batch)
        assert n == batch.n_trained == sum(r.n_trained for r in rows)
        assert float(loss) == pytest.approx(float(full.sum()), rel=1e-5)


def test_chunked_head_loss_and_gradient_equal_cross_entropy() -> None:
    from tinysft.models.chunked_head import head_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (10,), generator=g)
    ours = head_cross_entropy(hidden, weight, targets, chunk=3)  # 4 chunks, the last one short
    (ours * 2).backward()
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (ref * 2).backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(ours_grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_packed_batches_hold_the_same_conversations(tokenizer) -> None:
    rows = [render([{"role": "user", "content": "q" * (i % 7 + 1)}, {"role": "assistant", "content": "a" * (i % 5 + 1)}],
                   tokenizer) for i in range(21)]
    padded = make_batches(rows, 4, tokenizer.pad_token_id, seed=3)
    packed = make_batches(rows, 4, tokenizer.pad_token_id, packing=True, seed=3)
    assert len(packed) == len(padded) == 6
    for a, b in zip(padded, packed, strict=True):
        assert b.input_ids.shape == (1, a.n_tokens) and b.attention_mask is None
        assert a.n_tokens == b.n_tokens and a.n_trained == b.n_trained
        assert sorted(a.input_ids[a.attention_mask.bool()].tolist()) == sorted(b.input_ids[0].tolist())


def test_eval_loss_packed_equals_padded(rows, tokenizer) -> None:
    import contextlib

    model = _tiny_llama(len(tokenizer))
    padded = evaluate_loss(model, make_batches(rows, 2, tokenizer.pad_token_id, shuffle=False), torch.device("cpu"),
                           contextlib.nullcontext)
    assert use_packed_attention(model)
    packed = evaluate_loss(model, make_batches(rows, 2, tokenizer.pad_token_id, packing=True, shuffle=False),
                           torch.device("cpu"), contextlib.nullcontext)
    assert packed == pytest.approx(padded, rel=1e-5)


def test_generation_unchanged_by_packed_attention(tokenizer) -> None:
    """The switch is for training; batched (left-padded) generation with a KV cache stays the same."""
    model = _tiny_llama(len(tokenizer))
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    before = model.generate(ids, **kw)
    assert use_packed_attention(model)
    after = model.generate(ids, **kw)
    assert torch.equal(before, after)


def test_packed_run_follows_unpacked_loss_curve(tmp_path: Path, tiny_model_dir, tokenizer, monkeypatch) -> None:
    """Same batches, same steps: with dropout off, packing and shared openings change only the
    speed (length grouping is set for all, as its default follows packing)."""
    import tinysft.training.sft as sft
    from conftest import CHAT_ROWS, write_jsonl
    from tinysft.config import load_config, parse_overrides
    from tinysft.data.batching import share_prefixes

    computed = []  # (tokens in, tokens out) of each pass that went through share_prefixes

    def spy(batch: Batch) -> Batch:
        out = share_prefixes(batch)
        computed.append((batch.input_ids.shape[1], out.input_ids.shape[1]))
        return out

    monkeypatch.setattr(sft, "share_prefixes", spy)
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    curves, shared = {}, {}
    for name, packing, share in (("unpacked", False, True), ("packed", True, False), ("shared", True, True)):
        computed.clear()
        cfg = load_config(None, parse_overrides([
            f"model.name={tiny_model_dir}", f"data.train={data}", "train.epochs=2",
            "train.batch_size=4", "train.learning_rate=1e-2", "train.log_every=1", "lora.r=4", "lora.alpha=8",
            "lora.dropout=0.0", "train.mixed_precision=no", f"train.packing={str(packing).lower()}",
            "train.group_by_length=true", f"train.share_prefixes={str(share).lower()}"]))
        sft.train(cfg, tmp_path / f"run-{name}", show_progress=False, log=lambda m: None)
        lines = [json.loads(x) for x in (tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [h["loss"] for h in lines if "loss" in h]
        shared[name] = list(computed)
    assert len(curves["packed"]) == len(curves["unpacked"]) == 6
    assert curves["packed"][-1] < curves["packed"][0]  # it trained
    assert curves["packed"] == pytest.approx(curves["unpacked"], rel=1e-3)
    assert curves["shared"] == pytest.approx(curves["unpacked"], rel=1e-3)
    assert shared["unpacked"] == shared["packed"] == []  # only packed passes, and only where asked
    assert len(shared["shared"]) == 6 and all(after < before for before, after in shared["shared"])


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

    model = add_lora(_tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_dropout(model) == 2 * 4  # 2 layers x q/k/v/o
    drops = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(m, FastDropout) and m.p == 0.1 for m in drops)
    assert model.state_dict().keys() == state.keys()  # nothing to save or load changes
    assert use_fast_dropout(add_lora(_tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))) == 0


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_split_batch_pieces_add_up_to_the_batch(rows, tokenizer, layout) -> None:
    """Forward/backward piece by piece (bounded memory) gives the whole batch's loss and gradients."""
    from tinysft.config import LoraConfig
    from tinysft.data.batching import split_batch
    from tinysft.models.load import add_lora

    model = add_lora(_tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
    for i, (name, p) in enumerate(model.named_parameters()):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
    # float64: the sums are the same, only their order differs, and in float32 that order moved a
    # gradient element by 2e-6 (3.5e-4 relative) on an AMD EPYC (Zen 4) where Sapphire Rapids passed.
    model.double()
    use_packed_attention(model)
    batch = (pack if layout == "packed" else collate)(rows, tokenizer.pad_token_id)
    limit = batch.n_tokens // 2  # whole conversations: 2 or 3 pieces, some with several
    pieces = split_batch(batch, limit)
    assert 1 < len(pieces) < len(rows)
    assert all(p.n_tokens <= limit for p in pieces)
    assert sum(p.n_tokens for p in pieces) == batch.n_tokens and sum(p.n_trained for p in pieces) == batch.n_trained
    assert split_batch(batch, None) == [batch] and split_batch(batch, batch.n_tokens) == [batch]

    def grads(parts: list[Batch]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            loss, _ = causal_lm_loss(model, part)
            loss.backward()
            total += float(loss.detach())
        return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    whole_loss, whole = grads([batch])
    split_loss, split = grads(pieces)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for k, g in whole.items():
        torch.testing.assert_close(split[k], g, rtol=1e-4, atol=1e-6)


def test_cap_onednn_cache_keeps_a_user_setting(monkeypatch) -> None:
    from tinysft.models.cpu.allocator import ONEDNN_CACHE, cap_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_onednn_cache()
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    cap_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"


def test_batches_mix_lengths_without_length_grouping(tokenizer) -> None:
    # 16 short and 16 long conversations: grouped by length, a batch holds one kind; ungrouped,
    # batches are runs of the shuffled order, each conversation once.
    rows = [render([{"role": "user", "content": "q" * (1 if i % 2 else 40)}, {"role": "assistant", "content": "a"}],
                   tokenizer) for i in range(32)]
    long_len = max(len(r.input_ids) for r in rows)

    def kinds(batches):  # per batch: the set of kinds (long or not) it holds
        return [{int(n) == long_len for n in b.attention_mask.sum(1)} for b in batches]

    grouped = make_batches(rows, 4, tokenizer.pad_token_id, seed=5)
    assert all(len(k) == 1 for k in kinds(grouped))
    mixed = make_batches(rows, 4, tokenizer.pad_token_id, seed=5, group_by_length=False)
    assert any(len(k) == 2 for k in kinds(mixed))
    order = list(range(32))
    rng = random.Random(5)
    rng.shuffle(order)
    chunks = [order[s : s + 4] for s in range(0, 32, 4)]
    rng.shuffle(chunks)
    for batch, idx in zip(mixed, chunks, strict=True):
        assert batch.attention_mask.sum(1).tolist() == [len(rows[i].input_ids) for i in idx]


@pytest.mark.parametrize("chunked_head", [True, False])
def test_packed_sequence_logprobs_equal_padded(rows, tokenizer, chunked_head, monkeypatch) -> None:
    """The preference term's per-conversation log-probabilities are the same from one packed row."""
    import tinysft.losses as losses

    model = _tiny_llama(len(tokenizer))
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


def _paired_conversations():
    from tinysft.data.formats import Conversation

    chats = [
        ([{"role": "user", "content": "How do I kill a stuck process?"}, {"role": "assistant", "content": "Run kill -9 PID."}],
         "I'm sorry, but I can't help with that."),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}], None),
        ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4."}, {"role": "user", "content": "And how do I pick a lock?"},
          {"role": "assistant", "content": "I can't help with that, but a locksmith can."}],
         ["Sure! Here's how you can do that: take a tension wrench and a pick.", "Great question! Here's how."]),
        ([{"role": "user", "content": "Name three colours of the rainbow, please."},
          {"role": "assistant", "content": "Red, orange and yellow, then green and blue."}], "No."),
    ]
    return [Conversation(m, f"t.jsonl:{i + 1}", extra={} if r is None else {"rejected": r})
            for i, (m, r) in enumerate(chats)]


def _lora_tiny(tokenizer):
    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora

    model = add_lora(_tiny_llama(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
    for i, (name, p) in enumerate(model.named_parameters()):  # lora_B starts at 0: make every path carry a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
    assert use_packed_attention(model)
    return model


@pytest.mark.parametrize("tokens", [0, 3])
@pytest.mark.parametrize("chunked_head", [True, False])
def test_pairs_in_the_sft_pass_equal_a_separate_pair_pass(rows, tokenizer, tokens, chunked_head, monkeypatch) -> None:
    """Pool pairs as ``pair_only`` rows in the SFT pass (each rejected answer a branch of its
    prompt) give the separate pair pass's mean term and LoRA gradients, and leave the SFT loss and
    its token counts as they are."""
    import tinysft.losses as losses
    from tinysft.data.batching import append_rows
    from tinysft.training.preference import pair_row, preference_loss, preference_pairs

    if not chunked_head:
        monkeypatch.setattr(losses, "plain_lm_head", lambda _m: None)
    convs = [c for c in _paired_conversations() if c.extra]
    pairs = preference_pairs(convs, tokenizer, 512, None, tokens)
    assert len(pairs) == 4  # row 3 has two rejected answers
    pair_rows = [pair_row(c, r) for c, r in pairs]
    model = _lora_tiny(tokenizer)
    sft_batch = pack(rows, tokenizer.pad_token_id)
    fused = append_rows(sft_batch, pair_rows)
    assert (fused.n_tokens, fused.n_trained, fused.n_pairs) == (sft_batch.n_tokens, sft_batch.n_trained, 4)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    sft, n, pref_sum = losses.lm_and_pair_loss(model, fused)
    alone, n_alone = losses.causal_lm_loss(model, sft_batch)
    assert n == n_alone and float(sft.detach()) == pytest.approx(float(alone.detach()), rel=1e-5)
    together = grads(sft + pref_sum / len(pairs))
    separate = preference_loss(model, [c for c, _ in pairs], [r for _, r in pairs], tokenizer.pad_token_id,
                               0.1, torch.device("cpu"), packing=True)
    assert float(pref_sum.detach()) / len(pairs) == pytest.approx(float(separate.detach()), rel=1e-5)
    assert float(separate.detach()) != pytest.approx(0.6931, rel=1e-3)  # margins are not all 0
    apart = grads(losses.causal_lm_loss(model, sft_batch)[0] + separate)
    for k, g in apart.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(together[k], g, rtol=1e-4, atol=1e-6)


def test_split_batch_keeps_a_rejected_branch_with_its_conversation(rows, tokenizer) -> None:
    import dataclasses

    from tinysft.data.batching import split_batch
    from tinysft.losses import lm_and_pair_loss
    from tinysft.training.preference import pair_row, preference_pairs

    pairs = preference_pairs([c for c in _paired_conversations() if c.extra], tokenizer, 512, None, 4)
    # Rows carrying rejected branches, trained in SFT too (pair_only=False), so every token count is comparable.
    branched = [dataclasses.replace(pair_row(c, r), pair_only=False) for c, r in pairs]
    mixed = [*rows[:3], *branched, *rows[3:]]
    batch = pack(mixed, tokenizer.pad_token_id)
    pieces = split_batch(batch, max(len(r.input_ids) for r in mixed) + 1)
    assert len(pieces) > 1
    assert sum(p.n_pairs for p in pieces) == batch.n_pairs == 4
    assert sum(p.n_tokens for p in pieces) == batch.n_tokens
    assert sum(p.input_ids.shape[1] for p in pieces) == batch.input_ids.shape[1]
    model = _lora_tiny(tokenizer)
    with torch.no_grad():
        whole = lm_and_pair_loss(model, batch)
        parts = [lm_and_pair_loss(model, p) for p in pieces]
    assert sum(float(p[0]) for p in parts) == pytest.approx(float(whole[0]), rel=1e-5)
    assert sum(float(p[2]) for p in parts) == pytest.approx(float(whole[2]), rel=1e-5)
    for p in pieces:  # every piece starts with a conversation, never with a branch
        assert int(p.position_ids[0, 0]) == 0


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
        model = add_lora(_tiny_llama(len(tokenizer)).to(dtype), LoraConfig(r=4, alpha=8, dropout=dropout,
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


def test_pass_tokens_double_when_computing_in_16_bits() -> None:
    """A CPU pass holds 1,024 tokens in fp32 and 2,048 in bf16 / fp16; a GPU takes the micro-batch whole."""
    from tinysft.training.sft import PASS_TOKENS_CPU, pass_tokens_for

    cpu = torch.device("cpu")
    assert pass_tokens_for(cpu, "no", torch.float32) == PASS_TOKENS_CPU == 1024
    assert pass_tokens_for(cpu, "bf16", torch.float32) == pass_tokens_for(cpu, "bf16", torch.bfloat16) == 2048
    assert pass_tokens_for(cpu, "no", torch.bfloat16) == pass_tokens_for(cpu, "fp16", torch.float32) == 2048
    assert pass_tokens_for(torch.device("cuda"), "bf16", torch.bfloat16) is None


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


def _shared_opening_rows(tokenizer) -> tuple[list[Rendered], list[Rendered]]:
    """SFT rows with shared openings at two depths (the template's system prompt; a whole prompt
    answered twice, which sorts next to a row with a different prompt), one with its own system
    prompt, the paired conversations, and pool pairs (``pair_only``) of them."""
    from tinysft.data.render import render_all
    from tinysft.training.preference import pair_row, preference_pairs

    colours = "Name three colours of the rainbow, please."
    chats = [
        [{"role": "user", "content": colours}, {"role": "assistant", "content": "Red, orange and yellow."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "user", "content": colours}, {"role": "assistant", "content": "Green, blue and violet."}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4."}],
        [{"role": "user", "content": "Name a big cat."}, {"role": "assistant", "content": "A tiger."}],
    ]
    paired_convs = [c for c in _paired_conversations() if c.extra]
    sft = [render(c, tokenizer) for c in chats]
    paired = render_all(paired_convs, tokenizer, 512)
    pool = [pair_row(c, r) for c, r in preference_pairs(paired_convs, tokenizer, 512, None, 4)]
    return [*sft, *paired], pool


@pytest.mark.parametrize("short", [True, False], ids=["short-attention", "sdpa"])
def test_shared_prefixes_keep_losses_and_gradients(tokenizer, short, monkeypatch) -> None:
    """A packed batch whose shared openings are computed once (``share_prefixes``) gives the
    batch's SFT loss, preference term and LoRA gradients, with fewer tokens in the pass."""
    import tinysft.models.packed_attention as packed_attention
    from tinysft.data.batching import append_rows, share_prefixes
    from tinysft.losses import lm_and_pair_loss

    if not short:
        monkeypatch.setattr(packed_attention, "SHORT_ATTENTION_MAX", 0)
    sft_rows, pool = _shared_opening_rows(tokenizer)
    batch = append_rows(pack(sft_rows, tokenizer.pad_token_id), pool)
    shared = share_prefixes(batch)
    system = len(render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenizer).input_ids)
    # Every conversation but the first and the one with its own system prompt drops at least the
    # template's system prompt; the second colours row drops its whole prompt.
    assert batch.input_ids.shape[1] - shared.input_ids.shape[1] > (len(sft_rows) + len(pool) - 2) * (system - 10)
    assert (shared.n_tokens, shared.n_trained, shared.n_pairs) == (batch.n_tokens, batch.n_trained, batch.n_pairs)
    assert int((shared.labels != IGNORE).sum()) == int((batch.labels != IGNORE).sum())
    assert int((shared.rejected_targets != IGNORE).sum()) == int((batch.rejected_targets != IGNORE).sum())
    model = _lora_tiny(tokenizer)

    def run(b: Batch) -> tuple[float, float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        sft, _n, pref = lm_and_pair_loss(model, b)
        (sft + pref).backward()
        return float(sft.detach()), float(pref.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                                           if p.requires_grad}

    sft, pref, grads = run(batch)
    sft_s, pref_s, grads_s = run(shared)
    assert sft_s == pytest.approx(sft, rel=1e-5) and pref_s == pytest.approx(pref, rel=1e-5)
    for k, g in grads.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(grads_s[k], g, rtol=1e-4, atol=1e-6)


def test_shared_prefixes_read_the_conversation_that_holds_them(tokenizer) -> None:
    """Each shared segment reads its opening from the latest conversation that starts before it,
    not from the row's first one: the second colours row's prompt is in the first colours row."""
    from tinysft.data.batching import share_prefixes

    sft_rows, _ = _shared_opening_rows(tokenizer)
    shared = share_prefixes(pack(sft_rows, tokenizer.pad_token_id))
    firsts = [int(shared.position_ids[0, s]) for s in segment_bounds(shared.position_ids)[0][:-1]]
    assert firsts[0] == 0 and len(set(firsts[1:])) > 1 and all(f > 0 for f in firsts[1:3])  # two depths
    model = _tiny_llama(len(tokenizer))
    assert use_packed_attention(model)
    with torch.no_grad():
        alone = [float(per_token_loss(model, collate([r], tokenizer.pad_token_id)).sum()) for r in sft_rows]
        together = float(per_token_loss(model, shared).sum())
    assert together == pytest.approx(sum(alone), rel=1e-5)


def test_shared_prefixes_leave_unpacked_and_single_batches_alone(rows, tokenizer) -> None:
    from tinysft.data.batching import share_prefixes

    padded = collate(rows, tokenizer.pad_token_id)
    assert share_prefixes(padded) is padded
    one = pack(rows[:1], tokenizer.pad_token_id)
    assert share_prefixes(one) is one
