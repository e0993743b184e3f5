"""The command line's shared parts: the app, clean exits for user errors, logging, shared options.

Every user error (bad data, bad config, missing model, ...) becomes one paragraph on stderr and
exit code 1; an unexpected failure prints a short note (exit 2) and the traceback only with
TINYSFT_DEBUG=1.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
    from tinysft.votes import VotesError

    # A TrainError exists only once tinysft.training is imported; importing it here would load torch
    # (seconds) just to report an error that came before training, such as an unreachable hub id.
    training = sys.modules.get("tinysft.training.checkpoints")
    return (ConfigError, DataError, RenderError, RowProblem, ModelError, OutputError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, VotesError, PortError,
            *((training.TrainError,) if training else ()))


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
