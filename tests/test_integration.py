"""The real embedded model (SmolLM2-135M-Instruct): a short fine-tune changes its answers.

Marked `integration`: slower than the unit tests (about a minute), and CI runs them.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.integration

TRAINED_LORA: dict[str, dict[str, float]] = {}  # name -> (sum, abs sum) of each LoRA tensor training saved


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from peft import PeftModel

    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    run = tmp_path_factory.mktemp("real") / "run"
    cfg = load_config(None, parse_overrides([
        f"data.train={EXAMPLES / 'polite-helper' / 'seed.jsonl'}", "train.epochs=2", "train.learning_rate=1e-3",
        "train.batch_size=8", "train.log_every=1"]))
    # A spy, not a stand-in: records the LoRA tensors of the model training saves, then saves as usual.
    original = PeftModel.save_pretrained

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        TRAINED_LORA.clear()
        TRAINED_LORA.update({n.replace(".default", ""): {"sum": float(p.detach().float().sum()),
                                                         "abs": float(p.detach().float().abs().sum())}
                             for n, p in self.named_parameters() if "lora_" in n})
        return original(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(PeftModel, "save_pretrained", spy)
    try:
        train(cfg, run, show_progress=False, log=lambda m: None)
    finally:
        mp.undo()
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
    print("integration figures:", len(changed), "of", len(comp.rows), "changed;",
          {side: {k: comp.metrics[side].get(k) for k in ("polite_rate", "refusal_rate")} for side in ("base", "tuned")})
    # Measured (one run, 2026-12-07): 5 of 6 changed.
    assert len(changed) >= 3, [(r["base_answer"], r["tuned_answer"]) for r in comp.rows]
    # Changed into text, not symbol soup: every tuned answer has a few tokens, most of them words.
    # Measured (one run): the lowest share was 29 of 32 tokens on the harmful prompt, an answer that
    # repeats itself (9 distinct tokens), so repetition is not bounded here; the four before it were
    # >= 0.8, the last (task) was not reached in that run.
    for r in comp.rows:
        tokens = r["tuned_answer"].split()
        words = [t for t in tokens if re.fullmatch(r"[\w'’.,;:!?()\"-]+", t)]
        assert len(tokens) >= 3 and len(words) >= 0.6 * len(tokens), r
    assert paths["html"].is_file() and paths["md"].read_text().count("|") > 20


def test_peft_loads_real_adapter_in_fresh_process(real_run: Path) -> None:
    from tinysft.models.registry import cached_path

    # Every LoRA tensor PEFT loads in a fresh process is the one training held in memory (PEFT only
    # warns about keys it cannot place, leaving those at their initial values).
    code = (
        "import json; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
        f"base = AutoModelForCausalLM.from_pretrained({str(cached_path('smollm2-135m-instruct'))!r});"
        f"m = PeftModel.from_pretrained(base, {str(real_run / 'adapter')!r});"
        "print(json.dumps({n.replace('.default', ''): {'sum': float(p.float().sum()), 'abs': float(p.float().abs().sum())}"
        " for n, p in m.named_parameters() if 'lora_' in n}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert TRAINED_LORA and loaded.keys() == TRAINED_LORA.keys()
    for name, want in TRAINED_LORA.items():
        assert loaded[name] == pytest.approx(want, rel=1e-5, abs=1e-6), name
