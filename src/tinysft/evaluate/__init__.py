"""Evaluation: metrics (pure), compare, perplexity, classification, report.

``tinysft.evaluate`` is also the API function ``evaluate(run_dir, ...)`` (:func:`tinysft.api.evaluate`):
``from tinysft import evaluate`` must give the same object whether or not this subpackage was already
imported (importing a submodule sets ``tinysft.evaluate`` to the package), so the package is callable.
"""

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from tinysft.api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
