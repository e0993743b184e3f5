"""The formats people already have: each read into the one internal shape and trained for a few steps.

ShareGPT, TRL preference rows, message content as a list of parts, parquet files, a
``datasets.save_to_disk`` folder and its Arrow file; plus the one-hint refusal of a classification
file given to a chat command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from tinysft.data.validate import DataError, load_conversations

PAIRS = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]

SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q},
                               {"from": "gpt", "value": a}]} for q, a in PAIRS]
TRL_STANDARD = [{"prompt": q, "chosen": a, "rejected": "I will not say."} for q, a in PAIRS]
TRL_CONVERSATIONAL = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                       "rejected": [{"role": "assistant", "content": "No."}]} for q, a in PAIRS]
PARTS = [{"messages": [{"role": "user", "content": [{"type": "text", "text": q[:5]}, {"type": "text", "text": q[5:]}]},
                       {"role": "assistant", "content": [{"type": "text", "text": a}]}]} for q, a in PAIRS]


def test_sharegpt_rows_become_messages(tmp_path: Path) -> None:
    convs = load_conversations([write_jsonl(tmp_path / "s.jsonl", SHAREGPT)])
    assert [c.format for c in convs] == ["sharegpt"] * 4
    assert convs[0].messages == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": PAIRS[0][0]},
                                 {"role": "assistant", "content": PAIRS[0][1]}]


def test_sharegpt_unknown_speaker_names_the_field(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(DataError) as e:
        load_conversations([write_jsonl(tmp_path / "s.jsonl", rows)])
    assert "conversations[0].from" in str(e.value) and "human, gpt" in str(e.value)


@pytest.mark.parametrize("rows", [TRL_STANDARD, TRL_CONVERSATIONAL], ids=["standard", "conversational"])
def test_trl_preference_rows_keep_rejected_as_text(tmp_path: Path, rows: list) -> None:
    convs = load_conversations([write_jsonl(tmp_path / "p.jsonl", rows)])
    assert convs[1].format == "preference"
    assert convs[1].messages == [{"role": "user", "content": PAIRS[1][0]}, {"role": "assistant", "content": PAIRS[1][1]}]
    assert isinstance(convs[1].extra["rejected"], str) and convs[1].extra["rejected"].strip()


def test_content_parts_are_joined_and_images_refused(tmp_path: Path) -> None:
    convs = load_conversations([write_jsonl(tmp_path / "m.jsonl", PARTS)])
    assert convs[0].messages[0]["content"] == PAIRS[0][0]
    image = [{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                           {"role": "assistant", "content": "a cat"}]}]
    with pytest.raises(DataError) as e:
        load_conversations([write_jsonl(tmp_path / "i.jsonl", image)])
    assert "messages[0].content[0]" in str(e.value) and "only text parts" in str(e.value)


def test_parquet_and_datasets_folder_and_arrow_file(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = [{"prompt": q, "response": a} for q, a in PAIRS]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert [c.messages for c in load_conversations([tmp_path / "d.parquet"])][2][1]["content"] == PAIRS[2][1]
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "saved"))
    assert len(load_conversations([str(tmp_path / "saved")])) == 4
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_conversations([arrow])[3].format == "sharegpt"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_conversations([str(tmp_path / "dict")])) == 4


def test_broken_parquet_and_bad_hub_name_are_clean_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError) as e:
        load_conversations([tmp_path / "bad.parquet", "hf:no-slash"])
    text = str(e.value)
    assert "not a readable parquet file" in text and "hf:OWNER/NAME" in text


def _train(tmp_path: Path, data: Path | str, tiny_model_dir: Path, name: str, extra: dict | None = None) -> Path:
    from tinysft import load_config, train

    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": [str(data)], "train.max_steps": 2,
                             "train.batch_size": 2, "lora.r": 4, **(extra or {})})
    run = tmp_path / name
    result = train(cfg, run, log=lambda _: None)
    assert result.steps == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    return run


@pytest.mark.slow  # several trainings or CLI runs: outside the fast inner loop
def test_each_new_format_trains_a_few_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    import datasets
    import pandas as pd

    pd.DataFrame([{"prompt": q, "response": a} for q, a in PAIRS]).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "saved"))
    files = {"sharegpt": write_jsonl(tmp_path / "s.jsonl", SHAREGPT),
             "parts": write_jsonl(tmp_path / "m.jsonl", PARTS),
             "parquet": tmp_path / "d.parquet",
             "datasets_folder": tmp_path / "saved"}
    for name, path in files.items():
        run = _train(tmp_path, path, tiny_model_dir, name)
        assert json.loads((run / "manifest.json").read_text())["data_sha256"][str(path)]  # hashed, folder or file
    # TRL preference rows feed the preference term: its loss is logged, so the `rejected` answers were used.
    run = _train(tmp_path, write_jsonl(tmp_path / "p.jsonl", TRL_CONVERSATIONAL), tiny_model_dir, "pref",
                 {"train.preference_weight": 0.1, "train.log_every": 1})
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("preference_loss" in row for row in logged), logged[:2]


@pytest.mark.slow  # CLI subprocesses
def test_classification_csv_to_chat_train_is_one_hint(tmp_path: Path) -> None:
    csv = tmp_path / "topics.csv"
    csv.write_text("text,label\n" + "".join(f"row {i} about sport,sport\n" for i in range(12)))
    for args in (["data", "check", str(csv)], ["train", "--data", str(csv), "--out", str(tmp_path / "run")]):
        proc = subprocess.run([sys.executable, "-m", "tinysft", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert "--task classify" in proc.stderr
        assert "role marker" not in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count("classification data") == 1
    assert not (tmp_path / "run").exists()


def test_hub_dataset_name_offline_is_one_clean_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_conversations(["hf:someone/some-data"])
    assert "hf:someone/some-data" in str(e.value) and "could not be loaded from the hub" in str(e.value)
    assert "parquet" in str(e.value)  # the way out: download it and pass the file
