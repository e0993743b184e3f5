"""tinysft: LoRA / QLoRA fine-tuning for small language models, with a before/after report.

The Python API (the command line is ``tinysft``)::

    from tinysft import load_config, train, evaluate

    cfg = load_config("examples/polite-helper/config.yaml", {"train.max_steps": 20})
    train(cfg, "runs/notebook")
    print(evaluate("runs/notebook").metrics["tuned"])

Names are imported on first use, so ``import tinysft`` stays fast (no torch until you train).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("tinysft")
except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0.0.0+source"

__all__ = ["Evaluation", "__version__", "evaluate", "load_config", "train"]

_LAZY = {"load_config": "tinysft.api", "train": "tinysft.api", "Evaluation": "tinysft.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name == "evaluate":  # the subpackage tinysft.evaluate, which is also callable (see its __init__)
        return import_module("tinysft.evaluate")
    raise AttributeError(f"module 'tinysft' has no attribute {name!r}")
