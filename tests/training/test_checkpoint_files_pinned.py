"""The checkpoint files and the resume checks: what the mutmut run of training/checkpoints.py and
loop.write_checkpoint / load_training_state left standing after test_checkpoints_pinned.py
(docs/mutation.md). Nothing here trains.
"""

from __future__ import annotations

import json
import pickle
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinysft.config import load_config, parse_overrides
from tinysft.training.checkpoints import (
    STATE,
    TrainError,
    commit_checkpoint,
    config_changes,
    damage,
    plot_losses,
    resume_point,
    rng_state,
    set_rng_state,
    version,
    write_manifest,
)


def make_checkpoint(run: Path, step: int) -> Path:
    ck = run / "checkpoints" / f"step-{step}"
    (ck / "adapter").mkdir(parents=True)
    save_file({"w": torch.ones(2, 3)}, str(ck / "adapter" / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        torch.save({"step": step, "t": torch.ones(3)}, ck / name)
    (ck / STATE).write_text(json.dumps({"step": step, "world_size": 1}))
    return ck


@pytest.fixture
def run_and_cfg(tmp_path: Path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello."}\n')
    cfg = load_config(None, parse_overrides([f"model.name={tmp_path / 'model'}", f"data.train={data}"]))
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    write_manifest(run, cfg, "some/model")
    return run, cfg


# ---- checkpoint files are data, never code ----------------------------------------------------------
class Payload:
    """Any object outside torch's weights-only allow-list: unpickling it means running the class's
    code. A checkpoint of a downloaded run must be read as tensors and numbers only."""

    def __init__(self) -> None:
        self.note = "not a tensor"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_a_checkpoint_file_that_needs_unpickling_is_damage_and_is_never_loaded(tmp_path: Path, name: str) -> None:
    from tinysft.training.loop import load_training_state

    class Accelerator:
        distributed_type, process_index = "NO", 0

    ck = make_checkpoint(tmp_path, 3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    torch.save(sched.state_dict(), ck / "scheduler.pt")
    torch.save(rng_state(), ck / "rng-0.pt")
    load_training_state(Accelerator(), opt, sched, ck)  # the real files load
    torch.save({"step": 3, "payload": Payload()}, ck / name)
    problem = damage(ck)
    assert problem is not None and problem.startswith(f"{ck / name} cannot be read (Weights only load failed"), problem
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_training_state(Accelerator(), opt, sched, ck)


def test_an_unreadable_adapter_is_named_with_the_first_line_of_the_error(tmp_path: Path, monkeypatch) -> None:
    import safetensors

    ck = make_checkpoint(tmp_path, 4)
    adapter = ck / "adapter" / "adapter_model.safetensors"

    def fail(*_a, **_k):
        raise RuntimeError("y" * 300 + "\nsecond line")

    monkeypatch.setattr(safetensors, "safe_open", fail)
    assert damage(ck) == f"{adapter} cannot be read ({'y' * 120})"

    def fail_empty(*_a, **_k):
        raise OSError()

    monkeypatch.setattr(safetensors, "safe_open", fail_empty)
    assert damage(ck) == f"{adapter} cannot be read (OSError)"


# ---- commit ----------------------------------------------------------------------------------------
def test_an_old_checkpoint_already_gone_when_pruned_does_not_fail_the_commit(tmp_path: Path, monkeypatch) -> None:
    """Another process (or the user) removed an old checkpoint between the listing and the pruning."""
    import shutil

    old = make_checkpoint(tmp_path, 1)
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == old and old.exists():
            real(old)  # gone first
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    tmp = tmp_path / "checkpoints" / ".step-2.tmp"
    tmp.mkdir()
    assert commit_checkpoint(tmp, {"step": 2}, keep=1) == tmp_path / "checkpoints" / "step-2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


# ---- the sharded adapter --------------------------------------------------------------------------
def test_sharded_weights_are_saved_as_gathered_not_as_this_ranks_copy(tmp_path: Path) -> None:
    """With FSDP / ZeRO-3 a rank's own parameters are a shard (often empty): the adapter saved must
    be the state dict gathered from every rank."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora
    from tinysft.training.loop import make_accelerator, write_checkpoint

    make_accelerator(load_config(None, parse_overrides(["train.mixed_precision=no"])))
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1)), LoraConfig(r=2, alpha=4, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class Accelerator:
        distributed_type = DistributedType.FSDP
        state = SimpleNamespace(deepspeed_plugin=None)
        is_main_process, process_index = True, 0

        def wait_for_everyone(self) -> None:
            pass

        def unwrap_model(self, m):
            return m

        def get_state_dict(self, m):  # what the other ranks hold: here, this rank's values plus 1
            return {k: v + 1 for k, v in m.state_dict().items()}

    final = write_checkpoint(Accelerator(), model, opt, sched, tmp_path, 2, 1, {"step": 2})
    saved = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k] + 1) for k in ours)


# ---- CUDA generators ---------------------------------------------------------------------------------
def test_cuda_generators_are_saved_and_restored_where_there_are_gpus(monkeypatch) -> None:
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu-0 state", "gpu-1 state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = rng_state()
    assert state["cuda"] == ["gpu-0 state", "gpu-1 state"]
    set_rng_state(state)
    assert restored == [["gpu-0 state", "gpu-1 state"]]
    set_rng_state({**state, "cuda": None})  # saved on a machine without GPUs: the GPUs keep theirs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state)  # saved with GPUs, resumed without
    assert restored == [["gpu-0 state", "gpu-1 state"]]
    assert random.getstate() == state["python"]


# ---- what a resume compares ------------------------------------------------------------------------
def test_changes_are_listed_in_the_configs_own_section_order(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    changed = load_config(None, parse_overrides([f"model.name={cfg.model.name}", f"data.train={cfg.data.train[0]}",
                                                 "data.max_length=77", "lora.r=3"]))
    assert [c.split(" ")[0] for c in config_changes(run, changed)] == ["lora.r", "data.max_length"]


def test_a_manifest_without_data_hashes_compares_no_data(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    (run / "manifest.json").write_text(json.dumps({"tinysft": "0.0.1"}))  # an older manifest
    assert config_changes(run, cfg) == []


def test_the_refusal_names_the_newest_checkpoint(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    for step in (2, 4, 6):
        make_checkpoint(run, step)
    other = load_config(None, parse_overrides([f"model.name={cfg.model.name}", f"data.train={cfg.data.train[0]}",
                                               "train.seed=99"]))
    with pytest.raises(TrainError, match=r"\(last checkpoint step-6\)"):
        resume_point(run, other)


# ---- manifest ---------------------------------------------------------------------------------------
def test_manifest_is_indented_json_with_an_iso_timestamp_and_the_installed_version(run_and_cfg, monkeypatch) -> None:
    import importlib.metadata

    run, cfg = run_and_cfg
    before = time.time()
    write_manifest(run, cfg, "m")
    text = (run / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2)
    created = time.mktime(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S%z"))
    assert abs(created - before) < 120
    try:
        installed = importlib.metadata.version("tinysft")
    except importlib.metadata.PackageNotFoundError:
        installed = "dev"
    assert manifest["tinysft"] == version() == installed

    def missing(_name):
        raise importlib.metadata.PackageNotFoundError("tinysft")

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == "dev"


# ---- loss plot ----------------------------------------------------------------------------------------
def colours(png: Path) -> tuple[bool, bool]:
    """(the train curve's blue, the eval curve's red) appear in the picture."""
    from matplotlib.image import imread

    rgb = torch.from_numpy(imread(png))[..., :3]

    def near(hexcode: str) -> bool:
        want = torch.tensor([int(hexcode[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return bool(((rgb - want).abs().amax(-1) < 0.02).any())

    return near("#2563eb"), near("#dc2626")


def test_the_loss_plot_draws_the_train_and_the_eval_curve(tmp_path: Path) -> None:
    both, train_only, none = tmp_path / "both.png", tmp_path / "train.png", tmp_path / "none.png"
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3, "loss": 1.2},
                 {"step": 4, "eval_loss": 1.4}], both)
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], train_only)
    plot_losses([{"step": 1}], none)
    assert colours(both) == (True, True)
    assert colours(train_only) == (True, False)
    assert colours(none) == (False, False)


def test_the_loss_plot_holds_exactly_the_logged_points_labelled(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    figures: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or real(self, *a, **k))
    path = tmp_path / "loss.png"
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3, "loss": 1.2},
                 {"step": 4, "eval_loss": 1.4}], path)
    (ax,) = figures[0].axes
    lines = [(list(ln.get_xdata()), list(ln.get_ydata()), to_hex(ln.get_color()), ln.get_marker(), ln.get_label())
             for ln in ax.get_lines()]
    assert lines == [([1, 2, 3], [2.0, 1.5, 1.2], "#2563eb", "None", "train loss"),
                     ([2, 4], [1.7, 1.4], "#dc2626", "o", "eval loss")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optimizer step", "loss (nats / trained token)")
    assert imread(path).shape[:2] == (385, 660)  # 6 x 3.5 inches at 110 dpi


def test_load_adapter_weights_puts_the_checkpoints_adapter_into_a_fresh_model(tmp_path: Path) -> None:
    from peft import get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora
    from tinysft.training.checkpoints import load_adapter_weights

    def fresh(scale: float):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        model = add_lora(base, LoraConfig(r=2, alpha=4, dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * scale)
        return model

    saved, other = fresh(1), fresh(2)
    saved.save_pretrained(tmp_path / "adapter")
    want = get_peft_model_state_dict(saved)
    assert not all(torch.equal(v, get_peft_model_state_dict(other)[k]) for k, v in want.items())
    load_adapter_weights(other, tmp_path)
    got = get_peft_model_state_dict(other)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
