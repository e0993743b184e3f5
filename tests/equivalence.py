"""Shared pieces of the equivalence tests (a speed path computes what the plain path computes).

A tiny random Llama, five conversations rendered with the real chat template, and per-token /
per-conversation losses to compare packed, padded and single-row batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinysft.data.batching import IGNORE, Batch
from tinysft.data.render import Rendered, render


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def rendered_rows(tokenizer) -> list[Rendered]:
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
