"""Invariants of LoRA fine-tuning on a tiny random llama."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinysft.config import load_config, parse_overrides
from tinysft.train import train


def tiny_cfg(model_dir: Path, data: Path, *extra: str):
    return load_config(None, parse_overrides([
        f"model.name={model_dir}", f"data.train={data}", "train.epochs=8", "train.batch_size=4", "lora.target_modules=all-linear",
        "train.learning_rate=2e-2", "train.log_every=1", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "train.mixed_precision=no", *extra]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tokenizer):
    from conftest import CHAT_ROWS, write_jsonl

    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = tiny_cfg(tiny_model_dir, data)
    result = train(cfg, tmp / "run", show_progress=False, log=lambda m: None)
    return tmp / "run", result, cfg


def test_run_directory_contract(tiny_run) -> None:
    run, result, _ = tiny_run
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_sha256"] and "torch" in manifest["libraries"]
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == result.steps


def test_loss_goes_down(tiny_run) -> None:
    _, result, _ = tiny_run
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses


def test_base_weights_unchanged_and_lora_weights_changed(tiny_run, tiny_model_dir) -> None:
    from safetensors.torch import load_file

    run, _, _ = tiny_run
    base_before = load_file(str(tiny_model_dir / "model.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have been trained"
    assert not any("lora" not in k for k in adapter), "only adapter weights are saved"
    # The base folder is never written to, and a freshly loaded run has the same base weights.
    from tinysft.models.load import load_run

    loaded = load_run(run, log=lambda m: None)
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in loaded.model.state_dict().items() if "lora" not in k}
    for k, v in base_before.items():
        # Compared in the dtype the run loads (bf16 where bf16 is fast): rounding the saved fp32
        # weights must give exactly what the run holds.
        assert torch.equal(base_now[k], v.to(base_now[k].dtype)), k


def test_adapter_changes_the_output(tiny_run) -> None:
    from tinysft.evaluate.generate import adapter_state
    from tinysft.models.load import load_run

    loaded = load_run(tiny_run[0], log=lambda m: None)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), adapter_state(loaded.model, False):
        base = loaded.model(input_ids=ids).logits
    with torch.no_grad(), adapter_state(loaded.model, True):
        tuned = loaded.model(input_ids=ids).logits
    assert (base - tuned).abs().max() > 1e-4


def test_peft_loads_the_adapter_in_a_fresh_process(tiny_run, tiny_model_dir) -> None:
    run = tiny_run[0]
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r});"
        f"m = PeftModel.from_pretrained(base, {str(run / 'adapter')!r});"
        "print(sum(p.numel() for n, p in m.named_parameters() if 'lora' in n))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


def test_refuses_to_overwrite_a_finished_run(tiny_run) -> None:
    from tinysft.train import TrainError

    run, _, cfg = tiny_run
    with pytest.raises(TrainError, match="already holds a run"):
        train(cfg, run, show_progress=False, log=lambda m: None)


def test_eval_split_and_eval_loss(tmp_path, tiny_model_dir) -> None:
    from conftest import CHAT_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS * 2)
    cfg = tiny_cfg(tiny_model_dir, data, "data.val_fraction=0.25", "train.epochs=1")
    result = train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert result.eval_loss is not None and result.eval_loss > 0
    assert any("eval_loss" in h for h in result.history)
