"""Load a base model (embedded name, local folder, .gguf file or hub id), pick dtypes, wrap with LoRA."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinysft.config import LoraConfig, ModelConfig
from tinysft.models.registry import (
    EMBEDDED,
    HUB_KERNELS_OFF,
    ModelError,
    check_gguf,
    check_hub_id,
    convert_gguf,
    ensure_embedded,
    first_line,
    tinysft_home,
)


def _drop_hub_kernel_warning(record: logging.LogRecord) -> bool:
    """bitsandbytes (imported by PEFT) tries to fetch a 4-bit CPU kernel from the Hugging Face hub
    at import and warns when it cannot; it then uses its own CPU kernel. Offline that warning is
    every run's first line, and says nothing the user can act on."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _drop_offline_trust_note(record: logging.LogRecord) -> bool:
    """The kernels package notes, at every import of bitsandbytes in offline mode, that it skips the
    publisher check of that same hub kernel; nothing the user can act on either."""
    return not record.getMessage().startswith("Skipping publisher trust check for 'kernels-community/")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_warning)
logging.getLogger("kernels._internals.hf_hub").addFilter(_drop_offline_trust_note)
# PEFT, saving an adapter whose base is a hub id while offline, cannot look up the base's config on
# the hub and says it will assume an unmodified vocabulary: tinysft never resizes the embeddings.
warnings.filterwarnings("ignore", message=r"Could not find a config file in .* - will assume that the vocabulary")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")




def fast_bf16_available(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls are fast: CUDA with bf16, a CPU with AMX, or a CPU with AVX512-BF16
    whose bf16 matmul measures faster than its fp32 one (``cpu_bf16_faster``).

    On a CPU without them, bf16 is emulated and *slower* than fp32 (measured ~0.35x on AVX512
    without BF16), so "auto" must not pick it there. AVX512-BF16 alone is not enough either: an AMD
    EPYC VM ran bf16 matmuls at ~2.3x its fp32 rate, an Intel Xeon VM with AVX512-BF16 and no AMX at
    ~0.5x (and the demo recipe trained 1.36x faster in fp32 there). ``TINYSFT_FAST_BF16=0`` in the
    environment turns bf16 off everywhere (fp32 throughout: bit-for-bit reproducible numbers, e.g.
    batched greedy answers identical to one-at-a-time ones, at the cost of speed); ``=1`` turns it
    on wherever the hardware has bf16 instructions, without the measurement.
    """
    setting = os.environ.get("TINYSFT_FAST_BF16", "").strip().lower()
    if setting in ("0", "no", "false", "off"):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if emulated_on_cpu(torch.bfloat16, device):  # no AMX, no AVX512-BF16
        return False
    try:
        if torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:  # a torch without the probes
        return False
    return setting in ("1", "yes", "true", "on") or cpu_bf16_faster()


@functools.lru_cache(maxsize=1)
def cpu_bf16_faster(rounds: int = 5) -> bool:
    """Whether a bf16 matmul of a small model's shape beats fp32 on this CPU (measured once per process).

    One 512 x 576 @ 576 x 1,536 product (SmolLM2-135M's MLP on 512 tokens) in each dtype, taken in
    turns, best of ``rounds``; ~0.1 s in all. The inputs come from their own generator, so the
    global random state, and with it a run's seed, is untouched.
    """
    gen = torch.Generator().manual_seed(0)
    a32 = torch.rand(512, 576, generator=gen)
    b32 = torch.rand(576, 1536, generator=gen)
    pairs = {torch.float32: (a32, b32), torch.bfloat16: (a32.bfloat16(), b32.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for a, b in pairs.values():
            a @ b  # first call: oneDNN builds its kernel
        for _ in range(rounds):
            for dtype, (a, b) in pairs.items():
                t0 = time.perf_counter()
                a @ b
                a @ b
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < best[torch.float32]


def emulated_on_cpu(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether ``dtype`` has no matmul instructions on this CPU, so torch emulates it far below fp32.

    On an AMD EPYC VM with AVX2 only (no AVX-512), bf16 matmuls ran at 0.3-2 GFLOP/s and fp16 at ~1.2
    against ~160 for fp32: a run that asks for either there is ~100x slower than ``auto`` (fp32).
    Flagged: bf16 without AMX or AVX512-BF16, and fp16 without AMX-FP16 or any AVX-512 (an Intel
    Xeon with AVX512-FP16 ran it at ~250 GFLOP/s; AVX-512 CPUs without it were not measured).
    """
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    cpu = getattr(torch, "cpu", None)
    try:
        if dtype == torch.bfloat16:
            return not (cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
        return not (cpu._is_amx_fp16_supported() or cpu._is_avx512_supported())
    except AttributeError:  # a torch without these probes: say nothing
        return False


def emulated_warning(dtype: torch.dtype, setting: str) -> str:
    """The one-line warning for a run that asked for an emulated 16-bit dtype (``setting`` names where)."""
    name = str(dtype).removeprefix("torch.")
    return (f"Warning: {setting} asks for {name}, which this CPU has no instructions for: torch emulates it, "
            f"about 100x slower than fp32 here. Set it to auto (fp32 on this CPU) unless you need {name}.")


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if fast_bf16_available(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_path(name: str, log=print) -> str:
    """Embedded name -> cached folder; .gguf -> converted cache folder; folder -> itself; else a hub id."""
    if name in EMBEDDED:
        return str(ensure_embedded(name, log=log))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        check_gguf(path)
        import hashlib

        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        target = tinysft_home() / "models" / f"gguf-{path.stem}-{key}"
        if not (target / "config.json").is_file():
            import tempfile

            target.parent.mkdir(parents=True, exist_ok=True)
            log(f"Converting {path.name} to a safetensors folder (once)...")
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as tmp:
                convert_gguf(path, Path(tmp) / "model")
                (Path(tmp) / "model").rename(target)
        return str(target)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a model folder (with config.json) or a .gguf file.")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json in this folder — point --model at a Hugging Face model folder.")
        return str(path)
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelError(f"{path}: no such model folder or file — check the path (or pick an embedded model: "
                         f"{', '.join(EMBEDDED)}).")
    if name.count("/") == 1:
        check_hub_id(name, log=log)  # a hub id (org/name): downloaded by transformers, or read from the HF cache
        return name
    raise ModelError(f"model '{name}' is not an embedded name ({', '.join(EMBEDDED)}), an existing folder, "
                     "or a .gguf file. Check the spelling, or pass a hub id as org/name.")


def _check_weights_safe(path: str, allow_pickle: bool) -> None:
    folder = Path(path)
    if not folder.is_dir() or allow_pickle:
        return
    files = [p.name for p in folder.iterdir()]
    has_safe = any(f.endswith(".safetensors") for f in files)
    has_pickle = any(f.endswith(PICKLE_SUFFIXES) for f in files)
    if has_pickle and not has_safe:
        raise ModelError(f"{folder}: only pickle weights (.bin/.pt) found. Pickle files can run code when "
                         "loaded, so tinysft loads safetensors only; convert the model, or, if you trust it, set "
                         "model.allow_pickle=true in your training config (or pass --allow-pickle to a command "
                         "that loads a run).")


def _offline_hint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" in name:
        return " No model hub may be reachable here: use an embedded model (see `tinysft models`), a local folder or a .gguf file."
    return ""


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"{path}: could not load the tokenizer ({first_line(e)}).{_offline_hint(path)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _quantization_config(quantize: str, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for a frozen QLoRA base: NF4 with double quantization (the QLoRA paper's
    recipe; the quantization constants are quantized too, ~0.4 bit/param less), or LLM.int8.

    ``compute_dtype`` is what the 4-bit weights are dequantized to for each matmul: bf16 where bf16
    is fast, else the storage dtype (fp32 on a CPU without AMX / AVX512-BF16, where bf16 is slower).
    bitsandbytes >= 0.50 has CPU kernels for both, so CPU and CUDA run the same code path.
    """
    if quantize == "none":
        return None
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError("model.quantize needs bitsandbytes >= 0.50: pip install 'tinysft[qlora]'.") from None
    major, minor = (int(x) for x in bitsandbytes.__version__.split(".")[:2])
    if (major, minor) < (0, 50):
        raise ModelError(f"model.quantize needs bitsandbytes >= 0.50 (found {bitsandbytes.__version__}, which has "
                         "no CPU kernels): pip install -U 'bitsandbytes>=0.50'.")
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    # LLM.int8 casts activations to fp16 by design; bitsandbytes logs a warning on every matmul.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_int8_cast_warning not in bnb_logger.filters:
        bnb_logger.addFilter(_drop_int8_cast_warning)
    return BitsAndBytesConfig(load_in_8bit=True)


def _drop_int8_cast_warning(record: Any) -> bool:
    return "inputs will be cast" not in record.getMessage()


def load_causal_lm(cfg: ModelConfig, device: torch.device | str = "cpu", log=print) -> tuple[Any, Any, str]:
    """Load the frozen base model and tokenizer. Returns (model, tokenizer, resolved_path)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name, log=log)
    _check_weights_safe(path, cfg.allow_pickle)
    dtype = resolve_dtype(cfg.dtype, device)
    if emulated_on_cpu(dtype, device):
        log(emulated_warning(dtype, f"model.dtype={cfg.dtype}"))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                              "use_safetensors": None if cfg.allow_pickle else True, **HUB_KERNELS_OFF}
    qconfig = _quantization_config(cfg.quantize, torch.bfloat16 if dtype == torch.float32 and
                                   fast_bf16_available(device) else dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(device)} if torch.device(device).type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        damaged = " The weights file looks cut short or damaged: copy or download it again." \
            if "deserializing header" in str(e) else ""
        raise ModelError(f"{path}: could not load the model ({first_line(e)}).{damaged or _offline_hint(path)}") from None
    from tinysft.data.templates import MISSING_TEMPLATE_FIX, apply_chat_template

    tokenizer = apply_chat_template(load_tokenizer(path, cfg.trust_remote_code), cfg.chat_template)
    if tokenizer.chat_template is None:
        raise ModelError(f"{path}: the tokenizer has no chat template, so conversations cannot be rendered — "
                         f"{MISSING_TEMPLATE_FIX}.")
    if qconfig is None:
        model.to(device)
    model.requires_grad_(False)
    return model, tokenizer, path


def add_lora(model: Any, cfg: LoraConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """Wrap a frozen base with fresh LoRA adapters (fp32 LoRA weights even on a bf16 base)."""
    import peft

    target = cfg.target_modules
    if isinstance(target, list) and target == ["all-linear"]:
        target = "all-linear"
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                           task_type=task_type, modules_to_save=modules_to_save)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return peft.get_peft_model(model, lcfg)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"lora.target_modules: {first_line(e)} Linear layers in this model: "
                         f"{', '.join(names)} (or use all-linear).") from None


def keep_lora_inputs_in_compute_dtype(model: Any) -> int:
    """Stop PEFT from casting each LoRA layer's input to the adapter's dtype; returns how many layers.

    With a bf16 base and fp32 adapter weights, PEFT copies every adapted layer's input to fp32
    (``_cast_input_dtype``), and autocast copies it straight back to bf16 for the matmul: two
    copies of a full activation per layer, forward and backward, ~15% of a CPU training step.
    Only for use under autocast, which runs the adapter's matmuls in bf16 anyway.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def _check_adapter(adapter: Path, allow_pickle: bool) -> str | None:
    """Fail early, naming the file, on a damaged adapter (a copy cut short, a full disk); returns the
    base model the adapter was trained for."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelError(f"{adapter / 'adapter_config.json'}: unreadable or not valid JSON ({first_line(e)}) — the "
                         "run's adapter is damaged; train it again or restore the folder.") from None
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = any((adapter / n).is_file() for n in ("adapter_model.bin", "adapter_model.pt"))
        if pickled and not allow_pickle:
            raise ModelError(f"{adapter}: the adapter weights are a pickle file (adapter_model.bin), which can run "
                             "code when loaded; tinysft loads safetensors only. Pass --allow-pickle on the command line if you "
                             "trust this run (a run's own config.yaml cannot allow it).")
        if not pickled:
            raise ModelError(f"{weights}: missing — the run's adapter is incomplete; train it again.")
        return config.get("base_model_name_or_path") if isinstance(config, dict) else None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:  # reads the header: a cut-short file fails here
            f.keys()
    except Exception as e:
        raise ModelError(f"{weights}: damaged or incomplete ({first_line(e)}) — the file was cut short or "
                         "overwritten; train the run again or restore the file.") from None
    return config.get("base_model_name_or_path") if isinstance(config, dict) else None


@dataclass(frozen=True)
class RunPermissions:
    """What loading a run folder may do beyond reading safetensors and JSON: only the user's own
    command line grants these (``--trust-remote-code``, ``--allow-pickle``, ``--allow-other-base``),
    never the run folder's config.yaml, which is data that may come from anyone."""

    trust_remote_code: bool = False
    allow_pickle: bool = False
    allow_other_base: bool = False


_PERMISSIONS: ContextVar[RunPermissions] = ContextVar(
    "tinysft_run_permissions", default=RunPermissions())  # noqa: B039 (frozen: never mutated)


@contextlib.contextmanager
def run_permissions(permissions: RunPermissions) -> Iterator[None]:
    """Grant ``permissions`` to every run folder loaded inside the block (the CLI wraps a command in it)."""
    token = _PERMISSIONS.set(permissions)
    try:
        yield
    finally:
        _PERMISSIONS.reset(token)


def granted_permissions() -> RunPermissions:
    """The permissions the current command granted (``run_permissions``); none by default."""
    return _PERMISSIONS.get()


def load_run_config(run_dir: str | Path, log=print) -> Any:
    """A run folder's config.yaml as a RunConfig, with ``model.trust_remote_code`` and
    ``model.allow_pickle`` taken from the granted :class:`RunPermissions`, never from the file.

    Every loader of a run folder (generate, eval, chat, serve, merge, export, predict) reads the
    config through here, so a downloaded run cannot turn either on by itself.
    """
    from tinysft.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    granted = _PERMISSIONS.get()
    for key, flag in (("trust_remote_code", "--trust-remote-code"), ("allow_pickle", "--allow-pickle")):
        if getattr(cfg.model, key) and not getattr(granted, key):
            log(f"note: {run_dir / 'config.yaml'} sets model.{key}=true; ignored: a run folder cannot enable it. "
                f"Pass {flag} on the command line if you trust this run and its model.")
        setattr(cfg.model, key, getattr(granted, key))
    return cfg


@dataclass
class LoadedRun:
    model: Any  # PeftModel: adapter enabled = tuned, `with model.disable_adapter()` = base
    tokenizer: Any
    config: Any  # RunConfig
    run_dir: Path


def check_run_dir(run_dir: Path) -> None:
    """Refuse, with the fix, a folder that is not a finished run: no config.yaml, a config folder
    (config.yaml but nothing trained), or a run that stopped before writing its adapter."""
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{run_dir}: not a tinysft run directory (no config.yaml) — pass the folder `tinysft train --out` wrote.")
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return
    if not (run_dir / "checkpoints").is_dir() and not (run_dir / "metrics.jsonl").is_file():
        raise ModelError(f"{run_dir}: has a config.yaml but no adapter/ or checkpoints/, so it is not a run that "
                         "tinysft trained (a config folder?) — train it first: tinysft train "
                         f"{run_dir / 'config.yaml'} --out runs/NAME, then pass runs/NAME.")
    raise ModelError(f"{run_dir}: no adapter/adapter_config.json — the run did not finish; rerun the same `tinysft train` command to continue it (or pass --resume).")


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", log=print, dequantize: bool = False,
             dtype: str | None = None) -> LoadedRun:
    """Load a run directory's base model with its adapter, ready for generation.

    ``dequantize=True`` turns a 4-/8-bit base back into plain Linear layers (the values the adapter
    was trained against) before the adapter is attached, so it can be merged exactly. ``dtype``
    overrides the run's ``model.dtype`` (e.g. "float32" to merge into the full-precision base
    rather than its bf16 rounding).
    """
    import peft

    from tinysft.data.templates import apply_chat_template

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    adapter = run_dir / "adapter"
    cfg = load_run_config(run_dir, log=log)  # never trust_remote_code / allow_pickle from the run folder
    if cfg.train.task == "classify":
        raise ModelError(f"{run_dir}: this is a classification run; use `tinysft predict` or `tinysft eval --data`.")
    expected = _check_adapter(adapter, cfg.model.allow_pickle)
    if dtype is not None:
        cfg.model.dtype = dtype
    base, tokenizer, _ = load_causal_lm(cfg.model, device=device, log=log)
    if dequantize and cfg.model.quantize != "none":
        base = base.dequantize()
    from tinysft.models.identity import check_same_base

    check_same_base(run_dir, cfg.model.name, base, allow_other_base=granted_permissions().allow_other_base, log=log)
    if (run_dir / "tokenizer").is_dir():
        tokenizer = apply_chat_template(load_tokenizer(str(run_dir / "tokenizer")), cfg.model.chat_template)
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except Exception as e:
        # The first "size mismatch" line names a tensor and both shapes; more useful than the header.
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), first_line(e))
        raise ModelError(f"{adapter}: the adapter does not fit the base model {cfg.model.name} ({detail[:300]}); "
                         f"it was trained for {expected}. Set model.name in {run_dir / 'config.yaml'} back to "
                         "that model.") from None
    model.eval()
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, run_dir=run_dir)
