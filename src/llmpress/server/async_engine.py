"""Drive the (not thread-safe) LLMEngine from asyncio: one background thread owns the engine.

Coroutines never touch the engine. They post "add" and "abort" commands to an inbox; the engine
thread drains it, runs `engine.step()` while there is work, sleeps on a condition when there is none,
and hands each RequestOutput back to the event loop that asked for it with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from llmpress.engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (crashed or shut down); no request can be served any more."""


@dataclass
class _Consumer:
    """Where one request's outputs go: a queue that belongs to an event loop in another thread."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def deliver(self, item) -> bool:
        """Hand `item` (a RequestOutput or an exception) to the consumer; False if its loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the loop was closed: nobody is waiting any more
            return False


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    consumer: _Consumer


@dataclass
class _Abort:
    request_id: str
    consumer: _Consumer | None  # abort only if this consumer still owns the id (None: whoever owns it)


class AsyncEngine:
    """Owns `engine` (an LLMEngine) and runs it in one background thread; safe to call from any event loop."""

    def __init__(self, engine: "LLMEngine"):
        self.engine = engine
        self._inbox: collections.deque = collections.deque()
        self._wakeup = threading.Condition()
        self._consumers: dict[str, _Consumer] = {}  # written by the engine thread only: added, not yet finished
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        # Daemon: a server killed without shutdown() must not hang on a thread stuck in a long step.
        self._thread = threading.Thread(target=self._run, name="llmpress-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread after its current step; requests still waiting get EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_healthy(self) -> bool:
        """True while the engine thread is running and has not crashed."""
        return self._thread is not None and self._thread.is_alive() and self._error is None and not self._stopping

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread, if one did."""
        return self._error

    def num_unfinished(self) -> int:
        """Requests the engine thread has added and not yet seen finish (aborted ones count until the engine
        reports their abort). Any thread may ask: reading a dict's length is atomic in CPython."""
        return len(self._consumers)

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator["RequestOutput"]:
        """Yield the request's RequestOutputs until the finished one.

        add_request's error (LlmpressError: prompt too long, empty, duplicate id) is raised here. If the
        consumer stops early (cancelled: the client went away; or the generator is closed), the request is
        aborted in the engine.
        """
        consumer = _Consumer(asyncio.get_running_loop(), asyncio.Queue())
        self._post(_Add(request_id, list(prompt_token_ids), params, consumer))
        finished = False
        try:
            while not finished:
                item = await consumer.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine never took the request, or has stopped: nothing to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._post(_Abort(request_id, consumer))

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its stream then ends with finish_reason "abort"."""
        self._post(_Abort(request_id, None))

    def _post(self, command) -> None:
        with self._wakeup:
            if self._stopping or self._error is not None or self._thread is None:
                if isinstance(command, _Add):  # checked under the lock: the engine thread's last drain has run
                    self._raise_if_dead()
                return  # an abort for an engine that is gone: nothing to do
            self._inbox.append(command)
            self._wakeup.notify()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error ({type(self._error).__name__}: "
                                  f"{self._error}); restart the server.") from self._error
        if self._stopping:
            raise EngineDeadError("the engine is shutting down; no new requests are accepted.")
        if self._thread is None:
            raise EngineDeadError("the engine thread was never started; call AsyncEngine.start() first.")

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands = self._wait_for_work()
                if commands is None:
                    break
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output)
                elif self._consumers:
                    # The engine has nothing left but some request never reported its end: fail it rather
                    # than leave its client waiting forever.
                    for request_id in list(self._consumers):
                        self._consumers.pop(request_id).deliver(
                            RuntimeError(f"the engine dropped request {request_id} without finishing it."))
        except BaseException as error:  # noqa: BLE001 (anything here kills the engine; tell every waiter)
            log.exception("the engine thread crashed")
            self._error = error
        finally:
            self._fail_everyone()

    def _wait_for_work(self) -> list | None:
        """The pending commands (possibly none, if the engine has work); None when shutting down."""
        with self._wakeup:
            while not self._inbox and not self._stopping and not self.engine.has_unfinished_requests():
                self._wakeup.wait()
            if self._stopping:
                return None
            commands = list(self._inbox)
            self._inbox.clear()
            return commands

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
            except Exception as error:  # noqa: BLE001 (bad request: it goes back to its caller, the engine lives on)
                if not isinstance(error, LlmpressError):
                    log.exception("add_request failed for %s", command.request_id)
                command.consumer.deliver(error)
                return
            self._consumers[command.request_id] = command.consumer
        else:
            owner = self._consumers.get(command.request_id)
            if owner is not None and (command.consumer is None or command.consumer is owner):
                self.engine.abort_request(command.request_id)

    def _deliver(self, output) -> None:
        consumer = self._consumers.get(output.request_id)
        if consumer is None:
            return
        if output.finished:
            del self._consumers[output.request_id]
        if not consumer.deliver(output) and not output.finished:
            del self._consumers[output.request_id]
            self.engine.abort_request(output.request_id)

    def _fail_everyone(self) -> None:
        with self._wakeup:
            self._stopping = True
            pending = [c.consumer for c in self._inbox if isinstance(c, _Add)]
            self._inbox.clear()
        reason = ("the engine was shut down" if self._error is None else
                  f"the engine stopped after an error ({type(self._error).__name__}: {self._error})")
        for consumer in [*self._consumers.values(), *pending]:
            error = EngineDeadError(f"{reason}; the request was not completed.")
            error.__cause__ = self._error
            consumer.deliver(error)
        self._consumers.clear()
