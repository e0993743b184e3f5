"""The Python API: the same three steps as the command line, as plain calls.

    from tinysft import load_config, train, evaluate

    cfg = load_config("examples/polite-helper/config.yaml", {"train.max_steps": 20})
    result = train(cfg, "runs/notebook")              # -> TrainResult (steps, losses, seconds)
    report = evaluate("runs/notebook")                # -> Evaluation (metrics.base / metrics.tuned, paths)

Each call does what its command does (``tinysft train``, ``tinysft eval``), with the same checks and
the same run directory, so a run started in a notebook can be evaluated, merged or served from the
command line and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinysft.config import RunConfig, parse_overrides
from tinysft.config import load_config as _load_config_file


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, Any] | Iterable[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    ``overrides`` is ``{"train.epochs": 2, "lora.r": 8}``, or ``["train.epochs=2"]`` as with ``--set``,
    or the nested ``{"train": {"epochs": 2}}``. Raises ConfigError with the fix for a bad key or value.
    """
    nested: dict[str, dict[str, Any]] = {}
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if isinstance(value, Mapping):
                nested.setdefault(key, {}).update(value)
            else:  # "section.key": parse_overrides checks the shape and the section; the value stays typed
                (section, names), = parse_overrides([f"{key}=_"]).items()
                nested.setdefault(section, {})[next(iter(names))] = value
    elif overrides is not None:
        nested = parse_overrides(list(overrides))
    return _load_config_file(path, nested)


def train(config: RunConfig | str | Path, out_dir: str | Path, *, resume: bool = False,
          log: Callable[[str], None] = print, show_progress: bool = False) -> Any:
    """Train the config's task (chat SFT or classification) into ``out_dir``; returns a TrainResult.

    A failed run leaves no half-written folder behind, as on the command line.
    """
    from tinysft.training import discard_unfinished, train_classifier
    from tinysft.training import train as train_sft

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    out = Path(out_dir)
    with discard_unfinished(out):
        fit = train_classifier if cfg.train.task == "classify" else train_sft
        return fit(cfg, out, resume=resume, log=log, show_progress=show_progress)


@dataclass
class Evaluation:
    """What ``evaluate`` measured: ``metrics["base"]`` and ``metrics["tuned"]`` (the same keys as
    report.json's ``metrics``), and the report files written (``md``, ``json``, ``html``)."""

    metrics: dict[str, dict[str, Any]]
    paths: dict[str, Path]


def evaluate(run_dir: str | Path, data: str | Path | list[str | Path] | None = None, *,
             out_dir: str | Path | None = None, forgetting: bool = False,
             log: Callable[[str], None] = print) -> Evaluation:
    """Before/after evaluation of a run: base (adapter off) vs tuned (adapter on).

    ``data``: prompt file(s) for a chat run, labelled file(s) for a classification run; None = the
    run's own ``eval.prompts`` / ``data.eval``. ``forgetting``: also score the shipped
    general-knowledge set. The report is written to ``out_dir`` (default: the run directory).
    """
    import json

    from tinysft.config import load_config as load_file
    from tinysft.models.registry import ModelError

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a tinysft run directory (no config.yaml) — pass the folder that train wrote.")
    cfg = load_file(run / "config.yaml")
    files = [str(p) for p in ([data] if isinstance(data, str | Path) else (data or []))]
    target = Path(out_dir) if out_dir is not None else run
    if cfg.train.task == "classify":
        from tinysft.evaluate.classification import evaluate_classifier

        paths = evaluate_classifier(run, files or cfg.data.eval, target, log=log)
    else:
        from tinysft.pipeline import default_forgetting_set, evaluate_run

        forget = default_forgetting_set() if forgetting else None
        paths, _ = evaluate_run(run, files or cfg.eval.prompts, target,
                                forgetting=forget if forget and forget.is_file() else None, log=log)
    metrics = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))["metrics"]
    return Evaluation(metrics={"base": metrics["base"], "tuned": metrics["tuned"]}, paths=dict(paths))
