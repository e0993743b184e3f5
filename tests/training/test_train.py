"""Invariants of LoRA fine-tuning on a tiny random llama."""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tinysft.config import load_config, parse_overrides
from tinysft.training import train


def tiny_cfg(model_dir: Path, data: Path, *extra: str):
    return load_config(None, parse_overrides([
        f"model.name={model_dir}", f"data.train={data}", "train.epochs=8", "train.batch_size=4", "lora.target_modules=all-linear",
        "train.learning_rate=2e-2", "train.log_every=1", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "train.mixed_precision=no", *extra]))


@pytest.fixture(scope="module")
def base_before(tiny_model_dir) -> tuple[str, dict[str, torch.Tensor]]:
    """The base folder's weights file, hashed and read before any training in this module."""
    import hashlib

    from safetensors.torch import load_file

    path = tiny_model_dir / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest(), load_file(str(path))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tokenizer, base_before):
    from conftest import CHAT_ROWS, write_jsonl

    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = tiny_cfg(tiny_model_dir, data)
    result = train(cfg, tmp / "run", show_progress=False, log=lambda m: None)
    return tmp / "run", result, cfg


def test_run_directory_contract(tiny_run) -> None:
    run, result, _ = tiny_run
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_sha256"] and "torch" in manifest["libraries"]
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == result.steps


def test_loss_goes_down(tiny_run) -> None:
    _, result, _ = tiny_run
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses


def test_base_weights_unchanged_and_lora_weights_changed(tiny_run, tiny_model_dir, base_before) -> None:
    import hashlib

    from safetensors.torch import load_file

    run, _, _ = tiny_run
    digest, weights_before = base_before  # read before training
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == digest, \
        "training wrote to the base model's folder"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have been trained"
    assert not any("lora" not in k for k in adapter), "only adapter weights are saved"
    # A freshly loaded run holds the base weights as they were before training.
    from tinysft.models.load import load_run

    loaded = load_run(run, log=lambda m: None)
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in loaded.model.state_dict().items() if "lora" not in k}
    for k, v in weights_before.items():
        # Compared in the dtype the run loads (bf16 where bf16 is fast): rounding the saved fp32
        # weights must give exactly what the run holds.
        assert torch.equal(base_now[k], v.to(base_now[k].dtype)), k


def test_adapter_changes_the_output(tiny_run) -> None:
    from tinysft.evaluate.generate import adapter_state
    from tinysft.models.load import load_run

    loaded = load_run(tiny_run[0], log=lambda m: None)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), adapter_state(loaded.model, False):
        base = loaded.model(input_ids=ids).logits
    with torch.no_grad(), adapter_state(loaded.model, True):
        tuned = loaded.model(input_ids=ids).logits
    assert (base - tuned).abs().max() > 1e-4


@pytest.mark.slow
def test_peft_loads_the_adapter_in_a_fresh_process(tiny_run, tiny_model_dir) -> None:
    run = tiny_run[0]
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r});"
        f"m = PeftModel.from_pretrained(base, {str(run / 'adapter')!r});"
        "print(sum(p.numel() for n, p in m.named_parameters() if 'lora' in n))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


def test_refuses_to_overwrite_a_finished_run(tiny_run) -> None:
    from tinysft.training import TrainError

    run, _, cfg = tiny_run
    with pytest.raises(TrainError, match="already holds a run"):
        train(cfg, run, show_progress=False, log=lambda m: None)


def test_eval_split_is_disjoint_and_sized_and_gives_an_eval_loss(tmp_path, tiny_model_dir) -> None:
    """data.val_fraction holds out that share of the rows, none of them trained on."""
    from conftest import CHAT_ROWS, write_jsonl
    from tinysft.data.validate import load_conversations
    from tinysft.training.sft import split_for_eval

    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS)  # 10 distinct conversations
    convs = load_conversations([str(data)])
    kept, held = split_for_eval(convs, 0.3, seed=42)
    assert (len(kept), len(held)) == (7, 3)
    assert not {c.source for c in kept} & {c.source for c in held}
    assert {c.source for c in kept} | {c.source for c in held} == {c.source for c in convs}
    cfg = tiny_cfg(tiny_model_dir, data, "data.val_fraction=0.3", "train.epochs=1")
    result = train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["train_rows"], manifest["eval_rows"]) == (7, 3)
    assert result.eval_loss is not None and result.eval_loss > 0
    assert any("eval_loss" in h for h in result.history)


def test_runs_with_different_precisions_in_one_process(tmp_path, tiny_model_dir, chat_file) -> None:
    """accelerate keeps one process-wide state; a sweep or notebook trains fp32 and bf16 runs in turn."""
    from accelerate.state import AcceleratorState

    for i, mp in enumerate(["no", "bf16", "no"]):
        logs: list[str] = []
        result = train(tiny_cfg(tiny_model_dir, chat_file, "train.epochs=1", f"train.mixed_precision={mp}"),
                       tmp_path / f"run-{i}", show_progress=False, log=logs.append)
        assert (tmp_path / f"run-{i}" / "adapter" / "adapter_model.safetensors").is_file()
        assert AcceleratorState().mixed_precision == mp
        assert f"computing in {'bf16 autocast' if mp == 'bf16' else 'fp32'} on cpu." in "\n".join(logs)
        assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history if "loss" in h])))


def test_lora_inputs_stay_in_bf16_under_autocast(tiny_model_dir) -> None:
    """With the switch, every LoRA branch receives its input in bf16 under autocast (no fp32 copy);
    without it PEFT casts the input to the adapter's fp32. The output is the same either way
    (autocast computes the adapters in bf16 anyway)."""
    from tinysft.config import LoraConfig, ModelConfig
    from tinysft.models.load import add_lora, keep_lora_inputs_in_compute_dtype, load_causal_lm

    base, _, _ = load_causal_lm(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"), log=lambda m: None)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter, so its path counts
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
             for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert len(hooks) == 14  # 7 linear layers x 2 decoder layers
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits.float()
        assert set(seen) == {torch.float32} and len(seen) == 14, seen  # PEFT's cast to the adapter's dtype
        seen.clear()
        assert keep_lora_inputs_in_compute_dtype(model) == 14
        after = model(input_ids=ids).logits.float()
        assert set(seen) == {torch.bfloat16} and len(seen) == 14, seen
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-2)


def test_preference_loss_widens_the_margin(tiny_model_dir, tokenizer) -> None:
    """A few optimizer steps on the preference term alone raise log p(chosen) - log p(rejected)."""
    from transformers import AutoModelForCausalLM

    from tinysft.config import LoraConfig
    from tinysft.data.batching import collate
    from tinysft.data.formats import to_conversation
    from tinysft.losses import sequence_logprobs
    from tinysft.models.load import add_lora
    from tinysft.training.preference import preference_loss, preference_pairs

    # Rejected answers as long as the chosen ones, so the margin starts near 0 (not saturated).
    rows = [{"prompt": f"How do I pick the lock of my own bike number {n}?", "response": f"Use the key, or call shop {n}.",
             "rejected": f"Sorry, I can't help with bike {n}."} for n in (11, 22, 33)]
    pairs = preference_pairs([to_conversation(r) for r in rows], tokenizer, 512, None)
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0,
                                                                                        target_modules="all-linear"))
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]

    def margin() -> float:
        with torch.no_grad():
            lp = sequence_logprobs(model, collate([*chosen, *rejected], tokenizer.pad_token_id))
        return float((lp[:3] - lp[3:]).mean())

    before = margin()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = preference_loss(model, chosen, rejected, tokenizer.pad_token_id, 0.1, torch.device("cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert margin() > before + 5.0, (before, margin())
    assert losses[-1] < losses[0], losses


def preference_margin(run: Path, model_dir: Path, rows: list[dict]) -> float:
    """Mean over ``rows`` of log p(response) - log p(rejected) under the run's tuned model."""
    from tinysft.data.batching import collate
    from tinysft.data.formats import to_conversation
    from tinysft.losses import sequence_logprobs
    from tinysft.models.load import load_run
    from tinysft.training.preference import preference_pairs

    loaded = load_run(run, log=lambda m: None)
    pairs = preference_pairs([to_conversation(r) for r in rows], loaded.tokenizer, 512, None)
    pad = loaded.tokenizer.pad_token_id
    with torch.no_grad():
        chosen = sequence_logprobs(loaded.model, collate([c for c, _ in pairs], pad))
        rejected = sequence_logprobs(loaded.model, collate([r for _, r in pairs], pad))
    return float((chosen - rejected).mean())


@pytest.mark.parametrize("extra", [[], ["train.preference_tokens=4", "train.preference_pairs=1"], ["train.packing=false"],
                                   ["train.preference_reference=true"],
                                   ["train.preference_reference=true", "train.packing=false"]])
def test_preference_term_is_trained_and_logged(tmp_path, tiny_model_dir, extra) -> None:
    """The term is logged every step, falls, and moves the weights: the tuned model's margin
    log p(answer) - log p(rejected) ends higher than the same run's without the term. Removing the
    term's backward (or its share of the step loss) leaves the margin where SFT alone puts it."""
    from conftest import CHAT_ROWS, write_jsonl

    # Rejected answers that differ from the first token and are about as long (margins near 0 at first).
    rows = [{"prompt": f"How do I kill stuck process {n}?", "response": f"Run kill {n}.",
             "rejected": f"Wait {n} days."} for n in (11, 22)]
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS + rows)
    settings = ("train.epochs=2", "train.learning_rate=5e-3", *extra)
    result = train(tiny_cfg(tiny_model_dir, data, *settings, "train.preference_weight=1", "train.preference_beta=1"),
                   tmp_path / "run", show_progress=False, log=lambda m: None)
    prefs = [h["preference_loss"] for h in result.history if "preference_loss" in h]
    assert len(prefs) == result.steps and all(math.isfinite(p) and p >= 0 for p in prefs), prefs
    train(tiny_cfg(tiny_model_dir, data, *settings), tmp_path / "sft", show_progress=False, log=lambda m: None)
    with_term = preference_margin(tmp_path / "run", tiny_model_dir, rows)
    sft_only = preference_margin(tmp_path / "sft", tiny_model_dir, rows)
    # Measured: the term adds 1.6 to 2.5 nats of margin over SFT alone (0.2 to 0.35) across the three
    # layouts; without its backward the two runs' margins agree to 1e-3.
    assert with_term > sft_only + 0.8, (with_term, sft_only)


@pytest.mark.parametrize("packing", [True, False])
def test_the_dpo_term_starts_every_pair_at_log_2(tmp_path, tiny_model_dir, packing) -> None:
    """With the base model as reference, the first step (LoRA's B = 0: the model is the base) scores
    every pair's margin as 0, whatever the base prefers: the logged term is log 2. Reference-free,
    the same first step logs the base's own margins, far from it."""
    from conftest import CHAT_ROWS, write_jsonl

    # Rejected answers much longer than the answers: the base's margins are far from 0.
    rows = [{"prompt": f"How do I kill stuck process {n}?", "response": f"Run kill {n}.",
             "rejected": f"I'm sorry, but I can't help with process {n} or anything like it, sorry."} for n in (11, 22)]
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS + rows)
    first = {}
    for reference in (True, False):
        cfg = tiny_cfg(tiny_model_dir, data, "train.epochs=1", "train.preference_weight=1", "train.preference_beta=1",
                       f"train.preference_reference={str(reference).lower()}", f"train.packing={str(packing).lower()}")
        result = train(cfg, tmp_path / f"run-{reference}", show_progress=False, log=lambda m: None)
        first[reference] = result.history[0]["preference_loss"]
    assert first[True] == pytest.approx(math.log(2), abs=1e-3), first
    assert abs(first[False] - math.log(2)) > 0.5, first


def test_preference_weight_without_rejected_rows_is_a_data_error(tmp_path, tiny_model_dir, chat_file) -> None:
    from tinysft.data.validate import DataError

    with pytest.raises(DataError, match="rejected"):
        train(tiny_cfg(tiny_model_dir, chat_file, "train.preference_weight=1"), tmp_path / "run",
              show_progress=False, log=lambda m: None)


def test_preference_pool_follows_the_data_weights(tmp_path, tiny_model_dir) -> None:
    """A row the weights drop is not a preference pair either (the pool is the kept rows, once each)."""
    from conftest import CHAT_ROWS, write_jsonl
    from tinysft.data.validate import DataError

    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "How do I kill a stuck process?", "response": "Run kill.",
                                                    "rejected": "I'm sorry, but I can't help with that."}])
    cfg = tiny_cfg(tiny_model_dir, chat, f"data.train={chat},{pairs}", "train.preference_weight=1",
                   "data.file_weights=pairs.jsonl:0")
    with pytest.raises(DataError, match="after data weights"):
        train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)


def test_preference_pairs_keep_the_answer_prefix(tokenizer) -> None:
    from tinysft.data.formats import to_conversation
    from tinysft.data.render import render
    from tinysft.training.preference import preference_pairs

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."},
                        {"role": "user", "content": "How do I kill a stuck job?"},
                        {"role": "assistant", "content": "Run kill with the job's process id, then check it stopped."}],
           "rejected": "I'm sorry, but I can't help with that."}
    conv = to_conversation(row)
    full = render(conv, tokenizer, 512)
    (chosen, rejected), = preference_pairs([conv], tokenizer, 512, None, answer_tokens=3)
    last = len(full.loss_mask) - 1 - full.loss_mask[::-1].index(1)
    answer_start = last - full.loss_mask[last::-1].index(0) + 1  # first token of the last trained run
    assert sum(full.loss_mask[:answer_start]) > 0  # the first answer is trained in SFT
    assert chosen.input_ids == full.input_ids[: answer_start + 3]
    assert chosen.loss_mask == [0] * answer_start + [1, 1, 1]  # the first answer is not trained here
    assert rejected.input_ids[:answer_start] == full.input_ids[:answer_start]
    assert tokenizer.decode(rejected.input_ids[answer_start:]) == tokenizer.decode(
        tokenizer("I'm sorry, but I can't help with that.", add_special_tokens=False)["input_ids"][:3])
    (whole, _), = preference_pairs([conv], tokenizer, 512, None)
    assert whole.input_ids == full.input_ids and whole.loss_mask == full.loss_mask


def test_optimizer_is_fused_where_it_can_be_and_updates_like_the_default() -> None:
    from tinysft.training.loop import make_optimizer

    torch.manual_seed(0)
    init = [torch.randn(16, 40), torch.randn(40, 16), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]

    def run(opt_of: Any) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = opt_of(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    fused = make_optimizer([torch.nn.Parameter(t.clone()) for t in init], 1e-2, 0.01)
    assert fused.defaults["fused"] is True
    assert not make_optimizer([torch.nn.Parameter(init[0].clone())], 1e-2, 0.01, "FSDP").defaults["fused"]
    got = run(lambda ps: make_optimizer(ps, 1e-2, 0.01))
    want = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False))
    for g, w, start in zip(got, want, init, strict=True):
        assert not torch.equal(g, start)  # it moved
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _cpu_isa(monkeypatch, *, amx: bool, avx512_bf16: bool, faster: bool) -> list[int]:
    """Pretend to be a CPU with the given bf16 instructions; returns a list that counts measurements."""
    from tinysft.models import load

    calls: list[int] = []
    monkeypatch.delenv("TINYSFT_FAST_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(load, "cpu_bf16_faster", lambda: calls.append(1) or faster)
    return calls


@pytest.mark.parametrize(("amx", "avx512_bf16", "faster", "expected", "measured"), [
    (True, True, False, True, False),     # AMX: bf16, no need to measure
    (False, True, True, True, True),      # AVX512-BF16 alone: bf16 only where it measured faster
    (False, True, False, False, True),
    (False, False, True, False, False),   # no bf16 instructions: emulated, never bf16
])
def test_auto_dtype_follows_the_cpu(monkeypatch, amx, avx512_bf16, faster, expected, measured) -> None:
    from tinysft.models.load import fast_bf16_available, resolve_dtype

    calls = _cpu_isa(monkeypatch, amx=amx, avx512_bf16=avx512_bf16, faster=faster)
    assert fast_bf16_available("cpu") is expected
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if expected else torch.float32)
    assert bool(calls) is measured


def test_fast_bf16_environment_switch(monkeypatch) -> None:
    from tinysft.models.load import fast_bf16_available

    calls = _cpu_isa(monkeypatch, amx=False, avx512_bf16=True, faster=False)
    monkeypatch.setenv("TINYSFT_FAST_BF16", "1")
    assert fast_bf16_available("cpu") is True and not calls  # on, without measuring
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv("TINYSFT_FAST_BF16", "0")
    assert fast_bf16_available("cpu") is False  # off, even with AMX


def test_bf16_measurement_leaves_the_random_state_alone() -> None:
    from tinysft.models.load import cpu_bf16_faster

    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert isinstance(cpu_bf16_faster.__wrapped__(rounds=1), bool)
    assert torch.equal(torch.get_rng_state(), before)


def _no_half_instructions(monkeypatch, *, has: bool) -> None:
    """Pretend to be a CPU with (has=True: AMX, AVX-512 + BF16) or without (AVX2 only) 16-bit instructions."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported", "_is_avx512_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: has)


@pytest.mark.parametrize(("amx", "avx512", "avx512_bf16", "bf16", "fp16"), [
    (False, False, False, True, True),    # AVX2 only (AMD EPYC VM): both emulated, ~100x slower than fp32
    (False, True, False, True, False),    # AVX-512 without BF16: bf16 emulated; fp16 not measured, not flagged
    (False, True, True, False, False),    # AVX512-BF16
    (True, True, True, False, False),     # AMX
])
def test_emulated_dtypes_follow_the_cpu(monkeypatch, amx, avx512, avx512_bf16, bf16, fp16) -> None:
    from tinysft.models.load import emulated_on_cpu

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert emulated_on_cpu(torch.bfloat16, "cpu") is bf16
    assert emulated_on_cpu(torch.float16, "cpu") is fp16
    assert emulated_on_cpu(torch.float32, "cpu") is False
    assert emulated_on_cpu(torch.bfloat16, "cuda") is False  # a GPU is not this CPU


@pytest.mark.parametrize("has", [False, True])
def test_asking_for_an_emulated_dtype_warns(monkeypatch, tmp_path, tiny_model_dir, chat_file, has) -> None:
    from tinysft.config import ModelConfig
    from tinysft.models.load import load_causal_lm

    _no_half_instructions(monkeypatch, has=has)
    logs: list[str] = []
    load_causal_lm(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"), log=logs.append)
    assert any("model.dtype=bfloat16 asks for bfloat16" in m for m in logs) is not has
    logs.clear()
    train(tiny_cfg(tiny_model_dir, chat_file, "train.epochs=1", "train.mixed_precision=bf16"), tmp_path / "run",
          show_progress=False, log=logs.append, stop_after_steps=1)
    warned = [m for m in logs if m.startswith("Warning: train.mixed_precision=bf16 asks for bfloat16")]
    assert len(warned) == (0 if has else 1), logs


def test_models_load_without_hub_kernels(tiny_model_dir: Path) -> None:
    # transformers' default (use_kernels=True) swaps layers for code fetched from the Hub; offline on a
    # CUDA GPU, model.train() then raised (seen on an H200). tinysft keeps torch's layers.
    from transformers import AutoModelForCausalLM

    from tinysft.config import ModelConfig
    from tinysft.models.load import HUB_KERNELS_OFF, load_causal_lm

    model, _, _ = load_causal_lm(ModelConfig(name=str(tiny_model_dir)), log=lambda m: None)
    assert model.use_kernels is False
    model.train()
    assert model.use_kernels is False and model.kernels_mode is None
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir, **HUB_KERNELS_OFF).use_kernels is False


@pytest.mark.parametrize(("setting", "device", "packed"), [
    ("auto", "cpu", True), ("auto", "cuda", False), ("true", "cuda", True), ("false", "cpu", False)])
def test_packing_auto_packs_on_a_cpu_and_pads_on_a_gpu(setting: str, device: str, packed: bool) -> None:
    from tinysft.training.sft import packing_for

    cfg = load_config(None, parse_overrides([f"train.packing={setting}"]))
    assert packing_for(cfg, torch.device(device)) is packed


def test_training_runs_tinysft_layers_after_model_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    # With transformers' default use_kernels=True, model.train() (called before the loop) re-kernelized
    # the model and put transformers' RMSNorm forward back over tinysft's: the fast norm silently did
    # not run in training. Every patched layer must still be the one that trains.
    from torch.profiler import ProfilerActivity, profile

    from conftest import CHAT_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    cfg = tiny_cfg(tiny_model_dir, data, "train.epochs=1", "lora.dropout=0.1")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    ran = {e.key for e in prof.key_averages()}
    for fn in ("_RMSNormBackward", "_SiluMulBackward", "_LoraLinearBackward", "_HeadCrossEntropyBackward"):
        assert fn in ran, fn
