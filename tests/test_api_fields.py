"""What llama-server's and OpenAI's clients send, against the real server with the real
`openai` client: stop strings, refused fields, ignored fields, routes without /v1,
/tokenize, /detokenize, /props, an assistant prefill, sampling defaults from the GGUF.

A random-weight model with the demo tokenizer serves (answers are noise, but
deterministic under greedy decoding, which is all these tests compare).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.gguf_file import read_header
from coordinator.api.app import ServerState, create_app
from coordinator.api.sampling_defaults import SamplingDefaults, from_gguf, sampling_defaults
from coordinator.api.server import ServerThread
from coordinator.api.templates import chat_options
from coordinator.commands.serve import server_state
from coordinator.engine.frontend import Engine
from coordinator.ring.builder import build_ring
from coordinator.service import EngineOptions, start_engine
from coordinator.settings import add_arguments, from_args
from coordinator.tokenizer import Tokenizer
from tests.tiny_gguf import write_tiny_model

KEY = "test-key-2718"
MODEL = "tiny-chat"
WAIT = 60.0
USER = [{"role": "user", "content": "Count to five."}]
# What Qwen documents for QwQ, written into the GGUF as llama.cpp reads it.
GGUF_SAMPLING = {"general.sampling.temp": 0.6, "general.sampling.top_p": 0.95,
                 "general.sampling.top_k": 30, "general.sampling.min_p": 0.0}


@dataclass
class Served:
    url: str
    engine: Engine
    tokenizer: Tokenizer

    def client(self, v1: bool = True) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + ("/v1" if v1 else ""), api_key=KEY,
                             max_retries=0, timeout=WAIT)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=WAIT,
                          headers={"Authorization": f"Bearer {KEY}"})

    def chat(self, **body: Any) -> httpx.Response:
        return self.post("/v1/chat/completions", {"model": MODEL, "messages": USER,
                                                   "max_tokens": 4, "temperature": 0, **body})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, demo_target: Path) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("fields") / "tiny-chat.gguf",
                            vocab_from=demo_target, n_ctx=4096, extra=GGUF_SAMPLING)


@pytest.fixture(scope="module")
def served(model: Path) -> Iterator[Served]:
    built = build_ring(model, stages=1, ctx=1024, parallel=2, threads=1)
    tokenizer = Tokenizer(model)
    engine = start_engine(built, tokenizer, MODEL, options=EngineOptions(queue_size=4))
    try:
        state = ServerState(engine=engine, api_key=KEY)
        state.sampling = sampling_defaults({}, read_header(model))  # type: ignore[attr-defined]
        with ServerThread(create_app(state)) as server:
            yield Served(server.url, engine, tokenizer)
    finally:
        engine.close()
        built.close()
        tokenizer.close()


def error_of(reply: httpx.Response) -> str:
    assert reply.status_code == 400, reply.text
    return str(reply.json()["error"]["message"])


# --- sampling defaults --------------------------------------------------------------------

def test_defaults_come_from_the_ggufs_general_sampling_keys(model: Path) -> None:
    header = read_header(model)
    assert from_gguf(header) == {"temperature": pytest.approx(0.6), "top_p": pytest.approx(
        0.95), "top_k": 30, "min_p": 0.0}
    defaults = sampling_defaults({"top_k": 20, "presence_penalty": 1.5}, header)
    assert (defaults.temperature, defaults.top_k, defaults.presence_penalty) == \
        (pytest.approx(0.6), 20, 1.5)  # a flag wins over the GGUF
    assert dict(defaults.source) == {"temperature": "gguf", "top_p": "gguf", "top_k": "flag",
                                     "min_p": "gguf", "presence_penalty": "flag"}
    plain = sampling_defaults({}, None)
    assert plain == SamplingDefaults() and plain.params().temperature == 1.0


def test_props_reports_the_context_and_the_defaults(served: Served) -> None:
    props = httpx.get(served.url + "/props", timeout=WAIT,
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert props["default_generation_settings"]["n_ctx"] == served.engine.n_ctx == 1024
    params = props["default_generation_settings"]["params"]
    assert params["temperature"] == pytest.approx(0.6) and params["top_k"] == 30
    assert props["total_slots"] == 2 and props["model_alias"] == MODEL
    assert httpx.get(served.url + "/props", timeout=WAIT).status_code == 401


# --- fields and their fates ---------------------------------------------------------------

def test_nine_stop_strings_are_served_and_65_refused(served: Served) -> None:
    """continue.dev's 9 FIM stop strings, one of them replaced by a piece of what the
    model answers without stops: the answer ends before that piece."""
    def ask(stops: list[str] | None) -> Any:
        return served.client().completions.create(
            model=MODEL, prompt="def f():", max_tokens=8, temperature=0, stop=stops,
            extra_body={"ignore_eos": True}).choices[0]

    free = ask(None).text
    middle = free[len(free) // 2:]
    assert middle.strip(), free  # greedy noise from random weights, but some text
    stops = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>", "\n\n\n",
             "<|im_end|>", "<|file_sep|>", "```", middle[:2]]
    cut = min(free.find(stop) for stop in stops if stop in free)
    assert 0 < cut < len(free), free  # some text before the stop, and some cut off
    reply = ask(stops)
    assert reply.text == free[:cut] and reply.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model=MODEL, prompt="x", max_tokens=1,
                                           stop=[str(i) for i in range(65)])
    assert "65 stop strings: at most 64" in str(caught.value)


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": "not a schema"}},
     "needs a `json_schema` object"),
    ({"grammar": "root ::= \"yes\"", "json_schema": {"type": "object"}}, "send one"),
    ({"mirostat": 2}, "`mirostat` is not supported"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys are token ids"),
    ({"logit_bias": {"5": 500}}, "logit_bias values are in [-100, 100]"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "send `tools`"),
    ({"function_call": {"name": "f"}}, "`tool_choice` with `tools`"),
    ({"n_probs": 3}, "send `logprobs`"),
    ({"return_tokens": True}, "/tokenize"),
    ({"image_data": [{"data": "aGk=", "id": 1}]}, "text only"),
    ({"min_keep": 5}, "`min_keep` is not supported"),
])
def test_what_would_change_the_output_unimplemented_is_refused(
        served: Served, body: dict[str, Any], says: str) -> None:
    assert says in error_of(served.chat(**body))


def test_a_plain_text_response_format_and_ignored_fields_are_served(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="coordinator.api.schema"):
        for _ in range(2):
            reply = served.chat(response_format={"type": "text"}, t_max_predict_ms=5000,
                                typical_p=1.0, user="me", n_predict=3,
                                # the refused fields, off: nothing asked for
                                functions=[], function_call="auto", n_probs=0,
                                return_tokens=False, image_data=[], min_keep=0,
                                response_fields=["content"])
            assert reply.status_code == 200, reply.text
    said = [r.getMessage() for r in caplog.records if "t_max_predict_ms" in r.getMessage()]
    assert len(said) == 1 and "ignored" in said[0]  # once per field name


def test_n_predict_is_max_tokens(served: Served) -> None:
    reply = served.post("/v1/completions", {"model": MODEL, "prompt": "a b c",
                                            "n_predict": 3, "temperature": 0,
                                            "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3


def test_routes_without_v1(served: Served) -> None:
    bare, v1 = served.client(v1=False), served.client()
    a = bare.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,  # type: ignore[arg-type]
                                     temperature=0)
    b = v1.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,  # type: ignore[arg-type]
                                   temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert [m.id for m in bare.models.list()] == [MODEL]
    assert httpx.get(served.url + "/models", timeout=WAIT).status_code == 401  # key kept


def test_tokenize_detokenize_round_trip(served: Served) -> None:
    text = "Hello, world — ünïcode ✓"
    tokens = served.post("/tokenize", {"content": text}).json()["tokens"]
    assert tokens == served.tokenizer.encode(text, add_bos=False) and len(tokens) > 3
    assert served.post("/detokenize", {"tokens": tokens}).json() == {"content": text}
    pieces = served.post("/tokenize", {"content": "ab", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "ab"
    assert "beyond the vocabulary" in error_of(served.post("/detokenize",
                                                           {"tokens": [10**9]}))


def test_an_assistant_prefill_is_continued(served: Served) -> None:
    """A conversation ending with an assistant message: the reply continues its text (the
    prompt is the conversation before it, rendered, then that text), as llama-server."""
    prefill = "Sure: one, two,"
    reply = served.client().chat.completions.create(
        model=MODEL, max_tokens=5, temperature=0,
        messages=[*USER, {"role": "assistant", "content": prefill}])  # type: ignore[list-item]
    rendered = served.tokenizer.chat_prompt(USER) + prefill  # type: ignore[arg-type]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(served.tokenizer.encode(rendered))
    same = served.client().completions.create(model=MODEL, prompt=rendered, max_tokens=5,
                                              temperature=0)
    assert reply.choices[0].message.content == same.choices[0].text
    two = served.chat(messages=[*USER, {"role": "assistant", "content": "a"},
                                {"role": "assistant", "content": "b"}])
    assert "two assistant messages" in error_of(two)


# --- with the app glue (see the report): penalties, logit_bias, logprobs, model names -----

def first_token(served: Served, **body: Any) -> int:
    reply = served.post("/v1/completions", {"model": MODEL, "prompt": "The", "max_tokens": 1,
                                            "temperature": 0, "logprobs": 0, **body})
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["text"]
    return served.tokenizer.encode(text, add_bos=False)[0]


def test_logit_bias_minus_100_bans_a_token(served: Served) -> None:
    chosen = first_token(served)
    assert first_token(served, logit_bias={str(chosen): -100}) != chosen


def test_a_hard_coded_model_name_is_served(served: Served) -> None:
    reply = served.client().chat.completions.create(model="gpt-4o", messages=USER,  # type: ignore[arg-type]
                                                    max_tokens=2, temperature=0)
    assert reply.choices[0].message.content is not None


@contextmanager
def serving(served: Served, model: Path, flags: list[str]) -> Iterator[Served]:
    """Another API over the fixture's engine, its state built as `serve` builds it from
    these flags (no second model is loaded)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = from_args(parser.parse_args(flags))
    state = server_state(s, KEY, chat_options(s.reasoning_format, s.reasoning_budget,
                                              s.chat_template_file), model)
    state.engine = served.engine
    with ServerThread(create_app(state)) as server:
        yield Served(server.url, served.engine, served.tokenizer)


def test_aliases_are_listed_and_accepted_by_strict_names(served: Served, model: Path,
                                                         tmp_path: Path) -> None:
    """`--alias` names join /v1/models and pass --strict-model-name; /props reports the
    template --chat-template-file put in force, not the model's."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    flags = ["--alias", "qwq", "--alias", "qwq-32b", "--strict-model-name",
             "--chat-template-file", str(template)]
    with serving(served, model, flags) as aliased:
        client = aliased.client()
        assert [m.id for m in client.models.list()] == [MODEL, "qwq", "qwq-32b"]
        assert client.models.retrieve("qwq").id == "qwq"
        reply = aliased.chat(model="qwq-32b")
        assert reply.status_code == 200 and reply.json()["model"] == "qwq-32b"
        assert aliased.chat(model="gpt-4o").status_code == 404
        props = httpx.get(aliased.url + "/props", timeout=WAIT,
                          headers={"Authorization": f"Bearer {KEY}"}).json()
        assert props["chat_template"] == template.read_text()
    plain = httpx.get(served.url + "/props", timeout=WAIT,
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert plain["chat_template"] != template.read_text()


def test_a_request_without_sampling_fields_gets_the_servers_defaults(
        served: Served, model: Path) -> None:
    """Clients such as Open WebUI send no sampling fields: `--temp 0` makes such requests
    greedy whatever their seed; without it the GGUF's temperature (0.6) samples."""
    body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
    greedy = served.post("/v1/completions", {"model": MODEL, **body, "temperature": 0})
    greedy_text = greedy.json()["choices"][0]["text"]
    with serving(served, model, ["--temp", "0"]) as cold:
        texts = [cold.post("/v1/completions", {"model": MODEL, **body, "seed": seed}
                           ).json()["choices"][0]["text"] for seed in (1, 2)]
    assert texts == [greedy_text, greedy_text]
    sampled = {served.post("/v1/completions", {"model": MODEL, **body, "seed": seed}
                           ).json()["choices"][0]["text"] for seed in (1, 2, 3)}
    assert sampled != {greedy_text}  # the fixture's defaults (temperature 0.6) sample


def test_logprobs_in_openais_shapes(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, temperature=0,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the top


def test_presence_penalty_changes_a_greedy_answer(served: Served) -> None:
    body = {"prompt": "a a a a a a a a", "max_tokens": 12, "ignore_eos": True,
            "temperature": 0}
    plain = served.post("/v1/completions", {"model": MODEL, **body}).json()
    penalised = served.post("/v1/completions", {"model": MODEL, **body,
                                                "presence_penalty": 2.0,
                                                "repeat_penalty": 1.5}).json()
    assert plain["choices"][0]["text"] != penalised["choices"][0]["text"]
