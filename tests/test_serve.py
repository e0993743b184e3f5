"""The OpenAI-compatible server, driven by the official `openai` client against a real local server.

The server runs in a thread of the test process (uvicorn on a free loopback port) over a run of the
tiny random model; one test starts `tinysft serve` as a subprocess to cover the command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CHAT_ROWS, write_jsonl

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a uvicorn server per module, one test starts `tinysft serve`

KEY = "test-key-123"
HI = [{"role": "user", "content": "What is 2 plus 2?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    from tinysft.config import load_config, parse_overrides
    from tinysft.training import train

    tmp = tmp_path_factory.mktemp("serve-run")
    cfg = load_config(None, parse_overrides(["train.epochs=1", "train.batch_size=4", "train.learning_rate=1e-2",
                                             "lora.r=4", "lora.alpha=8", "data.max_length=128"]))
    cfg.model.name = str(tiny_model_dir)
    cfg.data.train = [str(write_jsonl(tmp / "train.jsonl", CHAT_ROWS))]
    train(cfg, tmp / "polite", show_progress=False, log=lambda m: None)
    # One epoch leaves the tiny model's greedy answer as it was (newlines, adapter on or off), so a
    # server that ignored the adapter would look right. Seeded random LoRA B matrices (a valid adapter
    # file, loaded the normal way) make the tuned model's greedy answers visibly its own.
    from safetensors.torch import load_file, save_file

    adapter = tmp / "polite" / "adapter" / "adapter_model.safetensors"
    weights = load_file(adapter)
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen).to(v.dtype) if "lora_B" in k else v for k, v in weights.items()},
              adapter)
    return tmp / "polite"


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    from tinysft.models.load import load_run

    return load_run(tiny_run, log=lambda m: None)


@pytest.fixture(scope="module")
def server(loaded) -> Iterator[str]:
    """Base URL of a running server (API key KEY, small caps so the limits are cheap to hit)."""
    import uvicorn

    from tinysft.serve import ServeLimits, create_app

    app = create_app(loaded, api_key=KEY, limits=ServeLimits(max_tokens=64, max_prompt_tokens=200),
                     log=lambda m: None)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server: str):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def ask(client: Any, model: str = "polite", stream: bool = False, **kw: Any) -> tuple[str, str | None]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    kw = {"messages": HI, "max_tokens": 12, "temperature": 0, **kw}
    if not stream:
        r = client.chat.completions.create(model=model, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        assert chunk.model == model and chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_lists_base_and_the_tuned_model(client) -> None:
    assert [m.id for m in client.models.list()] == ["base", "polite"]
    assert client.models.retrieve("polite").owned_by == "tinysft"


def test_completion_uses_the_adapter_for_the_tuned_model_only(client, loaded) -> None:
    from tinysft.evaluate.generate import adapter_state, generate

    r = client.chat.completions.create(model="polite", messages=HI, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "polite"
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason in ("stop", "length")
    base_text, _ = ask(client, "base")
    # The same greedy answers as tinysft's own batch generation with the adapter on / off.
    for tuned, text in ((True, r.choices[0].message.content), (False, base_text)):
        with adapter_state(loaded.model, tuned):
            expected = generate(loaded.model, loaded.tokenizer, [HI], max_new_tokens=12)[0]
        assert text.strip() == expected
    # ...and they differ: the tuned model's answer is not the base model's.
    assert r.choices[0].message.content.strip() and r.choices[0].message.content.strip() != base_text.strip()


def test_streamed_completion_equals_the_plain_one(client) -> None:
    answers = {}
    for model in ("polite", "base"):
        plain = ask(client, model, max_tokens=20)
        streamed = ask(client, model, stream=True, max_tokens=20)
        assert streamed == plain
        answers[model] = plain
    assert answers["polite"] != answers["base"]  # each stream came from its own model
    usage = [c.usage for c in client.chat.completions.create(
        model="polite", messages=HI, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}) if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens <= 5


def test_seed_makes_sampling_reproducible(client) -> None:
    a = ask(client, "base", temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    b = ask(client, "base", temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    c = ask(client, "base", stream=True, temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    assert a == b == c
    assert a != ask(client, "base", max_tokens=16)  # sampled, not greedy (16 random-model tokens)


def test_stop_sequence_cuts_the_answer(client) -> None:
    # Seeded sampling from the random base model: varied text, the same tokens on every call.
    sampled = {"temperature": 1.0, "seed": 3, "max_tokens": 24}
    full, _ = ask(client, "base", **sampled)
    middle = range(len(full) // 2, len(full) - 1)
    stop = next(full[i : i + 2] for i in middle if full[i : i + 2].isprintable() and not full[i : i + 2].isspace())
    for stream in (False, True):
        text, finish = ask(client, "base", stream=stream, stop=[stop], **sampled)
        assert text == full[: full.index(stop)] and finish == "stop"


def test_concurrent_requests_are_not_interleaved(client) -> None:
    # The base model answers every prompt greedily with newlines, so its two requests sample with
    # seeds: then all four replies differ and a reply that went to the wrong request would show.
    cases = [("polite", False, "What is 2 plus 2?", None), ("base", True, "Name a colour.", 1),
             ("base", False, "Hello there", 2), ("polite", True, "Tell me about cats.", None)] * 2
    def run(case: tuple[str, bool, str, int | None]) -> tuple[str, str | None]:
        model, stream, prompt, seed = case
        sampling = {"temperature": 1.0, "seed": seed} if seed is not None else {}
        return ask(client, model, stream, messages=[{"role": "user", "content": prompt}], max_tokens=16, **sampling)

    expected = [run(c) for c in cases[:4]] * 2  # one at a time
    assert len({text for text, _ in expected}) == 4, expected
    with ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(run, cases)) == expected


def test_malformed_requests_get_4xx_with_a_message(client, server: str) -> None:
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="polite", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="polite", messages=HI, temperature=5)
    with pytest.raises(openai.NotFoundError, match="available: base, polite"):
        client.chat.completions.create(model="gpt-4", messages=HI)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.chat.completions.create(model="polite", messages=HI, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="at most 200"):
        client.chat.completions.create(model="polite", messages=[{"role": "user", "content": "word " * 400}])
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = post(f"{server}/chat/completions", b"{not json", headers)
    assert status == 400 and "not valid JSON" in body["error"]["message"]


# Every numeric request field: (field, values at its limits that must work, values just past them).
# The server fixture allows max_tokens up to 64.
NUMERIC_LIMITS = [
    ("temperature", [0, 0.0, 1e-300, 5e-324, 2], [-1e-9, 2.000001, float("nan"), float("inf"), float("-inf")]),
    ("top_p", [5e-324, 1e-300, 1], [0, -1e-9, 1.000001, float("nan")]),
    ("seed", [-(2**63), 0, 2**64 - 1], [-(2**63) - 1, 2**64]),
    ("max_tokens", [1, 64], [0, -1, 65, 10**30]),
    ("max_completion_tokens", [1, 64], [0, 65]),
    ("n", [1], [0, 2]),
]


@pytest.mark.parametrize(("field", "ok", "bad"), NUMERIC_LIMITS, ids=[f for f, _, _ in NUMERIC_LIMITS])
def test_numeric_fields_at_their_limits_work_and_just_past_get_400(server: str, field: str, ok: list, bad: list) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server}/chat/completions"
    for stream in (False, True):
        for value in ok:
            body = {"model": "polite", "messages": HI, "max_tokens": 3, "stream": stream, field: value}
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:  # raises on any 4xx / 5xx
                text = r.read().decode()
            assert r.status == 200, (field, value)
            assert ("[DONE]" in text) if stream else json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")
    for value in bad:
        # json.dumps writes NaN / Infinity as bare literals, which the server's JSON parser accepts.
        status, body = post(url, json.dumps({"model": "polite", "messages": HI, field: value}).encode(), headers)
        assert status == 400, (field, value, body)
        assert body["error"]["param"] == field and field in body["error"]["message"], (field, value, body)


def test_a_vanishing_temperature_is_greedy(client) -> None:
    greedy = ask(client, "base", temperature=0, max_tokens=16)
    for t in (1e-300, 5e-324, 1e-6):
        assert ask(client, "base", temperature=t, max_tokens=16, seed=1) == greedy
        assert ask(client, "base", stream=True, temperature=t, max_tokens=16, seed=1) == greedy
        assert ask(client, "base", temperature=1.0, top_p=t, max_tokens=16, seed=1) == greedy


def test_bodies_over_1mb_get_413(server: str) -> None:
    # Declared too large: answered from the headers alone (the body is never sent, so no broken pipe).
    host, port = server.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1100000\r\n\r\n".encode())
        reply = b""
        while b"}}" not in reply and (data := sock.recv(65536)):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413") and b"too large" in reply


def test_bodies_without_content_length_are_counted_as_they_arrive() -> None:
    import asyncio

    from fastapi import HTTPException

    from tinysft.serve import Guard

    async def app(scope, receive, send) -> None:  # reads the whole body, like FastAPI does
        while (await receive()).get("more_body"):
            pass

    chunks = [{"type": "http.request", "body": b"x" * 600_000, "more_body": True}] * 2
    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/v1/chat/completions", "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    with pytest.raises(HTTPException) as e:
        asyncio.run(Guard(app, api_key=KEY, max_body_bytes=1_000_000)(scope, receive, None))
    assert e.value.status_code == 413


def test_missing_or_wrong_key_gets_401(server: str) -> None:
    for key in ("wrong-key", KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server, api_key=key, max_retries=0).models.list()
    status, body = post(f"{server}/chat/completions", json.dumps({"model": "polite", "messages": HI}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_cli_serve_binds_loopback_and_requires_its_key(tiny_run: Path) -> None:
    psutil = pytest.importorskip("psutil")
    port = free_port()
    env = {**os.environ, "TINYSFT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "tinysft", "serve", str(tiny_run), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "tinysft serve did not come up"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [a.ip for a in listening] == ["127.0.0.1"] and listening[0].port == port
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/v1/models", timeout=10)
        assert e.value.code == 401
        models = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list()
        assert [m.id for m in models] == ["base", "polite"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
