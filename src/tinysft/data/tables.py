"""Tabular inputs: parquet files, Hugging Face ``datasets`` folders and files, and hub dataset names.

Each source becomes the same (row number, dict) pairs that a JSONL file gives, so every row format
(:mod:`tinysft.data.formats`) works on them unchanged. Sources:

- ``FILE.parquet`` (also ``.arrow``: a datasets cache / ``save_to_disk`` shard);
- a folder written by ``datasets.Dataset.save_to_disk`` (it holds ``dataset_info.json`` or
  ``dataset_dict.json``; of a DatasetDict, the ``train`` split);
- ``hf:OWNER/NAME`` or ``hf:OWNER/NAME:SPLIT`` (default split ``train``): a dataset on the
  Hugging Face hub, downloaded by ``datasets`` (needs the network, or its local cache).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".parquet", ".arrow")
HUB_PREFIX = "hf:"
INSTALL_HINT = "install the reader: pip install 'tinysft[formats]' (pyarrow and datasets)"


def is_table_source(path: str | Path) -> bool:
    """True for the inputs this module reads (by name or folder contents; nothing is opened)."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return True
    p = Path(text)
    if p.suffix.lower() in TABLE_SUFFIXES:
        return True
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())


def read_table_rows(path: str | Path) -> list[tuple[int, Any]]:
    """Rows of a table source as (1-based row number, dict). Raises :class:`TableError` (one line
    with the fix) when the source cannot be read."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        rows = _hub_rows(text[len(HUB_PREFIX):])
    elif Path(text).is_dir():
        rows = _saved_dataset_rows(Path(text))
    elif not Path(text).exists():
        raise TableError("does not exist", "check the path")
    elif Path(text).suffix.lower() == ".parquet":
        rows = _parquet_rows(Path(text))
    else:
        rows = _arrow_rows(Path(text))
    return [(i + 1, _clean(row)) for i, row in enumerate(rows)]


class TableError(Exception):
    """A table source that cannot be read: what is wrong and the fix."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what} — {fix}")
        self.what, self.fix = what, fix


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """Arrow gives NaN for a missing float and numpy-free Python values otherwise; NaN -> None so the
    row checks say "missing" rather than "a number"."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError("is a parquet file, and pyarrow is not installed", INSTALL_HINT) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a one-line reason
        raise TableError(f"is not a readable parquet file ({str(e).splitlines()[0][:160]})",
                         "write it with pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet") from None


def _arrow_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa
    except ImportError:
        raise TableError("is an Arrow file, and pyarrow is not installed", INSTALL_HINT) from None
    errors = []
    for open_ in (pa.ipc.open_stream, pa.ipc.open_file):  # datasets writes the stream format
        try:
            with pa.memory_map(str(path)) as source:
                return open_(source).read_all().to_pylist()
        except Exception as e:
            errors.append(str(e).splitlines()[0][:160])
    raise TableError(f"is not a readable Arrow file ({errors[-1]})", "pass a .parquet file or a save_to_disk folder")


def _saved_dataset_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise TableError("is a datasets folder, and the datasets package is not installed", INSTALL_HINT) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise TableError(f"could not be read by datasets.load_from_disk ({str(e).splitlines()[0][:160]})",
                         "pass the folder that save_to_disk wrote") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise TableError(f"holds the splits {', '.join(ds)} and no 'train'",
                             "save the split you want on its own (ds[SPLIT].save_to_disk(...))")
        ds = ds["train"]
    return ds.to_list()


def _hub_rows(spec: str) -> list[dict[str, Any]]:
    name, _, split = spec.partition(":")
    if not name or name.count("/") != 1:
        raise TableError(f"hf:{spec} is not a hub dataset name", "write hf:OWNER/NAME or hf:OWNER/NAME:SPLIT")
    try:
        import datasets
    except ImportError:
        raise TableError("is a hub dataset, and the datasets package is not installed", INSTALL_HINT) from None
    try:
        return datasets.load_dataset(name, split=split or "train").to_list()
    except Exception as e:
        raise TableError(f"could not be loaded from the hub ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                         "check the name and split and the network (or HF_HUB_OFFLINE), or download it and "
                         "pass the parquet file") from None


def source_sha256(path: str | Path) -> str:
    """The sha256 that the run's manifest records for a data source: of the file's bytes; of a
    folder's files (names and bytes, in sorted order); of the name alone for ``hf:OWNER/NAME``
    (the hub's copy can change under the same name, which the manifest then cannot tell)."""
    import hashlib

    text = str(path)
    digest = hashlib.sha256()
    if text.startswith(HUB_PREFIX):
        digest.update(text.encode())
        return "name:" + digest.hexdigest()
    p = Path(text)
    if p.is_dir():
        for file in sorted(f for f in p.rglob("*") if f.is_file()):
            digest.update(str(file.relative_to(p)).encode() + b"\0")
            digest.update(file.read_bytes())
        return digest.hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()
