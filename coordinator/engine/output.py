"""What a request makes of the tokens the ring decides: text, stop strings, the thinking
guard, the length limit, the finish reason (vLLM's output processor, per request).

The engine core hands each verdict's tokens to the request's `Output` and applies what
comes back; nothing here touches the ring, so it is tested without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.engine.request import GenerationRequest
from coordinator.tokenizer import TextStream, Tokenizer


@dataclass(frozen=True)
class Decided:
    """A verdict's tokens, as the request sees them."""

    kept: list[int]  # the model's tokens that stand (the rest of the verdict is dropped)
    forced: list[int] = field(default_factory=list)  # text the guard put after them
    text: str = ""  # newly visible text
    gaps: list[float] = field(default_factory=list)  # top-2 margin per kept+forced token
    finish: str | None = None  # "stop" or "length": the request ends here

    @property
    def tokens(self) -> list[int]:
        return [*self.kept, *self.forced]


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


class Output:
    """One request's output processing. `length` counts its tokens, prompt included."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, n_ctx: int) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.text = TextStream(tokenizer)
        self.stop = StopText(request.stop)
        self.length = len(request.prompt)

    @property
    def generated(self) -> int:
        return self.length - len(self.request.prompt)

    def decide(self, tokens: list[int], gaps: list[float]) -> Decided:
        """Walk a verdict's tokens in order until one ends the request or the guard
        forces text; what follows that token is dropped."""
        request = self.request
        kept: list[int] = []
        text = ""
        for token in tokens:
            kept.append(token)
            self.length += 1
            if self.tokenizer.is_end(token) and not request.ignore_eos:
                return self._decided(kept, [], text, gaps, "stop")
            piece = self.text.push(token)
            text += self.stop.push(piece)
            if self.stop.stopped:
                return self._decided(kept, [], text, gaps, "stop")
            forced_text = request.guard.push(piece) if request.guard else None
            if forced_text:
                forced, forced_text = self._force(forced_text)
                text += self.stop.push(forced_text)
                return self._decided(kept, forced, text, gaps, "stop" if self.stop.stopped
                                     else self._limit())
            if self._limit():
                return self._decided(kept, [], text, gaps, "length")
        return self._decided(kept, [], text, gaps, None)

    def _force(self, text: str) -> tuple[list[int], str]:
        """The guard's text as tokens, as far as max_tokens and the context allow."""
        room = min(self.request.max_tokens - self.generated, self.n_ctx - self.length)
        forced = self.tokenizer.encode(text, special=True, add_bos=False)[:max(room, 0)]
        self.length += len(forced)
        return forced, "".join(self.text.push(token) for token in forced)

    def _limit(self) -> str | None:
        if self.generated >= self.request.max_tokens or self.length >= self.n_ctx:
            return "length"
        return None

    def _decided(self, kept: list[int], forced: list[int], text: str, gaps: list[float],
                 finish: str | None) -> Decided:
        # Tokens the guard decided carry no margin of the model's.
        margins = [*gaps[:len(kept)], *[0.0] * len(forced)]
        return Decided(kept, forced, text, margins, finish)

    def tail(self) -> str:
        """Text held back for a possible stop string, released when the request ends."""
        return "" if self.stop.stopped else self.stop.flush()
