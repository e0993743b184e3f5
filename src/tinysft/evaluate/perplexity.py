"""Held-out loss and perplexity of the base (adapter off) and tuned (adapter on) model.

The same token-weighted loss as training's eval loss (``train.evaluate_loss``): the mean
cross-entropy over the assistant tokens that training would train on, so the figures line up with
the eval curve in metrics.jsonl. Perplexity is exp of that mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from tinysft.data.batching import make_batches
from tinysft.data.formats import Conversation
from tinysft.data.render import render_all
from tinysft.evaluate.generate import adapter_state
from tinysft.evaluate.metrics import perplexity
from tinysft.losses import evaluate_loss


@dataclass
class LossFigures:
    loss: float  # mean cross-entropy per trained token, in nats
    perplexity: float  # exp(loss)
    tokens: int  # trained (answer) tokens scored
    rows: int  # conversations scored

    def to_dict(self) -> dict[str, Any]:
        return {"loss": round(self.loss, 5), "perplexity": round(self.perplexity, 4), "tokens": self.tokens,
                "rows": self.rows}


def heldout_loss(model: Any, tokenizer: Any, conversations: list[Conversation], *, max_length: int = 512,
                 batch_size: int = 8, system_prompt: str | None = None) -> dict[str, LossFigures]:
    """Token-weighted loss and perplexity on held-out conversations: {"base": ..., "tuned": ...}."""
    rendered = render_all(conversations, tokenizer, max_length, system_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = make_batches(rendered, batch_size, pad, shuffle=False)  # padded, not packed: one row per conversation
    device = next(model.parameters()).device
    tokens = sum(r.n_trained for r in rendered)
    out = {}
    for side, enabled in (("base", False), ("tuned", True)):
        with adapter_state(model, enabled):
            loss = evaluate_loss(model, batches, device, contextlib.nullcontext)
        out[side] = LossFigures(loss, perplexity(loss), tokens, len(rendered))
    return out
