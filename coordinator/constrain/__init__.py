"""Constrained decoding: grammars and JSON schemas, enforced token by token.

The engine (llguidance, https://github.com/guidance-ai/llguidance) works on the model's
own vocabulary: the GGUF's, read through llama.cpp (`vocab.py`). Each request with a
`response_format`, a `grammar`, a `json_schema` or a forced tool call gets a
`Constraint` (`state.py`): the grammar's state after the reply's decided tokens, kept by
the coordinator. For every judged slice it gives one mask per judged row — the state
after the slice's guesses before that row — which travels with the slice and is applied
by the last worker before the verdict (`cluster/constrain.py`); drafters guess under
the same masks. After a verdict the state advances by the tokens that stand.
"""

from coordinator.constrain.grammar import (
    GrammarSpec,
    gbnf_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from coordinator.constrain.state import Constraint, build_constraint, request_constraint
from coordinator.constrain.vocab import engine_info, ll_tokenizer

__all__ = ["Constraint", "GrammarSpec", "build_constraint", "engine_info", "gbnf_grammar",
           "json_schema_grammar", "ll_tokenizer", "request_constraint", "tool_call_grammar"]
