"""Average LoRA adapters of several runs (seeds of a recipe, or checkpoints of one run) into one run directory.

Run by hand (not a test); issue 34 item 2 names weight averaging as a lever for a recipe stable across seeds:

    .venv/bin/python benchmarks/recipe_average.py /tmp/tinysft-seeds/tax-r3l3-s{42,7,11,13,17} \\
        --out /tmp/tinysft-seeds/avg5-tax-r3l3-s0
    .venv/bin/python benchmarks/recipe_seeds.py --recipe avg5-tax-r3l3 --seeds 0   # scores it (no training)

Runs of different seeds start from different random LoRA matrices, so averaging their A and B
matrices one by one would not average what they learnt. Instead the output is the exact mean of the
weight updates: with N adapters of rank r, A (r x in) stacked to (N*r x in) and B (out x r) side by
side to (out x N*r), divided by N, so that B_avg @ A_avg = mean_i(B_i @ A_i); rank and alpha are both
multiplied by N, which keeps the scale alpha / rank. The first run's config.yaml, manifest and
tokenizer are copied, so ``tinysft eval`` / ``load_run`` read the result as a run of that recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def adapter_dir(run: Path) -> Path:
    """A run's adapter folder, or the folder itself when it is one (a checkpoint's ``adapter``)."""
    return run / "adapter" if (run / "adapter" / "adapter_config.json").is_file() else run


def average(runs: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The stacked adapter of ``runs`` (its tensors and adapter_config) whose update is the runs' mean update."""
    configs = [json.loads((adapter_dir(r) / "adapter_config.json").read_text()) for r in runs]
    weights = [load_file(str(adapter_dir(r) / "adapter_model.safetensors")) for r in runs]
    first = configs[0]
    for r, c in zip(runs, configs, strict=True):
        if (c["r"], c["lora_alpha"], sorted(c["target_modules"])) != (first["r"], first["lora_alpha"],
                                                                      sorted(first["target_modules"])):
            raise SystemExit(f"{r}: rank, alpha or target modules differ from {runs[0]}; cannot average.")
        if c.get("use_rslora") or c.get("use_dora"):
            raise SystemExit(f"{r}: rsLoRA / DoRA adapters are not supported here.")
    n = len(runs)
    out: dict[str, torch.Tensor] = {}
    for key, value in weights[0].items():
        parts = [w[key].float() for w in weights]
        if ".lora_A." in key:
            out[key] = torch.cat(parts, dim=0).to(value.dtype)
        elif ".lora_B." in key:
            out[key] = (torch.cat(parts, dim=1) / n).to(value.dtype)
        else:
            raise SystemExit(f"{key}: not a LoRA A/B matrix; only plain LoRA adapters can be averaged here.")
    config = dict(first, r=first["r"] * n, lora_alpha=first["lora_alpha"] * n)
    return out, config


def copy_run_files(src: Path, dest: Path) -> None:
    """Copy what makes ``dest`` read as a run of ``src`` (config, manifest, tokenizer), not the adapter."""
    for name in ("config.yaml", "manifest.json", ".tinysft-output", "tokenizer"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> None:
    """A PEFT adapter folder holding ``tensors`` with ``config``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (or adapter folders) to average")
    ap.add_argument("--out", type=Path, required=True, help="the new run directory (must not exist)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists; pick another --out.")
    tensors, config = average(args.runs)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_run_files(args.runs[0] if (args.runs[0] / "config.yaml").is_file() else args.runs[0].parents[2], tmp)
    write_adapter(tmp / "adapter", tensors, config)
    (tmp / "averaged_from.json").write_text(json.dumps([str(r) for r in args.runs], indent=2))
    tmp.rename(args.out)
    print(f"{args.out}: mean update of {len(args.runs)} adapters (rank {config['r']}, alpha {config['lora_alpha']})")


if __name__ == "__main__":
    main()
