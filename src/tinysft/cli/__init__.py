"""Command line: parse, call one library function, turn user errors into clean exits.

Every user error (bad data, bad config, missing model, ...) becomes one paragraph on stderr and
exit code 1; an unexpected failure prints a short note (exit 2) and the traceback only with
TINYSFT_DEBUG=1. ``base`` holds the app and the error handling; ``commands`` (data, training,
evaluation) and ``serving`` (merge, export, serve, ui) register their commands on it.
"""

from __future__ import annotations

from tinysft.cli import commands, serving  # noqa: F401  (registers the commands on the app)
from tinysft.cli.base import app, clean_errors, user_errors

__all__ = ["app", "clean_errors", "main", "user_errors"]


def main() -> None:
    import atexit
    import gc

    from tinysft.models.cpu.allocator import cap_onednn_cache, reexec_with_tcmalloc

    cap_onednn_cache()  # in the environment before the re-exec, so every command has it
    reexec_with_tcmalloc()
    # At exit, the interpreter's last garbage collections walk every object torch, transformers and
    # peft created (about a second after a model was loaded); frozen objects are skipped.
    atexit.register(gc.freeze)
    app(prog_name="tinysft")


if __name__ == "__main__":
    main()
