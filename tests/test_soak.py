"""Soak test: `tinysft serve` on the real embedded model answers 8 concurrent clients x 25 requests each
with no errors, and its memory stays flat.

The load generator is benchmarks/serve_load.py's (the same client the benchmark times), so the
benchmark keeps working too. Answers are short (4 tokens): this checks correctness and stability
under concurrency, not speed. Peak and current RSS of the server before and after are printed.
"""

from __future__ import annotations

import importlib.util
import secrets
import sys
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, ROOT, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a server subprocess under load

CLIENTS, REQUESTS, MAX_TOKENS = 8, 25, 4
# Flat memory: after 200 requests the server may hold a little more (allocator caches, tokenizer
# caches) but not a per-request amount; 200 leaked KV caches of even a short prompt would be far more.
MAX_GROWTH_MB = 64


def load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    """One optimizer step on the embedded model: a real run directory, cheaply."""
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("soak")
    data = write_jsonl(tmp / "train.jsonl", CHAT_ROWS[:4])
    cfg = load_config(None, parse_overrides([f"data.train={data}", "train.epochs=1", "train.batch_size=4",
                                             "lora.r=4", "data.max_length=64"]))
    train(cfg, tmp / "soak", show_progress=False, log=lambda _m: None)
    return tmp / "soak"


def test_server_soak_8_clients_x_25_requests(real_run: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_benchmark()
    port, key = bench.free_port(), secrets.token_hex(8)
    proc = bench.start_server(real_run, port, key, MAX_TOKENS)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        bench.wait_healthy(base_url.removesuffix("/v1"), proc, timeout=180)
        models = bench.model_ids(base_url, key)
        assert models == ["base", "soak"]
        bench.run_load(base_url, key, models, CLIENTS, 2, MAX_TOKENS, stream_every=3)  # warm-up
        before = bench.memory_mb(proc.pid)
        results, wall = bench.run_load(base_url, key, models, CLIENTS, REQUESTS, MAX_TOKENS, stream_every=3)
        after = bench.memory_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    summary = bench.summarise(results, wall)
    with capsys.disabled():
        print(f"\nsoak: {summary['requests']} requests, {summary['errors']} errors, {summary['requests_per_s']} "
              f"requests/s, latency p50 {summary['latency_s']['p50']} s p99 {summary['latency_s']['p99']} s; "
              f"server RSS {before.get('rss_mb', 0):.0f} -> {after.get('rss_mb', 0):.0f} MiB, peak "
              f"{before.get('peak_rss_mb', 0):.0f} -> {after.get('peak_rss_mb', 0):.0f} MiB")
    assert alive, "the server died under load"
    assert len(results) == CLIENTS * REQUESTS
    assert summary["errors"] == 0, summary["first_errors"]
    assert all(r.status == 200 and 1 <= r.completion_tokens <= MAX_TOKENS for r in results)
    assert sum(r.ttft_s is not None for r in results) > 0, "some streamed answers were checked"
    if before and after:  # /proc is Linux-only
        assert after["rss_mb"] - before["rss_mb"] < MAX_GROWTH_MB, (before, after)
        assert after["peak_rss_mb"] - before["peak_rss_mb"] < MAX_GROWTH_MB, (before, after)
