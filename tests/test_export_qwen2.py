"""GGUF export of a qwen2 model: q/k/v biases, NEOX rope (rows not reordered), tied embeddings, its
rope theta, and a Qwen2-style byte-level BPE tokenizer (GGUF ``gpt2`` model, ``qwen2`` pre-tokenizer).

The model is a tiny random Qwen2ForCausalLM (random, non-zero biases, so a dropped or misplaced bias
shows) with a ~400-token tokenizer trained here with Qwen2's own split pattern, as test_export.py
does for llama. Each file is checked three ways that do not share code with the exporter: gguf-py's
reader (metadata, names from a table written out here, values against a plain PEFT merge),
transformers' GGUF loader (config, tokenizer, greedy answers against the PEFT-merged model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHAT_ROWS
from test_export import train_run
from tinysft.export import SAMPLE_PROMPTS, ExportError, export_gguf, gguf_pre_tokenizer, write_gguf

ROPE_THETA = 1_000_000.0  # Qwen2's, not the 10,000 default: a file that drops it reads back wrong

# llama.cpp's qwen2 tensors (llama.cpp src/llama-arch.cpp, LLM_ARCH_QWEN2), written out here rather
# than taken from gguf-py, which the exporter uses.
QWEN2_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_qwen2_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{QWEN2_NAMES['.'.join(module)]}.{kind}"


def qwen2_tokenizer(chat_template: str):
    """A ~400-token byte-level BPE split as Qwen2's tokenizer splits (its regex, then ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    texts = [m["content"] for r in CHAT_ROWS for m in r.get("messages", [])] + list(SAMPLE_PROMPTS) * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # As Qwen2's own: no BOS token, <|endoftext|> pads.
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def tiny_qwen2(tok, tie: bool = True, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=ROPE_THETA, tie_word_embeddings=tie, bos_token_id=None, initializer_range=0.3,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)  # initializer_range 0.3: greedy answers vary (at 0.02 they repeat one token)
    with torch.no_grad():  # Qwen2 initializes its biases to zero, which would hide a lost bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def qwen2_model_dir(tmp_path_factory, tokenizer) -> Path:
    tok = qwen2_tokenizer(tokenizer.chat_template)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen2(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory, qwen2_model_dir) -> Path:
    # all-linear: the MLP weights carry the adapter too. Two steps move every LoRA B off zero.
    return train_run(qwen2_model_dir, tmp_path_factory.mktemp("qwen2-run"), "lora.target_modules=all-linear",
                     "train.max_steps=2")


@pytest.fixture(scope="module")
def peft_merged(qwen2_run: Path, qwen2_model_dir: Path):
    """base + adapter merged with plain PEFT (not tinysft's merge), float32, and the base's weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(qwen2_model_dir, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(qwen2_run / "adapter")).merge_and_unload().eval()
    return merged, base_state


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_qwen2_gguf_f32_reads_back_exactly_in_gguf_py_and_transformers(qwen2_run: Path, qwen2_model_dir: Path,
                                                                       peft_merged, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    merged, base_state = peft_merged
    want = {k: v.float() for k, v in merged.state_dict().items()}
    changed = [k for k in want if "proj.weight" in k and not torch.equal(want[k], base_state[k])]
    assert changed, "the adapter changes no weight: nothing here would tell a merge from no merge"

    out = tmp_path / "qwen2-f32.gguf"
    # new_tokens=8: the exporter's own greedy check is not what is tested here (and costs seconds).
    report = export_gguf(qwen2_run, out, gguf_type="f32", new_tokens=8, log=lambda m: None)
    # f32: the weights exactly, so the exporter's own greedy comparison agrees on every token.
    assert report.max_weight_error <= 1e-7 and report.identical == report.prompts, report

    # gguf-py: metadata as llama.cpp's converter writes it for qwen2.
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.rope.freq_base"] == ROPE_THETA
    assert (fields["qwen2.block_count"], fields["qwen2.attention.head_count"], fields["qwen2.attention.head_count_kv"],
            fields["qwen2.context_length"], fields["qwen2.embedding_length"]) == (2, 4, 2, 512, 64)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert "tokenizer.ggml.bos_token_id" not in fields and fields["tokenizer.ggml.add_bos_token"] is False
    tok = AutoTokenizer.from_pretrained(qwen2_model_dir)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "<|im_start|>" in fields["tokenizer.chat_template"]

    # gguf-py: every tensor under llama.cpp's name, biases included, equal to the PEFT merge. q/k
    # rows are compared as they are: qwen2's rope is NEOX in llama.cpp, so no llama reordering.
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {llama_cpp_qwen2_name(k) for k in want if k != "lm_head.weight"}
    assert {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= set(tensors)
    assert "output.weight" not in tensors and "blk.0.attn_output.bias" not in tensors  # tied; o_proj has no bias
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    for hf_name, w in want.items():
        if hf_name == "lm_head.weight":
            assert torch.equal(w, want["model.embed_tokens.weight"])  # tied: llama.cpp reuses token_embd
            continue
        t = tensors[llama_cpp_qwen2_name(hf_name)]
        got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(w.shape)
        assert torch.equal(got, w), hf_name

    # transformers' GGUF loader: the same config, tokenizer and greedy answers as the merged model.
    g_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32,
                                                   quantization_config=GgufConfig(dequantize=True)).eval()
    g_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert g_model.config.model_type == "qwen2" and g_model.config.tie_word_embeddings
    assert g_model.config.rope_parameters["rope_theta"] == ROPE_THETA
    assert torch.equal(g_model.state_dict()["model.layers.1.self_attn.v_proj.bias"],
                       want["model.layers.1.self_attn.v_proj.bias"])
    answers = 0
    for prompt in ("What is 12 times 34?", "Hi", "Name a colour.", "What is 3 plus 4?"):
        ids = chat_ids(tok, prompt)
        assert chat_ids(g_tok, prompt) == ids, prompt
        want_answer = greedy(merged, ids)
        assert greedy(g_model, ids) == want_answer, prompt
        answers += len(set(want_answer)) > 1
    assert answers, "every greedy answer repeats one token: the comparison would be weak"


def test_untied_qwen2_writes_its_output_matrix(tmp_path: Path, tokenizer) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, GgufConfig

    tok = qwen2_tokenizer(tokenizer.chat_template)
    model = tiny_qwen2(tok, tie=False, seed=1)
    write_gguf(model, tok, tmp_path / "untied.gguf", "f32")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "untied.gguf")).tensors}
    lm_head = model.lm_head.weight.detach()
    assert not torch.equal(lm_head, model.model.embed_tokens.weight.detach())
    assert torch.equal(torch.from_numpy(np.array(tensors["output.weight"].data)).reshape(lm_head.shape), lm_head)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="untied.gguf", dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    assert not loaded.config.tie_word_embeddings and torch.equal(loaded.lm_head.weight, lm_head)


def test_qwen2_with_sliding_window_is_refused(tmp_path: Path, tokenizer) -> None:
    tok = qwen2_tokenizer(tokenizer.chat_template)
    model = tiny_qwen2(tok)
    model.config.use_sliding_window = True
    with pytest.raises(ExportError, match="sliding-window"):
        write_gguf(model, tok, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_pre_tokenizer_names() -> None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    def split(pattern: str) -> dict:
        return {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": pattern}},
                                                      {"type": "ByteLevel", "use_regex": False}]}

    assert gguf_pre_tokenizer(split(PRETOKENIZE_REGEX)) == "qwen2"
    assert gguf_pre_tokenizer(split(PRETOKENIZE_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|"))) == "llama-bpe"
    assert gguf_pre_tokenizer(split(r"\s+")) is None  # a split llama.cpp would not reproduce
    assert gguf_pre_tokenizer({"type": "ByteLevel"}) == "gpt-2"
