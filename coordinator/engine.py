"""Serving many requests on one pipeline: sequence slots, a bounded queue, stop text.

Each admitted request owns a sequence id (0..parallel-1) in every stage and runs its
decode loop in a thread of its own; the steps of different requests interleave in the
ring. A request that is abandoned (client gone) frees its sequence at its next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from cluster.errors import SpecshardError
from cluster.sampling import SamplingParams
from coordinator.generate import Drafter, Pipeline, Stats, generate_stream
from coordinator.metrics import Metrics
from coordinator.tokenizer import TextStream, Tokenizer


class QueueFull(SpecshardError):
    """More requests are waiting than the queue holds (HTTP 429)."""


class ContextExceeded(SpecshardError):
    """The prompt (plus at least one token) does not fit the context (HTTP 400)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextChunk:
    text: str  # newly visible text (may be empty while a stop string is possible)
    token_ids: list[int]


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end token or stop string) or "length"
    n_prompt_tokens: int
    n_completion_tokens: int
    stats: dict[str, object] = field(default_factory=dict)


Event = TextChunk | Finished


class StopText:
    """Cuts the text at the first stop string; holds back what may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                self.stopped = True
                out, self.pending = self.pending[:at], ""
                return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, model_name: str,
                 parallel: int = 1, queue_size: int = 16,
                 drafters: list[Drafter | None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.parallel = parallel
        self.queue_size = queue_size
        self.drafters = drafters or [None] * parallel
        self.metrics = metrics or Metrics()
        self._free = list(range(parallel))
        self._active: set[threading.Event] = set()
        self._waiting = 0
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)

    @property
    def n_ctx(self) -> int:
        return self.pipeline.n_ctx

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise SpecshardError("the prompt is empty")
        if len(request.prompt) >= self.n_ctx:
            raise ContextExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens; the prompt "
                f"has {len(request.prompt)} tokens, which leaves no room to generate.")
        if request.max_tokens < 1:
            raise SpecshardError("max_tokens must be at least 1")

    # --- slots -------------------------------------------------------------------------

    def _acquire(self, cancelled: threading.Event) -> int | None:
        with self._lock:
            if not self._free and self._waiting >= self.queue_size:
                raise QueueFull(f"{self._waiting} requests are already waiting; retry later")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
            try:
                while not self._free:
                    if cancelled.is_set():
                        return None
                    self._slot_freed.wait(timeout=0.2)
                return self._free.pop(0)
            finally:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)

    def _release(self, seq: int) -> None:
        try:
            self.pipeline.reset(seq)
        finally:
            with self._lock:
                self._free.append(seq)
                self._free.sort()
                self._slot_freed.notify()

    # --- one request -------------------------------------------------------------------

    def run(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[Event]:
        """The request's events, synchronously; stops early when `cancelled` is set."""
        self.check(request)
        with self._lock:
            self._active.add(cancelled)
        try:
            seq = self._acquire(cancelled)
            if seq is None:
                return
            try:
                yield from self._decode(seq, request, cancelled)
            finally:
                self._release(seq)
        finally:
            with self._lock:
                self._active.discard(cancelled)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Stop every request at its next token and wait until every sequence is free."""
        with self._lock:
            for cancelled in self._active:
                cancelled.set()
            deadline = time.monotonic() + timeout_s
            while len(self._free) < self.parallel and time.monotonic() < deadline:
                self._slot_freed.wait(timeout=0.2)

    def _decode(self, seq: int, request: GenerationRequest, cancelled: threading.Event
                ) -> Iterator[Event]:
        stats = Stats()
        stream = generate_stream(self.pipeline, request.prompt, request.max_tokens,
                                 request.sampling, self.tokenizer.is_end, seq=seq,
                                 drafter=self.drafters[seq], stats=stats)
        text, stop = TextStream(self.tokenizer), StopText(request.stop)
        n_out, finish = 0, "length"
        self.metrics.tokens_in.inc(len(request.prompt))
        while True:
            try:
                token, _gap = next(stream)
            except StopIteration:
                break
            n_out += 1
            self.metrics.tokens_out.inc()
            if self.tokenizer.is_end(token):
                finish = "stop"
                break
            visible = stop.push(text.push(token))
            if stop.stopped:
                finish = "stop"
                yield TextChunk(visible, [token])
                break
            yield TextChunk(visible, [token])
            if cancelled.is_set():
                return
        tail = stop.flush() if not stop.stopped else ""
        if tail:
            yield TextChunk(tail, [])
        self.metrics.observe_stats(stats)
        yield Finished(finish, len(request.prompt), n_out, stats.as_dict())

    # --- async facade for the HTTP server ----------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Events as they come; closing the iterator early frees the sequence."""
        self.check(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def post(item: Event | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                cancelled.set()

        def produce() -> None:
            try:
                for event in self.run(request, cancelled):
                    post(event)
            except BaseException as exc:  # handed to the consumer, raised there
                post(exc)
            finally:
                post(None)

        with self._lock:
            if not self._free and self._waiting >= self.queue_size:
                raise QueueFull(f"{self._waiting} requests are already waiting; retry later")
        thread = threading.Thread(target=produce, daemon=True, name="request")
        thread.start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
