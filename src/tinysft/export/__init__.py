"""Merge a run's adapter into its base and export it — verified before anything is written.

Two outputs, each checked against the model it came from:

* ``merge_run`` (``merge.py``): a plain safetensors folder that ``AutoModelForCausalLM.from_pretrained``
  loads without PEFT, whose logits, loaded back, equal base + adapter's.
* ``export_gguf`` (``gguf_export.py``): one llama.cpp GGUF file (f32, f16, bf16 or q8_0), written by
  ``gguf_writer.py`` with the ``gguf`` package for the architectures in ``GGUF_ARCHS`` (llama, qwen2),
  tokenizer and chat template included; read back with transformers' GGUF reader and compared
  weight by weight and greedy token by greedy token with the merged model.
"""

from tinysft.export.gguf_export import GGUF_WEIGHT_RTOL, GgufReport, export_gguf
from tinysft.export.gguf_writer import (
    GGUF_ARCHS,
    GGUF_FILE_TYPE,
    GgufType,
    gguf_pre_tokenizer,
    gguf_tensor_name,
    permute_qk,
    write_gguf,
)
from tinysft.export.merge import (
    MERGE_RTOL,
    SAMPLE_PROMPTS,
    ExportError,
    MergeReport,
    SaveDtype,
    inputs_of,
    merge_run,
    merged_model,
    prompt_logits,
    sample_prompt_ids,
)

__all__ = [
    "GGUF_ARCHS", "GGUF_FILE_TYPE", "GGUF_WEIGHT_RTOL", "MERGE_RTOL", "SAMPLE_PROMPTS", "ExportError", "GgufReport",
    "GgufType", "MergeReport", "SaveDtype", "export_gguf", "gguf_pre_tokenizer", "gguf_tensor_name", "inputs_of",
    "merge_run", "merged_model", "permute_qk", "prompt_logits", "sample_prompt_ids", "write_gguf",
]
