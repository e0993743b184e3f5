"""Merge a run's adapter into its base and export it — verified before anything is written.

Two outputs, each checked against the model it came from:

* ``merge_run``: a plain safetensors folder (weights, config, tokenizer, chat template) that
  ``AutoModelForCausalLM.from_pretrained`` loads without PEFT. Checked: every weight finite, and the
  saved folder, loaded back, gives the same logits as base + adapter on sample prompts.
* ``export_gguf``: one llama.cpp GGUF file (f32, f16, bf16 or q8_0) written with the ``gguf`` package,
  tokenizer and chat template included. Checked by reading it back with transformers' GGUF reader
  (an independent implementation of llama.cpp's layout): the tokenizer encodes the sample prompts
  identically, every weight is within its format's rounding error, and greedy continuations are
  compared token by token with the merged model.

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
from tinysft.generation import greedy_continuation
from tinysft.model_card import write_model_card, write_modelfile
from tinysft.models.load import HUB_KERNELS_OFF, load_run
from tinysft.models.registry import ModelError

GgufType = Literal["f32", "f16", "bf16", "q8_0"]
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
# the format's rounding and nothing more. f16 / bf16 round to 11 / 8 significant bits (2^-11, 2^-8);
# q8_0 stores q = round(x / d) with d = amax / 127 per block of 32, d itself as f16, so
# |error| <= d / 2 + 127 * d * 2^-11 < amax / 200. A misplaced row or column is far outside these.
GGUF_WEIGHT_RTOL = {"f32": 1e-7, "f16": 2.0**-11 * 1.001, "bf16": 2.0**-8 * 1.001, "q8_0": 1.0 / 200}
GGUF_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values


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
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


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


# ---- GGUF --------------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_tensor_name(hf_name: str) -> str | None:
    """HF llama parameter name -> llama.cpp tensor name (None for a tensor GGUF does not store)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        leaf = _GGUF_LAYER_NAMES.get(".".join(parts[3:-1]))
        if leaf:
            return f"blk.{parts[2]}.{leaf}.weight"
    return None


def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's q/k row order: HF's rotate-half halves -> interleaved pairs (convert_hf_to_gguf.py).

    Rows of one head are [x0..x(d/2-1), y0..y(d/2-1)] in HF and [x0, y0, x1, y1, ...] in llama.cpp;
    transformers' GGUF reader applies the inverse.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _gguf_pre_tokenizer(spec: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None where it has none we can verify."""
    if spec is None:
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec.get("type") == "Sequence":
        steps = spec.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT):
            return "llama-bpe"
    return None


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Vocabulary, token types and merges for a byte-level BPE ("gpt2") GGUF tokenizer."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = _gguf_pre_tokenizer(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or pre is None:
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style); this "
                          f"model's tokenizer is {spec.get('model', {}).get('type')} with pre-tokenizer "
                          f"{(spec.get('pre_tokenizer') or {}).get('type')}. Use `tinysft merge` for a safetensors folder.")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings.")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows with no token (vocab padded for speed): llama.cpp's [PADn]
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None}


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: GgufType, name: str = "") -> None:
    """Write a llama model (float weights) and its tokenizer as one GGUF file at ``path``."""
    import gguf
    import numpy as np

    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ExportError(f"GGUF export supports llama-architecture models; this one is {cfg.model_type!r}. "
                          "Use `tinysft merge` for a safetensors folder that other tools can convert.")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet; use `tinysft merge`.")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ExportError("GGUF export does not handle llama models with bias terms yet; use `tinysft merge`.")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tok = _tokenizer_fields(tokenizer, cfg.vocab_size)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(GGUF_FILE_TYPE[gguf_type])
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(int(token_id))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_space_prefix(False)
    if isinstance(tokenizer.chat_template, str):
        w.add_chat_template(tokenizer.chat_template)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = gguf_tensor_name(hf_name)
        if gname is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor {hf_name}; use `tinysft merge`.")
        data = tensor.detach().float().cpu().numpy()
        if ".attn_q." in gname:
            data = permute_qk(data, n_head, n_head)
        elif ".attn_k." in gname:
            data = permute_qk(data, n_head, n_kv)
        # Norms (1-D) stay float32, as llama.cpp's converter keeps them; q8_0 needs rows of 32k values.
        t = qtype
        if data.ndim == 1 or (t == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32):
            t = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(data), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def export_gguf(run_dir: str | Path, out_file: str | Path, *, gguf_type: GgufType = "f16", new_tokens: int = 32,
                min_agreement: float = 0.5, force: bool = False, log: Callable[[str], None] = print) -> GgufReport:
    """Merge the run's adapter and write a verified GGUF file (llama architecture, byte-level BPE tokenizer).

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
        log(f"Comparing greedy continuations ({new_tokens} tokens) on {len(m.prompts)} prompts...")
        logit_diff, agree, identical = 0.0, 0, 0
        for ids in m.prompts:
            ref_logits, ref_tokens = greedy_continuation(m.model, ids, new_tokens)
            g_logits, g_tokens = greedy_continuation(g_model, ids, new_tokens)
            logit_diff = max(logit_diff, float((ref_logits - g_logits).abs().max()))
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
