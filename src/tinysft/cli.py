"""Command line: parse, call one library function, turn user errors into clean exits.

Every user error (bad data, bad config, missing model, ...) becomes one paragraph on stderr and
exit code 1; an unexpected failure prints a short note (exit 2) and the traceback only with
TINYSFT_DEBUG=1.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tinysft.files import check_replaceable, write_output_text
from tinysft.shipped import examples_dir

# Quiet the libraries' own progress bars and deprecation chatter; tinysft prints its own progress.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA / QLoRA fine-tuning for small language models, with a before/after report.\n\n"
                  "Shell completion: tinysft --install-completion (bash, zsh, fish, PowerShell).")
data_app = typer.Typer(no_args_is_help=True, help="Validate and inspect training data.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one paragraph per error, not wrapped at 80 columns

EXAMPLES = examples_dir()


def _hide_flag_types() -> None:
    """typer's help shows `<bool>` beside on/off flags (`--strict <bool>`), which reads as if a value
    were expected (`--strict true` then fails): show flags bare, as click does."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_bare", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_bare = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()


def _version(value: bool) -> None:
    if value:
        from tinysft import __version__

        out.print(f"tinysft {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """LoRA / QLoRA fine-tuning for small language models, with a before/after report.

    Shell completion: tinysft --install-completion (bash, zsh, fish, PowerShell).
    """


def user_errors() -> tuple[type[BaseException], ...]:
    from tinysft.config import ConfigError
    from tinysft.data.formats import RowProblem
    from tinysft.data.render import RenderError
    from tinysft.data.validate import DataError
    from tinysft.files import OutputError
    from tinysft.models.registry import ModelError
    from tinysft.ports import PortError
    from tinysft.training import TrainError
    from tinysft.votes import VotesError

    return (ConfigError, DataError, RenderError, RowProblem, ModelError, TrainError, OutputError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, VotesError, PortError)


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: user errors -> 'error: ...' and exit 1; anything else -> exit 2 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _error("stopped; rerun with --resume to continue from the last checkpoint.", label="interrupted")
            raise typer.Exit(130) from None
        except user_errors() as e:
            from tinysft.data.validate import DataError

            if isinstance(e, DataError):
                _error(f"{len(e.problems)} problem(s) in the data:\n{e}")
            elif isinstance(e, FileExistsError | NotADirectoryError) and _file_in_the_way(e.filename):
                _error(f"{_file_in_the_way(e.filename)} is a file, so nothing can be written inside it — choose "
                       "an --out path whose folders are folders.")
            elif isinstance(e, OSError) and e.filename:
                _error(f"{e.filename}: {e.strerror or e} — check the path and its permissions.")
            else:
                _error(str(e))
            raise typer.Exit(1) from None
        except Exception as e:
            if _disk_full(e):
                _error(f"no space left on the device while writing {getattr(e, 'filename', None) or 'the output'} "
                       f"({_first_line(e)}) — free some disk space and run again; nothing partial was kept.")
                raise typer.Exit(1) from None
            return _internal(e)

    return wrapper


def _file_in_the_way(filename: Any) -> Path | None:
    """The regular file that sits where a folder of ``filename`` should be, if any."""
    if not filename:
        return None
    path = Path(os.fsdecode(filename))
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def _disk_full(e: BaseException) -> bool:
    """A full disk as Python reports it (ENOSPC / EDQUOT), and as safetensors (Rust: "os error 28") and
    torch's zip writer ("unexpected pos" after a short write) report it."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded")) or (
        "inline_container" in text and "unexpected pos" in text)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _error(message: str, label: str = "error") -> None:
    from rich.text import Text

    err.print(Text.assemble((f"{label}: ", "bold red"), message), highlight=False)


def _internal(e: Exception) -> None:
    if os.environ.get("TINYSFT_DEBUG") == "1":
        raise e
    _error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\nThis is a bug in tinysft or an "
           "unsupported setup. Rerun with TINYSFT_DEBUG=1 for the traceback.", label="internal error")
    raise typer.Exit(2)


MAX_NEW_TOKENS_HELP = "Longest answer in tokens (default: the run's eval.max_new_tokens, 160 unless set)"


def _log(msg: str) -> None:
    err.print(msg, highlight=False, markup=False)


# Commands that load a run folder. What loading may do beyond reading safetensors and JSON is granted
# here, on the command line, and never by the run folder's config.yaml (docs/security.md).
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run Python code shipped with the run's base model (only for models you trust)")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load pickle (.bin/.pt) weights, which can run code (only for files you trust)")]
AllowOtherBase = Annotated[bool, typer.Option(
    "--allow-other-base", help="Load the adapter on a base other than the one it was trained on")]


def loads_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: grant the command's --trust-remote-code / --allow-pickle / --allow-other-base to the
    run folders it loads (models.load.run_permissions)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tinysft.models.load import RunPermissions, run_permissions

        granted = RunPermissions(**{k: bool(kwargs.get(k, False))
                                    for k in ("trust_remote_code", "allow_pickle", "allow_other_base")})
        with run_permissions(granted):
            return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------------
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
    from tinysft.data import stats as data_stats

    cfg = load_config(config)  # no file: the defaults, which are training's defaults
    task = task or cfg.train.task
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
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together")] = 16,
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


@app.command()
@clean_errors
@loads_runs
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged model")],
    dtype: Annotated[str, typer.Option(help="Weights as float32, bfloat16 or float16 (or fp32, bf16, fp16)")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists")] = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Merge the adapter into the base: a plain safetensors folder, verified before it is written.

    Loads with transformers' AutoModelForCausalLM.from_pretrained, no PEFT needed.

    Example: tinysft merge runs/demo --out merged/demo
    """
    from tinysft.config import DTYPE_ALIASES, ConfigError
    from tinysft.export import merge_run

    dtype = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16 (or fp32, bf16, fp16; got {dtype!r}).")
    r = merge_run(run_dir, out_dir, dtype=dtype, force=force, log=_log)  # type: ignore[arg-type]
    out.print(f"Merged model written to {r.out} ({r.dtype}). Verified on {r.prompts} prompts: max logit "
              f"difference vs base + adapter {r.max_logit_diff:.2e} (tolerance {r.tolerance:.1e}).")


@app.command()
@clean_errors
@loads_runs
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    out_file: Annotated[Path, typer.Option("--out", help="Output file, e.g. model.gguf")],
    format_: Annotated[str, typer.Option("--format", help="Output format (gguf)")] = "gguf",
    type_: Annotated[str, typer.Option("--type", help="GGUF tensor type: f16, bf16, q8_0 or f32")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists")] = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """Merge the adapter and write a GGUF file for llama.cpp and friends, verified by reading it back.

    Example: tinysft export runs/demo --format gguf --type q8_0 --out demo-q8_0.gguf
    """
    from tinysft.config import ConfigError
    from tinysft.export import export_gguf

    if format_ != "gguf":
        raise ConfigError(f"--format {format_!r} is not supported; use --format gguf (or `tinysft merge` for safetensors).")
    if type_ not in ("f16", "bf16", "q8_0", "f32"):
        raise ConfigError(f"--type must be f16, bf16, q8_0 or f32 (got {type_!r}).")
    r = export_gguf(run_dir, out_file, gguf_type=type_, force=force, log=_log)  # type: ignore[arg-type]
    out.print(f"Wrote {r.out} ({r.type}, {r.size_bytes / 2**20:.1f} MiB). Verified: read back by transformers, "
              f"weights within {r.type} rounding (worst {r.max_weight_error:.1e}), greedy outputs identical on "
              f"{r.identical}/{r.prompts} prompts, {r.token_agreement:.0%} of {r.new_tokens}-token continuations agree "
              f"(max logit difference {r.max_logit_diff:.2e}).")


@app.command()
@clean_errors
@loads_runs
def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `tinysft train`")],
    host: Annotated[str, typer.Option(help="Address to bind; other than loopback exposes the server")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TINYSFT_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' (or set TINYSFT_API_KEY)")] = None,
    name: Annotated[str | None, typer.Option(help="Model id of the tuned model (default: the run folder's name)")] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens")] = 4096,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    allow_other_base: AllowOtherBase = False,
) -> None:
    """OpenAI-compatible server: /v1/models and /v1/chat/completions, base and tuned from one model.

    Example: tinysft serve runs/demo --port 8000   (then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x"))
    """
    from tinysft.serve import ServeLimits
    from tinysft.serve import serve as run_server

    limits = ServeLimits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens)
    run_server(run_dir, host=host, port=port, api_key=api_key, model_name=name, limits=limits, log=_log)


@app.command()
@clean_errors
def ui(
    run_dirs: Annotated[list[Path], typer.Argument(help="One run (base vs tuned) or two (run A vs run B)")],
    host: Annotated[str, typer.Option(help="Address to bind; other than loopback exposes the page")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TINYSFT_API_KEY",
                                                help="Require this key for the page and the API (or set TINYSFT_API_KEY)")] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for")] = 1024,
    one_copy: Annotated[bool, typer.Option("--one-copy", help="Load one run once: half the memory, the two "
                                           "answers then stream one after the other")] = False,
) -> None:
    """Web page: the two models' answers side by side, streamed; blind votes; the report.

    Example: tinysft ui runs/demo   (then open http://127.0.0.1:8000/ui/)
    """
    from tinysft.serve import ServeLimits
    from tinysft.ui import serve_ui

    serve_ui(run_dirs, host=host, port=port, api_key=api_key, limits=ServeLimits(max_tokens=max_tokens),
             one_copy=one_copy, log=_log)


votes_app = typer.Typer(no_args_is_help=True, help="Votes from the web page (`tinysft ui`).")
app.add_typer(votes_app, name="votes")


@votes_app.command("export")
@clean_errors
def votes_export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder whose votes.jsonl to read")],
    out: Annotated[Path, typer.Option(help="JSONL file to write (must not exist)")],
) -> None:
    """Write the decided blind votes as training rows: the preferred answer as the assistant turn,
    the other as `rejected`.

    Example: tinysft votes export runs/demo --out votes.jsonl   (then: tinysft train --data votes.jsonl
    --set train.preference_weight=0.1)
    """
    from tinysft.votes import export_votes

    rows, skipped = export_votes(run_dir, out)
    out_note = f" ({skipped} skipped: equal or blank answers)" if skipped else ""
    _log(f"Wrote {rows} training rows to {out}{out_note}.")


def main() -> None:
    from tinysft.models.cpu.allocator import cap_onednn_cache, reexec_with_tcmalloc

    cap_onednn_cache()  # in the environment before the re-exec, so every command has it
    reexec_with_tcmalloc()
    app(prog_name="tinysft")


if __name__ == "__main__":
    main()
