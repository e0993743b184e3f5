"""A packed training run follows the unpacked run, and a pass holds twice the tokens in 16 bits.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinysft.data.batching import Batch


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


def test_pass_tokens_double_when_computing_in_16_bits() -> None:
    """A CPU pass holds 1,024 tokens in fp32 and 2,048 in bf16 / fp16; a GPU takes the micro-batch whole."""
    from tinysft.training.sft import PASS_TOKENS_CPU, pass_tokens_for

    cpu = torch.device("cpu")
    assert pass_tokens_for(cpu, "no", torch.float32) == PASS_TOKENS_CPU == 1024
    assert pass_tokens_for(cpu, "bf16", torch.float32) == pass_tokens_for(cpu, "bf16", torch.bfloat16) == 2048
    assert pass_tokens_for(cpu, "no", torch.bfloat16) == pass_tokens_for(cpu, "fp16", torch.float32) == 2048
    assert pass_tokens_for(torch.device("cuda"), "bf16", torch.bfloat16) is None
