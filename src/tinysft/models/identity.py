"""Which base model a run was trained on: a name and a fingerprint of the weights.

An adapter on the wrong base (same shapes, other weights: another fine-tune of the same
architecture, an edited ``model.name``) loads without any error and answers wrongly. So training
records the base's identity in the run's manifest.json (``"base": {"name", "fingerprint", "dtype"}``)
and every command that loads a run (generate, eval, chat, serve, merge, export) compares it with the
base it just loaded, refusing a mismatch unless the user passes ``--allow-other-base``.

The fingerprint hashes a few named tensors that no quantization touches (bitsandbytes quantizes
Linear layers only): a strided sample of rows of the input embedding and the final norm's weight.
Values are first cast to the dtype recorded at training time, then rounded to bfloat16, so a run
trained on a bf16 load and merged from the float32 checkpoint (or the reverse) agrees: rounding
float32 to bfloat16 once is exactly what a bfloat16 load does. Runs whose manifest has no record
(trained before this existed) load with no check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from tinysft.models.registry import ModelError

SAMPLED_ROWS = 64  # embedding rows hashed, spread over the vocabulary (first and last included)
FINGERPRINT_VERSION = "v1"


def _named_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors the fingerprint hashes: sampled embedding rows [SAMPLED_ROWS, hidden], final norm [hidden]."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight.detach()
    idx = torch.linspace(0, emb.shape[0] - 1, steps=min(SAMPLED_ROWS, emb.shape[0])).round().long()
    out = [("embed_tokens[sampled rows]", emb[idx.to(emb.device)])]
    norm = getattr(getattr(base, "model", None), "norm", None)
    if isinstance(getattr(norm, "weight", None), torch.Tensor):
        out.append(("norm.weight", norm.weight.detach()))
    return out


def weights_dtype(model: Any) -> str:
    """The dtype of the fingerprinted tensors as loaded, e.g. "float32" (recorded beside the fingerprint)."""
    return str(_named_tensors(model)[0][1].dtype).removeprefix("torch.")


def base_fingerprint(model: Any, through: str | None = None) -> str:
    """A short hash of the base's weights: "v1:" + 16 hex digits.

    ``through`` is the dtype the fingerprint was recorded in (manifest ``base.dtype``): the values
    pass through it first, so a base loaded in float32 reproduces a fingerprint taken on a bf16 load.
    Works on a plain transformers model or a PeftModel (the base under the adapter).
    """
    h = hashlib.sha256()
    for name, tensor in _named_tensors(model):
        values = tensor.to("cpu", torch.float32)
        if through is not None:
            values = values.to(getattr(torch, through)).to(torch.float32)
        bits = values.to(torch.bfloat16).contiguous().view(torch.int16)
        h.update(f"{name}:{tuple(tensor.shape)}:".encode())
        h.update(bits.numpy().tobytes())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def base_identity(name: str, model: Any) -> dict[str, str]:
    """The manifest record of the base a run trains on: {"name", "fingerprint", "dtype"}."""
    return {"name": name, "fingerprint": base_fingerprint(model), "dtype": weights_dtype(model)}


def recorded_base(run_dir: str | Path) -> dict[str, Any] | None:
    """The run manifest's ``base`` record, or None for a run trained without one."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = manifest.get("base") if isinstance(manifest, dict) else None
    return base if isinstance(base, dict) and isinstance(base.get("fingerprint"), str) else None


def check_same_base(run_dir: str | Path, name: str, model: Any, *, allow_other_base: bool = False,
                    log: Any = print) -> None:
    """Refuse (ModelError) when ``model`` is not the base the run was trained on, naming both.

    ``allow_other_base`` turns the refusal into a warning (the user says they mean it).
    """
    record = recorded_base(run_dir)
    if record is None:
        return
    dtype = record.get("dtype") if isinstance(record.get("dtype"), str) and hasattr(torch, record["dtype"]) else None
    found = base_fingerprint(model, through=dtype)
    if found == record["fingerprint"]:
        return
    message = (f"{run_dir}: the adapter was trained on the base {record.get('name')!r} (fingerprint "
               f"{record['fingerprint']}), but the base loaded now is {name!r} (fingerprint {found}): different "
               "weights, so its answers would be silently wrong.")
    if allow_other_base:
        log(f"warning: {message} Loading anyway (--allow-other-base).")
        return
    raise ModelError(f"{message} Set model.name in {Path(run_dir) / 'config.yaml'} back to the base it was trained "
                     "on, or pass --allow-other-base if you mean to use it on this one.")
