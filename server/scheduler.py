"""The bridge between asyncio handlers and the engine's own thread.

All engine calls happen on one worker thread, so torch work never blocks the event loop
and the engine needs no locks. Handlers submit work through a bounded inbox; token
events come back to each request's asyncio queue. A request whose consumer goes away
(client disconnect, stream closed) is cancelled and its row freed at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Sequence

from server.contract import ClassifyItem, ClassifyResult, Engine, GenerationRequest, TokenEvent
from server.errors import QueueFull

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_in_flight = max_queue
        self._inbox: list[Callable[[], None]] = []
        self._wake = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.in_flight = 0  # generate requests submitted and not yet finished (event-loop side)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adaptserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _post(self, op: Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(op)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.engine.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                ops, self._inbox = self._inbox, []
            for op in ops:
                op()
            if self.engine.has_work():
                try:
                    events = self.engine.step()
                except Exception as exc:  # a failed step must not take the server down
                    logger.exception("engine step failed; failing the requests in it")
                    events = self.engine.abort_all(f"engine error: {type(exc).__name__}")
                self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            target = self._streams.get(event.request_id)
            if target is None:
                continue
            loop, queue = target
            if event.finished:
                del self._streams[event.request_id]
            loop.call_soon_threadsafe(queue.put_nowait, event)

    # --- requests -----------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{time.time_ns():x}-{next(self._ids)}"

    def check_capacity(self) -> None:
        if self.in_flight >= self.max_in_flight:
            raise QueueFull(
                f"{self.in_flight} requests in flight (limit {self.max_in_flight}); retry shortly",
                headers={"Retry-After": "1"},
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Token events for `request` until its final one; closing the iterator cancels it."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.in_flight += 1
        finished = False

        def admit() -> None:
            self._streams[request.request_id] = (loop, queue)
            self.engine.add(request)

        self._post(admit)
        try:
            while True:
                event = await queue.get()
                finished = event.finished
                yield event
                if finished:
                    return
        finally:
            self.in_flight -= 1
            if not finished:
                self._post(lambda: self.engine.cancel(request.request_id, "cancelled"))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps (adapter loads, classification)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting handler, not swallowed
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._post(run)
        return await future

    def call_blocking(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """`call` for code without an event loop (tools, tests): blocks the calling thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._post(run)
        return future.result(timeout)

    async def classify(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        return await self.call(lambda: self.engine.classify(items))


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.cancelled():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)
