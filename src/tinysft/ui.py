"""The web page: base and tuned (or run A and run B) side by side, streaming, with blind votes.

The page is plain HTML + JS (``tinysft/static/ui``, shipped in the package; nothing from a CDN, no
build step) and a client of the serve app itself: both answers come from
``POST /v1/chat/completions`` with ``stream: true``, the same code path as ``tinysft serve``. This
module only adds, on that app:

    GET  /, /ui/, /ui/app.js, /ui/style.css   the page
    GET  /ui/api/config                       which model each side is, and the limits
    POST /ui/api/votes, GET /ui/api/votes      record a blind vote (JSON), the tally
    GET  /ui/api/votes/export                 the decided votes as training rows (JSONL download)
    GET  /ui/api/report?run=0, /ui/api/metrics?run=0   report.json, the loss history (metrics.jsonl)

The two sides run on two copies of the serve app (the second mounted under ``/b``): the serve app
answers one request at a time, so with one copy the second answer would start only after the
first had finished. One run: both copies load it (base on one, tuned on the other; ``one_copy``
loads it once, and the answers then stream one after the other). Two runs: run A is the
reference, run B the candidate, each on its own copy.

With an API key, every path except ``/health`` needs it: as ``Authorization: Bearer KEY``, or as the
session cookie the page's login (or ``/ui/?key=KEY``) sets. The cookie holds an HMAC of the key,
not the key, and is ``SameSite=Strict``; writes from another origin are refused (403) whether or
not a key is set, so another web site cannot add votes; on a loopback address, requests naming
another host are refused too (DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from tinysft import votes as votes_lib
from tinysft.serve import ServeLimits, create_app, is_loopback

COOKIE = "tinysft_session"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_TURN_CHARS = 200_000


@dataclass
class Side:
    """One column of the page: which served model answers, under which URL prefix."""

    label: str  # shown when not blind: "base", "tuned (polite)", "run A (v1)"
    prefix: str  # "" or "/b": the serve app that answers
    model: str  # model id in that app's /v1/models
    run: str  # run folder


# ---- request bodies ------------------------------------------------------------------------------
class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TURN_CHARS)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    temperature: float = Field(ge=0.0, le=2.0)
    max_tokens: int = Field(ge=1, le=1_000_000)


class VoteRequest(BaseModel):
    """One blind vote as the page sends it; ``shown`` says which side was displayed as A and B."""

    model_config = ConfigDict(extra="forbid")
    history: dict[Literal["reference", "candidate"], list[Turn]]
    answers: dict[Literal["reference", "candidate"], str]
    shown: dict[Literal["A", "B"], Literal["reference", "candidate"]]
    pick: Literal["A", "B", "tie", "both_bad"]
    settings: Settings


# ---- access --------------------------------------------------------------------------------------
def session_token(api_key: str) -> str:
    """The cookie value for a key: an HMAC of it, so the cookie never carries the key itself."""
    return hmac.new(api_key.encode(), b"tinysft ui session", hashlib.sha256).hexdigest()


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tinysft: API key</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>body{{font:16px system-ui,sans-serif;
max-width:26rem;margin:4rem auto;padding:0 1rem}}input,button{{font:inherit;padding:.4rem}}.err{{color:#b91c1c}}</style>
</head><body><h1>tinysft</h1><p>This server needs its API key (the one given to <code>--api-key</code>).</p>
{message}<form method="post" action="/ui/login"><input type="password" name="key" autofocus required
aria-label="API key" placeholder="API key"> <button type="submit">Open</button></form></body></html>"""


async def _send_simple(send: Any, status: int, body: bytes, content_type: str,
                       extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json_error(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}}).encode()


class PageGuard:
    """ASGI middleware in front of the whole app (page, UI endpoints, both serve apps): the API key,
    the login that turns it into a cookie, and refusal of cross-site writes and foreign Host names."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: set[str] | None) -> None:
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts
        self.token = session_token(api_key) if api_key else None

    def _authorised(self, headers: dict[bytes, bytes]) -> Literal["bearer", "cookie", None]:
        assert self.api_key is not None and self.token is not None
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            return "bearer"
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # a malformed Cookie header is no session
            return None
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value.encode(), self.token.encode()):
            return "cookie"
        return None

    async def _login(self, send: Any, key: str, path: str) -> None:
        assert self.api_key is not None and self.token is not None
        if hmac.compare_digest(key.encode(), self.api_key.encode()):
            cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            return await _send_simple(send, 303, b"", "text/plain",
                                      [(b"location", path.encode()), (b"set-cookie", cookie.encode())])
        message = "<p class='err'>That is not the key this server was started with.</p>"
        return await _send_simple(send, 401, LOGIN_PAGE.format(message=message).encode(), "text/html; charset=utf-8")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path, method = scope["path"], scope["method"]
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and (urlsplit(f"//{host}").hostname or "") not in self.allowed_hosts:
            return await _send_simple(send, 403, _json_error(
                f"Host '{host[:100]}' is not this server's address; open it at 127.0.0.1 or localhost.",
                "permission_error"), "application/json")
        origin = headers.get(b"origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin is not None and urlsplit(origin.decode("latin-1")).netloc != host:
            return await _send_simple(send, 403, _json_error(
                "Cross-site request refused: this server accepts writes only from its own page.",
                "permission_error"), "application/json")
        if self.api_key is None or path == "/health":
            return await self.app(scope, receive, send)
        page = method in ("GET", "HEAD") and (path == "/" or (path.startswith("/ui") and not path.startswith("/ui/api")))
        if page and "key" in (query := parse_qs(scope.get("query_string", b"").decode("latin-1"))):
            return await self._login(send, query["key"][0], "/ui/")
        if path == "/ui/login" and method == "POST":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > 10_000 or not message.get("more_body"):
                    break
            return await self._login(send, parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0], "/ui/")
        how = self._authorised(headers)
        if how is None:
            if page:
                return await _send_simple(send, 401, LOGIN_PAGE.format(message="").encode(), "text/html; charset=utf-8")
            return await _send_simple(send, 401, _json_error(
                "Missing or invalid API key: send the header 'Authorization: Bearer KEY' (or log in on the page).",
                "authentication_error"), "application/json", [(b"www-authenticate", b"Bearer")])
        if how == "cookie":  # the serve apps check the Bearer header on /v1: hand them the key the cookie stands for
            kept = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
            scope = {**scope, "headers": [*kept, (b"authorization", f"Bearer {self.api_key}".encode())]}
        return await self.app(scope, receive, send)


# ---- the app ---------------------------------------------------------------------------------------
def _page_file(name: str) -> bytes:
    return resources.files("tinysft").joinpath("static", "ui", name).read_bytes()


def create_ui_app(loaded_a: Any, loaded_b: Any, *, pair: Literal["base-tuned", "runs"] = "base-tuned",
                  api_key: str | None = None, limits: ServeLimits | None = None,
                  allowed_hosts: set[str] | None = None, log: Callable[[str], None] = print) -> Any:
    """The serve app for ``loaded_a`` with the page and its endpoints added, ``loaded_b``'s serve app
    mounted under ``/b`` (None: one copy answers both sides, one answer after the other).

    ``pair="base-tuned"``: both loaded runs are the same run; the reference side is its base model,
    the candidate its tuned model. ``pair="runs"``: the reference is run A's tuned model, the
    candidate run B's. Votes go to run A's folder.
    """
    from fastapi import Query
    from fastapi.responses import JSONResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    app = create_app(loaded_a, api_key=api_key, limits=limits, log=log)
    app_b = create_app(loaded_b, api_key=api_key, limits=limits, log=log) if loaded_b is not None else None
    name_a = app.state.model_names[1]
    run_a = Path(loaded_a.run_dir)
    if pair == "base-tuned":
        sides = {"reference": Side("base", "", "base", str(run_a)),
                 "candidate": Side(f"tuned ({name_a})", "/b" if app_b else "", name_a, str(run_a))}
        runs = [run_a]
    else:
        if app_b is None:
            raise ValueError("pair='runs' needs two loaded runs")
        name_b = app_b.state.model_names[1]
        run_b = Path(loaded_b.run_dir)
        sides = {"reference": Side(f"run A ({name_a})", "", name_a, str(run_a)),
                 "candidate": Side(f"run B ({name_b})", "/b", name_b, str(run_b))}
        runs = [run_a, run_b]
    # A vote's pair, as the tally matches it: model id @ run folder name (stable if the folder moves).
    models = {k: f"{s.model} @ {Path(s.run).name}" for k, s in sides.items()}

    if app_b is not None:
        app.mount("/b", app_b)
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[None]:  # a mounted app's own lifespan never runs
            try:
                async with inner(a):
                    yield
            finally:
                app_b.state.generator.shutdown()

        app.router.lifespan_context = lifespan
    app.add_middleware(PageGuard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.state.sides = sides

    def run_dir(run: int) -> Path:
        if not 0 <= run < len(runs):
            raise StarletteHTTPException(400, f"run must be 0{' or 1' if len(runs) > 1 else ''} (got {run}).")
        return runs[run]

    @app.get("/", include_in_schema=False)
    async def root() -> Any:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def page() -> Any:
        return Response(_page_file("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def page_file(name: str) -> Any:
        if name not in PAGE_FILES:  # a fixed list: no request value ever becomes a file path
            raise StarletteHTTPException(404, f"No page file '{name[:100]}'.")
        return Response(_page_file(name), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/config")
    async def config() -> dict[str, Any]:
        return {"sides": {k: {"label": s.label, "url": f"{s.prefix}/v1", "model": s.model, "run": s.run}
                          for k, s in sides.items()},
                "pair": pair, "runs": [str(r) for r in runs], "votes_file": str(votes_lib.votes_path(run_a)),
                "max_tokens": limits.max_tokens, "default_max_tokens": min(limits.default_max_tokens, 200)}

    def tally_body() -> dict[str, Any]:
        return votes_lib.tally(votes_lib.read_votes(run_a), models).as_dict()

    @app.get("/ui/api/votes")
    async def get_tally() -> dict[str, Any]:
        return tally_body()

    @app.post("/ui/api/votes")
    async def vote(req: VoteRequest) -> dict[str, Any]:
        missing = [k for k in votes_lib.SIDES if k not in req.history or k not in req.answers]
        if missing or sorted(req.shown) != ["A", "B"] or sorted(req.shown.values()) != sorted(votes_lib.SIDES):
            raise StarletteHTTPException(400, 'history and answers need both "reference" and "candidate"; shown '
                                              'must map "A" and "B" to them, one each.')
        for side, turns in req.history.items():
            if not turns or turns[-1].role != "user":
                raise StarletteHTTPException(400, f"history.{side} must end with the user's turn that was answered.")
        record = votes_lib.make_vote(models, {k: [t.model_dump() for t in v] for k, v in req.history.items()},
                                     dict(req.answers), dict(req.shown), req.pick, req.settings.model_dump())
        votes_lib.append_vote(run_a, record)
        return {"recorded": True, "winner": record["winner"], "tally": tally_body()}

    @app.get("/ui/api/votes/export")
    async def export() -> Response:
        rows, skipped = votes_lib.training_rows(votes_lib.read_votes(run_a))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{run_a.name}-votes.jsonl"',
            "X-Rows": str(len(rows)), "X-Skipped": str(skipped)})

    @app.get("/ui/api/report")
    async def report(run: int = Query(0)) -> Any:
        path = run_dir(run) / "report.json"
        if not path.is_file():
            raise StarletteHTTPException(404, f"No report yet for {run_dir(run)}: run `tinysft eval {run_dir(run)} "
                                              "--prompts FILE.jsonl` to make one.")
        try:
            return JSONResponse(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StarletteHTTPException(409, f"{path} is damaged (not JSON); run `tinysft eval` again.") from None

    @app.get("/ui/api/metrics")
    async def metrics(run: int = Query(0)) -> dict[str, Any]:
        rows = votes_lib.read_jsonl_tolerant(run_dir(run) / "metrics.jsonl")
        keep = ("step", "loss", "eval_loss")
        return {"run": str(run_dir(run)),
                "history": [{k: r[k] for k in keep if isinstance(r.get(k), int | float)} for r in rows
                            if isinstance(r.get("step"), int | float)],
                "finished": (run_dir(run) / "adapter" / "adapter_config.json").is_file()}

    return app


def loopback_hosts(host: str) -> set[str] | None:
    """Host names a loopback-bound server answers to (None: bound elsewhere, no Host check)."""
    return {"127.0.0.1", "localhost", "::1", host} if is_loopback(host) else None


def serve_ui(run_dirs: list[str | Path], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
             limits: ServeLimits | None = None, one_copy: bool = False, log: Callable[[str], None] = print) -> None:
    """Load the run(s), start the page and the API, and serve until Ctrl-C."""
    import torch

    from tinysft.config import ConfigError
    from tinysft.models.load import check_run_dir, load_run
    from tinysft.ports import bind_port, run_on_socket

    if not 1 <= len(run_dirs) <= 2:
        raise ConfigError(f"tinysft ui takes one run (base vs tuned) or two (run A vs run B), got {len(run_dirs)}.")
    if api_key is not None and not api_key:
        raise ConfigError("ui: --api-key is empty; give a key or leave the option out.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for run_dir in run_dirs:  # the cheap checks first, then the port, then the minutes of loading
        check_run_dir(Path(run_dir))
    sock = bind_port(host, port)  # a busy port fails now, not after the model has loaded
    loaded_a = load_run(run_dirs[0], device=device, log=log)
    if len(run_dirs) == 2:
        loaded_b, pair = load_run(run_dirs[1], device=device, log=log), "runs"
    else:
        loaded_b, pair = (None if one_copy else load_run(run_dirs[0], device=device, log=lambda _m: None)), "base-tuned"
    app = create_ui_app(loaded_a, loaded_b, pair=pair, api_key=api_key, limits=limits,  # type: ignore[arg-type]
                        allowed_hosts=loopback_hosts(host), log=log)
    if not is_loopback(host):
        log(f"warning: listening on {host}, reachable from other machines"
            + ("." if api_key else " WITHOUT an API key — anyone who can reach it can use it; pass --api-key."))
    shown = f"[{host}]" if ":" in host else host
    log(f"Open http://{shown}:{port}/ui/ to compare {app.state.sides['reference'].label} with "
        f"{app.state.sides['candidate'].label}{' (API key required)' if api_key else ''}; "
        f"votes go to {votes_lib.votes_path(run_dirs[0])}. Ctrl-C to stop.")
    run_on_socket(app, sock)
