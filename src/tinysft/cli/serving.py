"""Commands that ship a run: merge, export, serve, ui, votes export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinysft.cli.base import (
    AllowOtherBase,
    AllowPickle,
    TrustRemoteCode,
    _log,
    app,
    clean_errors,
    loads_runs,
    out,
)


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
