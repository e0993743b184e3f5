"""Writing files and folders so that a reader never sees a half-written one.

Every output of tinysft (run manifests, metrics, reports, adapters, checkpoints, generated answers)
is written under a temporary name in the same folder, then renamed into place: an interrupted or
failed write leaves the previous file (or nothing), never a truncated one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then rename it into place (never half-written)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- output ownership: what `--force` may replace ------------------------------------------------
# tinysft replaces or deletes only what it wrote itself. Two records say what that is:
#
# * a folder output (a merged model, a run) holds OUTPUT_MARKER, a JSON file naming its kind and
#   listing every file the folder held when it was marked (relative path -> size);
# * a single-file output (a .gguf, answers.jsonl, predictions.jsonl, a report file) is listed in
#   FILES_RECORD, one JSON file in the folder that holds it (name -> kind, size, mtime). One record
#   per folder rather than a sidecar per file: a folder of outputs gets one hidden file, not one
#   per output, and the record never claims the folder itself.
#
# Sizes (and a file's mtime) are compared when replacing: a file the user edited or swapped since
# tinysft wrote it no longer counts as tinysft's. Anything unlisted is the user's, and is never
# deleted: not with --force, not ever.
OUTPUT_MARKER = ".tinysft-output"
FILES_RECORD = ".tinysft-files"
# A training run's own layout (docs/DESIGN.md): files that appear in a run after it is marked.
RUN_FILES = {"config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "labels.json", "head_init.safetensors",
             "report.md", "report.json", "report.html", OUTPUT_MARKER, FILES_RECORD}
# votes.jsonl (the web page's blind votes) is left out on purpose: a person's judgements are theirs,
# so a run holding votes is never replaced by --force.
RUN_FOLDERS = {"adapter", "checkpoints", "tokenizer"}


class OutputError(ValueError):
    """An output path tinysft refuses to replace or delete; the message names the path and the fix."""


def _is_debris(name: str) -> bool:
    """Temporary names tinysft's own atomic writes use (``.NAME.tmp-PID``, ``.NAME.old-PID``)."""
    return name.startswith(".") and (".tmp" in name or ".old-" in name)


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != OUTPUT_MARKER}


def mark_output(path: str | Path, kind: str) -> None:
    """Record that tinysft wrote ``path`` (a folder or a file), so a later ``--force`` may replace it.

    A folder gets OUTPUT_MARKER (its kind and the files it holds now); a file is listed in its
    folder's FILES_RECORD. Call it once the output is complete (for a run: ``mark_output(run_dir,
    "run")``; files a run writes later, in its own layout, count as the run's). Marking again
    updates the record.
    """
    path = Path(path)
    if path.is_dir():
        marker = {"kind": kind, "files": _snapshot(path)}
        atomic_write_text(path / OUTPUT_MARKER, json.dumps(marker, indent=1, sort_keys=True))
        return
    st = path.stat()
    record = _read_json(path.parent / FILES_RECORD)
    record[path.name] = {"kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    atomic_write_text(path.parent / FILES_RECORD, json.dumps(record, indent=1, sort_keys=True))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def output_kind(path: str | Path) -> str | None:
    """The kind tinysft recorded for ``path`` (a marked folder or a recorded, unchanged file), else None."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_dir():
        kind = _read_json(path / OUTPUT_MARKER).get("kind")
        return kind if isinstance(kind, str) else None
    if path.is_file():
        entry = _read_json(path.parent / FILES_RECORD).get(path.name)
        st = path.stat()
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return str(entry.get("kind"))
        if path.name in RUN_FILES and is_run(path.parent):  # a run's own report.md etc.
            return "run-file"
    return None


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a training run: config.yaml beside adapter/ or checkpoints/."""
    return (folder / "config.yaml").is_file() and ((folder / "adapter").is_dir() or (folder / "checkpoints").is_dir())


def contains_run(folder: Path, max_depth: int | None = None) -> Path | None:
    """A training run below ``folder`` (not ``folder`` itself; at most ``max_depth`` levels down), or None."""
    level = [folder]
    depth = 0
    while level and (max_depth is None or depth < max_depth):
        depth += 1
        level = [p for d in level for p in sorted(d.iterdir()) if p.is_dir() and not p.is_symlink()]
        found = next((p for p in level if is_run(p)), None)
        if found is not None:
            return found
    return None


def _foreign_files(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Files in a marked folder that tinysft did not write (absent from the marker, or resized)."""
    listed = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    is_run = marker.get("kind") == "run"
    foreign = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (p.is_dir() and not p.is_symlink()) or _is_debris(p.name) or p.name in (OUTPUT_MARKER, FILES_RECORD):
            continue
        name = rel.as_posix()
        if name in listed and not p.is_symlink() and p.stat().st_size == listed[name]:
            continue
        if output_kind(p) is not None:  # a file output recorded in its folder's FILES_RECORD
            continue
        if is_run and (rel.parts[0] in RUN_FOLDERS or (len(rel.parts) == 1 and name in RUN_FILES)):
            continue
        foreign.append(name)
    return foreign


def check_replaceable(path: str | Path, *, protected: list[Path] | tuple[Path, ...] = (), kind: str | None = None) -> None:
    """Raise OutputError unless ``path`` may be deleted and written anew by tinysft.

    Allowed: a path that does not exist, an empty folder, a file tinysft recorded (unchanged since),
    and a folder tinysft marked (of ``kind``, when given) that holds only files tinysft wrote.
    Refused, whatever the flags: a symlink, a folder that is or contains any ``protected`` path
    (the command's input run, its data files), a folder that contains a training run, and anything
    with a file tinysft did not write.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    fix = "choose another --out, or move or delete it yourself if you really mean to replace it"
    resolved = path.resolve()
    for p in protected:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise OutputError(f"{path}: refusing to replace it: it {'is' if p == resolved else 'contains'} {p}, "
                              f"an input of this command — {fix}.")
    if path.is_symlink():
        raise OutputError(f"{path}: refusing to replace a symbolic link — {fix}.")
    if path.is_file():
        if output_kind(path) is None:
            raise OutputError(f"{path}: refusing to replace it: it was not written by tinysft (or was changed since), "
                              f"and --force only replaces tinysft's own outputs — {fix}.")
        return
    if not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    marker = _read_json(path / OUTPUT_MARKER)
    # Unmarked folders are refused without walking them (`--out ~ --force` must answer at once);
    # a shallow look only makes the message name a run the user is about to lose.
    run = contains_run(path, max_depth=None if marker else 2)
    if run is not None:
        raise OutputError(f"{path}: refusing to replace it: it contains the training run {run} — {fix}.")
    if not marker:
        raise OutputError(f"{path}: refusing to replace it: tinysft did not create this folder (no {OUTPUT_MARKER} "
                          f"marker), and --force only replaces tinysft's own outputs — {fix}.")
    if kind is not None and marker.get("kind") != kind:
        raise OutputError(f"{path}: refusing to replace it: it holds a tinysft {marker.get('kind')!r} output, not a "
                          f"{kind!r} one — {fix}.")
    foreign = _foreign_files(path, marker)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{path}: refusing to replace it: it holds files tinysft did not write ({shown}) — {fix}.")


def replace_output(tmp: str | Path, target: str | Path, *, kind: str,
                   protected: list[Path] | tuple[Path, ...] = ()) -> None:
    """Move a complete, verified output ``tmp`` (file or folder) to ``target``, marking it as tinysft's.

    ``target``, if it exists, is checked again with :func:`check_replaceable` right before it is
    replaced (the caller should also check before the expensive work, to fail early). A folder is
    swapped by two renames, so a crash leaves the old or the new folder, never a mix.
    """
    tmp, target = Path(tmp), Path(target)
    check_replaceable(target, protected=protected, kind=kind if tmp.is_dir() else None)
    if tmp.is_dir():
        mark_output(tmp, kind)
        if target.is_dir():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
        return
    os.replace(tmp, target)
    mark_output(target, kind)


def write_output_text(path: str | Path, text: str, *, kind: str, protected: list[Path] | tuple[Path, ...] = ()) -> None:
    """Write a single-file output (answers, predictions, a report) atomically and record it as tinysft's.

    An existing file at ``path`` is replaced only if tinysft wrote it (a rerun of the same command);
    the user's own file, or one of the command's inputs (``protected``), is refused.
    """
    path = Path(path)
    check_replaceable(path, protected=protected)
    atomic_write_text(path, text)
    mark_output(path, kind)
