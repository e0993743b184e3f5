"""Run configuration: a few small typed dataclasses, YAML + ``--set key=value`` overrides.

Precedence is CLI flags > YAML file > the defaults below. The resolved config is written into the
run directory (``config.yaml``) so a run can be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; the message says what to change."""


# Short dtype names people type (PyTorch / accelerate spell them both ways) -> the long ones used here.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Embedded name (see `tinysft models`), a local HF folder, a .gguf file, or a hub id."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Load the frozen base in 4-bit NF4 or 8-bit through bitsandbytes (QLoRA)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    """Storage dtype of the frozen base weights; auto = bf16 where the hardware runs it fast.
    fp32 / bf16 / fp16 are accepted for float32 / bfloat16 / float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust the repo."""
    allow_pickle: bool = False
    """Allow loading .bin/.pt (pickle) weights. Off: pickle files can run arbitrary code."""
    chat_template: str | None = None
    """For a model whose tokenizer has no chat template: a built-in one (chatml, zephyr, plain) or the
    path of a Jinja template file. None = the tokenizer's own."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty — give an embedded name, a folder, a .gguf file or a hub id.")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)  # type: ignore[assignment]
        if self.chat_template and Path(self.chat_template).expanduser().is_file():  # the run keeps working elsewhere
            self.chat_template = str(Path(self.chat_template).expanduser().resolve())


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt, or "all-linear"; for encoders the defaults are chosen per architecture."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1 (got {self.r}) — try lora.r=8 or 16.")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0 (got {self.alpha}) — a common choice is 2 x r.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1) (got {self.dropout}).")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty — e.g. q_proj,v_proj or all-linear.")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training files (JSONL; CSV for classification)."""
    eval: list[str] = field(default_factory=list)
    """Held-out files for eval loss; empty = split `val_fraction` off the training data."""
    val_fraction: float = 0.0
    """Fraction of training rows held out for eval loss when no eval file is given."""
    max_length: int = 512
    """Longest rendered sequence in tokens; longer rows are truncated (and reported)."""
    system_prompt: str | None = None
    """A system message prepended to conversations that have none."""
    labels: list[str] = field(default_factory=list)
    """Classification label set; empty = inferred from the training file."""
    category_weights: dict[str, float] = field(default_factory=dict)
    """Re-mix training rows by ``category``: 2 = twice per epoch, 0.5 = a seeded half, 0 = dropped;
    unlisted categories keep 1. On the command line: --set data.category_weights=refusal:2,task:0.5"""
    file_weights: dict[str, float] = field(default_factory=dict)
    """Re-mix training rows by file (its name in data.train, or the end of its path), the same way;
    a row's weight is its category's times its file's. --set data.file_weights=more.jsonl:0.4"""

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.eval, str):
            self.eval = [self.eval]
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8 (got {self.max_length}).")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction}).")
        for kind, weights in (("category_weights", self.category_weights), ("file_weights", self.file_weights)):
            for name, weight in weights.items():
                if weight < 0:
                    raise ConfigError(f"data.{kind}.{name} must be >= 0 (got {weight}).")


# train.report_to names -> the package each needs (accelerate's trackers).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@dataclass
class TrainConfig:
    task: Literal["sft", "classify"] = "sft"
    """sft: causal LM on chat data; classify: sequence classification on text/label rows."""
    epochs: float = 3.0
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = train.epochs decides): for quick trial runs."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    batch_size: int = 8
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: float = 0.05
    """Fraction of steps with linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    seed: int = 42
    """Seeds data order, LoRA init and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16", "bfloat16", "float16"] = "auto"
    """auto = bf16 autocast on CUDA with bf16, on CPUs with AMX, and on CPUs with AVX512-BF16 where a bf16 matmul
    measures faster than fp32 (models.load.fast_bf16_available); else fp32."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several conversations per row (attention stays within each conversation). auto = packed on a
    CPU; padded batches on a GPU, where tinysft's
    per-conversation attention (one kernel call per conversation and layer) is slower than padding
    (docs/benchmarks.md)."""
    share_prefixes: bool = True
    """In a packed pass, the opening tokens that a conversation shares with another (the chat
    template's system prompt, say) are computed once, as with a prompt cache: the same losses and
    gradients for fewer tokens. On a CPU, with packing and tinysft's packed attention (else off)."""
    group_by_length: bool | None = None
    """Put similar-length conversations in a batch, to save padding. None (default) = only without
    packing, which has no padding to save. Sorted batches gather one kind of row each (short
    refusals, long explanations); shuffled ones mix them, which measured better for behaviour
    (docs/recipe.md)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, more time."""
    preference_weight: float = 0.0
    """Weight of the preference term for rows with a `rejected` answer (0 = off); see docs/recipe.md."""
    preference_beta: float = 0.1
    """Scale of the log-probability margin inside that term: -log sigmoid(beta * (log p(answer) - log p(rejected)))."""
    preference_pairs: int = 0
    """Pairs in the preference term per optimizer step and process (0 = half of train.batch_size),
    drawn from every training row with a `rejected` answer; a row with a list of them gives one pair
    per rejected answer. With packing they are scored inside the SFT pass as extra pair-only rows
    sharing their prompt; otherwise in a pass of their own."""
    preference_tokens: int = 0
    """Only the first N tokens of the answer and of `rejected` enter the term (0 = whole answers):
    the refuse-or-answer decision is made there, and the pair pass gets shorter."""
    preference_reference: bool = False
    """Measure each pair's margin against the base model's (DPO, Rafailov et al. 2023):
    -log sigmoid(beta * (margin - base margin)), every pair starting at log 2; the base margins are
    computed once before training. False = reference-free (the CPO form), which pushes hardest on
    the pairs the model gets most wrong."""
    log_every: int = 5
    """Optimizer steps between log lines in metrics.jsonl."""
    eval_every: int = 0
    """Optimizer steps between eval-loss passes (0 = once per epoch and at the end)."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get every log line, through accelerate: any of tensorboard,
    wandb, mlflow, trackio (comma-separated; [] = metrics.jsonl only). TensorBoard writes to
    RUN/tensorboard; the others follow their own settings (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...)."""

    def __post_init__(self) -> None:
        self.mixed_precision = {"bfloat16": "bf16", "float16": "fp16"}.get(self.mixed_precision, self.mixed_precision)  # type: ignore[assignment]
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0 (got {self.learning_rate}) — try 2e-4.")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0 (got {self.epochs}).")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1) (got {self.warmup_ratio}).")
        if self.preference_beta <= 0:
            raise ConfigError(f"train.preference_beta must be > 0 (got {self.preference_beta}) — try 0.1.")
        for name in ("weight_decay", "max_grad_norm", "eval_every", "save_every", "threads", "max_steps",
                     "preference_weight", "preference_pairs", "preference_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (got {getattr(self, name)}); 0 means off / the default.")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}.")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError(f"train.log_every and train.keep_checkpoints must be >= 1 (got {self.log_every}, "
                              f"{self.keep_checkpoints}).")


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=list)
    """Prompt files (JSONL rows with `prompt` or `messages`) answered by base and tuned."""
    max_new_tokens: int = 160
    """Longest generated answer."""
    batch_size: int = 256
    """Answers decoded together (continuous batching: a finished answer's row takes the next prompt;
    fewer where the KV cache would pass 2 GiB)."""
    temperature: float = 0.0
    """0 = greedy decoding (reproducible)."""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"eval.max_new_tokens and eval.batch_size must be >= 1 (got {self.max_new_tokens}, "
                              f"{self.batch_size}).")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature must be >= 0 (got {self.temperature}); 0 = greedy.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML (through a temporary file: never half-written)."""
        from tinysft.files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


# Names people carry over from other tools (PEFT, TRL, transformers) -> tinysft's name.
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
           "num_epochs": "epochs", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
           "per_device_train_batch_size": "batch_size", "max_seq_length": "max_length", "model_name": "name"}


def _did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    if ALIASES.get(name) in options:
        return f" Did you mean '{ALIASES[name]}'?"
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or --set value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}.")
    if origin is Literal:
        if isinstance(value, bool) and "no" in args:
            value = "no" if value is False else value  # YAML reads a bare `no` as false
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")
        return [_coerce(v, args[0], where) for v in value]
    if origin is dict:
        if isinstance(value, str):  # --set data.category_weights=refusal:2,task:0.5 (the last ':' splits)
            pairs = [p.rpartition(":") for p in value.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(f"{where}: expected NAME:VALUE pairs separated by commas, got {value!r}.")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}.")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}.") from None
        if not math.isfinite(number):  # "nan" and "inf" parse as floats but are never a setting
            raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
        if annotation is int:
            if number != int(number):
                raise ConfigError(f"{where}: expected a whole number, got {value!r}.")
            return int(number)
        return number
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected text, got {type(value).__name__} {value!r}.")
        return str(value)
    return value


# Keys of experiments that measured worse and were removed (docs/recipe.md), with their "off"
# values: a saved run's config.yaml still holds them, and loads as long as they are off.
REMOVED = {"train.answer_start_tokens": 0, "train.answer_start_weight": 1.0, "train.preference_in_batch": False}


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        removed = f"{section}.{key}"
        if removed in REMOVED:
            if str(value).lower() != str(REMOVED[removed]).lower() and value != REMOVED[removed]:
                raise ConfigError(f"{removed} was removed (it measured worse; docs/recipe.md); delete it from the "
                                  "config to train without it.")
            continue
        if key not in known:
            raise ConfigError(f"unknown key '{section}.{key}'.{_did_you_mean(key, known)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def parse_overrides(pairs: typing.Iterable[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.epochs=2", "lora.r=8"]`` into ``{"train": {"epochs": "2"}, "lora": {"r": "8"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {pair!r}: expected SECTION.KEY=VALUE, e.g. --set train.epochs=2.")
        if section not in SECTIONS:
            raise ConfigError(f"--set {pair!r}: unknown section '{section}'.{_did_you_mean(section, SECTIONS)}")
        # Kept as text: each field's type decides how to read it (a bare `no` must stay "no").
        out.setdefault(section, {})[name] = value.strip()
    return out


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """Defaults, then the YAML file, then ``overrides`` (section -> key -> value)."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found — check the path.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}) — re-save the config as UTF-8.") from None
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error_message(path, e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, train, eval).")
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section '{section}'.{_did_you_mean(str(section), SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of keys to values.")
            merged[section].update(values)
        # Relative data paths in a config file are relative to the file, not the working directory.
        for key in ("train", "eval"):
            merged["data"][key] = _resolve_paths(merged["data"].get(key), path.parent)
        merged["eval"]["prompts"] = _resolve_paths(merged["eval"].get("prompts"), path.parent)
        merged["data"] = {k: v for k, v in merged["data"].items() if v is not None}
        merged["eval"] = {k: v for k, v in merged["eval"].items() if v is not None}
    for section, values in (overrides or {}).items():
        merged[section].update(values)
    try:
        return RunConfig(**{name: _build(cls, merged[name], name) for name, cls in SECTIONS.items()})
    except ConfigError as e:
        where = f"{path}: " if path is not None and not str(e).startswith(str(path)) else ""
        raise ConfigError(f"{where}{e}") from None


# PyYAML's problem texts -> the cause in words, and what to do about it.
_YAML_CAUSES = {
    "found character '\\t' that cannot start any token": (
        "a tab character in the indentation", "YAML indents with spaces only: replace the tab with spaces"),
    "mapping values are not allowed here": (
        "a ':' where no 'key: value' can start (the line is indented more than its neighbours, or a value "
        "holds ': ')", "line the key up with the keys around it, or quote the value"),
    "could not find expected ':'": ("a line without 'key: value' inside a mapping", "write 'key: value'"),
    "found unexpected end of stream": ("the file ends inside a quoted string", "close the quote"),
    "expected ',' or ']', but got '<stream end>'": ("a list opened with '[' is never closed", "close it with ']'"),
    "expected ',' or '}', but got '<stream end>'": ("a mapping opened with '{' is never closed", "close it with '}'"),
}


def yaml_error_message(path: Path, error: Exception) -> str:
    """``FILE:LINE:COLUMN: not valid YAML: <the cause in words> — <the fix>`` (1-based line and column)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = str(getattr(error, "problem", None) or str(error).splitlines()[0])
    cause, fix = _YAML_CAUSES.get(problem, (problem.replace("'\\t'", "a tab"), "fix the syntax at that position"))
    lines = (getattr(mark, "buffer", None) or "").splitlines()
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    if "\t" in line[: len(line) - len(line.lstrip())] and "tab" not in cause:
        cause += " (this line is indented with a tab: YAML indents with spaces only)"
    return f"{where}: not valid YAML: {cause} — {fix}."


def _resolve_paths(value: Any, base: Path) -> Any:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    return [str(base / p) if isinstance(p, str) and not Path(p).is_absolute() and (base / p).exists() else p for p in items]
