"""The LM head on trained positions only, in chunks, gives the full-logit loss and gradients.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from equivalence import per_token_loss, rendered_rows, tiny_llama
from tinysft.data.batching import collate, pack
from tinysft.data.render import Rendered
from tinysft.losses import causal_lm_loss


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Rendered]:
    return rendered_rows(tokenizer)


@pytest.mark.parametrize("head", ["chunked", "logits_to_keep"])
def test_trained_positions_loss_equals_full_logit_loss(rows, tokenizer, head) -> None:
    """Both head paths of causal_lm_loss (chunked for a frozen plain head, logits_to_keep else) give the full-logit loss."""
    from tinysft.models.chunked_head import plain_lm_head

    model = tiny_llama(len(tokenizer))
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
