"""A run folder is data: its config.yaml cannot turn on remote code or pickle, and its adapter is
refused on a base other than the one it was trained on, unless the user's own command line says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CHAT_ROWS, write_jsonl


def invoke(args: list[str]):
    from tinysft.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("trust-run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([f"model.name={tiny_model_dir}", f"data.train={data}", "train.epochs=1",
                                             "lora.r=2", "train.mixed_precision=no"]))
    train(cfg, tmp / "run", show_progress=False, log=lambda _m: None)
    return tmp / "run"


def _copy(run: Path, dest: Path, **model: object) -> Path:
    out = Path(shutil.copytree(run, dest))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["model"].update(model)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _evil_model(tiny: Path, dest: Path, sentinel: Path) -> Path:
    """The tiny model plus Python code that, if ever imported, writes ``sentinel``."""
    shutil.copytree(tiny, dest)
    (dest / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(sentinel)!r}).write_text('code from the run folder ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_run_config_cannot_enable_remote_code(run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = _evil_model(tiny_model_dir, tmp_path / "evil-model", sentinel)
    hostile = _copy(run, tmp_path / "run", name=str(evil), trust_remote_code=True)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    args = ["generate", str(hostile), "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl"),
            "--max-new-tokens", "2", "--allow-other-base"]
    result = invoke(args)
    assert not sentinel.exists(), "a run folder's config.yaml ran code"
    assert result.exit_code == 1, result.output  # the custom architecture cannot load without the code
    assert "model.trust_remote_code=true; ignored" in result.stderr and "--trust-remote-code" in result.stderr
    # The user's own flag does run it: the test above can fail.
    invoke([*args, "--trust-remote-code"])
    assert sentinel.exists()


def test_run_config_cannot_enable_pickle(run: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    hostile = _copy(run, tmp_path / "run", allow_pickle=True)
    adapter = hostile / "adapter"
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    result = invoke(["generate", str(hostile), "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl"),
                     "--max-new-tokens", "2"])
    assert result.exit_code == 1, result.output
    assert "pickle" in result.stderr and "--allow-pickle" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_permissions_come_from_the_command_line_only(run: Path, tmp_path: Path) -> None:
    from tinysft.models.load import RunPermissions, load_run_config, run_permissions

    hostile = _copy(run, tmp_path / "run", trust_remote_code=True, allow_pickle=True)
    notes: list[str] = []
    cfg = load_run_config(hostile, log=notes.append)
    assert not cfg.model.trust_remote_code and not cfg.model.allow_pickle and len(notes) == 2
    with run_permissions(RunPermissions(trust_remote_code=True, allow_pickle=True)):
        cfg = load_run_config(hostile)
    assert cfg.model.trust_remote_code and cfg.model.allow_pickle
    assert not load_run_config(hostile, log=notes.append).model.trust_remote_code, "the grant ends with the block"


def test_manifest_records_the_base_and_a_foreign_base_is_refused(run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tinysft.models.identity import base_fingerprint

    record = json.loads((run / "manifest.json").read_text())["base"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert record["fingerprint"] == base_fingerprint(base)
    assert base_fingerprint(base.to(torch.bfloat16)) == base_fingerprint(base.float(), through="bfloat16")
    # Another base with the same shapes: the same architecture, other weights.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01)
    base.save_pretrained(other)
    moved = _copy(run, tmp_path / "run", name=str(other))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    args = ["generate", str(moved), "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]
    result = invoke(args)
    assert result.exit_code == 1, result.output
    flat = " ".join(result.stderr.split())
    assert str(tiny_model_dir) in flat and str(other) in flat and "--allow-other-base" in flat
    assert not (tmp_path / "a.jsonl").exists()
    result = invoke([*args, "--allow-other-base"])
    assert result.exit_code == 0, result.output
    assert "Loading anyway" in result.stderr
    # A run without the record (trained before it existed) loads with no check.
    manifest = json.loads((moved / "manifest.json").read_text())
    del manifest["base"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "a.jsonl").unlink()
    assert invoke(args).exit_code == 0


def test_a_classification_run_on_another_encoder_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Same shapes, other weights: the encoder's fingerprint in the manifest catches it."""
    import shutil

    import torch
    import yaml
    from transformers import BertModel

    from conftest import EXAMPLES
    from tinysft.config import load_config
    from tinysft.evaluate.classification import load_classifier_run
    from tinysft.models.load import RunPermissions, run_permissions
    from tinysft.models.registry import ModelError
    from tinysft.training import train_classifier

    cfg = load_config(None, {"model": {"name": str(tiny_bert_dir)},
                             "data": {"train": [str(EXAMPLES / "news-topics" / "unit_test.jsonl")]},
                             "train": {"task": "classify", "epochs": 1}})
    run = tmp_path / "run"
    train_classifier(cfg, run, log=lambda m: None, show_progress=False)
    assert json.loads((run / "manifest.json").read_text())["base"]["fingerprint"].startswith("v1:")
    load_classifier_run(run, log=lambda m: None)  # its own base: loads
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    torch.manual_seed(123)
    BertModel(BertModel.from_pretrained(str(tiny_bert_dir)).config).save_pretrained(other)  # same shapes, new weights
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["name"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ModelError, match=r"trained on the base .*tiny-bert.*other-bert.*--allow-other-base"):
        load_classifier_run(run, log=lambda m: None)
    said: list[str] = []
    with run_permissions(RunPermissions(allow_other_base=True)):
        load_classifier_run(run, log=said.append)
    assert any("Loading anyway" in m for m in said)
