"""Merge a run's adapter into its base: a plain safetensors folder, verified before it is written.

``merge_run`` writes weights, config, tokenizer and chat template that
``AutoModelForCausalLM.from_pretrained`` loads without PEFT. Checked: every weight finite, and the
saved folder, loaded back, gives the same logits as base + adapter on sample prompts.
``merged_model`` (the in-memory merge, checked the same way) is shared with the GGUF export.

The merge always happens in float32 (a bf16 or 4-bit base is upcast / dequantized first), so the
reference it is checked against is exact; a smaller dtype is only chosen for what is written.
Outputs go to a temporary name next to the target and are renamed into place once verified.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from tinysft.data.render import render_prompt
from tinysft.files import check_replaceable, replace_output
from tinysft.model_card import write_model_card
from tinysft.models.load import HUB_KERNELS_OFF, load_run
from tinysft.models.registry import ModelError

SaveDtype = Literal["float32", "bfloat16", "float16"]

# Short, varied prompts: chat, code, arithmetic with multi-digit numbers, punctuation and non-ASCII
# text, so a tokenizer or layout mistake shows up in at least one of them.
SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "What is 12 times 34?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French and German (Guten Morgen? Bonjour?).",
)

# Largest |merged - reference| logit difference accepted, relative to the largest reference logit.
# float32: rounding only (measured ~1e-6 on the embedded model); half precision: the stored weights
# themselves are rounded, so the logits move by up to a few percent of their range.
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}
# Largest per-tensor |gguf - merged| weight error accepted, relative to the tensor's largest value:


class ExportError(ModelError):
    """A merge or export was refused or failed its verification; nothing was written."""



@dataclass
class MergeReport:
    out: Path
    dtype: str
    prompts: int
    max_logit_diff: float  # saved folder, loaded back, vs base + adapter
    tolerance: float
    max_abs_logit: float  # scale of the reference logits, for context



# ---- merge -------------------------------------------------------------------------------------
@dataclass
class _Merged:
    model: Any  # plain transformers model, float32, adapter merged in
    tokenizer: Any
    config: Any  # RunConfig
    prompts: list[list[int]]
    reference: list[torch.Tensor]  # base + adapter logits per prompt, float32 [seq, vocab]
    max_logit_diff: float
    max_abs_logit: float


def sample_prompt_ids(tokenizer: Any, system_prompt: str | None = None,
                      prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> list[list[int]]:
    """The verification prompts, rendered with the model's chat template (as at training time)."""
    return [render_prompt([{"role": "user", "content": p}], tokenizer, system_prompt) for p in prompts]


@torch.inference_mode()
def prompt_logits(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits [seq, vocab] of each prompt, one forward pass each (no padding to disturb them)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |a - b| over all prompts; NaN if any prompt has one (Python's ``max`` would keep an
    earlier number over a later NaN, and NaN logits would pass the check)."""
    return float(torch.stack([(x - y).abs().max() for x, y in zip(a, b, strict=True)]).max())


def merged_model(run_dir: str | Path, log: Callable[[str], None] = print) -> _Merged:
    """Load a run, merge its adapter into a float32 copy of the base, and check the merge in memory."""
    # The full-precision base (a bf16 load, the default where bf16 is fast, would merge into rounded
    # weights); .float() still upcasts a base that is stored in bf16 / fp16.
    loaded = load_run(run_dir, log=log, dequantize=True, dtype="float32")
    model = loaded.model.float()
    tokenizer = loaded.tokenizer
    prompts = sample_prompt_ids(tokenizer, loaded.config.data.system_prompt)
    reference = prompt_logits(model, prompts)  # adapter enabled = base + adapter
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: raises on a non-finite result
    except ValueError as e:
        raise ExportError(f"{run_dir}: merging the adapter gave non-finite weights ({e}); the adapter is "
                          "broken (NaN/inf) — retrain with a lower train.learning_rate.") from None
    bad = [n for n, p in merged.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ExportError(f"{run_dir}: non-finite weights after merging ({', '.join(bad[:3])}); nothing written.")
    merged.eval()
    diff = _max_diff(prompt_logits(merged, prompts), reference)
    scale = max(float(r.abs().max()) for r in reference)
    tol = MERGE_RTOL["float32"] * max(1.0, scale)
    if not diff <= tol:  # `not <=` also catches NaN
        raise ExportError(f"{run_dir}: merged logits differ from base + adapter by {diff:.3g} (tolerance "
                          f"{tol:.3g}); nothing written. This is a bug — please report it with the run's config.")
    return _Merged(merged, tokenizer, loaded.config, prompts, reference, diff, scale)


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse, before any work, an output that would land in the run or replace what is not tinysft's.

    ``--force`` replaces only an output tinysft itself wrote (``files.check_replaceable``): never a
    folder that holds the run, another run, or files the user put there.
    """
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: choose an output outside the run directory {run_dir}.")
    if (out.exists() or out.is_symlink()) and not force:
        raise ExportError(f"{out} already exists — choose another --out, or pass --force to replace it.")
    check_replaceable(out, protected=inputs_of(run_dir))


def inputs_of(run_dir: Path) -> list[Path]:
    """What a merge or export reads, so it may never replace it: the run, and its base model's
    folder or file when that is local (a base that is itself an earlier merge is marked as one)."""
    out = [run_dir]
    try:
        name = Path(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["model"]["name"])
    except Exception:  # an unreadable config is reported when the run loads
        return out
    return [*out, name] if name.exists() else out


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: SaveDtype = "float32", force: bool = False,
              log: Callable[[str], None] = print) -> MergeReport:
    """Merge the adapter into the base and save a plain safetensors folder, verified before it is kept.

    The check reloads the written folder with ``AutoModelForCausalLM.from_pretrained`` (what any
    other tool will do) and compares its logits with base + adapter on the sample prompts.
    """
    from transformers import AutoModelForCausalLM

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir, run_dir, force)
    m = merged_model(run_dir, log=log)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        m.model.to(torch_dtype).save_pretrained(tmp, safe_serialization=True)
        m.tokenizer.save_pretrained(tmp)  # includes the chat template
        write_model_card(tmp, run_dir, "merged", dtype)  # README.md: base, data hashes, config, before/after
        log(f"Verifying {out_dir.name}: reloading it and comparing logits on {len(m.prompts)} prompts...")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype, **HUB_KERNELS_OFF)
        reloaded.eval()
        diff = _max_diff(prompt_logits(reloaded, m.prompts), m.reference)
        del reloaded
        tol = MERGE_RTOL[dtype] * max(1.0, m.max_abs_logit)
        if not diff <= tol:
            raise ExportError(f"{out_dir}: the saved model's logits differ from base + adapter by {diff:.3g} "
                              f"(tolerance {tol:.3g} for {dtype}); nothing written. Try --dtype float32.")
        report = MergeReport(out_dir, dtype, len(m.prompts), diff, tol, m.max_abs_logit)
        (tmp / "tinysft-merge.json").write_text(json.dumps(
            {"run_dir": str(run_dir), "base_model": m.config.model.name,
             **{k: v for k, v in asdict(report).items() if k != "out"}}, indent=2))
        replace_output(tmp, out_dir, kind="merge", protected=inputs_of(run_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
