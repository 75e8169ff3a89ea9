"""One engine thread and the FIFO queue in front of it.

Requests are :class:`Job` s. The event loop submits them (refused with 429 when the queue is full,
503 once shutdown began); one thread takes them in arrival order and runs each through the same
API call as ``knapspec generate`` (``LLM.stream_ids``), one generation at a time. What a job
produces comes back to the event loop as :class:`Event` s on an asyncio queue.

Cancelling a job (its client went away) removes it from the queue, or, when it runs, stops it at
the end of the decoding round in progress: the token iterator is closed between rounds.

A sampled request with a ``seed`` repeats exactly only if its drafts do (speculative sampling's
random draws depend on what was drafted), so it runs on a fresh instance of the strategy when the
strategy's drafts follow the tokens alone (``Strategy.reproducible``), else on prompt lookup.

No decoding logic here: tokens in, tokens and text out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..api import DEFAULT_STRATEGY
from ..engine import DEFAULT_THRESHOLD, GenerationStats
from ..strategies import REGISTRY, Strategy
from .metrics import Metrics
from .protocol import APIError, Usage, spec_metrics
from .text import StopText

if TYPE_CHECKING:
    from ..api import LLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenRequest:
    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    reference: list[int] = field(default_factory=list)    # a predicted output's tokens


@dataclass(frozen=True)
class Event:
    kind: str                           # "text" | "done" | "error"
    text: str = ""
    finish: str | None = None           # done: "stop" | "length" | "abort"
    usage: Usage | None = None
    metrics: dict[str, Any] | None = None
    error: APIError | None = None


class Job:
    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, arrival: float | None = None) -> None:
        self.req = req
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrival = time.perf_counter() if arrival is None else arrival     # when the request came in

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:            # the event loop is closed: nobody listens any more
            pass


class Worker:
    def __init__(self, llm: LLM, *, metrics: Metrics, tokenizer_lock: threading.Lock, max_queue: int = 64,
                 strategy: str | Strategy | None = None, strategy_options: dict[str, Any] | None = None,
                 threshold: float | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.llm, self.metrics, self.max_queue = llm, metrics, max_queue
        self.strategy, self.options = strategy, dict(strategy_options or {})
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self._tok = tokenizer_lock
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="knapspec-engine", daemon=True)

    # ---- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise APIError(503, "the server is shutting down", type="server_error", code="service_unavailable")
            busy = len(self._waiting) + (self._running is not None)
            if busy >= 1 + self.max_queue:
                raise APIError(429, f"the server's queue is full ({len(self._waiting)} requests waiting, "
                               f"--max-queue {self.max_queue}): retry later", type="requests",
                               code="rate_limit_exceeded")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job from the queue, or stop it after the current round."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return                  # running or finished: the engine thread sees the flag
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.on_finish("abort")
        job.emit(Event("done", finish="abort", usage=Usage(len(job.req.ids), 0)))

    def drain(self) -> None:
        """Shutdown begins: refuse new jobs; the waiting ones get 503; the running one finishes."""
        with self._cond:
            self._accepting = False
            dropped = list(self._waiting)
            self._waiting.clear()
            self.metrics.waiting.set(0)
        for job in dropped:
            self.metrics.on_finish("abort")
            job.emit(Event("error", error=APIError(503, "the server is shutting down", type="server_error",
                                                   code="service_unavailable")))

    def stop(self, timeout: float = 10.0) -> None:
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return int(self._running is not None), len(self._waiting)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
                self.metrics.running.set(1)
            try:
                self._run(job)
            except ValueError as e:             # the engine refused the request (checked before: a bug)
                job.emit(Event("error", error=APIError(400, str(e))))
            except Exception as e:              # a bug or a broken model: this request fails, the server stays up
                log.exception("generation failed")
                job.emit(Event("error", error=APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                                       type="server_error")))
            finally:
                with self._cond:
                    self._running = None
                    self.metrics.running.set(0)

    def make_strategy(self) -> Strategy:
        """The server's strategy (the instance kept across requests when it learns across them)."""
        return self.llm.make_strategy(self.strategy, **self.options)

    def _strategy_for(self, req: GenRequest) -> Strategy:
        strat = self.make_strategy()
        if req.temperature > 0 and req.seed is not None:
            if not strat.reproducible:
                strat = self.llm.make_strategy("lookup", **self.options)
            elif strat.persists_across_prompts and not isinstance(self.strategy, Strategy):
                name, opts = REGISTRY.resolve(self.strategy or DEFAULT_STRATEGY, self.options)
                strat = REGISTRY.create(name, self.llm.model, **opts)
        return strat

    def _run(self, job: Job) -> None:
        req, m = job.req, self.metrics
        start = time.perf_counter()
        m.queue_time.observe(start - job.arrival)
        if job.cancelled.is_set():
            m.on_finish("abort")
            job.emit(Event("done", finish="abort", usage=Usage(len(req.ids), 0)))
            return
        strat = self._strategy_for(req)
        st = GenerationStats()
        text = StopText(self.llm.decode, req.stops)
        finish, n_out, drafted, accepted, last = None, 0, 0, 0, None
        it = self.llm.stream_ids(req.ids, strategy=strat, max_new_tokens=req.max_tokens,
                                 temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                 threshold=self.threshold, stats=st, reference=req.reference or None)
        try:
            for chunk in it:
                now = time.perf_counter()
                if last is None:
                    m.ttft.observe(now - job.arrival)
                else:
                    m.itl.observe(now - last)
                last = now
                # the engine has counted this round before yielding it
                m.on_round(st.drafted - drafted, st.accepted - accepted)
                drafted, accepted = st.drafted, st.accepted
                with self._tok:
                    piece, used = text.feed(chunk)
                n_out += used
                if piece:
                    job.emit(Event("text", text=piece))
                if text.stopped:
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    finish = "abort"
                    break
        finally:
            it.close()                          # ends the generation: the engine is free
        if finish is None:
            finish = "stop" if st.stopped == "eos" else "length"
            with self._tok:
                tail = text.finish()
            if tail:
                job.emit(Event("text", text=tail))
        usage = Usage(len(req.ids), n_out, st.reference_accepted, st.reference_drafted - st.reference_accepted)
        m.on_finish(finish, prompt_tokens=len(req.ids), generation_tokens=n_out,
                    e2e=(last or time.perf_counter()) - job.arrival)
        job.emit(Event("done", finish=finish, usage=usage,
                       metrics=spec_metrics(strat.name, st.draft_rounds, st.drafted, st.accepted)))
