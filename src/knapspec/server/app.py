"""The HTTP layer: Starlette routes in OpenAI's shapes, served by uvicorn.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events ending
with ``data: [DONE]``, or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
A request is checked (:mod:`.protocol`), tokenised (the chat template for ``messages``, as
``knapspec generate --chat`` does), checked against the context, and queued for the engine thread
(:mod:`.worker`). The event loop only moves bytes: it never decodes.

Errors before the first token are HTTP errors with OpenAI's body; one after it (a failure in the
engine) ends the stream with an ``{"error": ...}`` event. A client that goes away cancels its
request: taken off the queue, or stopped after the decoding round in progress.

Shutdown (SIGTERM, SIGINT): stop accepting connections, answer 503 to the queued requests, let
the running one finish its stream, then exit (status 0 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import jinja2
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..strategies import Strategy
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Shapes,
    chat_messages,
    completion_prompt,
    context_error,
    parse_body,
    prediction_text,
    stops,
    validate,
)
from .worker import Event, GenRequest, Job, Worker

if TYPE_CHECKING:
    from ..api import LLM

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
GREEDY_BELOW = 1e-5                      # a temperature below this decodes greedily (vLLM's rule)


class ServerState:
    """What the routes share: the model, its worker, metrics, the served name and key."""

    def __init__(self, llm: LLM, *, model_name: str | None = None, api_key: str | None = None,
                 max_queue: int = 64, strategy: str | Strategy | None = None,
                 strategy_options: dict[str, Any] | None = None, threshold: float | None = None) -> None:
        if llm.tokenizer is None:
            raise ValueError("the server needs a model with a tokenizer (its checkpoint has no tokenizer files)")
        self.llm = llm
        self.name = model_name or (llm.checkpoint.name if llm.checkpoint is not None else llm.model.cfg.name)
        self.api_key = api_key or None
        self.context = llm.model.cfg.max_position
        self.metrics = Metrics(self.name)
        self.tok_lock = threading.Lock()       # the tokenizer is shared by the engine thread and the routes
        self.worker = Worker(llm, metrics=self.metrics, tokenizer_lock=self.tok_lock, max_queue=max_queue,
                             strategy=strategy, strategy_options=strategy_options, threshold=threshold)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def warm_up(self) -> None:
        """Before serving, as ``knapspec generate`` does: the strategy's one-off preparation
        (``LLM.prepare``: this machine's latency profile when none is cached yet, and the hybrid's
        verdict on layer-skip drafts when none is remembered: a first DP on a short prompt cost
        ~0.1 s, 13% of a 128-token generation, on the embedded model), then one short generation
        for the first calls of the kernels; the first request pays none of it."""
        self.llm.prepare(self.worker.strategy, **self.worker.options)
        ids = self.llm.encode("one two three, one two three, one two three, one two")
        self.llm.generate(ids, strategy=self.worker.make_strategy(), max_new_tokens=8)

    def begin_shutdown(self) -> None:
        """Called from a signal handler: refuse new requests, answer 503 to the queued ones."""
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.worker.drain)

    # ---- request steps ------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def _encode_chat(self, messages: list[dict[str, str]], prediction: str | None) -> tuple[list[int], list[int]]:
        with self.tok_lock:
            try:
                ids = self.llm.encode_chat(messages)
            except jinja2.TemplateError as e:      # e.g. a template that wants roles to alternate
                raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            return ids, self._encode_reference(prediction)

    def _encode_reference(self, text: str | None) -> list[int]:
        if not text:
            return []
        return list(self.llm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_text(self, prompt: str) -> list[int]:
        with self.tok_lock:
            return self.llm.encode(prompt)

    def request(self, req: ChatRequest | CompletionRequest, ids: list[int], reference: list[int],
                max_tokens: int | None, what: str) -> GenRequest:
        if not ids:
            raise APIError(400, f"the {what} give no tokens", param="prompt" if what == "prompt" else "messages")
        if max_tokens is None:
            max_tokens = self.context - len(ids)
            if max_tokens < 1:
                raise context_error(len(ids), None, self.context, what)
        elif len(ids) + max_tokens > self.context:
            raise context_error(len(ids), max_tokens, self.context, what)
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenRequest(ids=ids, max_tokens=max_tokens,
                          # as vLLM: below 1e-5 is greedy (dividing logits by 1e-300 overflows)
                          temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          top_k=max(req.top_k or 0, 0), seed=req.seed, stops=stops(req), reference=reference)


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _accept(request: Request, kind: type) -> tuple[float, ServerState, Any]:
    """What every generation route does first: its arrival time, the key, the body as ``kind``,
    the model name."""
    arrival = time.perf_counter()
    st = _state(request)
    st.authorize(request)
    req = validate(kind, parse_body(await request.body()))
    st.check_model(req.model)
    return arrival, st, req


# ---- routes -----------------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    arrival, st, req = await _accept(request, ChatRequest)
    messages, prediction = chat_messages(req), prediction_text(req)
    ids, reference = await asyncio.to_thread(st._encode_chat, messages, prediction)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    gen = st.request(req, ids, reference, max_tokens, "messages")
    return await _answer(request, st, gen, arrival, stream=bool(req.stream), chat=True,
                         usage_in_stream=bool(req.stream_options and req.stream_options.include_usage))


async def completions(request: Request) -> Response:
    arrival, st, req = await _accept(request, CompletionRequest)
    prompt = completion_prompt(req)
    if isinstance(prompt, str):
        ids = await asyncio.to_thread(st._encode_text, prompt)
    else:
        vocab = st.llm.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", param="prompt")
        ids = list(prompt)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    gen = st.request(req, ids, [], max_tokens, "prompt")
    return await _answer(request, st, gen, arrival, stream=bool(req.stream), chat=False,
                         usage_in_stream=bool(req.stream_options and req.stream_options.include_usage))


async def _watch_disconnect(request: Request, on_disconnect) -> None:
    """Wait for the client to go away (the body was read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def _answer(request: Request, st: ServerState, gen: GenRequest, arrival: float, *, stream: bool,
                  chat: bool, usage_in_stream: bool) -> Response:
    job = Job(gen, asyncio.get_running_loop(), arrival)
    st.worker.submit(job)
    watch = asyncio.create_task(_watch_disconnect(request, lambda: st.worker.cancel(job)))
    shapes = Shapes(chat=chat, model=st.name)
    try:
        first = await job.events.get()         # waits in the queue, then for the first text
        if first.kind == "error":
            raise first.error
        if stream:
            body = _sse(first, job, shapes, usage_in_stream, watch, st.worker)
            watch = None                       # the stream owns it now
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, ev = [], first
        while ev.kind == "text":
            pieces.append(ev.text)
            ev = await job.events.get()
        if ev.kind == "error":
            raise ev.error
        return JSONResponse(shapes.response("".join(pieces), ev.finish, ev.usage, ev.metrics))
    finally:
        if watch is not None:
            watch.cancel()
            st.worker.cancel(job)              # nothing if it finished


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(first: Event, job: Job, shapes: Shapes, usage_on: bool, watch: asyncio.Task,
               worker: Worker) -> AsyncIterator[str]:
    try:
        ev, role_sent = first, not shapes.chat
        while True:
            if ev.kind == "error":
                yield _data(ev.error.body())
                break
            if not role_sent:                  # the role chunk goes with the first text
                yield _data(shapes.chunk(None, role=True, with_usage=usage_on))
                role_sent = True
            if ev.kind == "text":
                yield _data(shapes.chunk(ev.text, with_usage=usage_on))
            else:
                yield _data(shapes.chunk(None, ev.finish, with_usage=usage_on))
                if usage_on:
                    yield _data(shapes.usage_chunk(ev.usage, ev.metrics))
                break
            ev = await job.events.get()
        yield "data: [DONE]\n\n"
    finally:
        watch.cancel()
        worker.cancel(job)


async def models(request: Request) -> Response:
    st = _state(request)
    st.authorize(request)
    return JSONResponse({"object": "list", "data": [_model_card(st)]})


async def model(request: Request) -> Response:
    st = _state(request)
    st.authorize(request)
    st.check_model(request.path_params["model"])
    return JSONResponse(_model_card(st))


def _model_card(st: ServerState) -> dict[str, Any]:
    return {"id": st.name, "object": "model", "created": 0, "owned_by": "knapspec", "max_model_len": st.context}


async def health(request: Request) -> Response:
    st = _state(request)
    if st.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---- errors -----------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {"Retry-After": "1"} \
        if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        msg = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        msg = f"method {request.method} is not allowed on {request.url.path}"
    else:
        msg = str(exc.detail)
    return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                        status_code=500)


def create_app(llm: LLM, **options: Any) -> Starlette:
    """The ASGI app serving ``llm``; ``options`` are :class:`ServerState`'s (model_name, api_key,
    max_queue, strategy, strategy_options, threshold)."""
    state = ServerState(llm, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.loop = asyncio.get_running_loop()
        state.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.stop)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan)
    app.state.server = state
    return app


# ---- running it -------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one). Bound before the model loads, so that a port in use
    fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server; a shutdown signal first tells the app to drain its queue."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.server.begin_shutdown()
        super().handle_exit(sig, frame)


def config(app: Starlette, *, verbose: int = 0) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose > 0,
                          lifespan="on", timeout_keep_alive=30)


def run(app: Starlette, sock: socket.socket, *, verbose: int = 0) -> None:
    """Serve until SIGTERM or SIGINT. uvicorn raises the signal again once it has shut down; for
    SIGTERM a handler here takes it, so that the process ends normally (status 0)."""
    server = Server(config(app, verbose=verbose))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
