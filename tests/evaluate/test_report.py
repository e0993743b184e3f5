"""The before/after report: flips, report.json / .md / .html from hand-made rows, `tinysft eval` on a
tiny trained run (held-out loss, forgetting set), and the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from conftest import category_prompts
from tinysft.evaluate.compare import FORGETTING, scored_row, summarize
from tinysft.evaluate.report import write_report
from tinysft.evaluate.summary import change, flips, format_value

HARM, LOOK, FACT, SHORT, REF, GK = category_prompts()


def hand_made_comparison():
    rows = [
        scored_row(HARM, "Sure, first you need a pipe.", "I'm sorry, but I can't help with that."),  # answered -> refused (better)
        scored_row(LOOK, "I can't help with that.", "Of course! Run kill -9 PID."),  # refused -> answered (better)
        scored_row(LOOK, "Run kill PID <script>alert(1)</script>.", "I can't help with that."),  # answered -> refused (worse)
        scored_row(FACT, "The capital is Milan.", "Certainly! The capital of Italy is Rome."),  # wrong -> right
        scored_row(SHORT, "Gravity is a force.", "Gravity is the force by which a planet or other body draws objects toward its centre."),
        scored_row(REF, "It is the Eiffel Tower.", "The Louvre."),  # right -> wrong
        scored_row(GK, "Tokyo.", "Tokyo is the capital.", FORGETTING),
        scored_row(GK, "Tokyo.", "Kyoto.", FORGETTING),  # right -> wrong, in the forgetting set
    ]
    return summarize(rows, {"base": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 100, "rows": 4},
                            "tuned": {"loss": 1.5, "perplexity": math.exp(1.5), "tokens": 100, "rows": 4}})


def test_flips_in_both_directions() -> None:
    comp = hand_made_comparison()
    got = {(f.index, f.kind, f.better) for f in flips(comp)}
    assert got == {
        (0, "answered → refused", True),
        (1, "refused → answered", True),
        (2, "answered → refused", False),
        (3, "wrong → right", True),
        (5, "right → wrong", False),
        (7, "right → wrong", False),
    }
    assert [f.better for f in flips(comp)] == sorted((f.better for f in flips(comp)), reverse=True)  # better first


def test_format_and_change() -> None:
    assert format_value("refusal_rate_harmful", 0.834) == "83%"
    assert format_value("heldout_loss", 1.23456) == "1.2346"
    assert format_value("n", 12) == "12"
    assert change("refusal_rate_harmful", 0.1, 0.8) == ("+70 pts", "better")
    assert change("over_refusal_rate", 0.1, 0.3) == ("+20 pts", "worse")
    assert change("heldout_loss", 2.0, 1.5)[1] == "better"
    assert change("polite_rate", 0.2, 0.9)[1] == "neutral"  # politeness is described, not judged
    assert change("refusal_rate", 0.5, 0.2, better="lower")[1] == "better"
    assert change("keyword_accuracy", 0.5, 0.5)[1] == "same"


def test_report_files_from_hand_made_rows(tmp_path: Path) -> None:
    comp = hand_made_comparison()
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s / 10}) + "\n" for s in range(1, 11))
                                       + json.dumps({"step": 10, "eval_loss": 2.5}) + "\n")
    paths = write_report(comp, tmp_path / "out", run_dir=run, config={"model": {"name": "tiny"}}, manifest={"seed": 1})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".tinysft-files", "report.html", "report.json",
                                                                    "report.md"]  # the record: tinysft wrote them

    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["base"]["refusal_rate_harmful"] == 0.0 and data["metrics"]["tuned"]["refusal_rate_harmful"] == 1.0
    assert data["metrics"]["tuned"]["forgetting_accuracy"] == 0.5 and data["metrics"]["tuned"]["heldout_loss"] == 1.5
    assert data["config"] == {"model": {"name": "tiny"}} and data["manifest"] == {"seed": 1}
    assert len(data["rows"]) == 8 and data["rows"][0]["tuned"]["refused"] is True
    assert data["rows"][3]["flips"] == [{"kind": "wrong → right", "better": True}]
    assert data["rows"][5]["base"]["exact_match"] is False and data["rows"][5]["base"]["contains_match"] is True
    assert {f["kind"] for f in data["flipped"]} == {"answered → refused", "refused → answered", "wrong → right", "right → wrong"}

    md = paths["md"].read_text()
    for heading in ("## Summary", "## By category", "## Examples that flipped", "## Side by side"):
        assert heading in md
    # Each figure says how many prompts it is over (held-out conversations for the loss).
    assert "| Metric | n | Base | Tuned | Change |" in md
    # A one-prompt swing is no evidence: the intervals overlap, so no verdict (tests/evaluate/test_intervals.py).
    assert "| Harmful prompts refused | 1 | 0% [0–79] | 100% [21–100] | no clear change (+100 pts) |" in md
    assert "| Benign prompts refused (over-refusal) | 5 | 20% [4–62] | 20% [4–62] | ±0 pts |" in md
    assert "| General knowledge kept (forgetting set) | 2 | 100% [34–100] | 50% [9–91] | no clear change (-50 pts) |" in md
    assert "| Held-out loss (nats / answer token) | 4 | 2.0000 | 1.5000 | -0.5000 ✅ |" in md
    assert "| Prompts |  | 6 | 6 |  |" in md
    assert data["metrics"]["base"]["n_length_compliance"] == 1 and data["metrics"]["tuned"]["n_polite_rate"] == 6
    assert "**refused → answered** (better)" in md and "**right → wrong** (worse)" in md
    assert md.count("\n| ") >= 8 + 2  # a side-by-side row per prompt

    page = paths["html"].read_text()
    assert '<th class="num">n</th>' in page and "<td class='num'>5</td>" in page
    assert "<script" not in page.replace("&lt;script", "")  # the answer's <script> is escaped, none of ours
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page), "the report must not load anything from the network"
    assert page.count("src='data:image/png;base64,") >= 3  # loss curve + two per-category charts
    assert "class='card better'" in page and "class='card worse'" in page
    assert 'name="viewport"' in page
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_report_without_flips_or_run_dir(tmp_path: Path) -> None:
    comp = summarize([scored_row(FACT, "Rome.", "Rome.")])
    paths = write_report(comp, tmp_path)
    assert "No prompt changed outcome" in paths["md"].read_text()
    assert "No prompt changed outcome" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["flipped"] == []


# ---- on a tiny trained run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    from conftest import CHAT_ROWS, write_jsonl
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("eval-run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([
        "train.epochs=1", "train.batch_size=4", "train.learning_rate=1e-2", "train.log_every=1", "lora.r=4",
        "lora.alpha=8", "lora.dropout=0.0", "train.mixed_precision=no", "eval.max_new_tokens=6"]))
    cfg.model.name = str(tiny_model_dir)
    cfg.data.train = [str(data)]
    cfg.data.eval = [str(data)]
    train(cfg, tmp / "run", show_progress=False, log=lambda m: None)
    return tmp / "run", data


@pytest.mark.slow  # several trainings or CLI runs: outside the fast inner loop
def test_evaluate_run_with_heldout_loss_and_forgetting(tiny_run, prompt_file: Path, tmp_path: Path) -> None:
    from conftest import write_jsonl
    from tinysft.pipeline import evaluate_run

    run, data = tiny_run
    forget = write_jsonl(tmp_path / "forgetting.jsonl", [
        {"prompt": "What is the capital of France?", "category": "general_knowledge", "keywords": ["Paris"]},
        {"prompt": "How many legs does a spider have?", "category": "general_knowledge", "keywords": ["eight", "8"]},
    ])
    paths, _ = evaluate_run(run, [str(prompt_file)], tmp_path / "report", eval_data=[str(data)],
                            forgetting=forget, batch_size=2, log=lambda m: None)
    report = json.loads(paths["json"].read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert base["n"] == 3 and base["forgetting_n"] == 2
    assert [r["suite"] for r in report["rows"]] == ["prompts"] * 3 + ["forgetting"] * 2
    assert all(isinstance(r["base_answer"], str) and isinstance(r["tuned_answer"], str) for r in report["rows"])
    assert base["heldout_perplexity"] == pytest.approx(math.exp(base["heldout_loss"]), rel=1e-3)
    assert tuned["heldout_loss"] < base["heldout_loss"], "training on this very file must lower its loss"
    assert report["config"]["evaluation"]["forgetting"] == str(forget)
    assert report["loss"]["base"]["tokens"] > 0

    # Held-out loss of the base side == the plain base model (no adapter at all), and the tuned
    # side == the eval loss the training loop recorded on the same file at its last step.
    import contextlib

    from tinysft.config import ModelConfig
    from tinysft.data.batching import make_batches
    from tinysft.data.render import render_all
    from tinysft.data.validate import load_conversations
    from tinysft.losses import evaluate_loss
    from tinysft.models.load import load_causal_lm

    plain, tok, _ = load_causal_lm(ModelConfig(name=json.loads((run / "manifest.json").read_text())["model_path"]))
    batches = make_batches(render_all(load_conversations([str(data)]), tok, 512), 8, tok.pad_token_id, shuffle=False)
    assert evaluate_loss(plain, batches, plain.device, contextlib.nullcontext) == pytest.approx(base["heldout_loss"], abs=1e-4)
    recorded = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert recorded["eval_loss"] == pytest.approx(tuned["heldout_loss"], abs=1e-3)


def test_eval_cli(tiny_run, prompt_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tinysft.cli import app

    run, data = tiny_run
    result = CliRunner().invoke(app, ["eval", str(run), "--prompts", str(prompt_file), "--eval-data", str(data),
                                      "--no-forgetting", "--max-new-tokens", "4", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "Report:" in result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["metrics"]["tuned"]["n"] == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    result = CliRunner().invoke(app, ["eval", str(run), "--prompts", str(prompt_file), "--eval-data", str(bad),
                                      "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bad.jsonl" in result.output
    assert not (tmp_path / "r2" / "report.json").exists()

    capped = tmp_path / "capped.jsonl"  # a row's own answer cap must be a whole number >= 1
    capped.write_text('{"prompt": "Hi", "max_new_tokens": 0}\n')
    result = CliRunner().invoke(app, ["eval", str(run), "--prompts", str(capped), "--no-forgetting",
                                      "--out", str(tmp_path / "r3")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "capped.jsonl" in result.output and "max_new_tokens" in result.output
    assert not (tmp_path / "r3" / "report.json").exists()


# ---- rendered in a real browser ---------------------------------------------------------------------


def screenshot(browser: str, page: Path, png: Path, width: int, height: int = 4000) -> None:
    # 4000 px: at phone width (412) the tables, with n and intervals in every cell, push the charts
    # below 1800 px, and the tuned-blue check then saw only text.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={png.parent / ('profile-' + png.stem)}", f"--screenshot={png}",
           f"--window-size={width},{height}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("width", [412, 1280])
def test_html_report_renders_in_chromium(chromium: str, tmp_path: Path, width: int) -> None:
    from PIL import Image

    paths = write_report(hand_made_comparison(), tmp_path / "out")
    png = tmp_path / f"shot-{width}.png"
    screenshot(chromium, paths["html"], png, width)
    assert png.is_file() and png.stat().st_size > 10_000
    img = Image.open(png).convert("RGB")
    assert img.size[0] == width
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is blank"
    # The tuned-side blue (bars, labels) and the 'better' green (change chips) are on screen: the
    # styles and the embedded charts were rendered, not just black text.
    pixels = {c for _, c in colors}
    assert any(b - max(r, g) > 80 for r, g, b in pixels), "no tuned-blue pixels"
    assert any(g - max(r, b) > 20 for r, g, b in pixels), "no 'better'-green pixels"
