"""The OpenAI-compatible API, driven by the real `openai` client against the demo target."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from coordinator.api.app import ServerState, create_app
from coordinator.api.server import ServerThread
from coordinator.engine.frontend import Engine
from coordinator.engine.request import Finished, GenerationRequest, TextChunk
from coordinator.ring.builder import build_ring
from coordinator.service import EngineOptions, start_engine
from coordinator.tokenizer import Tokenizer

KEY = "test-key-3141"
MODEL = "specshard-demo"
ASK = "Write a haiku about the sea."
HAIKU: list[ChatCompletionMessageParam] = [{"role": "user", "content": ASK}]
STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a very long story about a dragon."}]
COUNTING = ", ".join(str(i) for i in range(1, 9)) + ","  # greedy: counts on and on
WAIT = 60.0  # generous: the machine is shared


@dataclass
class Served:
    url: str
    engine: Engine
    state: ServerState

    def client(self, key: str = KEY, **options: Any) -> openai.OpenAI:
        options = {"max_retries": 0, "timeout": WAIT, **options}
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, **options)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=WAIT).text
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        assert found, name
        return float(found.group(1))

    def still_serves(self) -> None:
        answer = self.client().completions.create(model=MODEL, prompt="def add(a, b):",
                                                  max_tokens=2, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def served(demo_target: Path) -> Iterator[Served]:
    built = build_ring(demo_target, stages=1, ctx=1024, parallel=2, threads=2)
    tokenizer = Tokenizer(demo_target)
    engine = start_engine(built, tokenizer, MODEL, options=EngineOptions(queue_size=1))
    try:
        state = ServerState(engine=engine, api_key=KEY)
        with ServerThread(create_app(state)) as server:
            yield Served(server.url, engine, state)
    finally:
        # Requests still decoding (a failed test's) end before the ring they run on.
        engine.close()
        built.close()
        tokenizer.close()


def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def direct(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[str, Finished]:
    events = list(engine.run(GenerationRequest(prompt, max_tokens), threading.Event()))
    done = events[-1]
    assert isinstance(done, Finished)
    return "".join(e.text for e in events if isinstance(e, TextChunk)), done


# --- answers ---------------------------------------------------------------------------------


def same_usage(later: Any, first: Any) -> bool:
    """The same counts; the later request found its prompt in a slot's caches (the same
    prompt went through before it): all of it but the last token, whose logits it needs."""
    assert later.prompt_tokens_details.cached_tokens == later.prompt_tokens - 1
    return bool((later.prompt_tokens, later.completion_tokens, later.total_tokens)
                == (first.prompt_tokens, first.completion_tokens, first.total_tokens))


@pytest.mark.slow
def test_chat_matches_the_engine_whole_and_streamed(served: Served) -> None:
    client, tok = served.client(), served.engine.tokenizer
    whole = client.chat.completions.create(model=MODEL, messages=HAIKU,
                                           max_tokens=12, temperature=0)
    prompt = tok.encode(tok.chat_prompt([{"role": "user", "content": ASK}]))
    text, done = direct(served.engine, prompt, 12)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.model == MODEL and whole.system_fingerprint and whole.created > 0
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text != ""
    assert whole.choices[0].finish_reason == done.finish_reason
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == done.n_completion_tokens
    assert whole.usage.total_tokens == len(prompt) + done.n_completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HAIKU, max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert same_usage(chunks[-1].usage, whole.usage)


@pytest.mark.slow
def test_completions_whole_and_streamed(served: Served) -> None:
    client, tok = served.client(), served.engine.tokenizer
    prompt = "def fibonacci(n):"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    text, done = direct(served.engine, tok.encode(prompt), 10)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.choices[0].text == text != ""
    assert whole.usage is not None and whole.usage.completion_tokens == done.n_completion_tokens
    assert whole.usage.prompt_tokens == len(tok.encode(prompt))

    chunks = list(client.completions.create(model=MODEL, prompt=[prompt], max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == done.finish_reason
    assert chunks[-1].usage is not None and same_usage(chunks[-1].usage, whole.usage)


@pytest.mark.slow
def test_models_list_and_retrieve(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.slow
def test_stop_sequence_ends_the_text_before_it(served: Served) -> None:
    client = served.client()
    free = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16,
                                     temperature=0).choices[0].text
    stop = free[6:9]
    cut = free.find(stop)
    assert cut > 0, free
    stopped = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16,
                                        temperature=0, stop=[stop, "never-said"])
    assert stopped.choices[0].text == free[:cut]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_a_temperature_near_zero_is_served_greedy(served: Served) -> None:
    """Temperatures of 1e-300 and 5e-324 give the text temperature 0 gives. (5e-324
    overflows the last worker's softmax, tests/test_serve.py: the API serves it greedy.)"""
    client = served.client()
    greedy, *tiny = (client.chat.completions.create(model=MODEL, messages=HAIKU,
                                                    max_tokens=12, temperature=t, seed=7)
                     for t in (0, 1e-300, 5e-324))
    assert greedy.choices[0].message.content
    for answer in tiny:
        assert answer.choices[0].message.content == greedy.choices[0].message.content
        assert answer.choices[0].finish_reason == greedy.choices[0].finish_reason


@pytest.mark.slow
def test_max_tokens_ends_with_length(served: Served) -> None:
    answer = served.client().chat.completions.create(
        model="", messages=STORY, max_completion_tokens=5, temperature=0.7,
        seed=1, extra_body={"top_k": 40})
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5


# --- errors ----------------------------------------------------------------------------------


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@pytest.mark.slow
@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 17}, "n"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"stop": [str(i) for i in range(65)]}, "stop"),  # at most 64
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": []}, "messages"),
])
def test_invalid_fields_are_400_naming_the_field(served: Served, fields: dict[str, Any],
                                                 param: str) -> None:
    body = {"messages": HAIKU, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(model=MODEL, **body)  # type: ignore[call-overload]
    error = error_of(caught.value)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    served.still_serves()


@pytest.mark.slow
def test_malformed_json_and_echo_are_400(served: Served) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    reply = httpx.post(served.url + "/v1/chat/completions", content=b'{"messages": [',
                       headers=auth, timeout=WAIT)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model=MODEL, prompt="x", echo=True)
    assert error_of(caught.value)["param"] == "echo"
    served.still_serves()


@pytest.mark.slow
def test_prompt_over_the_context_is_400(served: Served) -> None:
    long = "word " * served.engine.n_ctx
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long}], stream=True)
    assert error_of(caught.value)["code"] == "context_length_exceeded"
    served.still_serves()


@pytest.mark.slow
def test_api_key_is_required(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        served.client(key="wrong").models.list()
    assert error_of(caught.value)["code"] == "invalid_api_key"
    reply = httpx.get(served.url + "/v1/models", timeout=WAIT)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.url + "/health", timeout=WAIT).json() == {"status": "ok"}
    metrics = httpx.get(served.url + "/metrics", timeout=WAIT)
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "specshard_generated_tokens_total" in metrics.text
    reply = httpx.get(served.url + "/v1/nowhere", timeout=WAIT)
    assert reply.status_code == 404 and "error" in reply.json()
    served.still_serves()


@pytest.mark.slow
def test_unknown_model_is_404_when_names_are_strict(served: Served) -> None:
    """Any name is served by the one model (as llama-server); --strict-model-name, and a
    lookup of /v1/models/NAME, answer 404 as OpenAI does."""
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().models.retrieve("gpt-4o")
    error = error_of(caught.value)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    served.state.strict_model_name = True
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            served.client().chat.completions.create(model="gpt-4o", messages=HAIKU)
    finally:
        served.state.strict_model_name = False
    assert error_of(caught.value)["code"] == "model_not_found"
    served.still_serves()


@pytest.mark.slow
def test_cluster_describes_the_engine(served: Served) -> None:
    info = served.client().get("/cluster", cast_to=dict)
    assert info["model"] == MODEL and info["parallel"] == 2 and info["n_ctx"] > 0


def test_not_ready_answers_503() -> None:
    with ServerThread(create_app(ServerState(engine=None))) as server:
        assert httpx.get(server.url + "/health", timeout=WAIT).status_code == 503
        assert httpx.get(server.url + "/metrics", timeout=WAIT).status_code == 503
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=HAIKU)
        assert caught.value.status_code == 503
        assert error_of(caught.value)["code"] == "not_ready"
        reply = httpx.get(server.url + "/nowhere", timeout=WAIT)
        assert reply.status_code == 404 and "error" in reply.json()


# --- load and hang-ups -------------------------------------------------------------------------


class HeldStream:
    """A streaming request that takes a sequence and keeps it until `close`."""

    def __init__(self, served: Served) -> None:
        self.stream = served.client().completions.create(
            model=MODEL, prompt=COUNTING, max_tokens=400, temperature=0, stream=True)
        next(iter(self.stream))  # the first token: the request holds a sequence

    def close(self) -> None:
        self.stream.close()


def wait_until_idle(served: Served) -> float:
    """Generated-token count once nothing is generating any more."""
    last = -1.0
    deadline = time.monotonic() + WAIT
    while (now := served.metric("specshard_generated_tokens_total")) != last:
        assert time.monotonic() < deadline, "generation never stopped"
        last = now
        time.sleep(1.0)
    return now


@pytest.mark.slow
def test_queue_full_is_429_and_a_client_may_leave_the_queue(served: Served) -> None:
    held = [HeldStream(served), HeldStream(served)]
    try:
        outcome: list[BaseException] = []

        def queued() -> None:
            try:
                served.client(timeout=6.0).chat.completions.create(
                    model=MODEL, messages=HAIKU, max_tokens=2)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=queued)
        waiter.start()
        until(lambda: served.metric("specshard_queue_depth") == 1, "a queued request")
        with pytest.raises(openai.RateLimitError) as caught:
            served.client().chat.completions.create(model=MODEL, messages=HAIKU)
        assert error_of(caught.value)["code"] == "rate_limit_exceeded"
        waiter.join(WAIT)
        assert outcome and isinstance(outcome[0], openai.APITimeoutError), outcome
        # The client that gave up leaves the queue at once, long before a held stream
        # (400 tokens) could end and admit it.
        until(lambda: served.metric("specshard_queue_depth") == 0, "the queue to empty",
              timeout=10.0)
    finally:
        for stream in held:
            stream.close()
    wait_until_idle(served)
    served.still_serves()


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_sequence(served: Served) -> None:
    before = wait_until_idle(served)
    for stream in [HeldStream(served), HeldStream(served)]:
        stream.close()
    spent = wait_until_idle(served) - before
    assert spent < 2 * 400 / 4, f"{spent} tokens: the abandoned streams kept generating"
    # Both sequences are free: two requests at once both run (a held one would make the
    # first wait and the second be refused, the queue holding one).
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(served.client().completions.create(
                model=MODEL, prompt="import os", max_tokens=3, temperature=0))
        except openai.APIError as exc:
            answers.append(exc)

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(WAIT)
    assert len(answers) == 2 and not any(isinstance(a, Exception) for a in answers), answers


@pytest.mark.slow
def test_a_drained_stream_ends_cleanly_with_abort(served: Served) -> None:
    """A server that drains (shutting down) ends each stream with finish reason "abort",
    not an error: the client keeps what it got (a review found a 500 here)."""
    aborted = 'specshard_requests_total{outcome="aborted"}'

    def count() -> float:
        text = httpx.get(served.url + "/metrics", timeout=WAIT).text
        found = re.search(rf"^{re.escape(aborted)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count()
    stream = served.client().completions.create(model=MODEL, prompt=COUNTING, max_tokens=400,
                                                temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)  # decoding
    served.engine.drain(0)
    rest = list(chunks)
    assert rest and rest[-1].choices and rest[-1].choices[0].finish_reason == "abort"
    assert count() == before + 1
    served.still_serves()
