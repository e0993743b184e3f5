"""GGUF export of a run: merge, write (``gguf_writer``), then verify by reading the file back.

Checked by loading the file with transformers' GGUF reader (an independent implementation of
llama.cpp's layout): the tokenizer encodes the sample prompts identically, the chat template
survives, every weight is within its format's rounding error, and greedy continuations are compared
token by token with the merged model. The file is renamed into place only once all of that holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinysft.export.gguf_writer import GgufType, write_gguf
from tinysft.export.merge import ExportError, _check_out, inputs_of, merged_model
from tinysft.files import replace_output
from tinysft.generation import greedy_continuations
from tinysft.model_card import write_modelfile
from tinysft.models.load import HUB_KERNELS_OFF

# the format's rounding and nothing more. f16 / bf16 round to 11 / 8 significant bits (2^-11, 2^-8);
# q8_0 stores q = round(x / d) with d = amax / 127 per block of 32, d itself as f16, so
# |error| <= d / 2 + 127 * d * 2^-11 < amax / 200. A misplaced row or column is far outside these.
GGUF_WEIGHT_RTOL = {"f32": 1e-7, "f16": 2.0**-11 * 1.001, "bf16": 2.0**-8 * 1.001, "q8_0": 1.0 / 200}


@dataclass
class GgufReport:
    out: Path
    type: str
    size_bytes: int
    merge_max_logit_diff: float  # merged (in memory) vs base + adapter
    max_weight_error: float  # worst tensor: max |gguf - merged| / max |merged|
    max_logit_diff: float  # gguf vs merged, on the prompt positions
    prompts: int
    identical: int  # prompts whose greedy continuation is identical
    token_agreement: float  # generated tokens before the first divergence / all generated tokens
    new_tokens: int  # greedy tokens compared per prompt



def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def export_gguf(run_dir: str | Path, out_file: str | Path, *, gguf_type: GgufType = "f16", new_tokens: int = 32,
                min_agreement: float = 0.5, force: bool = False, log: Callable[[str], None] = print) -> GgufReport:
    """Merge the run's adapter and write a verified GGUF file (a ``GGUF_ARCHS`` model, byte-level BPE tokenizer).

    Verified by loading the file back with transformers: identical tokenization of the rendered
    sample prompts and the same chat template, every weight within the format's rounding error, and
    greedy continuations compared with the merged model; fails below ``min_agreement`` (the fraction
    of greedy tokens produced before the continuations first diverge).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    run_dir, out_file = Path(run_dir), Path(out_file)
    if out_file.suffix != ".gguf":
        raise ExportError(f"{out_file}: a GGUF file name must end in .gguf.")
    _check_out(out_file, run_dir, force)
    m = merged_model(run_dir, log=log)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name must end in .gguf: transformers picks its GGUF reader by the suffix.
    tmp = out_file.with_name(f".{out_file.stem}.tmp-{os.getpid()}.gguf")
    try:
        log(f"Writing {gguf_type} GGUF...")
        write_gguf(m.model, m.tokenizer, tmp, gguf_type, name=f"{m.config.model.name} + {run_dir.name}")
        log("Verifying: reading it back with transformers' GGUF reader...")
        try:
            g_tok = AutoTokenizer.from_pretrained(str(tmp.parent), gguf_file=tmp.name)
            g_model = AutoModelForCausalLM.from_pretrained(str(tmp.parent), gguf_file=tmp.name, dtype=torch.float32,
                                                           quantization_config=GgufConfig(dequantize=True), **HUB_KERNELS_OFF)
        except Exception as e:
            raise ExportError(f"{out_file}: the written GGUF does not load back ({str(e).splitlines()[0][:200]}); "
                              "nothing written.") from None
        g_model.eval()
        if g_tok.chat_template != m.tokenizer.chat_template:
            raise ExportError(f"{out_file}: the chat template did not survive the GGUF round trip; nothing written.")
        for ids in m.prompts:
            text = m.tokenizer.decode(ids)
            if g_tok(text, add_special_tokens=False)["input_ids"] != m.tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise ExportError(f"{out_file}: the GGUF tokenizer encodes {text[:60]!r} differently from the "
                                  "model's own tokenizer; nothing written.")
        worst, worst_name = 0.0, ""
        g_state = g_model.state_dict()
        for hf_name, ref in m.model.state_dict().items():
            got = g_state[hf_name].float()
            rel = float((got - ref.float()).abs().max()) / max(float(ref.abs().max()), 1e-12)
            if rel > worst:
                worst, worst_name = rel, hf_name
        if not worst <= GGUF_WEIGHT_RTOL[gguf_type]:
            raise ExportError(f"{out_file}: tensor {worst_name} differs from the merged model by {worst:.3g} of its "
                              f"range (more than {gguf_type} rounding); nothing written. This is a bug.")
        log(f"Comparing greedy continuations ({new_tokens} tokens) on {len(m.prompts)} prompts, one batch per "
            "model: the merged model (1/2)...")
        reference = greedy_continuations(m.model, m.prompts, new_tokens)
        log("... and the GGUF read back (2/2).")
        exported = greedy_continuations(g_model, m.prompts, new_tokens)
        logit_diff, agree, identical = 0.0, 0, 0
        for (ref_logits, ref_tokens), (g_logits, g_tokens) in zip(reference, exported, strict=True):
            diff = float((ref_logits - g_logits).abs().max())
            logit_diff = diff if diff != diff else max(logit_diff, diff)  # a NaN stays NaN (max() would drop it)
            same = _common_prefix(ref_tokens, g_tokens)
            agree += same
            identical += same == new_tokens
        del g_model
        agreement = agree / (new_tokens * len(m.prompts))
        if agreement < min_agreement:
            raise ExportError(f"{out_file}: greedy outputs of the GGUF agree with the merged model on only "
                              f"{agreement:.0%} of tokens (minimum {min_agreement:.0%}); nothing written.")
        replace_output(tmp, out_file, kind="gguf", protected=inputs_of(run_dir))
        write_modelfile(out_file, m.tokenizer, m.config.data.system_prompt)  # NAME.Modelfile for `ollama create`
    finally:
        tmp.unlink(missing_ok=True)
    return GgufReport(out_file, gguf_type, out_file.stat().st_size, m.max_logit_diff, worst, logit_diff,
                      len(m.prompts), identical, agreement, new_tokens)
