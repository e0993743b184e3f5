"""The merge / export verification, pinned by mutation testing (docs/mutation.md).

tests/test_export.py shows that a trained run merges and exports to what it should; these pin what
those leave open: the checks themselves. Each check is fed a known fault (a merged, reloaded or
GGUF model whose logits, weights or greedy tokens are off by a set amount) and must refuse it, with
its message, exactly when the fault is past its tolerance. Nothing here trains: the run is a tiny
llama with a random LoRA adapter written straight to disk, so a merge or an export takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import tinysft.export.gguf_export as export_gguf_module
import tinysft.export.merge as export_merge
from conftest import CHAT_ROWS
from tinysft.config import load_config, parse_overrides
from tinysft.export import (
    GGUF_WEIGHT_RTOL,
    MERGE_RTOL,
    SAMPLE_PROMPTS,
    ExportError,
    export_gguf,
    merge_run,
    merged_model,
    prompt_logits,
    sample_prompt_ids,
    write_gguf,
)
from tinysft.generation import greedy_continuations

SYSTEM = "Answer in one line."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A finished run without training: a 2-layer llama (GQA, tied embeddings) with a ~300-token
    byte-level BPE tokenizer, and an all-linear LoRA adapter whose B matrices are random (a trained
    adapter's are; PEFT starts them at zero, which would make every merge check trivially pass)."""
    texts = [m["content"] for r in CHAT_ROWS for m in r.get("messages", [])] + list(SAMPLE_PROMPTS) * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("export-pinned")
    base_dir, run = root / "base", root / "run"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(run / "adapter")
    cfg = load_config(None, parse_overrides([f"data.system_prompt={SYSTEM}"]))
    cfg.model.name = str(base_dir)
    cfg.save(run / "config.yaml")
    return run


def base_and_tuned_logits(run: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
    """Logits of the base and of base + adapter (plain PEFT, not tinysft's loader) on the sample prompts."""
    base_dir = run.parent / "base"
    prompts = sample_prompt_ids(AutoTokenizer.from_pretrained(base_dir), SYSTEM)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    before = prompt_logits(base, prompts)
    tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    return before, prompt_logits(tuned, prompts), prompts


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


class Logits:
    """``export.prompt_logits`` with the logits of call number ``at`` (0 = the first) moved by
    ``delta`` at one position of prompt ``prompt``, and every call's logits times ``scale`` (so the
    reference's largest logit, which sets the tolerance, is what the test wants)."""

    def __init__(self, at: int, delta: float, prompt: int = 3, scale: float = 1.0) -> None:
        self.at, self.delta, self.prompt, self.scale, self.calls = at, delta, prompt, scale, 0

    def __call__(self, model, prompts):
        out = [x * self.scale for x in prompt_logits(model, prompts)]
        if self.calls == self.at:
            out[self.prompt] = out[self.prompt].clone()
            out[self.prompt][-1, 7] += self.delta
        self.calls += 1
        return out


# ---- merged_model ----------------------------------------------------------------------------------
def test_merged_model_is_base_plus_adapter_checked_against_the_adapters_logits(fake_run: Path) -> None:
    before, tuned, prompts = base_and_tuned_logits(fake_run)
    assert max_diff(before, tuned) > 0.05, "the adapter is a no-op: no check below could fail"
    m = merged_model(fake_run, log=quiet)
    assert m.prompts == prompts and len(prompts) == len(SAMPLE_PROMPTS)
    tok = AutoTokenizer.from_pretrained(fake_run.parent / "base")
    assert [tok.decode(ids) for ids in m.prompts] == [  # the run's system prompt, then the question
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        for q in SAMPLE_PROMPTS]
    assert max_diff(m.reference, tuned) < 1e-5  # the reference is base + adapter, not the base
    assert not any("lora" in name for name in m.model.state_dict())  # merged and unloaded
    merged = prompt_logits(m.model, prompts)
    assert max_diff(merged, tuned) < 1e-4
    assert m.max_logit_diff == max_diff(merged, m.reference)
    assert m.max_abs_logit == max(float(r.abs().max()) for r in m.reference)
    assert m.config.model.name == str(fake_run.parent / "base") and m.config.data.system_prompt == SYSTEM


@pytest.mark.parametrize("scale", [50.0, 0.25])
def test_merge_check_refuses_logits_past_its_tolerance_and_only_those(fake_run: Path, monkeypatch,
                                                                       scale: float) -> None:
    """The merged model's logits off by 1.5x / 0.5x the tolerance, MERGE_RTOL * max(1, largest
    logit): with the largest logit at 50 and at 0.25 (where the 1 takes over)."""
    largest = max(float(r.abs().max()) for r in base_and_tuned_logits(fake_run)[1])
    k = scale / largest
    tol = MERGE_RTOL["float32"] * max(1.0, scale)
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=1, delta=1.5 * tol, scale=k))
    with pytest.raises(ExportError) as e:
        merged_model(fake_run, log=quiet)
    diff = float(str(e.value).split(" by ")[1].split(" ")[0])
    assert diff == pytest.approx(1.5 * tol, rel=2e-3)
    assert str(e.value) == (f"{fake_run}: merged logits differ from base + adapter by {diff:.3g} (tolerance {tol:.3g}); "
                            "nothing written. This is a bug — please report it with the run's config.")
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=1, delta=0.5 * tol, scale=k))
    m = merged_model(fake_run, log=quiet)
    assert m.max_logit_diff == pytest.approx(0.5 * tol, rel=2e-3)  # the worst prompt (the 4th), not the first
    assert m.max_abs_logit == pytest.approx(scale, rel=1e-5)


def test_merge_check_refuses_nan_logits(fake_run: Path, monkeypatch) -> None:
    # On the first prompt: Python's max() drops a NaN that comes after a number (docs/mutation.md).
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=1, delta=float("nan"), prompt=0))
    with pytest.raises(ExportError, match=r"merged logits differ from base \+ adapter by nan"):
        merged_model(fake_run, log=quiet)


def test_merge_check_refuses_nan_logits_on_a_later_prompt(fake_run: Path, monkeypatch) -> None:
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=1, delta=float("nan"), prompt=3))
    with pytest.raises(ExportError, match=r"merged logits differ from base \+ adapter by nan"):
        merged_model(fake_run, log=quiet)


def test_a_merge_with_non_finite_weights_is_refused_naming_three(fake_run: Path, monkeypatch) -> None:
    real = LoraModel.merge_and_unload

    def merge_then_break(self, *args, **kwargs):
        merged = real(self, *args, **kwargs)
        with torch.no_grad():
            for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight",
                         "model.norm.weight", "model.layers.1.post_attention_layernorm.weight"):
                merged.get_parameter(name)[0] = float("inf")
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_then_break)
    with pytest.raises(ExportError) as e:
        merged_model(fake_run, log=quiet)
    assert str(e.value) == (f"{fake_run}: non-finite weights after merging (model.layers.0.input_layernorm.weight, "
                            "model.layers.1.input_layernorm.weight, model.layers.1.post_attention_layernorm.weight); "
                            "nothing written.")

    def refuse(self, *args, **kwargs):
        assert kwargs.get("safe_merge") is True  # PEFT checks the merged weights as it goes
        raise ValueError("NaNs detected in the merged weights")

    monkeypatch.setattr(LoraModel, "merge_and_unload", refuse)
    with pytest.raises(ExportError) as e:
        merged_model(fake_run, log=quiet)
    assert str(e.value) == (f"{fake_run}: merging the adapter gave non-finite weights (NaNs detected in the merged "
                            "weights); the adapter is broken (NaN/inf) — retrain with a lower train.learning_rate.")


# ---- merge_run ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_run_reports_the_reloaded_folders_difference_and_its_tolerance(fake_run: Path, tmp_path: Path,
                                                                              dtype: str) -> None:
    from safetensors.torch import load_file

    from tinysft.files import output_kind
    from tinysft.model_card import model_card_text

    _, tuned, prompts = base_and_tuned_logits(fake_run)
    out = tmp_path / "not" / "yet" / "merged"  # folders above it are made
    said: list[str] = []
    report = merge_run(fake_run, out, dtype=dtype, log=said.append)  # type: ignore[arg-type]
    assert "Verifying merged: reloading it and comparing logits on 6 prompts..." in said
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {getattr(torch, dtype)}
    assert (out / "README.md").read_text() == model_card_text(fake_run, "merged", dtype)
    assert output_kind(out) == "merge"  # so a rerun with --force may replace it
    largest = max(float(r.abs().max()) for r in tuned)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    diff = max_diff(prompt_logits(reloaded, prompts), tuned)
    assert (report.out, report.dtype, report.prompts) == (out, dtype, len(SAMPLE_PROMPTS))
    assert report.max_abs_logit == pytest.approx(largest, rel=1e-6)
    assert report.tolerance == pytest.approx(MERGE_RTOL[dtype] * max(1.0, largest), rel=1e-6)
    assert report.max_logit_diff == pytest.approx(diff, rel=1e-3, abs=1e-5) and diff <= report.tolerance
    if dtype != "float32":
        assert diff > MERGE_RTOL["float32"]  # so these figures are of the half-precision folder
    text = (out / "tinysft-merge.json").read_text()
    assert json.loads(text) == {"run_dir": str(fake_run), "base_model": str(fake_run.parent / "base"), "dtype": dtype,
                                "prompts": len(SAMPLE_PROMPTS), "max_logit_diff": report.max_logit_diff,
                                "tolerance": report.tolerance, "max_abs_logit": report.max_abs_logit}
    assert text == json.dumps(json.loads(text), indent=2)


def test_merge_run_starts_from_an_empty_temporary_folder(fake_run: Path, tmp_path: Path) -> None:
    """A temporary folder left by a killed merge of the same name and process id is cleared first,
    so nothing stale ends up in the output."""
    import os

    out = tmp_path / "merged"
    stale = tmp_path / f".merged.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "stale.bin").write_text("left by a killed merge")
    merge_run(fake_run, out, log=quiet)
    assert not (out / "stale.bin").exists() and not stale.exists()


@pytest.mark.parametrize("scale", [50.0, 0.25])
def test_merge_run_refuses_a_saved_folder_past_its_tolerance_and_writes_nothing(fake_run: Path, tmp_path: Path,
                                                                                 monkeypatch, scale: float) -> None:
    largest = max(float(r.abs().max()) for r in base_and_tuned_logits(fake_run)[1])
    tol = MERGE_RTOL["float32"] * max(1.0, scale)
    # Calls: the reference, the merged model in memory, the reloaded folder.
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=2, delta=1.5 * tol, scale=scale / largest))
    out = tmp_path / "merged"
    with pytest.raises(ExportError) as e:
        merge_run(fake_run, out, log=quiet)
    diff = float(str(e.value).split(" by ")[1].split(" ")[0])
    assert diff == pytest.approx(1.5 * tol, rel=2e-3)
    assert str(e.value) == (f"{out}: the saved model's logits differ from base + adapter by {diff:.3g} (tolerance "
                            f"{tol:.3g} for float32); nothing written. Try --dtype float32.")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.setattr(export_merge, "prompt_logits", Logits(at=2, delta=0.5 * tol, scale=scale / largest))
    report = merge_run(fake_run, out, log=quiet)
    assert report.max_logit_diff == pytest.approx(0.5 * tol, rel=2e-3) and report.tolerance == pytest.approx(tol)


# ---- export_gguf -------------------------------------------------------------------------------------
def test_an_f32_gguf_is_exact_and_every_greedy_token_agrees(fake_run: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from tinysft.files import output_kind
    from tinysft.model_card import modelfile_text

    out = tmp_path / "not" / "yet" / "m.gguf"  # folders above it are made
    m = merged_model(fake_run, log=quiet)
    said: list[str] = []
    report = export_gguf(fake_run, out, gguf_type="f32", new_tokens=5, log=said.append)
    assert said == ["Writing f32 GGUF...", "Verifying: reading it back with transformers' GGUF reader...",
                    "Comparing greedy continuations (5 tokens) on 6 prompts, one batch per model: the merged model "
                    "(1/2)...", "... and the GGUF read back (2/2)."]
    assert GGUFReader(str(out)).fields["general.name"].contents() == f"{fake_run.parent / 'base'} + run"
    assert (report.out, report.type, report.size_bytes) == (out, "f32", out.stat().st_size)
    assert report.max_weight_error == 0.0  # f32 stores the merged weights as they are
    assert report.merge_max_logit_diff == m.max_logit_diff
    assert report.max_logit_diff < 1e-4
    assert (report.prompts, report.identical, report.token_agreement, report.new_tokens) == (6, 6, 1.0, 5)
    assert output_kind(out) == "gguf"  # so a rerun with --force may replace it
    modelfile = out.with_name("m.Modelfile").read_text()
    assert modelfile == modelfile_text("m.gguf", m.tokenizer, SYSTEM) and SYSTEM in modelfile and "<|im_start|>" in modelfile


class Perturbed:
    """``export.write_gguf`` writing the model with ``moves`` {parameter: change of its smallest value,
    relative to its largest} (the smallest, so the format's own rounding of it is negligible)."""

    def __init__(self, moves: dict[str, float]) -> None:
        self.moves = moves

    def __call__(self, model, *args, **kwargs):
        state = model.state_dict()
        kept = {name: state[name].clone() for name in self.moves}
        with torch.no_grad():
            for name, rel in self.moves.items():
                flat = state[name].view(-1)
                flat[int(flat.abs().argmin())] += rel * float(kept[name].abs().max())
        try:
            return write_gguf(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    state[name].copy_(value)


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_gguf_weight_check_names_the_worst_tensor_past_the_formats_rounding(fake_run: Path, tmp_path: Path,
                                                                            monkeypatch, gguf_type: str) -> None:
    rtol = GGUF_WEIGHT_RTOL[gguf_type]
    monkeypatch.setattr(export_gguf_module, "write_gguf", Perturbed({"model.layers.0.mlp.up_proj.weight": 3 * rtol,
                                                         "model.layers.1.self_attn.k_proj.weight": 9 * rtol,
                                                         "model.layers.1.mlp.down_proj.weight": 5 * rtol}))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, out, gguf_type=gguf_type, new_tokens=2, log=quiet)  # type: ignore[arg-type]
    worst = float(str(e.value).split(" by ")[1].split(" ")[0])
    assert worst == pytest.approx(9 * rtol, rel=0.12)  # plus the format's own rounding of that value
    assert str(e.value) == (f"{out}: tensor model.layers.1.self_attn.k_proj.weight differs from the merged model by "
                            f"{worst:.3g} of its range (more than {gguf_type} rounding); nothing written. This is a bug.")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    if gguf_type == "f16":  # (f32's bound, 1e-7, is below float32's own resolution of a value)
        monkeypatch.setattr(export_gguf_module, "write_gguf", Perturbed({"model.layers.1.self_attn.k_proj.weight": 0.6 * rtol}))
        report = export_gguf(fake_run, out, gguf_type=gguf_type, log=quiet)
        assert 0.6 * rtol <= report.max_weight_error <= rtol


class Greedy:
    """``greedy_continuations`` where the GGUF model's (the second call) continuation of prompt i
    diverges at token ``cut[i]`` and its prompt logits move by ``moved[i]``."""

    def __init__(self, cut: list[int], moved: list[float]) -> None:
        self.cut, self.moved, self.calls = cut, moved, 0

    def __call__(self, model, prompts, n):
        results = greedy_continuations(model, prompts, n)
        self.calls += 1
        if self.calls == 1:  # the merged model: as it is
            return results
        out = []
        for i, (logits, tokens) in enumerate(results):
            tokens = list(tokens)
            if self.cut[i] < n:
                tokens[self.cut[i]] += 1
            logits = logits.clone()
            logits[0, 0] += self.moved[i]
            out.append((logits, tokens))
        return out


def test_gguf_greedy_agreement_counts_tokens_before_the_first_divergence(fake_run: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    cut = [0, 1, 4, 2, 4, 3]  # 14 of 24 tokens agree; prompts 3 and 5 are identical
    monkeypatch.setattr(export_gguf_module, "greedy_continuations", Greedy(cut, [0.0, 0.25, 0.0, 0.75, 0.5, 0.0]))
    out = tmp_path / "m.gguf"
    report = export_gguf(fake_run, out, gguf_type="f32", new_tokens=4, min_agreement=14 / 24, log=quiet)
    assert report.token_agreement == 14 / 24 and report.identical == 2
    assert report.max_logit_diff == pytest.approx(0.75, abs=1e-4)  # the worst prompt, not the last
    monkeypatch.setattr(export_gguf_module, "greedy_continuations", Greedy(cut, [0.0] * 6))
    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, out, gguf_type="f32", new_tokens=4, min_agreement=0.6, force=True, log=quiet)
    assert str(e.value) == (f"{out}: greedy outputs of the GGUF agree with the merged model on only 58% of tokens "
                            "(minimum 60%); nothing written.")


def test_gguf_refusals_name_the_file_and_what_failed(fake_run: Path, tmp_path: Path, monkeypatch) -> None:
    import transformers

    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, tmp_path / "m.bin", log=quiet)
    assert str(e.value) == f"{tmp_path / 'm.bin'}: a GGUF file name must end in .gguf."
    out = tmp_path / "m.gguf"
    out.write_text("the user's own file")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(fake_run, out, log=quiet)  # no force: refused before any work
    out.unlink()

    real_tokenizer, real_model = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained

    def unloadable(*a, **k):  # the GGUF file only, not the base the run loads first
        if "gguf_file" in k:
            raise RuntimeError("z" * 300 + "\nsecond line")
        return real_model(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unloadable)
    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, out, gguf_type="f32", log=quiet)
    assert str(e.value) == f"{out}: the written GGUF does not load back ({'z' * 200}); nothing written."
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real_model)

    def other_template(*a, **k):
        tok = real_tokenizer(*a, **k)
        if "gguf_file" in k:
            tok.chat_template = "{{ messages }}"
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", other_template)
    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, out, gguf_type="f32", log=quiet)
    assert str(e.value) == f"{out}: the chat template did not survive the GGUF round trip; nothing written."

    class DropsLastToken:
        def __init__(self, tok) -> None:
            self.tok, self.chat_template = tok, tok.chat_template

        def __call__(self, text, **kwargs):
            return {"input_ids": self.tok(text, **kwargs)["input_ids"][:-1]}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: DropsLastToken(real_tokenizer(*a, **k)) if "gguf_file" in k else real_tokenizer(*a, **k))
    with pytest.raises(ExportError) as e:
        export_gguf(fake_run, out, gguf_type="f32", log=quiet)
    tok = real_tokenizer(fake_run.parent / "base")
    text = tok.decode(sample_prompt_ids(tok, SYSTEM)[0])
    assert len(text) > 60
    assert str(e.value) == (f"{out}: the GGUF tokenizer encodes {text[:60]!r} differently from the model's own "
                            "tokenizer; nothing written.")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
