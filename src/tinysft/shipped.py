"""Where the files shipped with tinysft live: the examples (data, configs, the forgetting set).

A wheel carries them inside the package (``tinysft/examples``, copied there by setup.py's build
step); a source checkout has them at the top of the repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def examples_dir() -> Path:
    """TINYSFT_EXAMPLES if set, else the copy inside the installed package, else the checkout's examples/."""
    if os.environ.get("TINYSFT_EXAMPLES"):
        return Path(os.environ["TINYSFT_EXAMPLES"])
    packaged = Path(__file__).resolve().parent / "examples"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "examples"
