"""Classification runs after training: load, predict, and evaluate base vs tuned.

The base is the same model with the adapter (and the trained head) disabled: the head training
started from, either the run's head_init.safetensors (a linear probe on the frozen embeddings) or the
random head seeded as in training. So "base" is the classifier training started from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinysft.config import RunConfig
from tinysft.data.formats import LABEL_FORMATS
from tinysft.data.validate import DataError, Problem, load_labeled, read_rows
from tinysft.evaluate.classification_metrics import classification_metrics
from tinysft.evaluate.classification_report import write_classification_report
from tinysft.models.encoder import HEAD_INIT_FILE, class_logits, load_encoder, max_length_for, probe_head
from tinysft.models.identity import check_same_base
from tinysft.models.load import granted_permissions, load_run_config
from tinysft.models.registry import ModelError


@dataclass
class LoadedClassifier:
    model: Any  # PeftModel: adapter enabled = tuned, `with model.disable_adapter()` = base (the starting head)
    tokenizer: Any
    labels: list[str]
    config: RunConfig
    run_dir: Path
    max_length: int
    device: torch.device


def load_classifier_run(run_dir: str | Path, device: torch.device | str | None = None,
                        log: Callable[[str], None] = print) -> LoadedClassifier:
    """Load a classification run directory: the base encoder with its adapter and head."""
    import peft

    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{run_dir}: not a tinysft run directory (no config.yaml) — pass the run folder that training wrote (its --out).")
    cfg = load_run_config(run_dir, log=log)  # never trust_remote_code / allow_pickle from the run folder
    if cfg.train.task != "classify":
        raise ModelError(f"{run_dir}: this is a chat (sft) run; use `tinysft generate` or `tinysft eval --prompts`.")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{run_dir}: no adapter/adapter_config.json — the run did not finish; rerun the same train command "
                         "with --resume (or train again).")
    labels_file = run_dir / "labels.json"
    labels = json.loads(labels_file.read_text(encoding="utf-8")) if labels_file.is_file() else cfg.data.labels
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not labels:
        raise ModelError(f"{run_dir}: no labels.json and no data.labels in config.yaml — the run is incomplete.")
    # Same seed as training: the base's untrained head is the one training started from.
    torch.manual_seed(cfg.train.seed)
    base, tokenizer, _, _ = load_encoder(cfg.model, labels, device, log=log)
    # The base the adapter was trained on (manifest "base"), unless the user said otherwise.
    check_same_base(run_dir, cfg.model.name, base, allow_other_base=granted_permissions().allow_other_base, log=log)
    head_init = run_dir / HEAD_INIT_FILE
    head_layer = probe_head(base)
    if head_init.is_file() and head_layer is not None:
        from safetensors.torch import load_file

        try:
            head_layer.load_state_dict(load_file(str(head_init)))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelError(f"{head_init}: does not fit the head of {cfg.model.name} ({first}); delete it to "
                             "compare against a random head, or train the run again.") from None
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"{adapter}: the adapter does not fit the base model {cfg.model.name} ({first}).") from None
    model.eval()
    return LoadedClassifier(model, tokenizer, list(labels), cfg, run_dir, max_length_for(cfg, base), device)


def predict_texts(loaded: LoadedClassifier, texts: list[str], *, tuned: bool = True,
                  batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) per text; ``tuned=False`` = adapter and trained head disabled."""
    def run() -> torch.Tensor:
        return class_logits(loaded.model, loaded.tokenizer, texts, max_length=loaded.max_length,
                            batch_size=batch_size, device=loaded.device)

    if tuned:
        logits = run()
    else:
        with loaded.model.disable_adapter():
            logits = run()
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return [(loaded.labels[int(i)], round(float(p[i]), 4)) for i, p in zip(best, probs, strict=True)]


def read_texts(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """Rows to classify (JSONL or CSV) with ``text`` or ``question``; a label is optional.

    Returns (row, text) pairs; every problem is collected into one DataError.
    """
    problems: list[Problem] = []
    out = []
    text_keys = [text_key for text_key, _ in LABEL_FORMATS.values()]
    for line, row in read_rows(path, problems):
        key = next((k for k in text_keys if isinstance(row, dict) and k in row), None)
        if key is None:
            problems.append(Problem(str(path), line, "(row)", "has no text to classify",
                                    'write {"text": "..."} (a "label" is optional)'))
        elif not isinstance(row[key], str) or not row[key].strip():
            problems.append(Problem(str(path), line, key, "must be a non-empty string", f'write "{key}": "..."'))
        else:
            out.append((row, row[key]))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([Problem(str(path), None, "(data)", "no rows found", "add rows to classify")])
    return out


def predict_rows(run_dir: str | Path, data_file: str | Path, *, tuned: bool = True,
                 log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], float | None]:
    """Each input row with ``prediction`` and ``confidence`` added, and the accuracy when every row
    carries a known label (``label``, or ``answer`` in seed-002 rows), else None."""
    items = read_texts(data_file)
    loaded = load_classifier_run(run_dir, log=log)
    predictions = predict_texts(loaded, [text for _, text in items], tuned=tuned)
    rows = [{**row, "prediction": label, "confidence": p} for (row, _), (label, p) in zip(items, predictions, strict=True)]
    gold = [str(r.get("label", r.get("answer", ""))).strip() for r, _ in items]
    accuracy = None
    if all(g in loaded.labels for g in gold):
        accuracy = sum(g == r["prediction"] for g, r in zip(gold, rows, strict=True)) / len(rows)
    return rows, accuracy


def evaluate_classifier(run_dir: str | Path, data_files: list[str], out_dir: str | Path,
                        log: Callable[[str], None] = print) -> dict[str, Path]:
    """Base (adapter off, untrained head) vs tuned on labelled rows; writes report.md/.json/.html."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not data_files:
        raise DataError([Problem("(command line)", None, "--data", "no labelled evaluation file given, and the run's "
                                 "config has no data.eval", "pass --data FILE.jsonl with {\"text\", \"label\"} rows")])
    loaded = load_classifier_run(run_dir, log=log)
    rows = load_labeled(data_files, loaded.labels)
    texts, gold = [r.text for r in rows], [r.label for r in rows]
    log(f"Classifying {len(rows)} rows with the base (starting head, no adapter) and the tuned model...")
    base = predict_texts(loaded, texts, tuned=False)
    tuned = predict_texts(loaded, texts, tuned=True)
    result = {
        "task": "classify",
        "run_dir": str(run_dir),
        "model": loaded.config.model.name,
        "data": [str(f) for f in data_files],
        "labels": loaded.labels,
        "metrics": {"base": classification_metrics(gold, [p for p, _ in base], loaded.labels),
                    "tuned": classification_metrics(gold, [p for p, _ in tuned], loaded.labels)},
        "rows": [{"text": r.text, "label": r.label, "source": r.source, "base": b, "base_confidence": bc,
                  "tuned": t, "tuned_confidence": tc} for r, (b, bc), (t, tc) in zip(rows, base, tuned, strict=True)],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_classification_report(result, out_dir, title=f"Classification report: {run_dir.name}", run_dir=run_dir)
