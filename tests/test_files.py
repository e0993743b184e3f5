"""Atomic writes: a failed write leaves the previous file or folder, and no temporary debris."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinysft import files
from tinysft.files import atomic_save_dir, atomic_write_text


def test_atomic_write_text_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first ü\n")
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")

    def broken_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_save_dir_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    atomic_save_dir(target, lambda d: (d / "weights").write_text("v1"))

    def half_write(d: Path) -> None:
        (d / "weights").write_text("v2-partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_save_dir(target, half_write)
    assert (target / "weights").read_text() == "v1"
    atomic_save_dir(target, lambda d: (d / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
