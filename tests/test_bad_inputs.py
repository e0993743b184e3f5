"""The bad-input corpus: every case in bad_inputs/cases.yaml through the CLI, in-process.

Each case asserts the exit code, a fragment of the one-paragraph answer (file, line, field, fix),
that no traceback or "internal error" is printed, and that nothing partial is left behind. Inputs
too large, binary or model-derived to commit are built here at test time (`SETUPS`); a full disk is
simulated by making the library's own write function fail the way it fails on a real full disk
(`PATCHES`), and once for real on a tiny tmpfs where the machine allows mounting one.
"""

from __future__ import annotations

import errno
import glob
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CHAT_ROWS, write_jsonl

INPUTS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((INPUTS / "cases.yaml").read_text())


@dataclass
class Ctx:
    tmp: Path
    tiny: Path
    run: Path

    def fill(self, text: str) -> str:
        for name, value in (("inputs", INPUTS), ("tmp", self.tmp), ("tiny", self.tiny), ("run", self.run)):
            text = text.replace("{" + name + "}", str(value))
        return text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished tiny run (1 step, rank 2), shared read-only by the cases."""
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("bad-inputs-run")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS)
    cfg = load_config(None, parse_overrides([f"model.name={tiny_model_dir}", f"data.train={data}", "train.epochs=1",
                                             "lora.r=2", "train.mixed_precision=no"]))
    train(cfg, tmp / "run", show_progress=False, log=lambda _m: None)
    return tmp / "run"


# ---- generated inputs ----------------------------------------------------------------------------
def big_line(ctx: Ctx) -> None:
    """One good row, then one 50 MB row (over the 8 MB line limit)."""
    with (ctx.tmp / "big.jsonl").open("w") as f:
        f.write(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
        f.write(json.dumps({"prompt": "Summarise this.", "response": "x" * 50_000_000}) + "\n")


def truncated_model(ctx: Ctx) -> None:
    shutil.copytree(ctx.tiny, ctx.tmp / "model")
    weights = ctx.tmp / "model" / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a download cut short


def pickle_model(ctx: Ctx) -> None:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(ctx.tiny, ctx.tmp / "model")
    weights = ctx.tmp / "model" / "model.safetensors"
    torch.save(load_file(str(weights)), ctx.tmp / "model" / "pytorch_model.bin")
    weights.unlink()


def fake_gguf(ctx: Ctx) -> None:
    (ctx.tmp / "fake.gguf").write_text("this is not a model\n")


def truncated_gguf(ctx: Ctx) -> None:
    """A real GGUF of the tiny model, cut in half; conversion goes to a private TINYSFT_HOME."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinysft.export import write_gguf

    model = AutoModelForCausalLM.from_pretrained(ctx.tiny)
    path = ctx.tmp / "cut.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(ctx.tiny), path, "f32")
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _copy_run(ctx: Ctx) -> Path:
    return Path(shutil.copytree(ctx.run, ctx.tmp / "run"))


def foreign_run(ctx: Ctx) -> None:
    """A run whose config now names another base model (hidden size 32 instead of 64)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ctx.tiny)
    torch.manual_seed(0)
    other = ctx.tmp / "other-model"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(other)
    tok.save_pretrained(other)
    run = _copy_run(ctx)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def truncated_adapter(ctx: Ctx) -> None:
    weights = _copy_run(ctx) / "adapter" / "adapter_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 100)


def pickle_adapter(ctx: Ctx) -> None:
    import torch
    from safetensors.torch import load_file

    adapter = _copy_run(ctx) / "adapter"
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def unfinished_run(ctx: Ctx) -> None:
    shutil.rmtree(_copy_run(ctx) / "adapter")


def non_empty_folder(ctx: Ctx) -> None:
    (ctx.tmp / "merged").mkdir()
    (ctx.tmp / "merged" / "keep.txt").write_text("the user's file\n")


def existing_gguf(ctx: Ctx) -> None:
    (ctx.tmp / "model.gguf").write_bytes(b"GGUF an older export")


def file_blocker(ctx: Ctx) -> None:
    (ctx.tmp / "blocker").write_text("a regular file where the output's folder should be\n")


def runs_folder(ctx: Ctx) -> None:
    """{tmp}/runs: two of the user's runs and a notes file (what `--out runs --force` must never delete)."""
    for name in ("a", "b"):
        shutil.copytree(ctx.run, ctx.tmp / "runs" / name)
    (ctx.tmp / "runs" / "notes.txt").write_text("which run was best\n")


def marked_merge_with_user_file(ctx: Ctx) -> None:
    """A merged-model folder tinysft wrote, into which the user then saved a file of their own."""
    from tinysft.files import mark_output

    merged = ctx.tmp / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"weights")
    mark_output(merged, "merge")
    (merged / "my-eval-notes.md").write_text("the user's notes\n")


def marked_run_as_merge_target(ctx: Ctx) -> None:
    """A folder tinysft marked as a run (not a merged model): merge --force must not replace it."""
    from tinysft.files import mark_output

    run = _copy_run(ctx)
    mark_output(run, "run")


def copied_prompts(ctx: Ctx) -> None:
    shutil.copy(INPUTS / "no_assistant.jsonl", ctx.tmp / "prompts.jsonl")


def user_answers(ctx: Ctx) -> None:
    (ctx.tmp / "answers.jsonl").write_text('{"note": "answers I wrote by hand"}\n')


def user_report(ctx: Ctx) -> None:
    (ctx.tmp / "report").mkdir()
    (ctx.tmp / "report" / "report.md").write_text("# my own report\n")


def pickle_adapter_allowed_by_run(ctx: Ctx) -> None:
    """A run whose own config.yaml says model.allow_pickle: true, with a pickle adapter."""
    pickle_adapter(ctx)
    _edit_run_config(ctx.tmp / "run", allow_pickle=True, trust_remote_code=True)


def _edit_run_config(run: Path, **model: Any) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(model)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def other_base_same_shapes(ctx: Ctx) -> None:
    """The run's config now names another base with the same shapes (other weights): no size mismatch."""
    import torch
    from transformers import AutoModelForCausalLM

    other = ctx.tmp / "other-base"
    shutil.copytree(ctx.tiny, other)
    model = AutoModelForCausalLM.from_pretrained(ctx.tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(other)
    _edit_run_config(_copy_run(ctx), name=str(other))


def base_is_an_earlier_merge(ctx: Ctx) -> None:
    """The run's base is itself a merged model tinysft wrote (marked): merging over it would destroy the input."""
    from tinysft.files import mark_output

    shutil.copytree(ctx.tiny, ctx.tmp / "base")
    mark_output(ctx.tmp / "base", "merge")
    _edit_run_config(_copy_run(ctx), name=str(ctx.tmp / "base"))


def run_config_with_tab(ctx: Ctx) -> None:
    run = _copy_run(ctx)
    text = (run / "config.yaml").read_text().splitlines(keepends=True)
    text[2] = "\t" + text[2].lstrip(" ")
    (run / "config.yaml").write_text("".join(text))


def csv_long_documents(ctx: Ctx) -> None:
    """Classification rows whose text cells are 300 KB (over Python's 128 KiB csv default), and one over 8 MB."""
    with (ctx.tmp / "long.csv").open("w") as f:
        f.write("text,label\n")
        f.write(f'"{"a long report. " * 20_000}",business\n')
        f.write(f'"{"a long match report. " * 15_000}",sport\n')
        f.write("short,sport\n")
    with (ctx.tmp / "huge.csv").open("w") as f:
        f.write("text,label\nshort,sport\n")
        f.write(f'"{"x" * 9_000_000}",business\n')
        f.write("a,\n")  # a later bad row is still listed


SETUPS: dict[str, Callable[[Ctx], None]] = {f.__name__: f for f in (
    big_line, truncated_model, pickle_model, fake_gguf, truncated_gguf, foreign_run, truncated_adapter,
    pickle_adapter, unfinished_run, non_empty_folder, existing_gguf, file_blocker, runs_folder,
    marked_merge_with_user_file, marked_run_as_merge_target, copied_prompts, user_answers, user_report,
    pickle_adapter_allowed_by_run, other_base_same_shapes, run_config_with_tab, csv_long_documents,
    base_is_an_earlier_merge)}
RUN_SETUPS = {"foreign_run", "truncated_adapter", "pickle_adapter", "unfinished_run", "runs_folder",
              "marked_run_as_merge_target", "pickle_adapter_allowed_by_run", "other_base_same_shapes",
              "run_config_with_tab", "base_is_an_earlier_merge"}  # copy the finished run


# ---- a full disk, as each library reports it ----------------------------------------------------
# Each fake writes part of the file first, as a real short write does, so the cleanup is exercised.
def _partial(path: Any) -> None:
    Path(path).write_bytes(b"\0" * 1000)


def enospc_safetensors(monkeypatch: pytest.MonkeyPatch, ctx: Ctx) -> None:
    """safetensors (Rust) raises SafetensorError, not OSError, on a full disk: this is its real message."""
    from safetensors import SafetensorError

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        _partial(filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("peft.peft_model.safe_save_file", save_file)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", save_file)


def enospc_torch_save(monkeypatch: pytest.MonkeyPatch, ctx: Ctx) -> None:
    """torch.save's zip writer on a full disk (measured on a 1 MiB tmpfs): a RuntimeError."""
    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        _partial(f)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr("torch.save", save)


def enospc_write_text(monkeypatch: pytest.MonkeyPatch, ctx: Ctx) -> None:
    original = Path.write_text

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if ctx.tmp in self.parents:
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


PATCHES: dict[str, Callable[[pytest.MonkeyPatch, Ctx], None]] = {f.__name__: f for f in (
    enospc_safetensors, enospc_torch_save, enospc_write_text)}


# ---- the corpus ------------------------------------------------------------------------------------
def invoke(args: list[str]) -> Any:
    from tinysft.cli import app

    return CliRunner().invoke(app, args)


def test_corpus_is_large_and_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    for case in CASES:
        assert set(case) <= {"id", "args", "exit", "message", "absent", "present", "setup", "patch"}, case["id"]
        assert all(s in SETUPS for s in case.get("setup", [])), case["id"]
        assert case.get("patch") is None or case["patch"] in PATCHES, case["id"]
    committed = {p.name for p in INPUTS.iterdir()} - {"cases.yaml"}
    used = " ".join(" ".join(map(str, c["args"])) for c in CASES)
    assert not [n for n in committed if n not in used], "every committed input is used by a case"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case: dict[str, Any], tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    setups = case.get("setup", [])
    uses_run = "{run}" in json.dumps(case["args"]) or bool(RUN_SETUPS & set(setups))
    ctx = Ctx(tmp_path, tiny_model_dir, request.getfixturevalue("finished_run") if uses_run else tmp_path / "no-run")
    monkeypatch.chdir(tmp_path)  # a default output path would land here, not in the checkout
    monkeypatch.setenv("TINYSFT_HOME", str(tmp_path / "home"))  # a GGUF conversion cache, if any, goes here
    for name in setups:
        SETUPS[name](ctx)
    if case.get("patch"):
        PATCHES[case["patch"]](monkeypatch, ctx)
    run_before = sorted(p.name for p in ctx.run.rglob("*")) if uses_run else []
    tree_before = tree(tmp_path), tree(INPUTS)

    result = invoke([ctx.fill(str(a)) for a in case["args"]])
    monkeypatch.undo()

    everything = result.stdout + result.stderr
    assert result.exit_code == case["exit"], everything
    assert "Traceback" not in everything and "internal error" not in everything, everything
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    answer = result.stdout if case["exit"] == 0 else result.stderr
    fragments = case["message"] if isinstance(case["message"], list) else [case["message"]]
    flat = " ".join(answer.split())  # the terminal width may wrap a long line anywhere
    for fragment in fragments:
        assert " ".join(ctx.fill(fragment).split()) in flat, f"{fragment!r} not in:\n{answer}"
    if case["exit"] != 0:
        error = answer[answer.index("error: "):]
        assert len(error.splitlines()) <= 22, "one paragraph (a data error lists at most 20 problems)"
    for pattern in case.get("absent", []):
        found = glob.glob(ctx.fill(pattern))
        assert not found, f"left behind: {found}"
    for path in case.get("present", []):
        assert Path(ctx.fill(path)).exists(), f"{path} was removed"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    if uses_run:
        assert sorted(p.name for p in ctx.run.rglob("*")) == run_before, "the shared run was modified"
    after = tree(tmp_path), tree(INPUTS)
    if case["exit"] != 0:  # a refused command changes nothing: every file as it was, nothing new
        assert after == tree_before, f"files changed: {set(after[0].items()) ^ set(tree_before[0].items())}"
    else:  # an accepted one may add its output, but changes no existing file
        assert all(after[0].get(k) == v for k, v in tree_before[0].items()) and after[1] == tree_before[1]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (the GGUF conversion cache under home/ aside): relative path -> (size, mtime)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith("home/")}


# ---- beyond one command ------------------------------------------------------------------------------
def test_disk_full_after_a_checkpoint_keeps_it_and_the_rerun_finishes(tmp_path: Path, tiny_model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is lost: a full disk at step 2 keeps checkpoint 1, and the same command then finishes."""
    import peft.peft_model
    from safetensors import SafetensorError

    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--set", "train.epochs=2", "--set",
            "train.batch_size=8", "--set", "train.packing=false", "--set", "train.save_every=1", "--set", "lora.r=2",
            "--out", str(run), "--no-progress"]
    real_save, calls = peft.peft_model.safe_save_file, []

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        calls.append(filename)
        if len(calls) > 1:  # the first checkpoint is written, then the disk is full
            _partial(filename)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr("peft.peft_model.safe_save_file", save_file)
    result = invoke(args)
    monkeypatch.undo()
    assert result.exit_code == 1 and "no space left on the device" in result.stderr, result.output
    assert (run / "checkpoints" / "step-1" / "state.json").is_file(), "the complete checkpoint is kept"
    assert not (run / "adapter").exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "the half-written checkpoint is removed"

    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "Resuming from" in result.stderr and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_discard_unfinished_rules(tmp_path: Path) -> None:
    """A new folder without a checkpoint goes; a checkpoint, or a folder that existed, stays (minus temp files)."""
    from tinysft.training import discard_unfinished

    def fail_inside(run: Path, make: Callable[[Path], None]) -> None:
        with pytest.raises(OSError), discard_unfinished(run):
            make(run)
            raise OSError(errno.ENOSPC, "No space left on device")

    def partial(run: Path) -> None:
        (run / "checkpoints" / ".step-2.tmp").mkdir(parents=True)
        (run / ".config.yaml.tmp").write_text("half")

    new = tmp_path / "new"
    fail_inside(new, partial)
    assert not new.exists()

    with_ckpt = tmp_path / "with-checkpoint"

    def checkpoint_then_partial(run: Path) -> None:
        (run / "checkpoints" / "step-1").mkdir(parents=True)
        (run / "checkpoints" / "step-1" / "state.json").write_text("{}")
        partial(run)

    fail_inside(with_ckpt, checkpoint_then_partial)
    assert (with_ckpt / "checkpoints" / "step-1" / "state.json").is_file()
    assert not [p for p in with_ckpt.rglob("*") if ".tmp" in p.name]

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    fail_inside(existing, partial)
    assert (existing / "notes.txt").is_file() and not [p for p in existing.rglob("*") if ".tmp" in p.name]

    ok = tmp_path / "ok"
    with discard_unfinished(ok):
        ok.mkdir()
    assert ok.is_dir(), "success keeps everything"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs: a real full disk. Needs root with CAP_SYS_ADMIN; skipped elsewhere."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_really_full_disk_while_merging(tiny_tmpfs: Path, finished_run: Path) -> None:
    """The merged tiny model (~13 MB) cannot fit in 1 MiB: a clean message, and the disk is left empty."""
    result = invoke(["merge", str(finished_run), "--out", str(tiny_tmpfs / "merged")])
    assert result.exit_code == 1, result.output
    assert "no space left on the device" in result.stderr and "Traceback" not in result.output
    assert list(tiny_tmpfs.iterdir()) == [], "nothing partial is left on the full disk"
