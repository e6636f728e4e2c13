"""Constrained decoding: JSON schemas, GBNF grammars and forced tool calls.

The rule first, without a model: masks applied on the last stage row by row keep
speculative sampling exact — the first two tokens follow the constrained distribution
(χ², as tests/test_penalties.py), and a last stage that forgets the masks is caught.

Then the real thing: the demo target over two gRPC workers (the masks travel with the
slices), the HTTP API in a thread and the real `openai` client, with and without the
demo draft model: `.parse()` with a nested pydantic model at temperature 1.0, a GBNF
grammar, `tool_choice: "required"` and a named function, LangChain's
`with_structured_output`, 400s that name the problem, and greedy constrained decoding
with the draft equal to it without (but at near ties). Both rounds share one ring; the
whole module took 4 min 49 s on the 2-core VM (20 sampled `.parse()` replies a round).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from cluster.constrain import allowed, masked, pack
from cluster.judge import judge
from cluster.messages import Slice
from cluster.sampling import SamplingParams, filtered_probs, sample
from cluster.wire_convert import slice_from_wire, slice_to_wire
from coordinator.api.app import ServerState, create_app
from coordinator.api.server import ServerThread
from coordinator.constrain import build_constraint, gbnf_grammar, json_schema_grammar
from coordinator.engine.frontend import Engine, Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import BuiltRing
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.draft import DraftModel
from coordinator.speculation.gamma import FREE_DRAFT, GammaConfig
from coordinator.tokenizer import Tokenizer
from tests.test_sampling import chi2_pvalue
from tests.test_speculative import NEAR_TIE

# --- the rule, on a 12-token vocabulary ------------------------------------------------------

N_VOCAB, N_DRAWS, MIN_P = 12, 20_000, 1e-3
BASE = np.random.default_rng(5)
P_LOGITS = BASE.normal(0, 1.5, N_VOCAB).astype(np.float32)
Q_LOGITS = BASE.normal(0, 1.5, N_VOCAB).astype(np.float32)
PARAMS = SamplingParams(temperature=0.9, top_p=0.95)
FIRST = [0, 2, 3, 5, 8, 11]  # what the "grammar" allows first


def after(token: int) -> list[int]:
    """What it allows after `token`."""
    return sorted({token, (5 * token + 1) % N_VOCAB, (token + 4) % N_VOCAB, 6})


def row_after(logits: np.ndarray, token: int) -> np.ndarray:
    return (np.roll(logits, token + 1) + 0.3 * np.sin(np.arange(N_VOCAB) * (token + 1))
            ).astype(np.float32)


def step(guesses: list[int], seed: int, mask_target: bool = True) -> list[int]:
    rows = [P_LOGITS] + [row_after(P_LOGITS, g) for g in guesses]
    q_rows = [Q_LOGITS] + [row_after(Q_LOGITS, g) for g in guesses[:-1]]
    masks = [pack(FIRST, N_VOCAB)] + [pack(after(g), N_VOCAB) for g in guesses]
    dists = [filtered_probs(masked(q, m), PARAMS) for q, m in zip(q_rows, masks, strict=False)]
    piece = Slice(0, 3, [1, *guesses], PARAMS, len(guesses), dists, step_seed=seed,
                  masks=masks if mask_target else [])
    return judge(piece, np.stack(rows)).tokens


def first_two(mask_target: bool = True, n: int = N_DRAWS) -> np.ndarray:
    rng = np.random.default_rng(7)
    counts = np.zeros((N_VOCAB, N_VOCAB), dtype=np.int64)
    q0 = filtered_probs(masked(Q_LOGITS, pack(FIRST, N_VOCAB)), PARAMS)
    for seed in range(n):
        g0 = sample(q0, rng)
        q1 = filtered_probs(masked(row_after(Q_LOGITS, g0), pack(after(g0), N_VOCAB)), PARAMS)
        out = step([g0, sample(q1, rng)], seed, mask_target)
        if len(out) < 2:  # the first guess was rejected: one more step, no guesses
            piece = Slice(0, 4, out, PARAMS, step_seed=seed + N_DRAWS,
                          masks=[pack(after(out[0]), N_VOCAB)] if mask_target else [])
            out = [*out, *judge(piece, row_after(P_LOGITS, out[0])[None]).tokens]
        counts[out[0], out[1]] += 1
    return counts


def constrained_two() -> np.ndarray:
    p0 = filtered_probs(masked(P_LOGITS, pack(FIRST, N_VOCAB)), PARAMS).dense(N_VOCAB)
    joint = np.zeros((N_VOCAB, N_VOCAB))
    for t in np.flatnonzero(p0):
        p1 = filtered_probs(masked(row_after(P_LOGITS, int(t)), pack(after(int(t)), N_VOCAB)),
                            PARAMS).dense(N_VOCAB)
        joint[t] = p0[t] * p1
    return joint


def test_speculative_sampling_under_masks_gives_the_constrained_distribution() -> None:
    assert chi2_pvalue(first_two(), constrained_two()) > MIN_P


def test_a_last_stage_that_forgets_the_masks_is_caught() -> None:
    counts, want = first_two(mask_target=False, n=2000), constrained_two()
    assert counts[want == 0].sum() > 0  # it emits what the grammar forbids


def test_greedy_judging_picks_the_best_allowed_token_and_masks_travel() -> None:
    best_allowed = max(FIRST, key=lambda t: P_LOGITS[t])
    piece = Slice(0, 3, [1], SamplingParams(), masks=[pack(FIRST, N_VOCAB)])
    assert judge(piece, P_LOGITS[None]).next_token == best_allowed
    assert slice_from_wire(slice_to_wire(piece)).masks == piece.masks
    assert list(np.flatnonzero(allowed(pack(FIRST, 40), 40))) == FIRST


# --- the real server -------------------------------------------------------------------------

N_CTX = 1024
RING_SLOTS = 4  # the `ring` and `drafter` fixtures (conftest): four slots
WAIT = 300.0


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Part(BaseModel):
    name: str = Field(max_length=8)
    color: Color


class Gadget(BaseModel):  # nested, an enum, a list, an optional field; short replies
    parts: list[Part] = Field(min_length=1, max_length=2)
    price: int | None


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                              "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
YES_NO = 'root ::= ("yes" | "no") ", " [a-z]{2,12} "."'


@dataclass
class Served:
    url: str
    engine: Engine
    draft: bool

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=WAIT)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=WAIT)


@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Iterator[Tokenizer]:
    tok = Tokenizer(demo_target)
    yield tok
    tok.close()


def engine_on(ring: BuiltRing, tokenizer: Tokenizer, drafter: DraftModel | None) -> Engine:
    return start_engine(ring, tokenizer, "demo", drafter,
                        EngineOptions(queue_size=32, gamma=GammaConfig(fixed=3)),
                        costs=FREE_DRAFT)


@pytest.fixture(scope="module", params=["plain", "draft"])
def served(request: pytest.FixtureRequest, ring: BuiltRing, tokenizer: Tokenizer,
           drafter: DraftModel) -> Iterator[Served]:
    draft = request.param == "draft"
    engine = engine_on(ring, tokenizer, drafter if draft else None)
    try:
        with ServerThread(create_app(ServerState(engine=engine))) as server:
            yield Served(server.url, engine, draft)
    finally:
        engine.close()


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.mark.slow
def test_parse_returns_the_pydantic_object_20_of_20_at_temperature_1(served: Served) -> None:
    client = served.client()

    def one(seed: int) -> Gadget | None:
        reply = client.chat.completions.parse(
            model="demo", messages=ask("Describe a toy robot as JSON."), response_format=Gadget,
            temperature=1.0, max_tokens=100, seed=seed)
        return reply.choices[0].message.parsed

    with ThreadPoolExecutor(4) as pool:
        parsed = list(pool.map(one, range(20)))
    assert all(isinstance(p, Gadget) for p in parsed), parsed
    print(f"[{'draft' if served.draft else 'plain'}] e.g. {parsed[0]}")


@pytest.mark.slow
def test_a_gbnf_grammar_holds(served: Served) -> None:
    def one(seed: int) -> str:
        reply = served.post("/v1/chat/completions", {
            "messages": ask("Is the sky blue? Answer yes or no and one word why."),
            "grammar": YES_NO, "temperature": 1.0, "max_tokens": 24, "seed": seed})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(3)))
    for text in texts:
        assert re.fullmatch(r"(yes|no), [a-z]{2,12}\.", text), texts


@pytest.mark.slow
def test_a_required_tool_call_always_comes_with_valid_arguments(served: Served) -> None:
    forced_calls(served, "required")


@pytest.mark.slow
@pytest.mark.parametrize("served", ["plain"], indirect=True)  # the draft: other tests
def test_a_named_tool_call_always_comes_with_valid_arguments(served: Served) -> None:
    forced_calls(served, "named")


def forced_calls(served: Served, choice: str) -> None:
    client = served.client()
    named = {"type": "function", "function": {"name": "get_time"}}

    def one(seed: int) -> Any:
        return client.chat.completions.create(
            model="demo", messages=ask("What should I wear in Paris today?"),
            tools=[WEATHER, TIME], tool_choice=named if choice == "named" else "required",
            parallel_tool_calls=False, temperature=1.0, max_tokens=80, seed=seed)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(one, range(3)))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for reply in replies:
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls", message
        assert message.tool_calls and len(message.tool_calls) == 1, message
        call = message.tool_calls[0].function
        assert choice == "required" or call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.mark.slow
@pytest.mark.parametrize("served", ["plain"], indirect=True)  # the draft: other tests
def test_json_object_and_llama_server_json_schema(served: Served) -> None:
    reply = served.post("/v1/chat/completions", {
        "messages": ask("Give me a JSON object about a cat."),
        "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 60})
    assert reply.status_code == 200, reply.text
    body = reply.json()["choices"][0]
    if body["finish_reason"] == "stop":
        assert isinstance(json.loads(body["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reply = served.post("/v1/completions", {
        "prompt": "The number of legs of a cat, as JSON:", "json_schema": schema,
        "temperature": 0, "max_tokens": 16})
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["text"]), schema)


@pytest.mark.slow
@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "frob"}}},
        "strict": True}}}, "Invalid type: frob"),
    ({"grammar": 'root ::= "a" | missing'}, "Rule 'missing' not found"),
    ({"response_format": {"type": "xml"}}, "response_format type 'xml'"),
    ({"grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}, "send one"),
])
@pytest.mark.parametrize("served", ["plain"], indirect=True)
def test_an_invalid_schema_or_grammar_is_a_400_naming_it(served: Served, body: dict[str, Any],
                                                         says: str) -> None:
    reply = served.post("/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 4,
                                                 **body})
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("served", ["plain"], indirect=True)  # the draft: other tests
def test_props_and_cluster_say_what_is_on(served: Served) -> None:
    for path in ("/props", "/v1/cluster"):
        info = httpx.get(served.url + path, timeout=WAIT).json()["constrained_decoding"]
        assert info["engine"] == "llguidance" and "json_schema" in info["response_format"]


# --- greedy: with the draft as without ------------------------------------------------------

GREEDY_SCHEMA = Gadget.model_json_schema()


def greedy(engine: Engine, tokenizer: Tokenizer, prompt: list[int]) -> Generation:
    constraint = build_constraint(json_schema_grammar(GREEDY_SCHEMA), tokenizer)
    return engine.generate(GenerationRequest(prompt, 40, SamplingParams(), with_gaps=True,
                                             constraint=constraint))


GREEDY: dict[str, list[Generation]] = {}  # the plain round's runs, for the draft round


@pytest.mark.slow
def test_greedy_constrained_with_the_draft_equals_it_without_but_at_near_ties(
        served: Served, tokenizer: Tokenizer) -> None:
    """The plain round records its greedy runs; the draft round compares with them."""
    prompts = [tokenizer.encode(tokenizer.chat_prompt(ask(text))) for text in
               ("Describe a toy car as JSON.", "Describe a kite as JSON.")]
    runs = [greedy(served.engine, tokenizer, p) for p in prompts]
    if not served.draft:
        GREEDY["plain"] = runs
        return
    if "plain" not in GREEDY:
        pytest.skip("the plain round did not run")
    accepted = 0
    for want, got in zip(GREEDY["plain"], runs, strict=True):
        accepted += sum(got.stats.accepted)
        i = next((k for k, (a, b) in enumerate(zip(want.tokens, got.tokens, strict=False))
                  if a != b), None)
        if i is None:
            assert want.tokens == got.tokens
            continue
        assert want.top2_gaps[i] < NEAR_TIE, (i, want.top2_gaps[i])
        warnings.warn(f"first difference at token {i}, a near tie ({want.top2_gaps[i]:.3g})",
                      stacklevel=1)
    print("tokens per step, plain / draft:",
          [round(g.stats.tokens_per_step, 2) for g in GREEDY["plain"]],
          [round(g.stats.tokens_per_step, 2) for g in runs])
    assert accepted > 0


def test_an_unparsable_grammar_names_the_problem(tokenizer: Tokenizer) -> None:
    with pytest.raises(Exception, match="not valid GBNF"):
        build_constraint(gbnf_grammar("root ::= ("), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("served", ["plain"], indirect=True)  # the draft: other tests
def test_langchain_with_structured_output(served: Served) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=served.url + "/v1", api_key="none", model="demo",  # type: ignore[arg-type]
                     temperature=0, max_tokens=120, max_retries=0, timeout=WAIT)
    gadget = llm.with_structured_output(Gadget).invoke("Describe a toy robot as JSON.")
    assert isinstance(gadget, Gadget)


def test_guesses_are_cut_at_the_first_the_grammar_forbids(tokenizer: Tokenizer) -> None:
    """The engine's and the n-gram drafter's view: masks per judged row, the state rolled
    back after, and the grammar's end ends the reply."""
    from coordinator.speculation.drafting import DraftRequest, draft_rng
    from coordinator.speculation.ngram import NgramDrafter

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    constraint = build_constraint(json_schema_grammar(schema), tokenizer)
    good = tokenizer.encode('{"a": 12}', add_bos=False)
    bad = tokenizer.encode('{"b', add_bos=False)
    kept, masks = constraint.slice_masks([*good[:3], bad[1], *good[3:]])
    assert kept == 3 and len(masks) == 4
    assert all(allowed(m, tokenizer.n_vocab)[t] for m, t in zip(masks, good, strict=False))
    # An n-gram draft that would repeat a forbidden continuation is cut too.
    context = [*bad, *good[:1]]
    ask = DraftRequest(0, context, 3, SamplingParams(), draft_rng(0), constraint)
    assert NgramDrafter().propose([ask])[0].tokens == []  # '"b' after '{': not allowed
    constraint.advance(good)
    assert constraint.finished
    assert list(np.flatnonzero(allowed(constraint.mask(), tokenizer.n_vocab))) == \
        sorted(constraint.ends)


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_share_one_prompt(served: Served, stream: bool) -> None:
    """n: 3 gives 3 indexed choices, sampled independently, and the prompt is computed
    once: the other choices copy it (each computes the prompt's last token itself, for
    its own logits)."""
    client = served.client()
    # A system prompt of its own: no slot holds much of it from another test.
    messages = [{"role": "system", "content": f"You name {'streamed ' if stream else ''}"
                                              "things. " * 12},
                *ask("Name a colour. One word.")]
    computed0 = counter(served.url, "specshard_prompt_tokens_computed_total")
    copied0 = counter(served.url, "specshard_prompt_tokens_copied_total")
    kwargs: dict[str, Any] = dict(model="demo", messages=messages, n=3, temperature=1.0,
                                  max_tokens=8, seed=7)
    if stream:
        texts = ["", "", ""]
        finished = [None, None, None]
        usage = None
        for chunk in client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finished[c.index] = c.finish_reason or finished[c.index]
        assert all(finished), finished
    else:
        reply = client.chat.completions.create(**kwargs)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        texts = [c.message.content or "" for c in reply.choices]
        usage = reply.usage
    assert usage is not None and all(texts), texts
    prompt = usage.prompt_tokens
    assert usage.completion_tokens >= 3
    computed = counter(served.url, "specshard_prompt_tokens_computed_total") - computed0
    copied = counter(served.url, "specshard_prompt_tokens_copied_total") - copied0
    # The prompt once (but what a slot held already), and the other choices' last token.
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert computed == prompt - cached + 2, (computed, prompt, cached)
    assert copied == 2 * (prompt - 1)
    print(f"[{'draft' if served.draft else 'plain'}] {texts}")
