"""The real embedded model (SmolLM2-135M-Instruct): a short fine-tune changes its answers.

Marked `integration`: slower than the unit tests (about a minute), and CI runs them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    run = tmp_path_factory.mktemp("real") / "run"
    cfg = load_config(None, parse_overrides([
        f"data.train={EXAMPLES / 'polite-helper' / 'seed.jsonl'}", "train.epochs=2", "train.learning_rate=1e-3",
        "train.batch_size=8", "train.log_every=1"]))
    train(cfg, run, show_progress=False, log=lambda m: None)
    return run


def test_real_model_learns_and_answers_change(real_run: Path) -> None:
    from tinysft.pipeline import evaluate_run

    history = [json.loads(x) for x in (real_run / "metrics.jsonl").read_text().splitlines()]
    # Epoch means, not the first and last step: steps are different batches (shuffled, of mixed
    # lengths), each epoch is the same conversations.
    first = [h["loss"] for h in history if "loss" in h and h["epoch"] <= 1.0]
    second = [h["loss"] for h in history if "loss" in h and h["epoch"] > 1.0]
    assert first and second and sum(second) / len(second) < sum(first) / len(first), (first, second)
    paths, comp = evaluate_run(real_run, [str(EXAMPLES / "polite-helper" / "prompts.jsonl")], real_run / "report",
                               max_new_tokens=48, log=lambda m: None)
    changed = [r for r in comp.rows if r["base_answer"] != r["tuned_answer"]]
    assert len(changed) >= 3, [(r["base_answer"], r["tuned_answer"]) for r in comp.rows]
    assert paths["html"].is_file() and paths["md"].read_text().count("|") > 20


def test_peft_loads_real_adapter_in_fresh_process(real_run: Path) -> None:
    from tinysft.models.registry import cached_path

    code = (
        "from transformers import AutoModelForCausalLM; from peft import PeftModel;"
        f"base = AutoModelForCausalLM.from_pretrained({str(cached_path('smollm2-135m-instruct'))!r});"
        f"m = PeftModel.from_pretrained(base, {str(real_run / 'adapter')!r}); print(type(m).__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PeftModel" in proc.stdout
