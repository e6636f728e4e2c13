"""What a request asks the reply to be, as an llguidance grammar: a JSON schema (OpenAI's
`response_format`, llama-server's `json_schema`), llama.cpp's GBNF (`grammar`), or the
tool calls a `tool_choice` forces (Qwen/Hermes `<tool_call>` blocks, `api/tools.py`).

Each function returns a `GrammarSpec` or raises `SpecshardError` naming the problem (a
400); the grammar is checked against the vocabulary when the request's `Constraint` is
built (`state.build_constraint`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark, is_lark_syntax

from cluster.errors import SpecshardError

# JSON as models write it, kept short: one space after ',' and ':' and no other free
# white space (free white space lets a sampled reply run on in blanks until max_tokens).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}

ROOT = re.compile(r"(?m)^(\s*)root(\s*::=)")


@dataclass(frozen=True)
class GrammarSpec:
    grammar: str  # llguidance's grammar (its JSON form)
    what: str  # "response_format json_schema", "grammar", … (for messages and logs)


def json_schema_grammar(schema: Any, strict: bool = True,
                        what: str = "response_format json_schema") -> GrammarSpec:
    """A JSON schema. `strict` (OpenAI's): every keyword must be enforced, else 400;
    not strict: keywords llguidance does not implement are ignored."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise SpecshardError(f"{what}: the schema must be a JSON object, got "
                             f"{type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=JSON_OPTIONS,  # type: ignore[arg-type]
            overrides={"lenient": not strict})
    except ValueError as exc:
        raise SpecshardError(f"{what}: {exc}") from None
    return GrammarSpec(grammar, what)


def gbnf_grammar(text: str, what: str = "grammar") -> GrammarSpec:
    """llama.cpp's GBNF (llama-server's `grammar` field; a Lark grammar is taken too)."""
    if not text.strip():
        raise SpecshardError(f"{what} is empty")
    # The converter makes a rule whose every part is a terminal a lexeme (fast: a DFA)
    # except the root, which stays a rule (slow: a parser item per character); a root of
    # its own that only names the real one lets the real one be a lexeme too.
    if not is_lark_syntax(text):
        text = ROOT.sub(r"\1specshard-root\2", text, count=1) + "\nroot ::= specshard-root\n"
    try:
        lark = any_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
        raise SpecshardError(f"{what} is not valid GBNF: {exc}") from None
    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(lark), what)


def tool_call_grammar(tools: list[dict[str, Any]], only: str | None, parallel: bool,
                      open_token: int | None, close_token: int | None) -> GrammarSpec:
    """Replies that are tool calls and nothing else: `<tool_call>\\n{"name": …,
    "arguments": …}\\n</tool_call>`, the arguments following the function's
    `parameters` schema; one call, or several (`parallel`) separated by new lines.
    `only`: the one function a named `tool_choice` asks for. `open_token` /
    `close_token`: the vocabulary's own `<tool_call>` tokens, when it has them (Qwen's
    do; the model writes those)."""
    calls = []
    for tool in tools:
        fn = tool.get("function", {})
        if only is not None and fn.get("name") != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        calls.append({"type": "object", "additionalProperties": False,
                      "required": ["name", "arguments"],
                      "properties": {"name": {"const": fn["name"]}, "arguments": params}})
    if not calls:
        raise SpecshardError("tool_choice: no tool to call")
    schema: dict[str, Any] = dict(calls[0]) if len(calls) == 1 else {"anyOf": calls}
    # The JSON inside a call is written as the template shows it: compact separators.
    schema["x-guidance"] = JSON_OPTIONS
    open_ = f'(<[{open_token}]> | "<tool_call>")' if open_token is not None \
        else '"<tool_call>"'
    close = f'(<[{close_token}]> | "</tool_call>")' if close_token is not None \
        else '"</tool_call>"'
    more = ' ("\\n" call)*' if parallel else ""
    lark = "\n".join([
        f"start: call{more}",
        f'call: {open_} "\\n" body "\\n" {close}',
        f"body: %json {json.dumps(schema)}",
    ])
    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(lark), "tool_choice")
