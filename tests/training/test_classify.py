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


def test_a_decoder_is_told_from_an_encoder(tiny_model_dir: Path, tiny_bert_dir: Path) -> None:
    """is_decoder picks the defaults and the dtype: the default classifier is the embedded causal LM."""
    from tinysft.models.encoder import is_decoder

    assert is_decoder(tiny_model_dir) and not is_decoder(tiny_bert_dir)
    assert not is_decoder(tiny_bert_dir / "no-such-folder")  # unreadable: load_encoder names the problem


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
    """One epoch of the example recipe on the real MiniLM: high held-out accuracy, not below the probe it started from."""
    from tinysft.config import load_config
    from tinysft.evaluate.classification import evaluate_classifier
    from tinysft.training import train_classifier

    cfg = load_config(NEWS / "config.yaml", {"train": {"epochs": 1}, "data": {"eval": []}})
    heldout = NEWS / "val.jsonl"  # 240 rows; unit_test.jsonl is a subset of train.jsonl (memorisation, not held out)
    texts = {json.loads(line)["text"] for f in cfg.data.train for line in Path(f).read_text().splitlines()}
    assert not texts & {json.loads(line)["text"] for line in heldout.read_text().splitlines()}, "held-out rows trained on"
    start = time.time()
    train_classifier(cfg, tmp_path / "run", log=lambda _m: None, show_progress=False)
    paths = evaluate_classifier(tmp_path / "run", [str(heldout)], tmp_path / "run", log=lambda _m: None)
    m = json.loads(paths["json"].read_text())["metrics"]
    assert m["tuned"]["accuracy"] >= 0.85, (m["tuned"]["accuracy"], time.time() - start)
    # The base is the linear probe the head started from (mean pooling): tuning must not lose to it.
    assert (tmp_path / "run" / "head_init.safetensors").is_file()
    assert m["tuned"]["accuracy"] >= m["base"]["accuracy"] - 0.05


@pytest.mark.integration
def test_the_default_classifier_is_the_embedded_decoder_and_learns(tmp_path: Path) -> None:
    """No model named: the embedded SmolLM2 through its last-token head, started from the probe; one epoch
    on 80 news rows reaches high accuracy on 80 held-out rows and does not lose to its probe."""
    import yaml

    from tinysft.config import LoraConfig, load_config
    from tinysft.evaluate.classification import evaluate_classifier
    from tinysft.models.registry import DEFAULT_CAUSAL
    from tinysft.training import train_classifier

    train_rows = (NEWS / "train.jsonl").read_text().splitlines()
    val_rows = (NEWS / "val.jsonl").read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(train_rows[i] for i in range(0, len(train_rows), 6)) + "\n")  # 80 rows, all labels
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(val_rows[i] for i in range(0, len(val_rows), 3)) + "\n")  # 80 rows
    cfg = load_config(None, {"data": {"train": [str(train)]}, "train": {"task": "classify", "epochs": 1}})
    logs: list[str] = []
    train_classifier(cfg, tmp_path / "run", log=logs.append, show_progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["name"] == DEFAULT_CAUSAL and saved["lora"]["target_modules"] == LoraConfig().target_modules
    assert any("Head initialised as a logistic regression" in m for m in logs)
    paths = evaluate_classifier(tmp_path / "run", [str(heldout)], tmp_path / "run", log=lambda _m: None)
    m = json.loads(paths["json"].read_text())["metrics"]
    assert m["tuned"]["accuracy"] >= 0.85, m["tuned"]["accuracy"]
    assert m["tuned"]["accuracy"] >= m["base"]["accuracy"] - 0.05


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


# ---- pooling that fits the encoder, defaults, the chance-level warning ------------------------------


def sentence_transformers_folder(src: Path, dest: Path, *, mode: str = "mean", normalize: bool = True) -> Path:
    """A copy of ``src`` laid out as a sentence-transformers model (modules.json, 1_Pooling, 2_Normalize)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (dest / item.name).write_bytes(item.read_bytes())
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls",
         "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": False}))
    return dest


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    return sentence_transformers_folder(tiny_bert_dir, tmp_path_factory.mktemp("tiny-st"))


def test_sentence_transformers_folder_gets_mean_pooling(tmp_path: Path, tiny_bert_dir: Path, tiny_st_dir: Path,
                                                        encoder_dir: Path) -> None:
    """The pooled embedding is the masked mean of the token states, normalised; padding changes nothing."""
    from transformers import AutoModel, AutoTokenizer

    from tinysft.config import ModelConfig
    from tinysft.models.encoder import MeanPoolClassifier, load_encoder, sentence_pooling

    assert sentence_pooling(encoder_dir) == ("mean", True)  # the embedded all-MiniLM-L6-v2
    assert sentence_pooling(tiny_bert_dir) == ("model", False)  # a plain encoder keeps its own head
    cls_dir = sentence_transformers_folder(tiny_bert_dir, tmp_path / "cls", mode="cls")
    assert sentence_pooling(cls_dir) == ("model", False)
    assert sentence_pooling(sentence_transformers_folder(tiny_bert_dir, tmp_path / "raw", normalize=False)) \
        == ("mean", False)

    model, _, _, head = load_encoder(ModelConfig(name=str(tiny_st_dir)), ["a", "b", "c"], log=lambda _m: None)
    assert isinstance(model, MeanPoolClassifier) and head == ["classifier"]
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    body = AutoModel.from_pretrained(str(tiny_st_dir)).eval()
    texts = ["short one", "a noticeably longer sentence with more tokens in it"]
    batch = AutoTokenizer.from_pretrained(str(tiny_st_dir))(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = body(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        pooled = model.pooled(batch["input_ids"], batch["attention_mask"])
        alone = model.pooled(**{k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()
                                if k in ("input_ids", "attention_mask")})
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert torch.allclose(pooled[0], alone[0], atol=1e-5)  # the padded batch and the text alone agree
    assert not torch.allclose(pooled, torch.nn.functional.normalize(states[:, 0], dim=-1), atol=1e-3)  # not CLS
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_linear_probe_head_is_the_base_and_plain_peft_reloads(tmp_path: Path, tiny_st_dir: Path) -> None:
    """A mean-pooling run starts from a logistic-regression head (saved as head_init.safetensors, the report's
    base), and PeftModel.from_pretrained(MeanPoolClassifier.from_pretrained(...)) restores the tuned model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoTokenizer

    from tinysft.evaluate.classification import load_classifier_run, predict_texts
    from tinysft.models.encoder import MeanPoolClassifier, fit_linear_probe, sentence_embeddings
    from tinysft.training import train_classifier

    # The probe is scikit-learn's LogisticRegression(C=1) objective.
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    weight, bias = fit_linear_probe(x, y, 3)
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x.numpy(), y.numpy())
    assert torch.allclose(weight, torch.tensor(ref.coef_, dtype=torch.float32), atol=2e-3)
    probs = (x @ weight.T + bias).softmax(-1)  # the unpenalised bias is defined up to a shift: compare probabilities
    assert torch.allclose(probs, torch.tensor(ref.predict_proba(x.numpy()), dtype=torch.float32), atol=2e-3)

    run = tmp_path / "run"
    train_classifier(tiny_config(tiny_st_dir, [str(NEWS / "unit_test.jsonl")], epochs=2), run, log=lambda _m: None,
                     show_progress=False)
    head = load_file(str(run / "head_init.safetensors"))
    loaded = load_classifier_run(run, log=lambda _m: None)
    rows = [json.loads(line) for line in (NEWS / "unit_test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    feats = sentence_embeddings(loaded.model.base_model.model, loaded.tokenizer, texts)  # adapter on: tuned body
    with loaded.model.disable_adapter():
        base_feats = sentence_embeddings(loaded.model.base_model.model, loaded.tokenizer, texts)
    base_pred = (base_feats @ head["weight"].T + head["bias"]).argmax(-1)
    assert [LABELS[i] for i in base_pred] == [p for p, _ in predict_texts(loaded, texts, tuned=False)]
    assert not torch.allclose(feats, base_feats)  # LoRA changed the encoder

    plain = PeftModel.from_pretrained(MeanPoolClassifier.from_pretrained(tiny_st_dir, LABELS), str(run / "adapter"))
    batch = AutoTokenizer.from_pretrained(str(tiny_st_dir))(texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(**batch).logits, loaded.model(**batch).logits, atol=1e-5)


def test_classification_defaults_replace_only_the_chat_defaults() -> None:
    from tinysft.config import load_config
    from tinysft.training.classify import DECODER_DEFAULTS, ENCODER_DEFAULTS, apply_classify_defaults

    for defaults in (DECODER_DEFAULTS, ENCODER_DEFAULTS):
        cfg = load_config(None, {"train": {"task": "classify"}})
        changes = apply_classify_defaults(cfg, defaults)
        assert (cfg.train.learning_rate, cfg.train.epochs, cfg.train.threads, cfg.data.max_length) == \
            (defaults.learning_rate, defaults.epochs, defaults.threads, defaults.max_length)
        assert any(c.startswith("train.learning_rate") for c in changes)
    assert ENCODER_DEFAULTS.epochs != DECODER_DEFAULTS.epochs  # the kinds differ, or one table would do
    mine = load_config(None, {"train": {"task": "classify", "learning_rate": 1e-3, "epochs": 2, "threads": 2},
                              "data": {"max_length": 64}})
    assert apply_classify_defaults(mine, ENCODER_DEFAULTS) == []
    assert (mine.train.learning_rate, mine.train.epochs, mine.data.max_length, mine.train.threads) == (1e-3, 2, 64, 2)


def test_a_run_that_learns_nothing_warns_with_the_fix(tmp_path: Path, tiny_bert_dir: Path) -> None:
    import math

    from tinysft.training import train_classifier
    from tinysft.training.classify import chance_level_warning

    assert chance_level_warning([1.39, 1.38, 1.40], 4) is not None
    assert chance_level_warning([1.39, 0.9, 0.4], 4) is None  # it learned
    assert chance_level_warning([2.5, 1.9, 1.4], 4) is None  # it fell from a bad start to chance: still learning
    assert chance_level_warning([1.39], 4) is None

    logs: list[str] = []
    cfg = tiny_config(tiny_bert_dir, [str(NEWS / "unit_test.jsonl")], epochs=2, learning_rate=1e-9)
    result = train_classifier(cfg, tmp_path / "run", log=logs.append, show_progress=False, head_init="random")
    assert abs(result.train_loss - math.log(4)) < 0.1 * math.log(4)
    warning = [m for m in logs if "chance level" in m]
    assert len(warning) == 1 and "train.learning_rate" in warning[0] and "ln 4" in warning[0]


def test_distilbert_trains_lora_on_q_lin_v_lin_and_saves_its_head(tmp_path: Path, encoder_dir: Path) -> None:
    """The seed's model family: a tiny random DistilBERT folder trains with LoRA on q_lin/v_lin, and both new
    head layers (pre_classifier, classifier) are saved with the adapter."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from tinysft.training import train_classifier

    tok = AutoTokenizer.from_pretrained(str(encoder_dir))
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                     max_position_embeddings=128)).save_pretrained(tmp_path / "distil")
    tok.save_pretrained(tmp_path / "distil")
    logs: list[str] = []
    train_classifier(tiny_config(tmp_path / "distil", [str(NEWS / "unit_test.jsonl")], epochs=1), tmp_path / "run",
                     log=logs.append, show_progress=False)
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["q_lin", "v_lin"]
    keys = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")).keys()
    assert any(".q_lin.lora_A" in k for k in keys) and any(".v_lin.lora_B" in k for k in keys)
    assert any("pre_classifier" in k for k in keys) and any(k.endswith("classifier.weight") for k in keys)
    assert not (tmp_path / "run" / "head_init.safetensors").exists()  # its own head: random init, no probe


def test_a_decoder_classifies_through_its_score_head_started_from_a_linear_probe(tmp_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    """A causal LM gets its own sequence-classification head (``score``, the last non-pad token's final
    state); the head starts as a logistic regression on exactly the features it reads (head_init.safetensors,
    the report's base), so base predictions equal that probe's, and the adapter changes them."""
    from safetensors.torch import load_file

    from tinysft.evaluate.classification import load_classifier_run, predict_texts
    from tinysft.models.encoder import head_features, is_decoder, probe_head
    from tinysft.training import train_classifier

    assert is_decoder(tiny_model_dir)
    run = tmp_path / "run"
    train_classifier(tiny_config(tiny_model_dir, [str(NEWS / "unit_test.jsonl")], epochs=2), run,
                     log=lambda _m: None, show_progress=False)
    head = load_file(str(run / "head_init.safetensors"))
    assert set(head) == {"weight"}  # a decoder's score has no bias, and the probe fits none
    loaded = load_classifier_run(run, log=lambda _m: None)
    inner = loaded.model.base_model.model
    assert probe_head(inner) is not None
    rows = [json.loads(line) for line in (NEWS / "unit_test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    with loaded.model.disable_adapter():
        base_feats = head_features(inner, loaded.tokenizer, texts)
        base_preds = [p for p, _ in predict_texts(loaded, texts, tuned=False)]
    assert [LABELS[i] for i in (base_feats @ head["weight"].float().T).argmax(-1)] == base_preds
    probe_acc = sum(p == r["label"] for p, r in zip(base_preds, rows, strict=True)) / len(rows)
    assert probe_acc > 0.5  # a probe on the training rows themselves separates them (chance: 0.25)
    assert not torch.allclose(head_features(inner, loaded.tokenizer, texts), base_feats)  # LoRA moved the body


def test_last_token_features_ignore_padding(tiny_model_dir: Path) -> None:
    """head_features reads the last real token of each row: a text's features are the same alone and
    right-padded in a batch with a longer text."""
    from tinysft.config import ModelConfig
    from tinysft.models.encoder import head_features, load_encoder

    model, tok, _, _ = load_encoder(ModelConfig(name=str(tiny_model_dir)), LABELS, log=lambda _m: None)
    short, long = "a short one", "a much longer text that pads the short one in its batch"
    alone = head_features(model, tok, [short])
    batched = head_features(model, tok, [short, long])
    assert torch.allclose(alone[0], batched[0], atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])
