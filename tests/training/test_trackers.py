"""train.report_to: the log lines also go to experiment trackers through accelerate."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import CHAT_ROWS, write_jsonl
from tinysft.config import ConfigError, load_config, parse_overrides
from tinysft.training import train


def test_tensorboard_gets_the_same_losses_as_metrics_jsonl(tmp_path, tiny_model_dir) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([
        f"model.name={tiny_model_dir}", f"data.train={data}", "train.epochs=1", "train.batch_size=4",
        "train.log_every=1", "train.mixed_precision=no", "lora.r=4", "train.report_to=tensorboard"]))
    run = tmp_path / "run"
    train(cfg, run, show_progress=False, log=lambda m: None)
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(run) for p in run.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, round(e.value, 5)) for e in acc.Scalars("loss")]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(h["step"], pytest.approx(h["loss"], abs=1e-5)) for h in lines if "loss" in h]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_package(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([f"model.name={tiny_model_dir}", f"data.train={data}",
                                             "train.report_to=wandb"]))
    with pytest.raises(ConfigError, match=r"needs the wandb package.*pip install wandb"):
        train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)


def test_an_unknown_tracker_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        load_config(None, parse_overrides(["train.report_to=neptune"]))
