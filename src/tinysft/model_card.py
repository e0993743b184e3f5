"""What travels with the weights: a model card (README.md) and an Ollama Modelfile.

The card replaces PEFT's empty template: the base model by the name the user gave (not a cache
path), the training data files with their sha256, the resolved config, and the before/after
summary when the run has been evaluated. The Modelfile sits beside a GGUF file so that
``ollama create NAME -f FILE.Modelfile`` runs the export with the right chat format and stop token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml

from tinysft.files import atomic_write_text, write_output_text

CARD_FIGURES = 12  # the before/after table keeps the first figures of report.json (the headline ones)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary_rows(metrics: dict[str, Any]) -> list[str]:
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    rows = []
    for key, value in tuned.items():
        before = base.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(before, int | float):
            continue
        rows.append(f"| {key} | {before:.3g} | {value:.3g} |")
    return rows[:CARD_FIGURES]


def model_card_text(run_dir: str | Path, kind: Literal["adapter", "merged"] = "adapter",
                    dtype: str | None = None) -> str:
    """The README.md text for a run's adapter folder or a merged folder made from it."""
    run = Path(run_dir)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    base = str((config.get("model") or {}).get("name", "unknown"))
    task = str((config.get("train") or {}).get("task", "sft"))
    manifest = _read_json(run / "manifest.json")
    report = _read_json(run / "report.json")
    front = {"base_model": base if not Path(base).is_absolute() else Path(base).name,
             "library_name": "peft" if kind == "adapter" else "transformers",
             "tags": ["tinysft", "lora", "text-classification" if task == "classify" else "sft"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run.resolve().name}", ""]
    what = "A LoRA adapter" if kind == "adapter" else f"The base model with the LoRA adapter merged in ({dtype or 'float32'})"
    lines += [f"{what}, fine-tuned with [tinysft](https://pypi.org/project/tinysft/) from `{base}`"
              f" ({'classification' if task == 'classify' else 'supervised fine-tuning on conversations'}).", ""]
    if kind == "adapter":
        lines += ["```python", "from peft import AutoPeftModelForCausalLM" if task != "classify" else "import peft",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{run.name}/adapter")' if task != "classify"
                  else "# a classification adapter: load it with `tinysft predict RUN`", "```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")', "```", ""]
    metrics = report.get("metrics") if isinstance(report.get("metrics"), dict) else None
    if metrics:
        rows = _summary_rows(metrics)
        if rows:
            lines += ["## Before / after", "", "The same evaluation with the adapter off (base) and on (tuned); "
                      "the full report is report.md / report.html in the run folder.", "",
                      "| figure | base | tuned |", "|---|---:|---:|", *rows, ""]
    hashes = manifest.get("data_sha256") or {}
    if hashes:
        lines += ["## Training data", "", "| file | sha256 |", "|---|---|",
                  *(f"| `{Path(name).name}` | `{digest}` |" for name, digest in hashes.items()), ""]
    versions = manifest.get("libraries") or {}
    if manifest.get("tinysft") or versions:
        lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in
                                              {"tinysft": manifest.get("tinysft"), **versions}.items() if v), ""]
    lines += ["## Config", "", "The resolved config of the run (`config.yaml`):", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, run_dir: str | Path, kind: Literal["adapter", "merged"] = "adapter",
                     dtype: str | None = None) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's template) and return its path."""
    path = Path(folder) / "README.md"
    atomic_write_text(path, model_card_text(run_dir, kind, dtype))
    return path


# ---- Ollama ------------------------------------------------------------------------------------------

# Go templates for the chat formats tinysft renders; Ollama fills .System, .Messages (.Role, .Content).
_OLLAMA_TEMPLATES = {
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    "zephyr": ('{{- if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}'
               '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}'
               '<|assistant|>\n', ["</s>", "<|user|>"]),
}


def chat_format(tokenizer: Any) -> str | None:
    """The chat format of a tokenizer's template, as far as a Modelfile needs it (None: unknown)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "<|im_start|>" in template:
        return "chatml"
    if "<|user|>" in template or "'<|' + message['role'] + '|>" in template:
        return "zephyr"
    return None


def modelfile_text(gguf_name: str, tokenizer: Any, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile for ``gguf_name`` (a file in the same folder)."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE   (then: ollama run NAME)", f"FROM ./{gguf_name}", ""]
    fmt = chat_format(tokenizer)
    if fmt:
        template, stops = _OLLAMA_TEMPLATES[fmt]
        lines += [f'TEMPLATE """{template}"""', *(f'PARAMETER stop "{s}"' for s in stops)]
    else:  # Ollama then uses the chat template stored in the GGUF file's metadata
        eos = getattr(tokenizer, "eos_token", None)
        lines += ["# The chat template stored in the GGUF file is used.", *([f'PARAMETER stop "{eos}"'] if eos else [])]
    if system_prompt:
        lines += ["", 'SYSTEM """' + system_prompt.replace('"""', '" " "') + '"""']
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer: Any, system_prompt: str | None = None) -> Path:
    """Write ``NAME.Modelfile`` beside ``NAME.gguf`` and return its path."""
    gguf = Path(gguf_path)
    path = gguf.with_name(gguf.stem + ".Modelfile")
    # Replaces only a Modelfile tinysft wrote (files.write_output_text refuses the user's own).
    write_output_text(path, modelfile_text(gguf.name, tokenizer, system_prompt), kind="modelfile")
    return path
