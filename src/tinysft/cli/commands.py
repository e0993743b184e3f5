"""Commands that check data, train and evaluate: models, data check, train, generate, eval, predict, chat, demo."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tinysft.cli.base import (
    EXAMPLES,
    MAX_NEW_TOKENS_HELP,
    AllowOtherBase,
    AllowPickle,
    TrustRemoteCode,
    _log,
    app,
    clean_errors,
    data_app,
    err,
    loads_runs,
    out,
)
from tinysft.files import check_replaceable, write_output_text


@app.command()
@clean_errors
def models() -> None:
    """List the embedded default models and where they are cached.

    Example: tinysft models
    """
    from tinysft.models.cpu.allocator import allocator_in_use
    from tinysft.models.load import fast_bf16_available
    from tinysft.models.registry import list_models, tinysft_home

    out.print(f"Embedded models (cache: {tinysft_home()})", highlight=False)
    for row in list_models():
        out.print(f"\n[bold]{row['name']}[/bold]  ({row['kind']})  {row['description']}", highlight=False)
        out.print(f"  source: {row['source']}\n  cache:  {row['status']}", highlight=False, soft_wrap=True)
    cpu_dtype = "bf16" if fast_bf16_available("cpu") else "fp32 (bf16 matmuls are not faster on this CPU)"
    out.print(f"\nThis machine: CPU training computes in {cpu_dtype}; memory allocator: {allocator_in_use()}",
              highlight=False)


@data_app.command("check")
@clean_errors
def data_check(
    files: Annotated[list[Path], typer.Argument(help="JSONL files to validate")],
    model: Annotated[str | None, typer.Option(help="Model whose tokenizer and chat template measure lengths [default: the config's, else smollm2-135m-instruct]")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Training truncates rows to this many tokens [default: the config's data.max_length, else 512]")] = None,
    show_mask: Annotated[int, typer.Option("--show-mask", min=0, help="Print N rendered rows, trained tokens highlighted")] = 0,
    task: Annotated[str | None, typer.Option(help="sft or classify [default: the config's train.task, else sft]")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exact duplicate rows are errors (exit 1), not just counted")] = False,
    config: Annotated[Path | None, typer.Option(help="Training config: check with its model, data.max_length, data.system_prompt and task")] = None,
    chat_template: Annotated[str | None, typer.Option(
        "--chat-template", help="For a model without one: chatml, zephyr, plain or a Jinja file (model.chat_template)")] = None,
) -> None:
    """Validate data files and print stats; exit 1 with every problem listed.

    The rows are checked with the trainer's own rules (rendered and truncated as training does), so
    pass the options you train with (or --config with the training config).

    Example: tinysft data check examples/polite-helper/train.jsonl --show-mask 2
    """
    from tinysft.config import load_config
    from tinysft.models.registry import check_hub_id

    cfg = load_config(config)  # no file: the defaults, which are training's defaults
    task = task or cfg.train.task
    if task != "classify":
        check_hub_id(model or cfg.model.name, log=_log)  # an unreachable hub id fails in seconds
    from tinysft.data import stats as data_stats

    if task == "classify":
        report = data_stats.check_labeled([str(f) for f in files], strict=strict)
    else:
        report = data_stats.check_chat([str(f) for f in files],
                                       tokenizer=tokenizer_loader(model or cfg.model.name,
                                                                  chat_template or cfg.model.chat_template),
                                       max_length=max_length or cfg.data.max_length, show_mask=show_mask,
                                       strict=strict, system_prompt=cfg.data.system_prompt)
    data_stats.print_report(report, out)


def tokenizer_loader(model: str | None, chat_template: str | None = None) -> Callable[[], Any] | None:
    """A function that loads ``model``'s tokenizer (None without a model), with ``chat_template``
    (model.chat_template) applied; a tokenizer left without a template is a user error naming the key."""
    if not model:
        return None

    def load() -> Any:
        from tinysft.data.templates import MISSING_TEMPLATE_FIX, apply_chat_template, has_chat_template
        from tinysft.models.load import load_tokenizer, resolve_model_path
        from tinysft.models.registry import ModelError

        path = resolve_model_path(model, log=_log)
        tokenizer = apply_chat_template(load_tokenizer(path), chat_template)
        if not has_chat_template(tokenizer):
            raise ModelError(f"{model}: the tokenizer has no chat template, so conversations cannot be rendered — "
                             f"{MISSING_TEMPLATE_FIX}.")
        return tokenizer

    return load


@app.command("train")
@clean_errors
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML config (optional)")] = None,
    model: Annotated[str | None, typer.Option(help="Embedded name, local folder, .gguf file or hub id")] = None,
    task: Annotated[str | None, typer.Option(help="sft or classify")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Training file(s)")] = None,
    eval_data: Annotated[list[str] | None, typer.Option("--eval-data", help="Held-out file(s) for eval loss")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: SECTION.KEY=VALUE")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory")] = Path("runs/latest"),
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it holds a run tinysft wrote (never another folder)")] = False,
) -> None:
    """Fine-tune with LoRA and write a run directory.

    Example: tinysft train examples/polite-helper/config.yaml --set train.epochs=2 --out runs/polite
    """
    from tinysft.config import load_config, parse_overrides

    overrides = parse_overrides(set_ or [])
    if model:
        overrides.setdefault("model", {})["name"] = model
    if task:
        overrides.setdefault("train", {})["task"] = task
    if data:
        overrides.setdefault("data", {})["train"] = data
    if eval_data:
        overrides.setdefault("data", {})["eval"] = eval_data
    cfg = load_config(config, overrides)
    from tinysft.models.registry import check_hub_id

    check_hub_id(cfg.model.name, log=_log)  # an unreachable hub id fails here, in seconds, before torch loads
    if force and out_dir.exists():
        import shutil

        from tinysft.files import check_replaceable

        # Only a run tinysft wrote (its marker, no foreign files), never the data or a folder holding runs.
        check_replaceable(out_dir, kind="run", protected=[Path(f) for f in cfg.data.train + cfg.data.eval])
        shutil.rmtree(out_dir)
    from tinysft.training import discard_unfinished

    with discard_unfinished(out_dir):  # a failed run leaves no half-written folder behind
        if cfg.train.task == "classify":
            from tinysft.training import train_classifier

            result = train_classifier(cfg, out_dir, resume=resume, log=_log, show_progress=not no_progress)
        else:
            from tinysft.training import train

            result = train(cfg, out_dir, resume=resume, log=_log, show_progress=not no_progress)
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: rank 0 alone reports
        return
    out.print(f"Done: {result.steps} steps in {result.seconds:.0f} s, final train loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + f". Run directory: {out_dir}")


@app.command()
@clean_errors
@loads_runs
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    prompts: Annotated[Path, typer.Option(help="JSONL rows with `prompt` or `messages`")],
    out_file: Annotated[Path, typer.Option("--out", help="Output JSONL (each input row + `response`)")],
    base: Annotated[bool, typer.Option("--base", help="Answer with the adapter disabled")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help=MAX_NEW_TOKENS_HELP)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Answers decoded together")] = 256,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Answer a file of prompts in batches; write each row back with a `response` field.

    Example: tinysft generate runs/demo --prompts examples/polite-helper/prompts.jsonl --out answers.jsonl
    """
    from rich.progress import Progress

    from tinysft.data.validate import load_prompts, read_rows
    from tinysft.evaluate.generate import generate_rows
    from tinysft.models.load import load_run

    check_replaceable(out_file, protected=[prompts])  # before the work: never the input, never the user's file
    rows = load_prompts([str(prompts)])
    raw = [r for _, r in read_rows(prompts, [])]
    loaded = load_run(run_dir, log=_log)
    with Progress(transient=True, console=err) as bar:
        task = bar.add_task("generate", total=len(rows))
        answers = generate_rows(loaded.model, loaded.tokenizer, rows, tuned=not base,
                                max_new_tokens=max_new_tokens or loaded.config.eval.max_new_tokens,
                                batch_size=batch_size, system_prompt=loaded.config.data.system_prompt,
                                on_batch=lambda n: bar.advance(task, n))
    text = "".join(json.dumps({**r, "response": a}, ensure_ascii=False) + "\n" for r, a in zip(raw, answers, strict=True))
    write_output_text(out_file, text, kind="answers", protected=[prompts])
    out.print(f"Wrote {len(answers)} answers to {out_file}")


@app.command("eval")
@clean_errors
@loads_runs
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    prompts: Annotated[list[Path] | None, typer.Option(help="Prompt JSONL file(s) (chat runs)")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="Labelled JSONL/CSV (classification runs)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default: the run directory)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help=MAX_NEW_TOKENS_HELP)] = None,
    eval_data: Annotated[list[Path] | None, typer.Option(
        "--eval-data", help="Held-out chat file(s) for base/tuned loss and perplexity (default: the run's data.eval)")] = None,
    forgetting: Annotated[bool, typer.Option(
        "--forgetting/--no-forgetting", help="Score the shipped general-knowledge set before/after")] = True,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Prompts generated together (default: the run's eval.batch_size)")] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Before/after report: base (adapter off) vs tuned (adapter on) on the same prompts.

    Writes report.md, report.json and report.html (charts, flipped examples; opens on a phone).

    Example: tinysft eval runs/demo --prompts examples/polite-helper/heldout.jsonl --eval-data examples/chat-bench/val.jsonl
    """
    from tinysft.config import load_config
    from tinysft.models.load import check_run_dir

    check_run_dir(run_dir)  # before any prompt file or model is read
    cfg = load_config(run_dir / "config.yaml")
    target = out_dir or run_dir
    for name in ("report.json", "report.md", "report.html"):  # refuse before the work, not after it
        check_replaceable(target / name, protected=[*(prompts or []), *(data or [])])
    if cfg.train.task == "classify":
        from tinysft.evaluate.classification import evaluate_classifier

        paths = evaluate_classifier(run_dir, [str(p) for p in (data or [])] or cfg.data.eval, target, log=_log)
        m = json.loads(paths["json"].read_text(encoding="utf-8"))["metrics"]
        out.print(f"Accuracy {m['base']['accuracy']:.3f} -> {m['tuned']['accuracy']:.3f}, weighted F1 "
                  f"{m['base']['f1_weighted']:.3f} -> {m['tuned']['f1_weighted']:.3f} (base -> tuned, {m['tuned']['n']} rows)")
        out.print(f"Report: {paths['md']}  ({paths['html']})")
        _adapter_card(run_dir, target)
        return
    from tinysft.pipeline import default_forgetting_set, evaluate_run, summary_table

    prompt_files = [str(p) for p in (prompts or [])] or cfg.eval.prompts
    forgetting_file = default_forgetting_set() if forgetting else None
    if forgetting_file and not forgetting_file.is_file():
        _log(f"note: no forgetting set at {forgetting_file}; skipping the forgetting check.")
        forgetting_file = None
    paths, comp = evaluate_run(run_dir, prompt_files, target, max_new_tokens=max_new_tokens,
                               eval_data=[str(p) for p in eval_data] if eval_data else None,
                               forgetting=forgetting_file, batch_size=batch_size, show_progress=True, log=_log)

    out.print(summary_table(comp))
    out.print(f"Report: {paths['md']}  ({paths['html']})")
    _adapter_card(run_dir, target)


def _adapter_card(run_dir: Path, report_dir: Path) -> None:
    """The adapter's README.md (model card) gains the before/after summary once the run is evaluated."""
    if report_dir.resolve() == run_dir.resolve() and (run_dir / "adapter").is_dir():
        from tinysft.model_card import write_model_card

        write_model_card(run_dir / "adapter", run_dir)


@app.command()
@clean_errors
@loads_runs
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Classification run directory from `tinysft train --task classify`")],
    data: Annotated[Path, typer.Option(help="JSONL/CSV rows with `text` (or `question`); a label is optional")],
    out_file: Annotated[Path, typer.Option("--out", help="Output JSONL (each input row + `prediction`, `confidence`)")],
    base: Annotated[bool, typer.Option("--base", help="Predict with the adapter and trained head disabled")] = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Classify each row; write it back with `prediction` (a label) and `confidence` (its probability).

    Example: tinysft predict runs/news --data examples/news-topics/val.jsonl --out predictions.jsonl
    """
    from tinysft.evaluate.classification import predict_rows

    check_replaceable(out_file, protected=[data])
    rows, accuracy = predict_rows(run_dir, data, tuned=not base, log=_log)
    write_output_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), kind="predictions",
                      protected=[data])
    note = f" (accuracy {accuracy:.3f} against the rows' labels)" if accuracy is not None else ""
    out.print(f"Wrote {len(rows)} predictions to {out_file}{note}")


@app.command()
@clean_errors
@loads_runs
def chat(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    base: Annotated[bool, typer.Option("--base", help="Start with the adapter disabled (switch with /tuned)")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help=MAX_NEW_TOKENS_HELP)] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy (reproducible); e.g. 0.7 to sample")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling when temperature > 0")] = 0.9,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the run's data.system_prompt)")] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Talk to a run in the terminal; answers stream as they are generated.

    Inside: /base and /tuned switch the adapter off/on, /reset starts over, /exit leaves.

    Example: tinysft chat runs/demo
    """
    from tinysft.chat import ChatSession, repl
    from tinysft.models.load import load_run

    if temperature < 0 or not 0 < top_p <= 1:
        from tinysft.config import ConfigError

        raise ConfigError(f"--temperature must be >= 0 and --top-p in (0, 1] (got {temperature}, {top_p}).")
    loaded = load_run(run_dir, log=_log)
    session = ChatSession(loaded.model, loaded.tokenizer, tuned=not base,
                          max_new_tokens=max_new_tokens or loaded.config.eval.max_new_tokens,
                          temperature=temperature, top_p=top_p,
                          system_prompt=system if system is not None else loaded.config.data.system_prompt)
    repl(session, banner=f"tinysft chat · {run_dir} · base model {loaded.config.model.name}")


@app.command()
@clean_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory for the demo")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="Seed data only, fewer prompts (about a minute)")] = False,
) -> None:
    """The whole story on the embedded model: fetch, check data, train, compare base vs tuned.

    Example: tinysft demo --out runs/demo
    """
    from tinysft.pipeline import run_demo, summary_table

    paths, comp, seconds = run_demo(EXAMPLES / "polite-helper", out_dir, quick=quick, log=_log)
    out.print(summary_table(comp))
    out.print(f"Demo finished in {seconds:.0f} s. Report: {paths['md']} (open {paths['html']} in a browser)")
