from pathlib import Path

import pytest

from tinysft.config import ConfigError, load_config, parse_overrides


def test_defaults_match_the_seed_lora() -> None:
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("{}\n")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  learning_rate: 1e-4\ndata:\n  train: [d.jsonl]\n")
    cfg = load_config(f, parse_overrides(["train.epochs=2", "lora.target_modules=q_proj,v_proj"]))
    assert cfg.train.epochs == 2
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == [str(tmp_path / "d.jsonl")]  # relative to the config file


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, parse_overrides(["lora.r=4", "train.seed=7"]))
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(("override", "fragment"), [
    (["train.learnig_rate=1e-4"], "Did you mean 'learning_rate'"),
    (["train.learning_rate=-1"], "learning_rate must be > 0"),
    (["lora.r=0"], "lora.r must be >= 1"),
    (["train.epochs=abc"], "expected a number"),
    (["trian.epochs=1"], "Did you mean 'train'"),
    (["train.schedule=wavy"], "is not one of"),
    (["nodot=1"], "SECTION.KEY=VALUE"),
    (["data.category_weights=refusal"], "NAME:VALUE pairs"),
    (["data.category_weights=refusal:lots"], "data.category_weights.refusal: expected a number"),
    (["data.category_weights=refusal:-1"], "must be >= 0"),
    (["data.file_weights=more.jsonl:-1"], "data.file_weights.more.jsonl must be >= 0"),
    (["train.max_steps=-1"], "train.max_steps must be >= 0"),
])
def test_bad_values_are_named(override: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, parse_overrides(override))


def test_unknown_yaml_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'"):
        load_config(f)


def test_category_weights_from_yaml_and_from_set(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  category_weights: {refusal: 3, task: 0.5}\n")
    assert load_config(f).data.category_weights == {"refusal": 3.0, "task": 0.5}
    cfg = load_config(None, parse_overrides(["data.category_weights=refusal:2, lookalike:1.5"]))
    assert cfg.data.category_weights == {"refusal": 2.0, "lookalike": 1.5}
    cfg = load_config(None, parse_overrides(["data.file_weights=more.jsonl:0.4,C:/data/x.jsonl:2"]))
    assert cfg.data.file_weights == {"more.jsonl": 0.4, "C:/data/x.jsonl": 2.0}  # the last ':' splits
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_saved_run_with_removed_keys_at_their_off_values_still_loads(tmp_path: Path) -> None:
    """config.yaml of runs made before the answer-start and in-batch experiments were removed."""
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  answer_start_tokens: 0\n  answer_start_weight: 1.0\n  preference_in_batch: false\n")
    assert load_config(old).train.epochs == 3.0
    old.write_text("train:\n  answer_start_tokens: 3\n")
    with pytest.raises(ConfigError, match="answer_start_tokens was removed"):
        load_config(old)
