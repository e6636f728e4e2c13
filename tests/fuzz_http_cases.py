"""The hostile requests of tests/test_fuzz_http.py, as raw HTTP/1.1 bytes: a table of
named cases, and a seeded generator of mutated bodies."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

KEY = "fuzz-key-2718281828"
MODEL = "tiny-chat"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 4}
TEXT: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
REFERENCE: dict[str, Any] = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 12,
                             "temperature": 0}
DROP = object()  # a field value: leave the field out
NAN, INF = float("nan"), float("inf")  # json.dumps writes them as the raw tokens NaN, Infinity


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    expect: int | None = None  # the exact status; None: any 4xx
    # False: refused below the app, by uvicorn's HTTP parser (its own plain 400) or a
    # close; True: the app answers, in OpenAI's error shape.
    shaped: bool = True
    may_answer: bool = False  # a mutation that may have left the request valid: 200 too


def http(method: str, path: str, body: bytes = b"", *, auth: str | None = f"Bearer {KEY}",
         content_type: str | None = "application/json", extra: tuple[str, ...] = ()
         ) -> bytes:
    """One request as bytes; headers are latin-1, so any byte can be put in one."""
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", "Connection: close"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, *extra]).encode("latin-1") + b"\r\n\r\n" + body


def merged(base: dict[str, Any], fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in {**base, **fields}.items() if v is not DROP}
    return json.dumps(body).encode()


def chat(**fields: Any) -> bytes:
    return http("POST", "/v1/chat/completions", merged(CHAT, fields))


def text(**fields: Any) -> bytes:
    return http("POST", "/v1/completions", merged(TEXT, fields))


def post(body: bytes, path: str = "/v1/chat/completions", **options: Any) -> bytes:
    return http("POST", path, body, **options)


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def deep_tool(depth: int) -> bytes:
    """A chat whose tool's parameter schema nests `depth` objects (as text: json.dumps
    itself stops near 1000 levels)."""
    schema = '{"type": "object", "properties": {"x": ' * depth + "{}" + "}}" * depth
    tool = {"type": "function", "function": {"name": "deep", "parameters": "@"}}
    return http("POST", "/v1/chat/completions",
                merged(CHAT, {"tools": [tool]}).replace(b'"@"', schema.encode()))


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
BODY = json.dumps(CHAT).encode()

TABLE: list[Case] = [
    # bad JSON
    Case("truncated json", post(BODY[:25])),
    Case("trailing garbage", post(BODY + b" xyz")),
    Case("json array", post(b"[]")),
    Case("json null", post(b"null")),
    Case("json string", post(b'"hello"')),
    Case("empty body", post(b"")),
    Case("single quotes", post(b"{'model': 'x'}")),
    Case("nested 100k deep", post(b"[" * 100_000 + b"]" * 100_000)),
    Case("5000-digit number", post(BODY.replace(b'"max_tokens": 4',
                                                b'"max_tokens": ' + b"9" * 5000))),
    Case("bom then no messages", post(b"\xef\xbb\xbf" + json.dumps({"model": MODEL}).encode())),
    # wrong types and values
    Case("messages a string", chat(messages="hi")),
    Case("messages empty", chat(messages=[])),
    Case("unknown role", chat(messages=[{"role": "wizard", "content": "x"}])),
    Case("content a number", chat(messages=user(5))),
    Case("image part", chat(messages=user([{"type": "image_url",
                                            "image_url": {"url": "http://x/y.png"}}]))),
    Case("tool turn without id", chat(messages=[{"role": "tool", "content": "x"}])),
    Case("max_tokens a word", chat(max_tokens="many")),
    Case("max_tokens -1", chat(max_tokens=-1)),
    Case("max_tokens 0", chat(max_tokens=0)),
    Case("max_tokens 1e400", post(BODY.replace(b'"max_tokens": 4', b'"max_tokens": 1e400'))),
    Case("max_completion_tokens -5", chat(max_completion_tokens=-5)),
    Case("temperature NaN", chat(temperature=NAN)),
    Case("temperature Infinity", chat(temperature=INF)),
    Case("temperature -Infinity", chat(temperature=-INF)),
    Case("temperature 2.5", chat(temperature=2.5)),
    Case("top_p NaN", chat(top_p=NAN)),
    Case("top_p 0", chat(top_p=0)),
    Case("top_k -5", chat(top_k=-5)),
    Case("top_k a float", chat(top_k=1.5)),
    Case("n 2", chat(n=2), 200),
    Case("n 0", chat(n=0)),
    Case("n 17", chat(n=17)),
    Case("n 10**30", chat(n=10**30)),
    Case("65 stops", chat(stop=[str(i) for i in range(65)])),
    Case("stop a number", chat(stop=5)),
    Case("stream an object", chat(stream={"x": 1})),
    Case("stream_options a word", chat(stream_options="yes")),
    Case("model a number", chat(model=123)),
    Case("unknown model", chat(model="gpt-4"), 200),  # served, as llama-server does
    Case("tool with empty name", chat(tools=[{"type": "function", "function": {"name": ""}}])),
    Case("required without tools", chat(tool_choice="required")),
    Case("choice of a missing tool", chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "nope"}})),
    Case("template kwargs replace messages", chat(chat_template_kwargs={"messages": []})),
    Case("template kwargs a string", chat(chat_template_kwargs="x")),
    Case("reasoning_format unknown", chat(reasoning_format="raw")),
    Case("thinking budget -2", chat(thinking_budget_tokens=-2)),
    Case("prompt token ids", text(prompt=[1, 2, 3])),
    Case("two prompts", text(prompt=["a", "b"])),
    Case("echo", text(echo=True)),
    Case("no prompt", text(prompt=DROP)),
    Case("empty prompt", text(prompt="")),
    Case("lone surrogate in prompt", text(prompt="a\ud800b")),
    Case("lone surrogate in message", chat(messages=user("\udfff"))),
    Case("lone surrogate in model", chat(model="\ud83d")),
    Case("lone surrogate in a template kwarg", chat(chat_template_kwargs={"x\udc00": 1})),
    Case("prompt over the context", text(prompt="hello " * 1500)),
    Case("3 MB message", chat(messages=user("word " * 600_000))),
    # legal but extreme: answered
    Case("seed 2**70", text(seed=2**70), 200),
    Case("seed -1", text(seed=-1), 200),
    Case("top_k 10**30", text(top_k=10**30, temperature=1.0), 200),
    Case("unknown fields", text(frobnicate={"a": [1, None]}, logit_bias={"5": 100}), 200),
    Case("an empty stop", text(stop=[""]), 200),
    Case("seed -2", text(seed=-2)),
    Case("tool schema 450 deep", deep_tool(450)),
    Case("tool schema 5000 deep", deep_tool(5000)),
    # headers
    Case("no authorization", post(BODY, auth=None), 401),
    Case("bearer without key", post(BODY, auth="Bearer"), 401),
    Case("wrong key", post(BODY, auth="Bearer not-the-key"), 401),
    Case("basic auth", post(BODY, auth="Basic dXNlcjpwYXNz"), 401),
    Case("key and more", post(BODY, auth=f"Bearer {KEY} extra"), 401),
    Case("non-ascii key", post(BODY, auth="Bearer \xff\xfe\x80"), 401),
    Case("two wrong keys", post(BODY, auth="Bearer a", extra=("Authorization: Bearer b",)),
         401),
    Case("8 kB key", post(BODY, auth="Bearer " + "k" * 8000), 401),
    Case("text/plain", post(BODY, content_type="text/plain")),
    Case("form encoded", post(b"model=x&messages=y",
                              content_type="application/x-www-form-urlencoded")),
    Case("multipart", post(BODY, content_type="multipart/form-data; boundary=zz")),
    Case("bad utf-8 body", post(b'{"model": "\xff\xfe", "messages": []}')),
    Case("latin-1 body", post('{"messages": [{"role": "user", "content": "caf\xe9"}]}'
                              .encode("latin-1"), content_type="application/json; "
                              "charset=latin-1")),
    Case("gzip claimed", post(b"\x1f\x8b\x08\x00garbage", extra=("Content-Encoding: gzip",))),
    # methods and paths
    Case("GET a POST route", http("GET", "/v1/chat/completions"), 405),
    Case("PUT", http("PUT", "/v1/completions", BODY), 405),
    Case("DELETE", http("DELETE", "/v1/models"), 405),
    Case("PATCH", http("PATCH", "/v1/chat/completions", BODY), 405),
    Case("OPTIONS", http("OPTIONS", "/v1/chat/completions"), 405),
    Case("TRACE", http("TRACE", "/v1/models"), 405),
    Case("made-up method", http("FROB", "/v1/models"), 405),
    Case("dot-dot path", http("GET", "/v1/../../etc/passwd"), 404),
    Case("encoded dot-dot model", http("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd"), 404),
    Case("NUL model", http("GET", "/v1/models/%00"), 404),
    Case("encoded dots", http("GET", "/%2e%2e/%2e%2e/etc/passwd"), 404),
    Case("double slashes", http("GET", "//v1//models"), 404),
    Case("10 kB model name", http("GET", "/v1/models/" + "m" * 10_000), 404),
    Case("below a POST route", http("POST", "/v1/chat/completions/x", BODY), 404),
    Case("cluster without key", http("GET", "/v1/cluster", auth=None), 401),
    # below the app: uvicorn's parser
    Case("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
         shaped=False),
    Case("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", shaped=False),
    Case("no version", b"GET /v1/models\r\n\r\n", shaped=False),
    Case("header without colon", b"GET /health HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n",
         shaped=False),
    Case("negative length", http("POST", "/v1/completions", extra=("Content-Length: -1",))
         .replace(b"Content-Length: 0\r\n", b""), shaped=False),
    Case("length a word", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
         b"Content-Length: abc\r\n\r\n{}", shaped=False),
    Case("length and chunked", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
         b"Connection: close\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\n0\r\n\r\n",
         shaped=False),
    Case("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", shaped=False),
    Case("1 MB header", http("GET", "/v1/models", extra=("X-Big: " + "x" * 1_000_000,)),
         shaped=False),
]

# --- the seeded generator -------------------------------------------------------------------

# Values each field must refuse (so a case with any of them is a 4xx).
HOSTILE: dict[str, list[Any]] = {
    "max_tokens": [-1, 0, -(10**30), 2.5, "x", [], {}],
    "temperature": [-0.5, 2.5, NAN, INF, -INF, "hot", []],
    "top_p": [0, -1, 1.5, NAN, "x"],
    "top_k": [-1, -(10**20), 1.5, "k"],
    "n": [0, 17, 10**9, -1],
    "stop": [5, [1], ["a"] * 65, {"a": 1}],
    "stream": [[], {}, "maybe"],
    "model": [5, [], {}],
    "stream_options": ["x", 5, {"include_usage": "perhaps"}],
    "seed": ["s", 1.5, []],
}
CHAT_HOSTILE: dict[str, list[Any]] = {"messages": ["x", [], [{}], [{"role": "x"}], user({}), None],
                "tools": ["x", [{}], [{"type": "function", "function": {"name": ""}}]],
                "thinking_budget_tokens": [-2, "x"]}
TEXT_HOSTILE: dict[str, list[Any]] = {"prompt": [None, 5, [], ["a", "b"], [5], {}], "echo": [True]}
NOISE = b'{}[]",:\\\x00\xff 0-eE'


def random_cases(rng: random.Random, n: int) -> list[Case]:
    """Half: 1-3 fields of a valid body set to values they refuse (a 4xx each); half: a
    valid body with 1-4 bytes changed, deleted or inserted (a 4xx, or an answer)."""
    cases = []
    for i in range(n):
        is_chat = rng.random() < 0.5
        base, path = (CHAT, "/v1/chat/completions") if is_chat else (TEXT, "/v1/completions")
        if i % 2 == 0:
            pool = {**HOSTILE, **(CHAT_HOSTILE if is_chat else TEXT_HOSTILE)}
            fields = {k: rng.choice(pool[k]) for k in rng.sample(sorted(pool), rng.randint(1, 3))}
            cases.append(Case(f"random {i}: {sorted(fields)}", http("POST", path,
                                                                    merged(base, fields))))
            continue
        body = bytearray(json.dumps(base).encode())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            op = rng.randrange(3)
            if op == 0:
                body[at] = rng.choice(NOISE)
            elif op == 1:
                del body[at]
            else:
                body.insert(at, rng.choice(NOISE))
        cases.append(Case(f"random {i}: {bytes(body)!r}", http("POST", path, bytes(body)),
                          may_answer=True))
    return cases
