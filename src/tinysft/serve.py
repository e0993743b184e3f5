"""OpenAI-compatible HTTP API over a run directory.

One model is loaded; ``base`` and the tuned model are the same weights with the LoRA adapter
switched off or on per request. Generation runs on a single worker thread, so requests queue in
arrival order and never share a forward pass — one request's tokens cannot leak into another's
output, and the adapter switch cannot happen mid-generation.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream`` true/false, ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``) and an unauthenticated ``GET /health``.

Safety: binds to 127.0.0.1 unless told otherwise; bodies over ``max_body_bytes`` get 413; prompt
length and ``max_tokens`` are capped; with an API key, ``/v1`` requests without the right
``Authorization: Bearer`` header get 401 (compared in constant time); no request value is ever used
as a file path. Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tinysft.generation import Sampling, adapter_state, decode, encode_prompt
from tinysft.models.load import LoadedRun, check_run_dir, load_run


@dataclass
class ServeLimits:
    max_tokens: int = 1024
    """Largest ``max_tokens`` a request may ask for (larger: 400)."""
    default_max_tokens: int = 256
    """``max_tokens`` when a request gives none."""
    max_prompt_tokens: int = 4096
    """Longest rendered prompt in tokens (longer: 400); also bounded by the model's context."""
    max_body_bytes: int = 1_000_000
    """Largest request body (larger: 413)."""
    max_queue: int = 32
    """Requests running or waiting; more get 503 until the queue drains."""

    def __post_init__(self) -> None:
        from tinysft.config import ConfigError

        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {name} must be >= 1 (got {getattr(self, name)}).")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


# ---- request schema ------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


GREEDY_BELOW = 1e-5
"""A ``temperature`` or ``top_p`` below this is treated as greedy decoding. Sampling at such a
temperature picks the top token anyway unless two logits lie within ~1e-4 of each other, and
dividing logits by a temperature near the smallest float (JSON allows 1e-300) overflows to inf and
NaN probabilities. A ``top_p`` that small keeps only the top token (whose probability is at least
1/vocabulary size), and rounds to 0 in float32 (5e-324 does), which would keep none."""


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request that tinysft honours; unknown fields are ignored.

    Numeric ranges (inclusive unless marked; outside them: 400 naming the field; NaN and infinity
    are refused): ``max_tokens`` / ``max_completion_tokens`` 1 to the server's limit
    (``ServeLimits.max_tokens``, checked in the handler); ``temperature`` 0 to 2 (below
    ``GREEDY_BELOW``: greedy); ``top_p`` above 0 to 1; ``seed`` -2**63 to 2**64-1 (torch's
    generator range); ``n`` 1.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator.manual_seed's range
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return stops


# ---- generation ----------------------------------------------------------------------------------
@dataclass
class Job:
    prompt: list[int]
    tuned: bool
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


class Generator:
    """Owns the model: one worker thread runs the jobs one at a time, in the order they arrive."""

    def __init__(self, loaded: LoadedRun, max_queue: int) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinysft-generate")
        self._pending = 0
        self._count_lock = threading.Lock()
        self._closed = threading.Event()
        # The event loop encodes prompts while the worker decodes tokens; a fast tokenizer can raise
        # "Already borrowed" when used from two threads at once, so both take this lock.
        self.tokenizer_lock = threading.Lock()

    def try_reserve(self) -> bool:
        with self._count_lock:
            if self._pending >= self.max_queue:
                return False
            self._pending += 1
            return True

    def submit(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker (a slot must have been reserved); returns a concurrent Future."""

        def run() -> Any:
            try:
                return fn()
            finally:
                with self._count_lock:
                    self._pending -= 1

        return self._executor.submit(run)

    def shutdown(self) -> None:
        """Drop queued jobs and stop the running one at its next token (so Ctrl-C exits promptly)."""
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def encode(self, messages: list[dict[str, str]], system_prompt: str | None) -> list[int]:
        with self.tokenizer_lock:
            return encode_prompt(self.tokenizer, messages, system_prompt)  # message text never becomes control tokens

    def run(self, job: Job, emit: Callable[[str], None] = lambda _d: None) -> Completion:
        """Generate for one request on the calling thread with the shared decoder; ``emit`` gets each
        piece of final text."""
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        sampling = Sampling(max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, seed=seed,
                            stop=tuple(job.stops))
        with adapter_state(self.model, job.tuned):
            answer = decode(self.model, _LockedTokenizer(self.tokenizer, self.tokenizer_lock), [job.prompt], sampling,
                            batch_size=1, on_text=lambda _i, piece: emit(piece),
                            cancelled=lambda: job.cancelled.is_set() or self._closed.is_set())[0]
        finish = "length" if answer.finish_reason == "cancelled" else answer.finish_reason
        return Completion(answer.text, finish, len(answer.tokens))


class _LockedTokenizer:
    """The tokenizer, with the calls the decoder makes taken under the lock ``encode`` takes too."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer, self._lock = tokenizer, lock

    def decode(self, *args: Any, **kwargs: Any) -> str:
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)

    def get_vocab(self) -> dict[str, int]:
        with self._lock:
            return self._tokenizer.get_vocab()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


# ---- the app ---------------------------------------------------------------------------------------
def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": None}},
                        status_code=status, headers=headers)


class Guard:
    """ASGI middleware run before routing: API key on /v1, and the request-body size limit."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            # compare_digest: the time taken does not reveal how much of the key matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = _error(401, "Missing or invalid API key: send the header 'Authorization: Bearer KEY'.",
                                  "authentication_error", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error(413, f"Request body too large (limit {self.max_body} bytes).")(scope, receive, send)
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received  # bodies sent without Content-Length are counted as they arrive
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    from fastapi import HTTPException

                    raise HTTPException(413, f"Request body too large (limit {self.max_body} bytes).")
            return message

        return await self.app(scope, limited_receive, send)


def _validation_message(exc: Any) -> tuple[int, str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "The request body is not valid JSON.", None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    # 400, as OpenAI's API answers a parameter out of range (not FastAPI's default 422).
    return 400, "Invalid request — " + "; ".join(parts), param


def create_app(loaded: LoadedRun, *, api_key: str | None = None, model_name: str | None = None,
               limits: ServeLimits | None = None, log: Callable[[str], None] = print) -> Any:
    """A FastAPI app serving ``loaded`` as ``base`` (adapter off) and ``model_name`` (adapter on).

    ``model_name`` defaults to the run directory's name. The app owns one worker thread; it is shut
    down with the app.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    if api_key is not None and not api_key:
        from tinysft.config import ConfigError

        raise ConfigError("serve: --api-key is empty; give a key or leave the option out.")
    tuned_name = model_name or Path(loaded.run_dir).resolve().name
    if tuned_name == "base":
        tuned_name = "tuned"
    models = {"base": False, tuned_name: True}  # id -> adapter enabled
    created = int(time.time())
    generator = Generator(loaded, limits.max_queue)
    system_prompt = loaded.config.data.system_prompt
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        generator.shutdown()

    # No /docs or /openapi.json: nothing is exposed beyond the API itself.
    app = FastAPI(title="tinysft", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.generator = generator
    app.state.model_names = list(models)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(exc)
        return _error(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
            exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_crash(_request: Request, exc: Exception) -> JSONResponse:
        log(f"internal error: {type(exc).__name__}: {exc}")
        return _error(500, "Internal server error.", "server_error")

    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tinysft"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(n) for n in models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in models:
            raise StarletteHTTPException(404, f"The model '{model_id}' does not exist; available: {', '.join(models)}.")
        return _model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        if req.model not in models:
            raise StarletteHTTPException(404, f"The model '{req.model}' does not exist; available: {', '.join(models)}.")
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            return _error(400, f"{field_name} is {max_tokens}; this server allows at most {limits.max_tokens}.",
                          param=field_name)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = generator.encode(messages, system_prompt)
        except Exception as e:  # the chat template refused the conversation (e.g. roles out of order)
            raise StarletteHTTPException(400, f"The model's chat template cannot render these messages: "
                                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
        if len(prompt) > limits.max_prompt_tokens:
            raise StarletteHTTPException(400, f"The prompt is {len(prompt)} tokens; this server accepts at most "
                                              f"{limits.max_prompt_tokens}.")
        if context and len(prompt) + max_tokens > context:
            raise StarletteHTTPException(400, f"The prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                                              f"exceeds the model's context of {context} tokens.")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:  # see GREEDY_BELOW
            temperature = 0.0
        job = Job(prompt, models[req.model], max_tokens, temperature,
                  top_p, req.stop or [], req.seed)  # type: ignore[arg-type]
        if not generator.try_reserve():
            raise StarletteHTTPException(503, f"The server is busy ({limits.max_queue} requests queued); retry shortly.")
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # Submitted now, not when the response starts: the reserved queue slot is always released.
            events = start_stream(generator, job)
            return StreamingResponse(stream_chunks(events, job, rid, now, req.model, len(prompt), include_usage, log),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result: Completion = await asyncio.wrap_future(generator.submit(lambda: generator.run(job)))
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        return {"id": rid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(len(prompt), result.completion_tokens)}

    return app


def start_stream(generator: Generator, job: Job) -> asyncio.Queue[tuple[str, Any]]:
    """Queue the job; its text pieces arrive on the returned asyncio queue as ("delta", str),
    then ("done", Completion) or ("error", exception)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down)
            job.cancelled.set()

    def work() -> None:
        try:
            put(("done", generator.run(job, emit=lambda delta: put(("delta", delta)))))
        except Exception as e:
            put(("error", e))

    generator.submit(work)
    return queue

async def stream_chunks(queue: asyncio.Queue[tuple[str, Any]], job: Job, rid: str, now: int, model: str,
                        prompt_tokens: int, include_usage: bool, log: Callable[[str], None]) -> AsyncIterator[str]:
    """The job's server-sent events in OpenAI's chunk format, ending with [DONE]."""
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                              "logprobs": None}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(prompt_tokens, value.completion_tokens))
                break
            else:
                log(f"internal error while streaming: {type(value).__name__}: {value}")
                err = {"error": {"message": "Internal server error.", "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that disconnects mid-stream stops its generation


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, limits: ServeLimits | None = None,
          log: Callable[[str], None] = print) -> None:
    """Load the run and serve it until interrupted (Ctrl-C)."""
    from tinysft.ports import bind_port, run_on_socket

    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_run_dir(Path(run_dir))  # the cheap checks first, then the port, then the minutes of loading
    sock = bind_port(host, port)  # a busy port fails now, not after the model has loaded
    loaded = load_run(run_dir, device=device, log=log)
    app = create_app(loaded, api_key=api_key, model_name=model_name, limits=limits, log=log)
    if not is_loopback(host):
        log(f"warning: listening on {host}, reachable from other machines"
            + ("." if api_key else " WITHOUT an API key — anyone who can reach it can use it; pass --api-key."))
    log(f"Serving models {', '.join(app.state.model_names)} at http://{host}:{port}/v1 "
        f"(OpenAI-compatible{', API key required' if api_key else ''}). Ctrl-C to stop.")
    run_on_socket(app, sock)
