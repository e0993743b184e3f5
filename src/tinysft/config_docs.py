"""docs/config.md, generated from the config dataclasses: every key, its type, default and docstring.

    python -m tinysft.config_docs            # rewrite docs/config.md
    python -m tinysft.config_docs --check    # exit 1 if docs/config.md is out of date

The field docstrings in ``tinysft/config.py`` are the one source; tests/test_config_docs.py fails
when the file and the dataclasses disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from tinysft.config import SECTIONS

HEADER = """# Configuration reference

Every key of a tinysft config, generated from the dataclasses in `src/tinysft/config.py` by
`python -m tinysft.config_docs` (a test fails when this file is out of date: rerun it after
changing a field).

Set keys in a YAML file (one mapping per section) or on the command line with
`--set SECTION.KEY=VALUE`; flags (`--model`, `--data`, ...) override `--set`, which overrides the file,
which overrides these defaults. Lists take `a,b` on the command line, mappings `name:value,name:value`.
The resolved config is saved as `config.yaml` in every run directory.

```yaml
model: {name: smollm2-135m-instruct}
data: {train: [my.jsonl]}
train: {epochs: 2, max_steps: 0}
```
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal right after its assignment)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{str(a).lower()}`" if isinstance(a, bool) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ([], {}):
        return "(empty)"
    if isinstance(value, list):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def render_config_reference() -> str:
    """The whole docs/config.md text."""
    parts = [HEADER]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        parts.append(f"\n## `{section}`\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            parts.append(inspect.cleandoc(cls.__doc__) + "\n")
        parts.append("| key | type | default | what it does |\n|---|---|---|---|")
        for f in dataclasses.fields(cls):
            doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
            parts.append(f"| `{section}.{f.name}` | {_type_name(hints[f.name])} | {_default(f)} | {doc} |")
    return "\n".join(parts) + "\n"


DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_config_reference()
    if "--check" in args:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date: run python -m tinysft.config_docs", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
