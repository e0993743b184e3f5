"""The checkpoint protocol and the resume checks, function by function (pinned by mutation testing,
docs/mutation.md).

The training tests (test_resume.py, test_checkpoints.py) show that a stopped run continues with
the same losses; these pin what those leave open: which folders count as checkpoints and in which
order, how many are kept, each damage message, each refusal, what a failed run leaves behind, and
the optimizer / scheduler / RNG round trip of ``loop.write_checkpoint`` and ``load_training_state``.
Nothing here trains: checkpoints are built from small files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinysft.config import load_config, parse_overrides
from tinysft.training.checkpoints import (
    STATE,
    MetricsLog,
    TrainError,
    begin_checkpoint,
    checkpoints,
    commit_checkpoint,
    config_changes,
    damage,
    discard_unfinished,
    latest_checkpoint,
    plot_losses,
    read_jsonl,
    resume_point,
    rng_state,
    set_rng_state,
    sha256_files,
    version,
    write_manifest,
)


def make_checkpoint(run: Path, step: int, *, world_size: int | None = 1, optimizer: str = "optimizer.pt") -> Path:
    """A complete, intact checkpoint folder ``run/checkpoints/step-N`` built from small files."""
    ck = run / "checkpoints" / f"step-{step}"
    (ck / "adapter").mkdir(parents=True)
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(ck / "adapter" / "adapter_model.safetensors"))
    for name in (optimizer, "scheduler.pt", "rng-0.pt"):
        torch.save({"step": step, "t": torch.ones(3)}, ck / name)
    state = {"step": step} if world_size is None else {"step": step, "world_size": world_size}
    (ck / STATE).write_text(json.dumps(state))
    return ck


def cfg_for(data: Path, *extra: str):
    return load_config(None, parse_overrides([f"model.name={data.parent / 'model'}", f"data.train={data}", *extra]))


@pytest.fixture
def run_and_cfg(tmp_path: Path):
    """An unfinished run folder (config.yaml, manifest.json with the data's hash) and its config."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello."}\n')
    cfg = cfg_for(data)
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    write_manifest(run, cfg, "some/model")
    return run, cfg


# ---- which folders are checkpoints ---------------------------------------------------------------


def test_checkpoints_are_complete_step_folders_in_numeric_order(tmp_path: Path) -> None:
    assert checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None  # no checkpoints/ folder at all
    for step in (9, 10, 2, 100):
        make_checkpoint(tmp_path, step)
    ck = tmp_path / "checkpoints"
    (ck / "step-7").mkdir()  # no state.json: not complete
    (ck / ".step-11.tmp").mkdir()
    (ck / ".step-11.tmp" / STATE).write_text('{"step": 11}')
    (ck / "step-x").mkdir()
    (ck / "step-x" / STATE).write_text("{}")
    (ck / "step-12").write_text("a file, not a folder")
    (ck / "step-5").mkdir()
    (ck / "step-5" / STATE).mkdir()  # state.json must be a file
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-9", "step-10", "step-100"]
    assert latest_checkpoint(tmp_path) == ck / "step-100"


def test_begin_checkpoint_gives_an_empty_temporary_folder(tmp_path: Path) -> None:
    tmp = begin_checkpoint(tmp_path / "run", 6)  # the run and checkpoints/ folders do not exist yet
    assert tmp == tmp_path / "run" / "checkpoints" / ".step-6.tmp" and tmp.is_dir()
    (tmp / "optimizer.pt").write_text("left by a killed write")
    (tmp / "adapter").mkdir()
    again = begin_checkpoint(tmp_path / "run", 6)
    assert again == tmp and list(again.iterdir()) == []


def test_commit_writes_the_state_renames_and_keeps_the_newest(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    tmp = begin_checkpoint(tmp_path, 8)
    (tmp / "optimizer.pt").write_text("x")
    state = {"step": 8, "world_size": 1, "window_loss": 1.5}
    final = commit_checkpoint(tmp, state, keep=2)
    assert final == tmp_path / "checkpoints" / "step-8" and not tmp.exists()
    assert json.loads((final / STATE).read_text()) == state and (final / "optimizer.pt").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-6", "step-8"]
    # keep 0 (or less) still keeps the checkpoint just written.
    final = commit_checkpoint(begin_checkpoint(tmp_path, 9), {"step": 9}, keep=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-9"]
    assert final.is_dir()


def test_commit_replaces_an_older_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    old = make_checkpoint(tmp_path, 4)
    (old / "stale.txt").write_text("from an earlier attempt")
    tmp = begin_checkpoint(tmp_path, 4)
    (tmp / "fresh.txt").write_text("new")
    final = commit_checkpoint(tmp, {"step": "4"}, keep=3)  # step is read with int()
    assert final == old and sorted(p.name for p in final.iterdir()) == ["fresh.txt", STATE]


# ---- damage --------------------------------------------------------------------------------------


def test_an_intact_checkpoint_has_no_damage(tmp_path: Path) -> None:
    assert damage(make_checkpoint(tmp_path, 2)) is None
    assert damage(make_checkpoint(tmp_path, 4, optimizer="optimizer-0.pt")) is None  # a sharded optimizer's file


@pytest.mark.parametrize(("harm", "message"), [
    (lambda ck: (ck / STATE).unlink(), "{ck}/state.json is not valid JSON (FileNotFoundError)"),
    (lambda ck: (ck / STATE).write_text('{"step": 4'), "{ck}/state.json is not valid JSON (JSONDecodeError)"),
    (lambda ck: (ck / STATE).write_text("[4]"), "{ck}/state.json has no step number"),
    (lambda ck: (ck / STATE).write_text('{"step": "4"}'), "{ck}/state.json has no step number"),
    (lambda ck: (ck / STATE).write_text('{"steps": 4}'), "{ck}/state.json has no step number"),
    (lambda ck: (ck / "optimizer.pt").unlink(), "{ck} has no optimizer file"),
    (lambda ck: (ck / "optimizer.pt").rename(ck / "my-optimizer.pt"), "{ck} has no optimizer file"),
    (lambda ck: (ck / "scheduler.pt").unlink(), "{ck}/scheduler.pt is missing"),
    (lambda ck: (ck / "rng-0.pt").unlink(), "{ck}/rng-0.pt is missing"),
    (lambda ck: ((ck / "rng-0.pt").unlink(), (ck / "rng-0.pt").mkdir()), "{ck}/rng-0.pt is missing"),
])
def test_each_damage_is_named(tmp_path: Path, harm, message: str) -> None:
    ck = make_checkpoint(tmp_path, 4)
    harm(ck)
    assert damage(ck) == message.format(ck=ck)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt", "rng-1.pt"])
def test_a_cut_torch_file_is_named_with_the_first_line_of_the_error(tmp_path: Path, name: str) -> None:
    ck = make_checkpoint(tmp_path, 4)
    torch.save({"t": torch.ones(1000)}, ck / name)
    (ck / name).write_bytes((ck / name).read_bytes()[:200])
    problem = damage(ck)
    prefix = f"{ck / name} cannot be read ("
    assert problem is not None and problem.startswith(prefix) and problem.endswith(")"), problem
    reason = problem[len(prefix):-1]
    assert reason and "\n" not in reason and len(reason) <= 120, reason


def test_a_cut_adapter_is_named_before_the_other_files(tmp_path: Path) -> None:
    ck = make_checkpoint(tmp_path, 4)
    adapter = ck / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])  # the header is whole, the last tensor is cut
    (ck / "scheduler.pt").unlink()
    problem = damage(ck)
    assert problem is not None and problem.startswith(f"{adapter} cannot be read (") and problem.endswith(")"), problem
    assert "\n" not in problem and len(problem) <= len(f"{adapter} cannot be read ()") + 120
    adapter.unlink()
    assert damage(ck).startswith(f"{adapter} cannot be read (")


def test_a_huge_error_message_is_cut_to_its_first_line_and_120_characters(tmp_path: Path, monkeypatch) -> None:
    ck = make_checkpoint(tmp_path, 4)

    def fail(*_a, **_k):
        raise RuntimeError("x" * 300 + "\nsecond line")

    monkeypatch.setattr(torch, "load", fail)
    assert damage(ck) == f"{ck / 'optimizer.pt'} cannot be read ({'x' * 120})"

    def fail_empty(*_a, **_k):
        raise EOFError()

    monkeypatch.setattr(torch, "load", fail_empty)
    assert damage(ck) == f"{ck / 'optimizer.pt'} cannot be read (EOFError)"


# ---- RNG -----------------------------------------------------------------------------------------


def test_rng_state_round_trip_repeats_python_and_torch_draws() -> None:
    state = rng_state()
    assert set(state) == {"python", "torch", "cuda"}
    assert state["cuda"] is None or torch.cuda.is_available()
    first = (random.random(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == first
    set_rng_state({"python": state["python"], "torch": state["torch"]})  # no "cuda" key: fine
    assert (random.random(), torch.rand(3).tolist()) == first


# ---- what a resume compares ----------------------------------------------------------------------


def test_the_same_config_and_data_have_no_changes(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    assert config_changes(run, cfg) == []


def test_config_changes_name_the_key_and_both_values(run_and_cfg) -> None:
    run, _ = run_and_cfg
    data = Path(cfg_for_data(run))
    changed = cfg_for(data, "train.learning_rate=0.001", "lora.r=4")
    assert _saved(run, "lora", "r") != 4 and _saved(run, "train", "learning_rate") != 0.001
    assert config_changes(run, changed) == [f"lora.r was {_saved(run, 'lora', 'r')!r}, now 4",
                                            f"train.learning_rate was {_saved(run, 'train', 'learning_rate')!r}, now 0.001"]


def cfg_for_data(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["train"][0]


def _saved(run: Path, section: str, key: str):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())[section][key]


def test_run_control_keys_and_the_eval_section_may_change(run_and_cfg) -> None:
    run, _ = run_and_cfg
    data = Path(cfg_for_data(run))
    same_run = cfg_for(data, "train.threads=3", "train.save_every=7", "train.keep_checkpoints=9", "train.log_every=5",
                       "train.report_to=tensorboard", "eval.max_new_tokens=7")
    assert config_changes(run, same_run) == []


def test_a_key_the_saved_config_lacks_reads_unset(run_and_cfg) -> None:
    import yaml

    run, cfg = run_and_cfg
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["seed"]
    del saved["lora"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    changes = config_changes(run, cfg)
    assert f"train.seed was '(unset)', now {cfg.train.seed!r}" in changes
    assert f"lora.r was '(unset)', now {cfg.lora.r!r}" in changes
    assert all(c.startswith(("train.seed ", "lora.")) for c in changes), changes


def test_a_missing_or_unreadable_config_is_a_change(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    (run / "config.yaml").write_text("model: [unclosed")
    assert config_changes(run, cfg) == ["config.yaml is missing or unreadable"]
    (run / "config.yaml").unlink()
    assert config_changes(run, cfg) == ["config.yaml is missing or unreadable"]


def test_edited_data_is_a_change_and_a_missing_manifest_is_not(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    data = Path(cfg.data.train[0])
    data.write_text('{"prompt": "Hi", "response": "Hello there."}\n')
    assert config_changes(run, cfg) == [f"the data file {data} changed since the run started"]
    data.unlink()  # a data file that is gone is not compared (the run then fails to load it)
    assert config_changes(run, cfg) == []
    data.write_text("changed again\n")
    (run / "manifest.json").write_text("{not json")
    assert config_changes(run, cfg) == []
    (run / "manifest.json").unlink()
    assert config_changes(run, cfg) == []


def test_manifest_records_versions_model_seed_hashes_and_extras(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    write_manifest(run, cfg, "resolved/model", {"train_rows": 3})
    manifest = json.loads((run / "manifest.json").read_text())
    data = cfg.data.train[0]
    assert manifest["tinysft"] == version() and isinstance(version(), str) and version()
    assert manifest["model_path"] == "resolved/model" and manifest["seed"] == cfg.train.seed
    assert manifest["train_rows"] == 3
    assert manifest["data_sha256"] == {data: hashlib.sha256(Path(data).read_bytes()).hexdigest()}
    assert manifest["data_sha256"] == sha256_files([data])
    assert set(manifest["libraries"]) == {"torch", "transformers", "peft", "accelerate"}
    assert manifest["libraries"]["torch"] == torch.__version__
    assert len(manifest["created"]) >= len("2026-01-01T00:00:00")
    assert not list(run.glob(".*tmp*"))


# ---- resume_point --------------------------------------------------------------------------------


def test_resume_point_is_none_without_checkpoints_and_the_newest_otherwise(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    said: list[str] = []
    assert resume_point(run, cfg, log=said.append) is None
    make_checkpoint(run, 2)
    make_checkpoint(run, 4, world_size=None)  # older state files have no world_size: one process
    assert resume_point(str(run), cfg, log=said.append) == run / "checkpoints" / "step-4"
    assert said == []


def test_resume_point_refuses_a_finished_run(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainError) as e:
        resume_point(run, cfg)
    assert str(e.value) == (f"{run} already holds a run that finished (its adapter/ is written). Choose another "
                            "--out, or pass --force to replace it.")


def test_resume_point_refuses_other_settings_naming_them(run_and_cfg) -> None:
    run, _ = run_and_cfg
    make_checkpoint(run, 2)
    make_checkpoint(run, 6)
    data = Path(cfg_for_data(run))
    other = cfg_for(data, "train.epochs=7", "train.seed=5")
    with pytest.raises(TrainError) as e:
        resume_point(run, other)
    changes = "; ".join(config_changes(run, other))
    assert changes.count("; ") == 1
    assert str(e.value) == (f"{run} holds an unfinished run (last checkpoint step-6) started with other settings: "
                            f"{changes}. Rerun with the same settings to continue it, or choose another --out.")


def test_resume_point_skips_damaged_checkpoints_and_says_so(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    make_checkpoint(run, 2)
    good = make_checkpoint(run, 4)
    for step in (6, 8):
        (make_checkpoint(run, step) / "scheduler.pt").unlink()
    said: list[str] = []
    assert resume_point(run, cfg, log=said.append) == good
    ck = run / "checkpoints"
    assert said == [f"Damaged checkpoint(s) skipped: {ck / 'step-8' / 'scheduler.pt'} is missing; "
                    f"{ck / 'step-6' / 'scheduler.pt'} is missing. Continuing from step-4, the newest intact one."]


def test_resume_point_stops_when_every_checkpoint_is_damaged(run_and_cfg) -> None:
    run, cfg = run_and_cfg
    for step in (2, 4):
        (make_checkpoint(run, step) / "rng-0.pt").unlink()
    with pytest.raises(TrainError) as e:
        resume_point(run, cfg, log=lambda m: pytest.fail(m))
    ck = run / "checkpoints"
    assert str(e.value) == (f"{run}: every checkpoint is damaged ({ck / 'step-4' / 'rng-0.pt'} is missing; "
                            f"{ck / 'step-2' / 'rng-0.pt'} is missing), so the run cannot continue. Delete {ck} to "
                            "train from step 0, or choose another --out.")


@pytest.mark.parametrize(("saved", "now"), [(2, 1), (1, 4), (None, 2)])
def test_resume_point_refuses_another_number_of_processes(run_and_cfg, saved, now) -> None:
    run, cfg = run_and_cfg
    ck = make_checkpoint(run, 4, world_size=saved)
    with pytest.raises(TrainError) as e:
        resume_point(run, cfg, world_size=now)
    was = 1 if saved is None else saved
    assert str(e.value) == (f"{ck} was written by {was} process(es) but this run has {now}: the data is sharded per "
                            f"process, so resume with {was} process(es) (or choose another --out).")
    assert resume_point(run, cfg, world_size=was) == ck


# ---- what a failed run leaves --------------------------------------------------------------------


def test_a_fresh_run_that_fails_before_a_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="boom"), discard_unfinished(str(run)):
        run.mkdir()
        (run / "config.yaml").write_text("x")
        raise ValueError("boom")
    assert not run.exists()


@pytest.mark.parametrize("keeps", ["checkpoint", "adapter", "existed"])
def test_a_failed_run_worth_keeping_loses_only_its_temporary_files(tmp_path: Path, keeps: str) -> None:
    run = tmp_path / "run"
    if keeps == "existed":
        run.mkdir()
    with pytest.raises(KeyboardInterrupt), discard_unfinished(run):
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text("x")
        if keeps == "checkpoint":
            make_checkpoint(run, 2)
        elif keeps == "adapter":
            (run / "adapter").mkdir()
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / ".step-4.tmp").mkdir()
        (run / "checkpoints" / ".step-4.tmp" / "optimizer.pt").write_text("half")
        (run / ".metrics.jsonl.tmp-7").write_text("half")
        (run / ".adapter.tmp").mkdir()
        raise KeyboardInterrupt
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert "config.yaml" in left and not [p for p in left if "tmp" in p], left
    assert (keeps != "checkpoint") or (run / "checkpoints" / "step-2" / STATE).is_file()


def test_a_failure_on_another_rank_or_a_success_removes_nothing(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError), discard_unfinished(run):
        run.mkdir()
        (run / ".x.tmp").write_text("rank 0 cleans up")
        raise RuntimeError
    assert (run / ".x.tmp").is_file()
    monkeypatch.setenv("RANK", "0")
    other = tmp_path / "other"
    with discard_unfinished(other):
        other.mkdir()
        (other / ".x.tmp").write_text("a success leaves it")
    assert (other / ".x.tmp").is_file()


# ---- metrics -------------------------------------------------------------------------------------


def test_read_jsonl_skips_a_cut_line_and_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "none.jsonl") == []
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]


def test_metrics_log_starts_empty_appends_and_on_resume_drops_later_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 99}\n')
    log = MetricsLog(tmp_path, True, None)
    assert path.read_text() == "" and log.history == []
    for step in (1, 2, 3, 4):
        log.record({"step": step, "loss": step / 10})
    assert read_jsonl(path) == log.history and len(log.history) == 4
    resumed = MetricsLog(tmp_path, True, 2)
    assert resumed.history == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
    assert read_jsonl(path) == resumed.history


def test_metrics_log_of_another_rank_never_touches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 5}\n')
    log = MetricsLog(tmp_path, False, None)
    log.record({"step": 2})
    assert path.read_text() == '{"step": 1}\n{"step": 5}\n' and log.history == [{"step": 2}]
    resumed = MetricsLog(tmp_path, False, 1)
    assert resumed.history == [{"step": 1}] and path.read_text() == '{"step": 1}\n{"step": 5}\n'
    unstepped = tmp_path / "u"
    unstepped.mkdir()
    (unstepped / "metrics.jsonl").write_text('{"note": 1}\n')
    assert MetricsLog(unstepped, False, 0).history == [{"note": 1}]  # no step reads as step 0


def test_plot_losses_writes_the_png_through_a_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
    plot_losses([], path)  # nothing logged yet: still a picture
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- loop.write_checkpoint / load_training_state --------------------------------------------------


class ShardedAccelerator:
    """A single-process stand-in for an FSDP / DeepSpeed accelerator: the checkpoint writer's
    sharded paths (one optimizer file per rank, gathered adapter weights) without launching ranks."""

    def __init__(self, kind: str, zero_stage: int | None = None) -> None:
        from types import SimpleNamespace

        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[kind]
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
        self.is_main_process, self.process_index = True, 0
        self.waits, self.gathered = 0, 0

    def wait_for_everyone(self) -> None:
        self.waits += 1

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        self.gathered += 1
        return model.state_dict()


@pytest.fixture
def trained_bits():
    """A tiny LoRA model, an optimizer that has taken a step and a scheduler that has moved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinysft.config import LoraConfig
    from tinysft.models.load import add_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    model = add_lora(base, LoraConfig(r=2, alpha=4, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]

    def fresh():
        opt = torch.optim.AdamW(params, lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    opt, sched = fresh()
    for _ in range(2):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, fresh


def test_write_checkpoint_then_load_training_state_restores_optimizer_scheduler_and_rng(tmp_path: Path,
                                                                                       trained_bits) -> None:
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from tinysft.training.loop import load_training_state, make_accelerator, write_checkpoint

    model, opt, sched, fresh = trained_bits
    accelerator = make_accelerator(load_config(None, parse_overrides(["train.mixed_precision=no"])))
    run = tmp_path / "run"
    for step in (1, 2):
        make_checkpoint(run, step)
    state = {"step": 4, "world_size": 1, "seen_tokens": 40, "window_loss": 2.5}
    want_opt, want_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    random.seed(7)
    torch.manual_seed(7)
    final = write_checkpoint(accelerator, model, opt, sched, run, 4, 2, state)
    draws = (random.random(), torch.rand(4).tolist())  # the state saved is the state before these
    assert final == run / "checkpoints" / "step-4" and damage(final) is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "optimizer.pt", "rng-0.pt", "scheduler.pt", STATE]
    assert json.loads((final / STATE).read_text()) == state
    saved = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    # Move everything on, then restore into fresh objects.
    random.random()
    torch.rand(9)
    opt2, sched2 = fresh()
    assert load_training_state(accelerator, opt2, sched2, final) == state
    got = opt2.state_dict()
    assert got["param_groups"] == want_opt["param_groups"]
    assert got["state"].keys() == want_opt["state"].keys() and got["state"]
    for k, v in want_opt["state"].items():
        assert all(torch.equal(got["state"][k][name], v[name]) for name in v), k
    assert sched2.state_dict() == want_sched and sched2.last_epoch == 2
    assert (random.random(), torch.rand(4).tolist()) == draws


@pytest.mark.parametrize(("kind", "zero_stage", "optimizer_file", "gathered"), [
    ("FSDP", None, "optimizer-0.pt", 1),
    ("DEEPSPEED", 2, "optimizer-0.pt", 0),
    ("DEEPSPEED", 3, "optimizer-0.pt", 1),
    ("MULTI_GPU", None, "optimizer.pt", 0),
])
def test_sharded_runs_write_one_optimizer_file_per_rank_and_gather_sharded_weights(
        tmp_path: Path, trained_bits, kind, zero_stage, optimizer_file, gathered) -> None:
    from safetensors.torch import load_file

    from tinysft.training.loop import adapter_weights, load_training_state, make_accelerator, write_checkpoint

    make_accelerator(load_config(None, parse_overrides(["train.mixed_precision=no"])))  # the process state gather_object reads
    model, opt, sched, fresh = trained_bits
    accelerator = ShardedAccelerator(kind, zero_stage)
    final = write_checkpoint(accelerator, model, opt, sched, tmp_path, 6, 3, {"step": 6})
    assert accelerator.gathered == gathered and accelerator.waits == 3
    assert (adapter_weights(accelerator, model) is None) == (gathered == 0)
    assert sorted(p.name for p in final.iterdir() if p.suffix == ".pt") == sorted([optimizer_file, "rng-0.pt",
                                                                                    "scheduler.pt"])
    assert damage(final) is None and load_file(str(final / "adapter" / "adapter_model.safetensors"))
    opt2, sched2 = fresh()
    assert load_training_state(accelerator, opt2, sched2, final) == {"step": 6}
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys() and sched2.last_epoch == 2
