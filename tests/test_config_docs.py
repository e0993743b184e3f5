"""docs/config.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import dataclasses

from tinysft.config import SECTIONS
from tinysft.config_docs import DOC_PATH, field_docs, main, render_config_reference


def test_docs_config_md_is_up_to_date() -> None:
    assert main(["--check"]) == 0, "docs/config.md is out of date: run `python -m tinysft.config_docs`"
    assert DOC_PATH.read_text(encoding="utf-8") == render_config_reference()


def test_every_key_is_documented_in_the_reference() -> None:
    text = render_config_reference()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring in config.py"
            assert f"| `{section}.{f.name}` |" in text
    assert "| `train.max_steps` | int | `0` |" in text
