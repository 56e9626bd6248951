"""The HTTP side of `onecard serve` (FastAPI): the OpenAI-compatible API and the chat page.

The model loads in the background while the server already answers (503 until it is ready).
Each generation request is checked (onecard/openai_api.py), then waits in the decode workers'
bounded queue (onecard/workers.py; 429 when full); its text comes back through an asyncio queue
and goes out as one JSON answer or as server-sent events. A client that disconnects cancels its
job. The page (onecard/static/chat.html) is served with a Content-Security-Policy that allows
only its own script and style, by hash: even text that slipped into the page as HTML could not
run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from onecard.conversations import prompt_ids
from onecard.engine import Engine, cache_bytes
from onecard.openai_api import ApiError, Limits, chunk, new_id, parse_chat, parse_completion, response, usage
from onecard.workers import CacheMemory, Job, QueueFull, Workers

log = logging.getLogger("onecard.serve")
DRAIN_BYTES = 16 * 2**20  # an oversized body is read (and dropped) up to this, so the client sees the 413


class Backend:
    """The served model: "loading" until `load` finishes, then "ready" (or "failed", with why)."""

    def __init__(self, name: str, workers: int = 4, max_queued: int = 64, cache_memory: int | None = None) -> None:
        self.name, self.count, self.max_queued = name, workers, max_queued
        self.cache_memory = cache_memory  # bytes for the KV caches; None: what the card has free once loaded
        self.cache_need: Callable[[int, int, int], int] = lambda prompt, new, samples: 0
        self.status, self.error, self.kind = "loading", None, None
        self.tokenizer, self.context, self.workers = None, 0, None
        self.trained_context = None  # the sequence length it trained on; `context` is the positions it takes
        self.created = int(time.time())

    def load(self, loader: Callable[[], tuple]) -> None:
        """loader() -> (model, tokenizer, kind); run in a thread while the server answers."""
        try:
            model, tokenizer, kind = loader()
            model.eval()
            self.trained_context = model.config.sequence_len  # its rotary table runs 10x as far, as nanochat's
            self.cache_need = lambda prompt, new, samples: cache_bytes(model, prompt, new, samples)
            if self.cache_memory is None:
                self.cache_memory = free_memory(model.lm_head.weight.device)
            self.ready(lambda tools: Engine(model, tokenizer, tools=tools), tokenizer, model.rotary_len, kind)
        except Exception as error:  # shown to clients in /health and to the user by `onecard serve`
            self.error = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.status = "failed"
            log.debug("loading failed", exc_info=True)

    def ready(self, make_engine: Callable[[bool], Engine], tokenizer, context: int, kind: str) -> None:
        self.tokenizer, self.context, self.kind = tokenizer, context, kind
        self.workers = Workers(make_engine, self.count, self.max_queued, CacheMemory(self.cache_memory))
        self.status = "ready"

    def require_ready(self) -> None:
        if self.status == "loading":
            raise ApiError(503, "the model is still loading: try again in a few seconds", code="model_loading")
        if self.status != "ready":
            raise ApiError(503, f"the model could not be loaded: {self.error}", code="model_failed")

    def stop_generating(self) -> None:
        if self.workers:
            self.workers.cancel_all()

    def close(self) -> None:
        if self.workers:
            self.workers.close()


def free_memory(device: torch.device) -> int | None:
    """Bytes a card has free (with what PyTorch holds unused); None on a CPU, where the system
    pages instead of failing."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class Page:
    """The chat page, with a policy that lets only its own inline script and style run."""

    def __init__(self, html: str) -> None:
        self.html = html

        def hashes(tag: str) -> str:
            bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
            return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                            for b in bodies) or "'none'"
        self.headers = {
            "Content-Security-Policy": f"default-src 'none'; script-src {hashes('script')}; "
                                       f"style-src {hashes('style')}; connect-src 'self'; img-src data:; "
                                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    @classmethod
    def shipped(cls) -> Page:
        return cls(resources.files("onecard").joinpath("static/chat.html").read_text(encoding="utf-8"))


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_json(request: Request, limits: Limits) -> object:
    """The body as JSON: 413 past the size limit, 408 when it does not arrive in time, 422 if not JSON."""
    too_large = ApiError(413, f"the request body is larger than {limits.max_body_bytes:,} bytes",
                         code="request_too_large")
    drain = max(DRAIN_BYTES, limits.max_body_bytes)  # past the limit, read (and drop) up to here
    declared = request.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise ApiError(400, "bad Content-Length header", code="invalid_value")
    if declared is not None and int(declared) > drain:
        raise too_large
    pieces, size = [], 0

    async def read() -> None:
        nonlocal size
        async for piece in request.stream():
            size += len(piece)
            if size <= limits.max_body_bytes:
                pieces.append(piece)
            elif size > drain:
                return
    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except ClientDisconnect:  # nobody is left to answer
        raise ApiError(400, "the client went away before its body arrived", code="client_disconnected") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="timeout") from None
    if size > limits.max_body_bytes:
        raise too_large
    try:
        return json.loads(b"".join(pieces))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ApiError(422, f"the request body is not valid JSON ({first})", code="invalid_json") from None


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator, so the job is cancelled at once."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


class Generation:
    """One request's job and the events its worker sends back to this event loop."""

    def __init__(self, backend: Backend, parsed, chat: bool) -> None:
        tokenizer = backend.tokenizer
        if chat:
            self.prompt = prompt_ids(tokenizer, parsed.messages)
        else:
            self.prompt = tokenizer.encode(parsed.prompt, prepend_bos=True)
        if len(self.prompt) >= backend.context:
            raise ApiError(400, f"the prompt is {len(self.prompt):,} tokens; this model's context is "
                                f"{backend.context:,}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        self.parsed, self.chat, self.model = parsed, chat, backend.name
        new_tokens = min(parsed.sampling.max_tokens, backend.context - len(self.prompt))
        need = backend.cache_need(len(self.prompt), new_tokens, parsed.n)
        if backend.cache_memory is not None and need > backend.cache_memory:
            raise ApiError(400, f"{len(self.prompt):,} prompt tokens and {parsed.n} x {new_tokens:,} new ones need "
                                f"{need / 2**30:.3g} GiB for their KV caches; this server has "
                                f"{backend.cache_memory / 2**30:.3g} GiB: ask for fewer (max_tokens, n)",
                           param="max_tokens", code="insufficient_memory")
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                self.job.cancelled.set()
        self.job = Job(self.prompt, parsed.sampling, emit, n=parsed.n, stops=parsed.stop, tools=chat,
                       cache_bytes=need)
        try:
            backend.workers.submit(self.job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({backend.count} generating, {backend.max_queued} waiting): "
                                "try again shortly", code="rate_limit_exceeded") from None

    def usage(self, completion_tokens: int) -> dict:
        return usage(len(self.prompt), completion_tokens)

    async def stream(self) -> AsyncIterator[str]:
        p, chat = self.parsed, self.chat
        head = (chat, self.id, self.model, self.created)  # the same in every chunk
        try:
            if chat:
                for i in range(p.n):
                    yield sse(chunk(*head, i, first=True, with_usage=p.include_usage))
            while True:
                kind, *rest = await self.events.get()
                if kind == "text":
                    yield sse(chunk(*head, rest[0], text=rest[1], with_usage=p.include_usage))
                elif kind == "finish":
                    yield sse(chunk(*head, rest[0], reason=rest[1], with_usage=p.include_usage))
                elif kind == "done":
                    if p.include_usage:
                        yield sse(chunk(*head, None, used=self.usage(rest[0]), with_usage=True))
                    break
                else:
                    yield sse(failure(rest).body())
                    break
            yield sse("[DONE]")
        finally:
            self.job.cancelled.set()

    async def collect(self, request: Request) -> JSONResponse | None:
        """The whole answer; None if the client went away first (its job is cancelled)."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            self.job.cancelled.set()
            self.events.put_nowait(("gone",))
        watcher = asyncio.create_task(watch())
        texts, reasons = [[] for _ in range(self.parsed.n)], [None] * self.parsed.n
        try:
            while True:
                kind, *rest = await self.events.get()
                if kind == "text":
                    texts[rest[0]].append(rest[1])
                elif kind == "finish":
                    reasons[rest[0]] = rest[1]
                elif kind == "done":
                    return JSONResponse(response(self.chat, self.id, self.model, self.created,
                                                 ["".join(t) for t in texts], reasons, self.usage(rest[0])))
                elif kind == "gone":
                    return None
                else:
                    raise failure(rest)
        finally:
            watcher.cancel()
            self.job.cancelled.set()


def failure(event: list) -> ApiError:
    """An "error" event's message and status (500 unless the workers said another: 503 on shutdown)."""
    status = event[1] if len(event) > 1 else 500
    return ApiError(status, event[0], code="shutting_down" if status == 503 else "generation_failed")


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin header names the server the request reached (its Host header)."""
    return urlsplit(origin).netloc.lower() == host.lower()


def create_app(backend: Backend, limits: Limits | None = None, api_key: str | None = None,
               page: Page | None = None, allow_origins: tuple[str, ...] = ()) -> FastAPI:
    """allow_origins: web pages elsewhere that may use the API (CORS), '*' for any; the server's own
    page and clients that are not browsers (they send no Origin) need nothing."""
    limits = limits or Limits()
    page = page or Page.shipped()
    app = FastAPI(title="onecard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    if allow_origins:
        # any header: the official JavaScript client sends its own (x-stainless-os, ...) on every
        # request, and a preflight that refused one would block all of that page's requests
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail), code="not_found"
                                       if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crashed(_request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(error).__name__}", code="internal_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'" if not given else
                           "wrong API key", code="invalid_api_key")

    def check_origin(request: Request) -> None:
        # Any page a user has open can POST here as text/plain, which needs no CORS preflight: without
        # this check, every site could spend the model's time (it could not read the answers).
        origin = request.headers.get("origin")
        if origin is None or "*" in allow_origins or origin in allow_origins or \
                same_origin(origin, request.headers.get("host", "")):
            return
        raise ApiError(403, f"a web page at {origin} may not use this server (onecard serve --allow-origin "
                            f"{origin} lets it)", code="origin_not_allowed")

    def check_model(model_id: str | None) -> None:
        if model_id not in (None, backend.name):
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {backend.name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": backend.name, "object": "model", "created": backend.created, "owned_by": "onecard",
                "onecard": {"kind": backend.kind, "context": backend.context,
                            "trained_context": backend.trained_context}}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page.html, headers=page.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = backend.workers
        body = {"status": {"ready": "ok"}.get(backend.status, backend.status), "model": backend.name,
                "kind": backend.kind, "error": backend.error, "auth": api_key is not None,
                "generating": workers.running if workers else 0, "waiting": workers.waiting if workers else 0}
        return JSONResponse(body, status_code=200 if backend.status == "ready" else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        backend.require_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        authorize(request)
        backend.require_ready()
        check_model(model_id)
        return model_card()

    async def generate(request: Request, chat: bool):
        check_origin(request)
        authorize(request)
        backend.require_ready()
        parsed = (parse_chat if chat else parse_completion)(await read_json(request, limits), limits)
        check_model(parsed.model)
        if chat and backend.kind != "chat":
            raise ApiError(400, f"{backend.name} is a base model: it continues text at /v1/completions",
                           param="messages", code="base_model")
        generation = Generation(backend, parsed, chat)
        if parsed.stream:
            return EventStream(generation.stream(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await generation.collect(request)
        return answer if answer is not None else JSONResponse({}, status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError if it cannot be had."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app: FastAPI, log_level: str = "warning"):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # generations end first, so their clients hear why at once, rather than waiting out the grace
            # period to be cut off mid-answer
            app.state.backend.stop_generating()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_keep_alive=5, timeout_graceful_shutdown=3, limit_concurrency=1024,
                            lifespan="off")
    return Server(config)


class Running:
    """A server in a background thread (tests and benchmarks): `url`, then `stop()`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app, self.server = app, uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.app.state.backend.close()
