"""The engine thread: the one thread that touches the model.

HTTP handlers call :meth:`EngineWorker.submit` (thread-safe) with a sink, a callable the
engine thread calls with each event of that request: ``TokensEvent`` (ids committed this
step, streaming only), then one ``DoneEvent`` (the result) or ``FailedEvent`` (the engine
or the server stopped it). The thread drains its inbox between steps, so a request joins
the running batch at the next step (continuous batching).

Admission control: at most ``max_batch_size`` requests run and ``max_waiting`` wait; one
more is refused at once (``Overloaded``, an HTTP 429) instead of queueing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from idlm.decoding.requests import GenerationRequest, GenerationResult
from idlm.decoding.scheduler import EngineSession, StepEvents

LOG = logging.getLogger("idlm.serve")
IDLE_POLL_S = 0.5


@dataclass
class TokensEvent:
    token_ids: list[int]


@dataclass
class DoneEvent:
    result: GenerationResult


@dataclass
class FailedEvent:
    message: str
    status: int = 500


Event = TokensEvent | DoneEvent | FailedEvent
Sink = Callable[[Event], None]


class Overloaded(Exception):
    """The server already holds as many requests as it may (running + waiting)."""


class EngineWorker:
    """Owns an ``EngineSession`` and runs it on its own thread."""

    def __init__(self, session: EngineSession, *, max_waiting: int) -> None:
        from idlm.serving.http.metrics import ServerMetrics

        self.session, self.engine = session, session.engine
        self.max_waiting = max_waiting
        self.capacity = self.engine.max_batch_size + max_waiting
        self.metrics = ServerMetrics()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0                    # accepted and not yet done (running + waiting)
        self._next_ticket = 0
        self._sinks: dict[int, Sink] = {}      # engine thread only: ticket -> sink
        self._tickets: dict[int, int] = {}     # engine thread only: session handle -> ticket
        self._handles: dict[int, int] = {}     # engine thread only: ticket -> session handle
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idlm-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current step, fail what is left (503) and end the thread."""
        self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def validate(self, request: GenerationRequest) -> str | None:
        return self.session.validate(request)

    def submit(self, request: GenerationRequest, sink: Sink, *, stream: bool) -> int:
        """Queue a request; returns its ticket. Raises ``Overloaded`` when full."""
        with self._lock:
            if self._in_flight >= self.capacity:
                self.metrics.count("requests_rejected")
                raise Overloaded(
                    f"the server is at capacity ({self.engine.max_batch_size} running, "
                    f"{self.max_waiting} waiting): retry later")
            self._in_flight += 1
            ticket = self._next_ticket
            self._next_ticket += 1
        self.metrics.count("requests_received")
        self.metrics.add_prompt_tokens(len(request.prompt_ids))
        self._inbox.put(("submit", (ticket, request, sink, stream)))
        return ticket

    def cancel(self, ticket: int) -> None:
        """Stop a request whose client went away (no event follows)."""
        self._inbox.put(("cancel", ticket))

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        LOG.info("engine thread started")
        while not self._stopping.is_set():
            self._drain(block=self.session.idle)
            if self._stopping.is_set() or self.session.idle:
                continue
            started = time.perf_counter()
            try:
                events = self.session.step()
            except Exception as error:   # a broken step must not take the server down
                LOG.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(error).__name__}: {error}", 500)
                continue
            self.metrics.record_step(time.perf_counter() - started, len(events.admitted),
                                     self.session.running, self.session.waiting,
                                     self.engine.forwards_run)
            self._dispatch(events)
        self._fail_all("the server is shutting down", 503)
        LOG.info("engine thread stopped")

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            ticket, request, sink, stream = payload
            handle = self.session.submit(request, stream=stream)
            self._sinks[ticket], self._tickets[handle] = sink, ticket
            self._handles[ticket] = handle
        elif kind == "cancel" and payload in self._handles:
            if self.session.cancel(self._handles[payload]):
                self.metrics.count("requests_cancelled")
            self._release(self._handles[payload])

    def _dispatch(self, events: StepEvents) -> None:
        for handle, token_ids in events.tokens.items():
            ticket = self._tickets.get(handle)
            if ticket is not None:
                self._sinks[ticket](TokensEvent(token_ids))
        for result in events.finished:
            ticket = self._tickets.get(result.index)
            if ticket is None:
                continue
            self.metrics.record_result(result)
            self._sinks[ticket](DoneEvent(result))
            self._release(result.index)

    def _release(self, handle: int) -> None:
        ticket = self._tickets.pop(handle, None)
        if ticket is None:
            return
        self._sinks.pop(ticket, None)
        self._handles.pop(ticket, None)
        with self._lock:
            self._in_flight -= 1

    def _fail_all(self, message: str, status: int) -> None:
        """Fail every request held (a crashed step or shutdown) and start a fresh session."""
        while True:   # requests still in the inbox are held too
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload[2](FailedEvent(message, status))
                self.metrics.count("requests_failed")
                with self._lock:
                    self._in_flight -= 1
        for handle, ticket in list(self._tickets.items()):
            self._sinks[ticket](FailedEvent(message, status))
            self.metrics.count("requests_failed")
            self._release(handle)
        self.session = EngineSession(self.engine, self.session.shape)
