"""Run tinysft on tcmalloc where the system has it, and cap oneDNN's primitive cache.

A CPU training step allocates and frees thousands of activation-sized tensors. glibc's malloc
hands large blocks back to the kernel and takes fresh pages again for the next step, and on a
virtual machine every such page fault is expensive; tcmalloc keeps them (faster training, lower
peak memory: docs/benchmarks.md). The allocator can only be chosen when a process starts, so the
``tinysft`` command re-executes itself once with ``LD_PRELOAD`` when it finds Debian's / Ubuntu's
``libtcmalloc-minimal4`` (``make install`` adds it where apt-get can run). ``TINYSFT_TCMALLOC=0``
turns this off.
"""

from __future__ import annotations

import glob
import os
import sys

_LIB = "libtcmalloc_minimal.so.4"
ONEDNN_CACHE = 64  # oneDNN primitives kept (its default: 1024)
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def tcmalloc_path() -> str | None:
    """The tcmalloc shared library on this system, or None."""
    for folder in _SEARCH:
        hits = sorted(glob.glob(os.path.join(folder, _LIB)))
        if hits:
            return hits[0]
    return None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with tcmalloc added to LD_PRELOAD, when found and allowed."""
    env = dict(os.environ if env is None else env)
    lib = tcmalloc_path()
    if lib is None or env.get("TINYSFT_TCMALLOC", "1") == "0" or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return env
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def reexec_with_tcmalloc() -> None:
    """Replace this process with the same ``python -m tinysft`` command on tcmalloc (at most once).

    Does nothing where tcmalloc is missing, already loaded, or turned off, and on other systems
    than Linux. The process keeps its PID, arguments, environment and terminal.
    """
    if not sys.platform.startswith("linux") or os.environ.get("_TINYSFT_REEXEC"):
        return
    env = preload_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env["_TINYSFT_REEXEC"] = "1"  # never loop, even if the preload does not take
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "tinysft", *sys.argv[1:]], env)
    except OSError:
        return  # carry on with the default allocator


def allocator_in_use() -> str:
    """"tcmalloc" if this process runs on it, else "default" (read from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "tcmalloc" in f.read() else "default"
    except OSError:
        return "default"


def cap_onednn_cache(capacity: int = ONEDNN_CACHE) -> None:
    """Keep at most ``capacity`` oneDNN primitives cached, unless the user set the limit already.

    torch's CPU matmuls go through oneDNN, which caches one compiled primitive (with its
    buffers) per matmul shape, up to 1,024. Packed training rows have a different length in
    every pass, so each pass adds ~20 shapes and the cache grows for the whole run; a small cache
    keeps peak memory down at the same speed (creating a primitive costs far less than the matmul
    it runs; docs/benchmarks.md). oneDNN reads the variable when it first creates a primitive, so
    call this before any CPU matmul.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
