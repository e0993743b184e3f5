"""End-to-end flows built from the stages: evaluate a run, and the demo.

Like cli.py this sits at the end of the flow and may import every stage; no stage imports it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tinysft.evaluate.compare import Comparison
from tinysft.files import atomic_write_text, check_replaceable, mark_output


def default_forgetting_set() -> Path:
    """The general-knowledge Q&A set shipped in examples/ (TINYSFT_EXAMPLES overrides the folder)."""
    from tinysft.shipped import examples_dir

    return examples_dir() / "general-knowledge" / "forgetting.jsonl"


def evaluate_run(run_dir: str | Path, prompt_files: list[str], out_dir: str | Path, *,
                 max_new_tokens: int | None = None, eval_data: list[str] | None = None,
                 forgetting: str | Path | None = None, batch_size: int | None = None,
                 show_progress: bool = False, log: Callable[[str], None] = print) -> tuple[dict[str, Path], Comparison]:
    """Load a run, answer every prompt with the adapter off and on, score both, write the report.

    ``eval_data``: held-out chat files for loss / perplexity (None = the run's data.eval; [] = none).
    ``forgetting``: a general-knowledge prompt file scored before/after (None = no forgetting check).
    Every input file is read and validated before the model is loaded.
    """
    from tinysft.data.validate import DataError, Problem, load_conversations, load_prompts
    from tinysft.evaluate.compare import answer_limits, compare, with_loss
    from tinysft.evaluate.perplexity import heldout_loss
    from tinysft.evaluate.report import write_report
    from tinysft.models.load import load_run

    if not prompt_files:
        raise DataError([Problem("(eval)", None, "prompts", "no prompt file given", "pass --prompts FILE.jsonl")])
    run = Path(run_dir)
    from tinysft.config import load_config

    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    prompts = load_prompts(prompt_files)
    forget = load_prompts([forgetting]) if forgetting else []
    answer_limits(prompts + forget, 1)  # a bad per-row answer cap is a DataError now, not after the model loads
    loss_files = list(eval_data) if eval_data is not None else (list(cfg.data.eval) if cfg else [])
    heldout = load_conversations(loss_files) if loss_files else []

    loaded = load_run(run_dir, log=log)
    cfg = loaded.config
    limit = max_new_tokens or cfg.eval.max_new_tokens
    log(f"Generating base and tuned answers for {len(prompts)} prompts"
        + (f" and {len(forget)} forgetting-set questions" if forget else "") + "...")
    with _progress(show_progress, 2 * (len(prompts) + len(forget)), "generate") as advance:
        comp = compare(loaded.model, loaded.tokenizer, prompts, max_new_tokens=limit,
                       batch_size=batch_size or cfg.eval.batch_size, system_prompt=cfg.data.system_prompt,
                       forgetting=forget, temperature=cfg.eval.temperature, on_batch=advance)
    if heldout:
        log(f"Scoring held-out loss on {len(heldout)} conversations ({', '.join(map(str, loss_files))})...")
        figures = heldout_loss(loaded.model, loaded.tokenizer, heldout, max_length=cfg.data.max_length,
                               batch_size=cfg.train.batch_size, system_prompt=cfg.data.system_prompt)
        comp = with_loss(comp, {side: f.to_dict() for side, f in figures.items()})
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else None
    config = cfg.to_dict()
    config["evaluation"] = {"prompts": [str(p) for p in prompt_files], "eval_data": [str(p) for p in loss_files],
                            "forgetting": str(forgetting) if forgetting else None, "max_new_tokens": limit}
    paths = write_report(comp, out_dir, title=f"tinysft before / after — {run.resolve().name}", run_dir=run,
                         config=config, manifest=manifest)
    return paths, comp


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields the function that advances it (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def summary_table(comp: Comparison) -> Any:
    """The report's summary (metric, n, base, tuned, change) as a rich table for the terminal: rates
    with their 95% intervals, a verdict colour only on a clear change (summary.INTERVAL_RULE)."""
    from rich.markup import escape
    from rich.table import Table

    from tinysft.evaluate.summary import INTERVAL_RULE, summary_rows

    table = Table(title="Base vs tuned", caption=escape(INTERVAL_RULE))
    table.add_column("metric")
    table.add_column("n", justify="right")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    style = {"better": "green", "worse": "red"}
    for r in summary_rows(comp):
        text = escape(r.change)
        table.add_row(escape(r.label), r.n, escape(r.base), escape(r.tuned),
                      f"[{style[r.verdict]}]{text}[/]" if r.verdict in style else text)
    return table


def run_demo(example_dir: Path, out_dir: Path, *, quick: bool = False,
             log: Callable[[str], None] = print) -> tuple[dict[str, Path], Comparison, float]:
    """Fetch the embedded model, check the built-in data, train, and write the before/after report."""
    from tinysft.config import load_config
    from tinysft.data.stats import check_chat
    from tinysft.models.registry import DEFAULT_CAUSAL, ensure_embedded
    from tinysft.training import TrainError, train

    start = time.time()
    config_file = example_dir / ("config-quick.yaml" if quick else "config.yaml")
    cfg = load_config(config_file)
    if out_dir.exists() and any(out_dir.iterdir()):
        manifest = out_dir / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("demo")):
            raise TrainError(f"{out_dir} exists and is not a previous demo run; choose another --out.")
        check_replaceable(out_dir, kind="run", protected=[example_dir])  # only what tinysft wrote there
        shutil.rmtree(out_dir)  # a previous demo: start afresh
    log("[1/4] Embedded model")
    ensure_embedded(DEFAULT_CAUSAL, log=log)
    log("[2/4] Checking the built-in data")
    from tinysft.models.load import load_tokenizer, resolve_model_path

    report = check_chat(cfg.data.train, tokenizer=lambda: load_tokenizer(resolve_model_path(cfg.model.name, log=log)),
                        max_length=cfg.data.max_length)
    assert report.stats is not None
    log(f"      {report.stats.rows} conversations, {sum(report.token_lengths):,} tokens, "
        f"categories: {', '.join(f'{k} {v}' for k, v in report.stats.categories.most_common())}")
    log(f"[3/4] Training LoRA (r={cfg.lora.r}) for {cfg.train.epochs:g} epochs")
    train(cfg, out_dir, log=log)
    _mark_demo(out_dir)
    log("[4/4] Evaluating base vs tuned")
    paths, comp = evaluate_run(out_dir, cfg.eval.prompts, out_dir, log=log)
    return paths, comp, time.time() - start


def _mark_demo(run_dir: Path) -> None:
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["demo"] = True
    atomic_write_text(path, json.dumps(data, indent=2))
    mark_output(run_dir, "run")
