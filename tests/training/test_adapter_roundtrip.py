"""The saved adapter is the trained one: reloaded from the run directory it gives the logits the
model in memory gave at the end of training.

PEFT only warns about adapter keys it cannot place, so an adapter saved under the wrong names loads
"fine" and silently keeps its initial weights; comparing logits (and every LoRA tensor) catches that.
The in-memory model is the one training saved: a spy on ``PeftModel.save_pretrained`` records it
and then saves as usual (nothing about training or saving is replaced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CHAT_ROWS, write_jsonl

IDS = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, Any]:
    """(run directory, the PEFT model object training saved its final adapter from)."""
    from peft import PeftModel

    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("roundtrip")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    # fp32 throughout so in-memory and reloaded logits can be compared to fp32 rounding; a high
    # learning rate and every linear layer so the adapter moves the logits far from the base.
    cfg = load_config(None, parse_overrides([
        f"model.name={tiny_model_dir}", f"data.train={data}", "train.epochs=1", "train.batch_size=4",
        "train.learning_rate=5e-2", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "lora.target_modules=all-linear",
        "model.dtype=float32", "train.mixed_precision=no", "data.max_length=128"]))
    saved: list[Any] = []
    original = PeftModel.save_pretrained

    def spy(self, *args: Any, **kwargs: Any) -> Any:
        saved.append(self)
        return original(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(PeftModel, "save_pretrained", spy)
    try:
        train(cfg, tmp / "run", show_progress=False, log=lambda m: None)
    finally:
        mp.undo()
    assert saved, "training saved no adapter through PeftModel.save_pretrained"
    return tmp / "run", saved[-1].eval()


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_reloaded_adapter_gives_the_in_memory_logits(trained, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tinysft.models.load import load_run

    run, in_memory = trained
    want = logits(in_memory)
    with in_memory.disable_adapter():
        base = logits(in_memory)
    assert float((want - base).abs().max()) > 0.05, "the adapter barely moves the logits: this test could not tell"
    # Plain PEFT on the plain base (what another tool does), and tinysft's own loader.
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(run / "adapter")).eval()
    ours = load_run(run, log=lambda m: None, dtype="float32").model.eval()
    for reloaded in (plain, ours):
        torch.testing.assert_close(logits(reloaded), want, atol=1e-5, rtol=1e-5)


def test_every_trained_lora_tensor_is_in_the_file_under_a_name_peft_loads(trained, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, in_memory = trained
    trained_lora = {n: p.detach() for n, p in in_memory.named_parameters() if "lora_" in n}
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(run / "adapter"))
    reloaded = {n: p.detach() for n, p in plain.named_parameters() if "lora_" in n}
    assert trained_lora.keys() == reloaded.keys() and len(trained_lora) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    wrong = [n for n, p in trained_lora.items() if not torch.equal(p.float(), reloaded[n].float())]
    assert not wrong, f"{len(wrong)} LoRA tensors differ after reloading, e.g. {wrong[:3]}"
