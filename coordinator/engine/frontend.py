"""The engine as its callers see it: requests in, events out.

`Engine` checks a request, admits it under the queue bound, and hands it to the core's
loop, which decodes every sequence together; events come back through a sink — a queue
for a caller in a thread (`run`, `generate`), the event loop for the HTTP server
(`stream`). `generate`, `bench`, `demo` and `serve` all go through here: the CLI is the
scheduler with one sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field

from cluster.errors import ClusterError, ClusterUnavailable, SpecshardError
from coordinator.engine.core import Admit, Cancel, EngineCore, State
from coordinator.engine.output import Output
from coordinator.engine.request import (
    ContextExceeded,
    Event,
    EventSink,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    Stats,
    TextChunk,
)
from coordinator.engine.sequence import Sequence
from coordinator.metrics import Metrics
from coordinator.tokenizer import Tokenizer


@dataclass
class Generation:
    """A whole request's output, for callers that wait for the end."""

    tokens: list[int]
    text: str
    finish_reason: str
    stats: Stats
    top2_gaps: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, core: EngineCore, tokenizer: Tokenizer, model_name: str,
                 queue_size: int = 16) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.queue_size = queue_size
        self.metrics: Metrics = core.metrics
        self._lock = threading.Lock()
        self._outstanding: set[Sequence] = set()
        self._idle = threading.Condition(self._lock)
        core.start()

    @property
    def parallel(self) -> int:
        return self.core.parallel

    @property
    def outstanding(self) -> int:
        """Requests admitted and not ended yet (running or waiting)."""
        with self._lock:
            return len(self._outstanding)

    @property
    def n_ctx(self) -> int:
        return self.core.ring.n_ctx

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise SpecshardError("the prompt is empty")
        if len(request.prompt) >= self.n_ctx:
            raise ContextExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens; the prompt "
                f"has {len(request.prompt)} tokens, which leaves no room to generate.")
        if request.max_tokens < 1:
            raise SpecshardError("max_tokens must be at least 1")
        vocab = self.tokenizer.n_vocab
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise SpecshardError(f"token ids must be in 0..{vocab - 1}")

    # --- admission ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> Sequence:
        """Admit a request; its events go to `sink`, one at a time, from the core's
        thread."""
        self.check(request)
        if self.core.state is State.DOWN:
            raise ClusterUnavailable("the ring is down: a worker is lost and could not be "
                                     "replaced yet; retry later")
        with self._lock:
            waiting = len(self._outstanding) - self.parallel
            if waiting >= self.queue_size:
                raise QueueFull(f"{max(waiting, 0)} requests are already waiting; retry later")
            seq = Sequence(request, sink, Output(request, self.tokenizer, self.n_ctx))
            seq.sink = self._tracked(seq, sink)
            self._outstanding.add(seq)
        self.metrics.tokens_in.inc(len(request.prompt))
        self.core.post(Admit(seq))
        return seq

    def _tracked(self, seq: Sequence, sink: EventSink) -> EventSink:
        def deliver(event: Event) -> None:
            if isinstance(event, Finished | Failed):
                with self._lock:
                    self._outstanding.discard(seq)
                    self._idle.notify_all()
            sink(event)
        return deliver

    def cancel(self, seq: Sequence, reason: str = "abort") -> None:
        self.core.post(Cancel(seq, reason))

    # --- callers -----------------------------------------------------------------------

    def run(self, request: GenerationRequest, cancelled: threading.Event | None = None
            ) -> Generator[TextChunk | Finished, None, None]:
        """The request's events, in this thread; ends early when `cancelled` is set."""
        events: queue.Queue[Event] = queue.Queue()
        seq = self.submit(request, events.put)
        try:
            while True:
                try:
                    event = events.get(timeout=0.2)
                except queue.Empty:
                    if cancelled is not None and cancelled.is_set():
                        self.cancel(seq)
                        cancelled = None  # its Finished("abort") still comes
                    continue
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not seq.done:
                self.cancel(seq)

    def generate(self, request: GenerationRequest,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """The whole output; `on_text` sees the text as it comes (a CLI echoes it)."""
        tokens, gaps, text = [], [], []
        for event in self.run(request):
            if isinstance(event, TextChunk):
                tokens += event.token_ids
                gaps += event.top2_gaps
                text.append(event.text)
                if on_text is not None and event.text:
                    on_text(event.text)
            elif isinstance(event, Finished):
                return Generation(tokens, "".join(text), event.finish_reason, event.stats,
                                  gaps)
        raise ClusterError("the engine stopped without finishing")  # pragma: no cover

    async def stream(self, request: GenerationRequest
                     ) -> AsyncIterator[TextChunk | Finished]:
        """Events as they come; closing the iterator early frees the sequence."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def post(event: Event) -> None:
            # RuntimeError: the loop is gone (shutdown), nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        seq = self.submit(request, post)
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not seq.done:
                self.cancel(seq)

    # --- shutdown ----------------------------------------------------------------------

    def drain(self, timeout_s: float = 30.0) -> None:
        """Let running and waiting requests end by themselves for up to `timeout_s`, then
        end the rest (finish reason "abort") and wait until they have."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
            pending = list(self._outstanding)
        for seq in pending:
            self.cancel(seq)
        deadline = time.monotonic() + 10.0
        with self._lock:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(timeout=0.2)

    def close(self, drain_timeout_s: float = 0.0) -> None:
        self.drain(drain_timeout_s)
        self.core.stop()
