"""`n` choices of one request: n sequences, one API object.

Each choice is a sequence of its own with its own shape (its reply parser, thinking
guard and grammar state); they share the prompt's KV — the first computes the prompt,
the others copy it on every stage (docs/scheduler.md, "Shared prefixes"). Here their
objects become one response: choice i's chunks and choices carry `index: i`, and the
usage counts the prompt once and every choice's completion tokens, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from coordinator.api.schema import CompletionTokensDetails, Usage
from coordinator.api.shapes import Shape
from coordinator.engine.request import Finished, TextChunk

Events = AsyncIterator[TextChunk | Finished]


def indexed(objects: list[BaseModel], index: int) -> list[BaseModel]:
    """Objects of one choice, numbered as choice `index`."""
    for obj in objects:
        for choice in getattr(obj, "choices", []):
            choice.index = index
    return objects


def merged_usage(usages: list[Usage]) -> Usage:
    """The prompt once (the choices share it), every choice's completion tokens."""
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    reasoning = [u.completion_tokens_details.reasoning_tokens for u in usages
                 if u.completion_tokens_details is not None]
    return Usage(prompt_tokens=first.prompt_tokens, completion_tokens=completion,
                 total_tokens=first.prompt_tokens + completion,
                 prompt_tokens_details=first.prompt_tokens_details,
                 completion_tokens_details=CompletionTokensDetails(
                     reasoning_tokens=sum(reasoning)) if reasoning else None)


def whole(shapes: list[Shape], results: list[tuple[str, Finished]]) -> BaseModel:
    """The response with every choice, in index order."""
    wholes = [shape.whole(text, done) for shape, (text, done) in zip(shapes, results,
                                                                     strict=True)]
    first: Any = wholes[0]
    first.choices = [c for i, w in enumerate(wholes)
                     for c in indexed([w], i)[0].choices]  # type: ignore[attr-defined]
    first.usage = merged_usage([w.usage for w in wholes])  # type: ignore[attr-defined]
    return first  # type: ignore[no-any-return]


async def chunks(shapes: list[Shape], streams: list[Events], include_usage: bool,
                 sse: Callable[[BaseModel], str], done: dict[int, Finished]
                 ) -> AsyncIterator[str]:
    """Every choice's chunks as its tokens come (choices interleave), then, when asked,
    one usage chunk for all; `done` gets each choice's end. Ends with the first failure
    (the caller reports it)."""
    queue: asyncio.Queue[tuple[int, TextChunk | Finished | BaseException]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for event in streams[i]:
                await queue.put((i, event))
        except Exception as exc:  # noqa: BLE001 (handed to the reader, which raises it)
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        for i, shape in enumerate(shapes):
            for obj in indexed(shape.opening(), i):
                yield sse(obj)
        while len(done) < len(shapes):
            i, event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            shape = shapes[i]
            shape.observe(event)
            if isinstance(event, Finished):
                done[i] = event
                objects = shape.ending(event)
            else:
                objects = shape.piece(event.text) if event.text else []
            for obj in indexed(objects, i):
                yield sse(obj)
        if include_usage:
            last: Any = shapes[0].usage_only(done[0])
            last.usage = merged_usage([shapes[i].usage_only(done[i]).usage  # type: ignore[attr-defined]
                                       for i in range(len(shapes))])
            yield sse(last)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
