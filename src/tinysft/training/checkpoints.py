"""The run directory while training: checkpoints, resume checks, manifest, metrics and loss plot.

Every training task (SFT, classification) writes the same layout (the contract of DESIGN.md):

    config.yaml, manifest.json  written first: what is needed to resume or reproduce
    metrics.jsonl               one JSON object per log / eval line
    checkpoints/step-N/         adapter/ + optimizer + scheduler + every rank's RNG + state.json
    adapter/                    the final PEFT adapter; a run without it is unfinished (resumable)
    loss.png                    training / eval loss curves

One checkpoint protocol: every file is written into ``checkpoints/.step-N.tmp``, ``state.json``
last, then the folder is renamed to ``step-N`` in one step. A folder named ``step-N`` therefore
always holds every file, and ``latest_checkpoint`` also requires ``state.json``, so a process
killed at any moment leaves either the previous checkpoints or a temporary folder that is ignored
and cleaned up. A checkpoint damaged later (a truncated file, a full disk on another tool's copy)
is detected on resume (``damage``), named, and skipped for the newest intact one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tinysft.config import RunConfig
from tinysft.files import atomic_write_text


class TrainError(RuntimeError):
    """Training stopped for a reason the user can act on (NaN loss, bad resume state, ...)."""


STATE = "state.json"  # written last into a checkpoint: its presence marks the folder complete


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (``step-N`` folders holding ``state.json``), oldest first."""
    ckpts = [p for p in (Path(run_dir) / "checkpoints").glob("step-*")
             if p.is_dir() and p.name[5:].isdigit() and (p / STATE).is_file()]
    return sorted(ckpts, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint ``step`` (rank 0 calls it; every rank may write into it)."""
    tmp = Path(run_dir) / "checkpoints" / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state.json`` last, rename the folder into place, keep the newest ``keep`` checkpoints."""
    step = int(state["step"])
    (tmp / STATE).write_text(json.dumps(state))
    final = tmp.parent / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(tmp.parent.parent)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's files (the first damaged file and why), or None if intact."""
    try:
        state = json.loads((ckpt / STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{ckpt / STATE} has no step number"
    except (OSError, ValueError) as e:
        return f"{ckpt / STATE} is not valid JSON ({type(e).__name__})"
    adapter = ckpt / "adapter" / "adapter_model.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(key)
    except Exception as e:  # safetensors raises several types for a cut file
        return f"{adapter} cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:120]})"
    names = [p for p in ckpt.iterdir() if p.suffix == ".pt"]
    if not any(p.name.startswith("optimizer") for p in names):
        return f"{ckpt} has no optimizer file"
    for required in ("scheduler.pt", "rng-0.pt"):
        if not (ckpt / required).is_file():
            return f"{ckpt / required} is missing"
    for p in sorted(names):
        try:
            torch.load(p, weights_only=True)
        except Exception as e:  # torch raises RuntimeError / EOFError / pickle errors for a cut file
            return f"{p} cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:120]})"
    return None


def load_adapter_weights(model: Any, ckpt: Path) -> None:
    """Put a checkpoint's adapter weights into ``model`` (before ``accelerator.prepare``, so FSDP /
    ZeRO-3 shard the resumed values)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))


def rng_state() -> dict[str, Any]:
    """This process's random state (Python, torch, CUDA): dropout masks on a resumed run match."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- resume -------------------------------------------------------------------------------------

# train.* keys that may differ between a run and its continuation: they change how often things
# are logged or saved, or how fast it runs, never what is computed. The eval section is only used
# after training (generation settings for the report).
RUN_CONTROL_KEYS = {"train.threads", "train.save_every", "train.keep_checkpoints", "train.log_every",
                    "train.report_to"}


def sha256_files(paths: list[str]) -> dict[str, str]:
    from tinysft.data.tables import source_sha256  # files, datasets folders and hf: names

    return {str(p): source_sha256(p) for p in paths}


def config_changes(run_dir: Path, cfg: RunConfig) -> list[str]:
    """What differs between the run's saved config / data and ``cfg`` (empty = same run)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ["config.yaml is missing or unreadable"]
    now = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # same round trip as the saved file
    changes = []
    for section, values in now.items():
        if section == "eval":
            continue
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, "(unset)")
            if f"{section}.{key}" not in RUN_CONTROL_KEYS and old != value:
                changes.append(f"{section}.{key} was {old!r}, now {value!r}")
    try:
        hashes = json.loads((run_dir / "manifest.json").read_text()).get("data_sha256", {})
    except (OSError, ValueError):
        hashes = {}
    for path, digest in hashes.items():
        if Path(path).is_file() and sha256_files([path])[path] != digest:
            changes.append(f"the data file {path} changed since the run started")
    return changes


def resume_point(run_dir: Path, cfg: RunConfig, world_size: int = 1, log: Any = print) -> Path | None:
    """The checkpoint an unfinished run in ``run_dir`` continues from; None to start from step 0.

    Refuses (TrainError) a finished run, and an unfinished one whose config, data or number of
    processes differ: continuing it would silently mix two different trainings. A damaged
    checkpoint is named and skipped for the newest intact one; if none is intact, it stops.
    """
    run_dir = Path(run_dir)
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        raise TrainError(f"{run_dir} already holds a run that finished (its adapter/ is written). Choose another "
                         "--out, or pass --force to replace it.")
    ckpts = checkpoints(run_dir)
    if not ckpts:
        return None
    changes = config_changes(run_dir, cfg)
    if changes:
        raise TrainError(f"{run_dir} holds an unfinished run (last checkpoint {ckpts[-1].name}) started with other "
                         f"settings: {'; '.join(changes)}. Rerun with the same settings to continue it, or choose "
                         "another --out.")
    damaged = []
    for ckpt in reversed(ckpts):
        problem = damage(ckpt)
        if problem is None:
            if damaged:
                log(f"Damaged checkpoint(s) skipped: {'; '.join(damaged)}. Continuing from {ckpt.name}, the newest "
                    "intact one.")
            break
        damaged.append(problem)
    else:
        raise TrainError(f"{run_dir}: every checkpoint is damaged ({'; '.join(damaged)}), so the run cannot continue. "
                         f"Delete {run_dir / 'checkpoints'} to train from step 0, or choose another --out.")
    saved_world = json.loads((ckpt / STATE).read_text()).get("world_size", 1)
    if saved_world != world_size:
        raise TrainError(f"{ckpt} was written by {saved_world} process(es) but this run has {world_size}: the data "
                         f"is sharded per process, so resume with {saved_world} process(es) (or choose another --out).")
    return ckpt


@contextlib.contextmanager
def discard_unfinished(run_dir: str | Path) -> Iterator[None]:
    """On any failure (error, disk full, Ctrl-C), leave nothing half-written in ``run_dir``.

    Temporary files and folders of an interrupted write are removed. A run directory that did not
    exist before is removed entirely unless it holds a complete checkpoint to resume from: a run
    that failed before its first checkpoint has nothing worth keeping. Used by ``tinysft train``.
    """
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0 and run_dir.is_dir():
            if fresh and latest_checkpoint(run_dir) is None and not (run_dir / "adapter").is_dir():
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for tmp in [*run_dir.glob(".*.tmp*"), *run_dir.glob("checkpoints/.*.tmp*")]:
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


# ---- manifest, metrics, plot --------------------------------------------------------------------


def version() -> str:
    """The installed tinysft version ("dev" when run from a source tree without metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tinysft")
    except PackageNotFoundError:
        return "dev"


def write_manifest(run_dir: Path, cfg: RunConfig, model_path: str, extra: dict[str, Any] | None = None) -> None:
    """manifest.json: library versions, the resolved model path, the seed and the data files' hashes."""
    import accelerate
    import peft
    import transformers

    manifest = {
        "tinysft": version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "accelerate": accelerate.__version__},
        "model_path": model_path,
        "seed": cfg.train.seed,
        "data_sha256": sha256_files(cfg.data.train + cfg.data.eval),
        **(extra or {}),
    }
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is empty and a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class MetricsLog:
    """metrics.jsonl and its in-memory copy; only rank 0 (``write``) touches the file."""

    def __init__(self, run_dir: Path, write: bool, resume_step: int | None) -> None:
        self.path, self.write = Path(run_dir) / "metrics.jsonl", write
        self.history: list[dict[str, Any]] = []
        if resume_step is not None:
            # Lines logged after the checkpoint are dropped: the continued run writes them again.
            self.history = [h for h in read_jsonl(self.path) if h.get("step", 0) <= resume_step]
            if write:
                atomic_write_text(self.path, "".join(json.dumps(h) + "\n" for h in self.history))
        elif write:
            self.path.write_text("")

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training and eval loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", color="#2563eb")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss", color="#dc2626")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
