"""Classification: LoRA + a trained head on an encoder, base (untrained head) vs tuned.

Unit tests use a tiny random BERT (2 layers, hidden 32) with the embedded MiniLM tokenizer; the
integration test trains the real embedded encoder for one epoch.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import EXAMPLES, write_jsonl

NEWS = EXAMPLES / "news-topics"
LABELS = ["Business", "Sci/Tech", "Sports", "World"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module, restored after: the tiny models' matmuls are too small to split,
    and on a busy 2-core machine two threads mostly wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model: Path, train: list[str], **train_overrides):
    from tinysft.config import load_config

    overrides = {"model": {"name": str(model)}, "data": {"train": train},
                 "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                 "train": {"task": "classify", "epochs": 15, "batch_size": 8, "learning_rate": 1e-2,
                           "warmup_ratio": 0.0, "log_every": 1, **train_overrides}}
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """One trained tiny classification run on the 40-row unit-test subset, shared by the tests below."""
    from tinysft.training import train_classifier

    run = tmp_path_factory.mktemp("cls") / "run"
    train_classifier(tiny_config(tiny_bert_dir, [str(NEWS / "unit_test.jsonl")]), run, log=lambda _m: None,
                     show_progress=False)
    return run


# ---- metrics ---------------------------------------------------------------------------------------


def test_metrics_match_scikit_learn() -> None:
    from sklearn import metrics as sk

    from tinysft.evaluate.classification_metrics import classification_metrics

    rng = random.Random(1)
    labels = ["a", "b", "c", "d"]
    gold = [rng.choice(labels) for _ in range(200)]
    # "d" is never predicted (precision 0 by convention), the rest are noisy copies of gold.
    pred = [g if rng.random() < 0.6 else rng.choice(labels[:3]) for g in gold]
    pred = [p if p != "d" else "a" for p in pred]
    m = classification_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
    assert m["f1_weighted"] == pytest.approx(sk.f1_score(gold, pred, labels=labels, average="weighted", zero_division=0))
    assert m["f1_macro"] == pytest.approx(sk.f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    assert m["precision_weighted"] == pytest.approx(
        sk.precision_score(gold, pred, labels=labels, average="weighted", zero_division=0))
    assert m["confusion_matrix"] == sk.confusion_matrix(gold, pred, labels=labels).tolist()
    recalls = sk.recall_score(gold, pred, labels=labels, average=None, zero_division=0)
    assert [m["per_class"][x]["recall"] for x in labels] == pytest.approx(list(recalls))
    assert m["per_class"]["d"]["precision"] == 0.0


# ---- model choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [
    ("distilbert", ["q_lin", "v_lin"]),
    ("bert", ["query", "value"]),
    ("roberta", ["query", "value"]),
    ("deberta-v2", ["query_proj", "value_proj"]),
])
def test_lora_targets_are_chosen_per_architecture(kind: str, expected: list[str]) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tinysft.config import LoraConfig
    from tinysft.models.encoder import choose_target_modules

    config = AutoConfig.for_model(kind, vocab_size=100, hidden_size=32, dim=32, hidden_dim=64, n_layers=1, n_heads=4,
                                  num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    assert choose_target_modules(model, LoraConfig().target_modules) == expected
    assert choose_target_modules(model, ["dense"]) == ["dense"]  # an explicit choice is kept


def test_default_model_for_classification_is_the_embedded_encoder() -> None:
    from tinysft.config import load_config
    from tinysft.models.encoder import classifier_model_name
    from tinysft.models.registry import DEFAULT_ENCODER

    cfg = load_config(None, {"train": {"task": "classify"}})
    assert classifier_model_name(cfg.model.name) == DEFAULT_ENCODER
    assert classifier_model_name("/some/local/bert") == "/some/local/bert"


@pytest.mark.parametrize(("kind", "expected"), [
    ("distilbert", {"pre_classifier", "classifier"}),  # its head has two new layers
    ("bert-without-pooler", {"pooler", "classifier"}),  # e.g. a sentence-transformers export
])
def test_new_head_modules_are_trained_and_saved(tmp_path: Path, encoder_dir: Path, kind: str, expected: set) -> None:
    """Every layer the checkpoint lacks is random at load time, so it must be trained and saved (modules_to_save)."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    from tinysft.config import ModelConfig
    from tinysft.models.encoder import load_encoder

    if kind == "distilbert":
        DistilBertModel(DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4)).save_pretrained(tmp_path)
    else:
        config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
        BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_bytes((encoder_dir / "vocab.txt").read_bytes())
    _, _, _, head = load_encoder(ModelConfig(name=str(tmp_path)), ["x", "y"], log=lambda _m: None)
    assert set(head) == expected


# ---- training, evaluation, prediction --------------------------------------------------------------


def test_training_raises_accuracy_on_the_unit_subset(tiny_run: Path) -> None:
    """Seed 002's unit test, done properly: train on the 40-row subset, accuracy must rise well above the
    untrained head's (chance is 0.25)."""
    from tinysft.evaluate.classification import evaluate_classifier

    paths = evaluate_classifier(tiny_run, [str(NEWS / "unit_test.jsonl")], tiny_run / "report", log=lambda _m: None)
    report = json.loads(paths["json"].read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert tuned["accuracy"] >= 0.75, tuned
    assert tuned["accuracy"] >= base["accuracy"] + 0.3
    assert tuned["f1_weighted"] > base["f1_weighted"]
    assert report["labels"] == LABELS and len(report["rows"]) == 40
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and "Sci/Tech" in html  # confusion matrix plot, per-class table
    losses = [h["loss"] for h in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if "loss" in h]
    assert losses[-1] < losses[0]


def test_run_directory_and_plain_peft_reload(tiny_run: Path, tiny_bert_dir: Path) -> None:
    """The run dir holds what DESIGN.md promises, and plain PEFT restores the tuned classifier (head included)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tinysft.evaluate.classification import load_classifier_run, predict_texts

    for name in ("config.yaml", "labels.json", "manifest.json", "metrics.jsonl", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (tiny_run / name).is_file(), name
    assert json.loads((tiny_run / "labels.json").read_text()) == LABELS
    assert "task: classify" in (tiny_run / "config.yaml").read_text()

    texts = ["Stocks slide as the central bank raises rates", "Champions League final ends in penalties"]
    loaded = load_classifier_run(tiny_run, log=lambda _m: None)
    ours = [label for label, _ in predict_texts(loaded, texts)]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=len(LABELS))
    plain = PeftModel.from_pretrained(base, str(tiny_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    with torch.no_grad():
        logits = plain(**tok(texts, return_tensors="pt", padding=True)).logits
        ref = loaded.model(**tok(texts, return_tensors="pt", padding=True)).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    assert [LABELS[i] for i in logits.argmax(-1)] == ours


def test_cli_train_eval_predict(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """End to end on the CLI: train on seed 002's {"question", "answer"} rows, eval on a CSV, predict."""
    from tinysft.cli import app

    rows = [json.loads(x) for x in (NEWS / "unit_test.jsonl").read_text().splitlines()]
    train = write_jsonl(tmp_path / "seed.jsonl", [{"question": r["text"], "answer": r["label"]} for r in rows])
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--task", "classify", "--model", str(tiny_bert_dir), "--data", str(train),
                                 "--set", "train.epochs=1", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Done:" in result.output

    eval_csv = tmp_path / "eval.csv"  # CSV with a text,label header works as well as JSONL
    with eval_csv.open("w", newline="") as f:
        csv.DictWriter(f, ["text", "label"]).writeheader()
        csv.DictWriter(f, ["text", "label"]).writerows(rows[:12])
    result = runner.invoke(app, ["eval", str(run), "--data", str(eval_csv), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["metrics"]) == {"base", "tuned"} and report["metrics"]["tuned"]["n"] == 12
    assert "Accuracy" in result.output

    unlabelled = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["text"], "id": i} for i, r in enumerate(rows[:5])])
    preds = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", str(run), "--data", str(unlabelled), "--out", str(preds)])
    assert result.exit_code == 0, result.output
    out = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [r["id"] for r in out] == list(range(5))
    assert all(r["prediction"] in LABELS and 0.0 < r["confidence"] <= 1.0 for r in out)


def test_unknown_label_in_eval_data_names_file_and_line(tmp_path: Path, tiny_run: Path) -> None:
    from tinysft.cli import app

    bad = write_jsonl(tmp_path / "eval.jsonl", [{"text": "Rates rise", "label": "Business"},
                                                 {"text": "A new comet", "label": "Space"}])
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--data", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2" in result.output and "unknown label 'Space'" in result.output
    assert "Traceback" not in result.output


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from safetensors.torch import load_file

    from tinysft.training import train_classifier

    cfg = tiny_config(tiny_bert_dir, [str(NEWS / "unit_test.jsonl")], epochs=2)
    cfg.lora.dropout = 0.1  # dropout RNG must be restored too
    quiet = {"log": lambda _m: None, "show_progress": False}
    full = train_classifier(cfg, tmp_path / "full", **quiet)
    partial = train_classifier(cfg, tmp_path / "resumed", stop_after_steps=4, **quiet)
    assert partial.steps == 4 and not (tmp_path / "resumed" / "adapter").exists()
    resumed = train_classifier(cfg, tmp_path / "resumed", resume=True, **quiet)
    assert resumed.steps == full.steps
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


# ---- integration: the real embedded encoder ---------------------------------------------------------


@pytest.mark.integration
def test_embedded_encoder_learns_news_topics(tmp_path: Path) -> None:
    """One epoch of the example recipe on the real MiniLM: held-out accuracy far above the untrained head."""
    from tinysft.config import load_config
    from tinysft.evaluate.classification import evaluate_classifier
    from tinysft.training import train_classifier

    cfg = load_config(NEWS / "config.yaml", {"train": {"epochs": 1}, "data": {"eval": []}})
    start = time.time()
    train_classifier(cfg, tmp_path / "run", log=lambda _m: None, show_progress=False)
    paths = evaluate_classifier(tmp_path / "run", [str(NEWS / "unit_test.jsonl")], tmp_path / "run", log=lambda _m: None)
    m = json.loads(paths["json"].read_text())["metrics"]
    assert m["tuned"]["accuracy"] >= 0.85, (m["tuned"]["accuracy"], time.time() - start)
    assert m["base"]["accuracy"] <= 0.5


def test_an_encoder_in_an_emulated_dtype_warns(monkeypatch, tiny_bert_dir: Path) -> None:
    from tinysft.config import ModelConfig
    from tinysft.models.encoder import load_encoder

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)  # a CPU without bf16 instructions
    logs: list[str] = []
    load_encoder(ModelConfig(name=str(tiny_bert_dir), dtype="bfloat16"), ["a", "b"], log=logs.append)
    assert any(m.startswith("Warning: model.dtype=bfloat16 asks for bfloat16") for m in logs)
    logs.clear()
    load_encoder(ModelConfig(name=str(tiny_bert_dir)), ["a", "b"], log=logs.append)  # auto: fp32, no warning
    assert not any(m.startswith("Warning") for m in logs)
