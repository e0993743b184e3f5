"""Output ownership: ``--force`` replaces only what tinysft wrote, and never a run, an input or a user's file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tinysft.files import (
    OUTPUT_MARKER,
    OutputError,
    check_replaceable,
    mark_output,
    output_kind,
    replace_output,
    write_output_text,
)


def _merged(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    mark_output(folder, "merge")
    return folder


def _run(folder: Path) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    return folder


def test_a_marked_folder_of_its_own_files_is_replaceable(tmp_path: Path) -> None:
    merged = _merged(tmp_path / "merged")
    check_replaceable(merged)
    check_replaceable(merged, kind="merge")
    check_replaceable(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")


@pytest.mark.parametrize("case", ["unmarked", "user-file-added", "file-changed", "holds-a-run", "other-kind",
                                  "is-protected", "contains-protected", "symlink"])
def test_refused_folders(tmp_path: Path, case: str) -> None:
    target = tmp_path / "out"
    if case == "unmarked":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        _merged(target)
    if case == "user-file-added":
        (target / "notes.txt").write_text("mine")
    if case == "file-changed":
        (target / "config.json").write_text('{"edited": "by the user"}')
    if case == "holds-a-run":
        _run(target / "runs" / "a")
    protected = []
    if case == "is-protected":
        protected = [target]
    if case == "contains-protected":
        protected = [target / "config.json"]
    if case == "symlink":
        os.symlink(target, tmp_path / "link")
        target = tmp_path / "link"
    with pytest.raises(OutputError, match=re.escape(str(target))) as info:
        check_replaceable(target, protected=protected, kind="run" if case == "other-kind" else None)
    assert "choose another --out" in str(info.value)


def test_a_run_folder_marked_as_a_run_accepts_its_own_layout(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    mark_output(run, "run")
    (run / "checkpoints" / "step-1").mkdir(parents=True)  # written after the mark, in the run's layout
    (run / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (run / "report.md").write_text("# report")
    check_replaceable(run, kind="run")
    (run / "my-notes.md").write_text("mine")
    with pytest.raises(OutputError, match=r"my-notes\.md"):
        check_replaceable(run, kind="run")


def test_files_are_replaceable_only_while_recorded_and_unchanged(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    write_output_text(answers, "{}\n", kind="answers")
    assert output_kind(answers) == "answers"
    write_output_text(answers, '{"a": 1}\n', kind="answers")  # a rerun replaces its own output
    answers.write_text("edited by hand\n")
    os.utime(answers, ns=(1, 1))
    with pytest.raises(OutputError, match="not written by tinysft"):
        write_output_text(answers, "{}\n", kind="answers")
    assert answers.read_text() == "edited by hand\n"
    mine = tmp_path / "prompts.jsonl"
    mine.write_text("{}\n")
    with pytest.raises(OutputError, match="input of this command"):
        write_output_text(mine, "{}\n", kind="answers", protected=[mine])


def test_replace_output_marks_and_refuses_a_foreign_target(tmp_path: Path) -> None:
    tmp = tmp_path / ".new"
    tmp.mkdir()
    (tmp / "w").write_text("new")
    replace_output(tmp, tmp_path / "out", kind="merge")
    assert (tmp_path / "out" / OUTPUT_MARKER).is_file() and output_kind(tmp_path / "out") == "merge"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    tmp.mkdir()
    with pytest.raises(OutputError):
        replace_output(tmp, home, kind="merge")
    assert (home / "thesis.tex").read_text() == "years of work"
