"""A hub id (org/name) with no way to download it fails in seconds, with the fix; a cached one still loads.

The hub is pointed (HF_ENDPOINT / huggingface_hub.constants.ENDPOINT) at a closed local port, so
these tests behave the same with or without internet. Without the check, huggingface_hub retries
each file of an uncached id for about a minute before failing, and a cached id whose cache lacks an
optional file (adapter_config.json, ...) spends minutes retrying those requests.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, write_jsonl
from tinysft.models.load import resolve_model_path
from tinysft.models.registry import ModelError, check_hub_id, hub_unreachable, is_hub_id

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, connections are refused


def fake_hf_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """``model_dir`` laid out as huggingface_hub's cache holds a downloaded ``repo_id`` (main -> a snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """huggingface_hub in online mode (the tests' conftest turns it off); restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after the cached-id switch sets it
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


@pytest.fixture
def hub_down(online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Online mode, the hub at a closed port, an empty HF cache (returned)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_is_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("smollm2-135m-instruct")  # embedded
    for path in ("./org/name", "/org/name", "~/name", "a/b/c", "org/model.gguf", "name"):
        assert not is_hub_id(path), path
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # an existing local folder wins over the hub


def test_unreachable_hub_fails_in_seconds_with_the_fix(hub_down: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        resolve_model_path("someorg/somemodel", log=lambda m: None)
    assert time.monotonic() - start < 5
    message = str(e.value)
    for needle in ("someorg/somemodel", "not in the local Hugging Face cache", CLOSED, "cannot be reached",
                   "hf download someorg/somemodel", "tinysft models", "HF_ENDPOINT"):
        assert needle in message, (needle, message)


def test_hub_offline_fails_without_a_request(hub_down: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    import tinysft.models.registry as registry

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(registry, "hub_unreachable", lambda *a: pytest.fail("probed the hub in offline mode"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        check_hub_id("someorg/somemodel")


def test_a_cached_id_passes_and_turns_offline_mode_on(hub_down: Path, tiny_model_dir: Path) -> None:
    from huggingface_hub import constants

    fake_hf_cache(hub_down, "someorg/tiny", tiny_model_dir)
    said: list[str] = []
    assert resolve_model_path("someorg/tiny", log=said.append) == "someorg/tiny"
    assert len(said) == 1 and "using the cached copy of someorg/tiny" in said[0] and CLOSED in said[0]
    # Offline from here on: transformers reads every file from the cache instead of retrying requests.
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained("someorg/tiny").hidden_size == 64


def test_a_cached_id_with_the_hub_offline_passes_silently(hub_down: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    fake_hf_cache(hub_down, "someorg/tiny", tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_hub_id("someorg/tiny", log=lambda m: pytest.fail(f"said {m!r}"))


@pytest.fixture
def answering_hub() -> Iterator[str]:
    """A local HTTP server that answers every request with 404, as the hub's root may."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_any_http_answer_counts_as_reachable(online: None, answering_hub: str) -> None:
    assert hub_unreachable(answering_hub) is None
    assert "refused" in hub_unreachable(CLOSED, 3.0).lower()  # what the user is told for a closed port


def test_a_hub_that_never_answers_is_given_up_after_the_timeout(online: None) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        reason = hub_unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert time.monotonic() - start < 2
    assert reason is not None


# ---- through the CLI -------------------------------------------------------------------------------
def tinysft_offline(*args: str, cache: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI with the hub at a closed port (and no HF_HUB_OFFLINE unless given); (result, seconds)."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tinysft", *args], capture_output=True, text=True, timeout=600,
                          env={**base, "HF_ENDPOINT": CLOSED, "HF_HUB_CACHE": str(cache), **env})
    return proc, time.monotonic() - start


def assert_clean_hub_failure(proc: subprocess.CompletedProcess, seconds: float, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr and "Retrying" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error: ") == 1, proc.stderr
    for needle in ("someorg/somemodel", "not in the local Hugging Face cache", "hf download someorg/somemodel",
                   *needles):
        assert needle in proc.stderr, (needle, proc.stderr)
    assert seconds < 10, seconds


@pytest.mark.slow  # CLI subprocesses
def test_cli_train_and_data_check_fail_fast_on_an_unreachable_hub_id(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    out = tmp_path / "run"
    proc, seconds = tinysft_offline("train", "--model", "someorg/somemodel", "--data", str(data), "--out", str(out),
                                    cache=tmp_path)
    assert_clean_hub_failure(proc, seconds, "cannot be reached", CLOSED)
    assert not out.exists()  # nothing half-written
    proc, seconds = tinysft_offline("data", "check", str(data), "--model", "someorg/somemodel", cache=tmp_path)
    assert_clean_hub_failure(proc, seconds, "cannot be reached")
    proc, seconds = tinysft_offline("train", "--model", "someorg/somemodel", "--data", str(data), "--out", str(out),
                                    cache=tmp_path, HF_HUB_OFFLINE="1")
    assert_clean_hub_failure(proc, seconds, "HF_HUB_OFFLINE is set")


@pytest.mark.slow  # CLI subprocess that trains
def test_cli_trains_on_a_cached_hub_id_with_the_hub_unreachable(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = fake_hf_cache(tmp_path / "hf-cache", "someorg/tiny", tiny_model_dir)
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    proc, seconds = tinysft_offline("train", "--model", "someorg/tiny", "--data", str(data), "--set",
                                    "train.max_steps=1", "--no-progress", "--out", str(tmp_path / "run"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert "using the cached copy of someorg/tiny" in proc.stderr + proc.stdout
    assert "Retrying" not in proc.stderr  # no request retried: every file came from the cache
    assert seconds < 120  # measured ~24 s on a loaded 2-core machine; retrying the cache's gaps took minutes
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_train_errors_stay_user_errors_though_the_handler_no_longer_imports_training() -> None:
    """The CLI's error handler imports tinysft.training only if a command already did (it loads torch,
    seconds that an early failure such as an unreachable hub id should not wait for)."""
    from tinysft.cli import user_errors
    from tinysft.training import TrainError

    assert TrainError in user_errors()
