"""The malformed worker calls of tests/test_fuzz_grpc.py, against a 2-stage ring of the
tiny model (4 layers of N_EMBD, N_VOCAB ids) holding two sequences: 0 (PROMPT and STEPS
greedy tokens: L0 positions) and 1 (PROMPT1: L1 positions). None of them is valid: each
would change a cache if a check were missing, and the test looks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cluster.auth import METADATA_KEY
from cluster.wire import worker_pb2 as pb
from tests.tiny_gguf import N_EMBD, N_VOCAB

N_LAYER, CUT, N_CTX, N_SEQ = 4, 2, 256, 2
PROMPT = list(range(1, 13))
PROMPT1 = [7, 3, 9, 1, 44, 2, 8, 90, 5, 6, 61, 17, 33, 12, 70, 4, 58, 21, 9, 30]
STEPS = 4  # greedy tokens: the prompt's judged row, then STEPS - 1 decode steps
L0, L1 = len(PROMPT) + STEPS - 1, len(PROMPT1)
FIRST_ID = 5_000_000  # fuzz batch ids: far from the ring's and the test's own
NAN = float("nan")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
Metadata = tuple[tuple[str, str], ...]


def rows(n: int, width: int = N_EMBD) -> bytes:
    return np.zeros((n, width), "<f4").tobytes()


def S(seq: int, start: int, tokens: list[int], **fields: Any) -> pb.Slice:  # noqa: N802
    return pb.Slice(seq=seq, start=start, tokens=tokens, **fields)


def sampled(temperature: float = 1.0, top_p: float = 1.0) -> pb.Sampling:
    return pb.Sampling(temperature=temperature, top_p=top_p)


def dist(ids: list[int], probs: list[float]) -> pb.SparseDist:
    return pb.SparseDist(ids=ids, probs=probs)


def guess(dists: list[pb.SparseDist], n_draft: int = 1, tokens: int = 2, **fields: Any
          ) -> pb.Slice:
    """A judged, sampled slice of sequence 0 with guesses, as the last stage gets it."""
    return S(0, L0, list(range(1, tokens + 1)), n_draft=n_draft, draft_dists=dists,
             judge=True, sampling=fields.pop("sampling", sampled()), **fields)


@dataclass(frozen=True)
class Fwd:
    """Messages on one Forward stream to worker `worker`: every reply is an inline
    INVALID_ARGUMENT, the first saying `words`; `published`: the coordinator hears too."""

    name: str
    worker: int
    messages: list[pb.ForwardMessage]
    words: str
    published: bool = True


def batch(*slices: pb.Slice, hidden: bytes = b"", n_embd: int = 0, **fields: Any
          ) -> list[pb.ForwardMessage]:
    return [pb.ForwardMessage(batch_id=FIRST_ID, slices=slices, hidden=hidden, n_embd=n_embd,
                              n_chunks=fields.pop("n_chunks", 1), **fields)]


def chunked(n_chunks: int, *later: dict[str, Any]) -> list[pb.ForwardMessage]:
    """The head of a 3-row batch into the last stage, in `n_chunks` chunks, then `later`
    chunks as given (their fields over a well-formed next chunk's)."""
    data = rows(3)
    head = pb.ForwardMessage(batch_id=FIRST_ID, slices=[S(0, L0, [1, 2, 3])], n_embd=N_EMBD,
                             hidden=data[:256], n_chunks=n_chunks)
    rest = [pb.ForwardMessage(**{"batch_id": FIRST_ID, "hidden": data[256:512],
                                 "chunk_index": 1, "n_chunks": n_chunks, **fields})
            for fields in later]
    return [head, *rest]


LAST, FIRST = 1, 0
FORWARD: list[Fwd] = [
    # hidden states that do not fit
    Fwd("narrow rows", LAST, batch(S(0, L0, [1]), hidden=rows(1, 32), n_embd=32), "hold"),
    Fwd("wide rows", LAST, batch(S(0, L0, [1]), hidden=rows(1, 128), n_embd=128), "hold"),
    Fwd("a byte short", LAST, batch(S(0, L0, [1]), hidden=rows(1)[:-1], n_embd=N_EMBD),
        "bytes"),
    Fwd("f32 bytes called f16", LAST, batch(S(0, L0, [1]), hidden=rows(1), n_embd=N_EMBD,
                                            dtype=pb.HIDDEN_DTYPE_F16), "bytes"),
    Fwd("unknown dtype", LAST, batch(S(0, L0, [1]), hidden=rows(1), n_embd=N_EMBD, dtype=7),
        "dtype"),
    Fwd("no hidden into the last stage", LAST, batch(S(0, L0, [1])), "takes hidden states"),
    Fwd("hidden into the first stage", FIRST, batch(S(0, L0, [1]), hidden=rows(1),
                                                    n_embd=N_EMBD), "token ids"),
    # positions and sequences
    Fwd("start past what the stage holds", LAST, batch(S(0, L0 + 1, [1]), hidden=rows(1),
                                                       n_embd=N_EMBD), "continue"),
    Fwd("a sequence twice", LAST, batch(S(1, L1, [1]), S(1, L1, [2]), hidden=rows(2),
                                        n_embd=N_EMBD), "twice"),
    Fwd("a sequence twice, first stage", FIRST, batch(S(1, L1, [1]), S(1, L1 - 1, [2, 3])),
        "twice"),
    Fwd("sequence 2**32-1", LAST, batch(S(2**32 - 1, 0, [1]), hidden=rows(1), n_embd=N_EMBD),
        "unknown sequence"),
    Fwd("sequence n_seq_max", FIRST, batch(S(N_SEQ, 0, [1])), "unknown sequence"),
    Fwd("past the context, last stage", LAST, batch(S(1, L1, [1] * (N_CTX - L1 + 1)),
                                                    hidden=rows(N_CTX - L1 + 1),
                                                    n_embd=N_EMBD), "exceed the context"),
    Fwd("token -1", FIRST, batch(S(1, L1, [5, -1])), "out of range"),
    Fwd("token n_vocab", FIRST, batch(S(1, L1, [N_VOCAB])), "out of range"),
    Fwd("no slices", LAST, batch(), "no slices"),
    Fwd("no slices, with rows", LAST, batch(hidden=rows(1), n_embd=N_EMBD), "no slices"),
    Fwd("no slices, first stage", FIRST, batch(), "no slices"),
    # chunks
    Fwd("chunk 2 before chunk 1", LAST, chunked(3, {"chunk_index": 2}), "out of order"),
    Fwd("a chunk of another batch", LAST, chunked(2, {"batch_id": FIRST_ID + 1}),
        "out of order"),
    Fwd("slices in a later chunk", LAST, chunked(2, {"slices": [S(1, L1, [1])]}),
        "out of order"),
    Fwd("a later chunk alone", LAST, chunked(2, {})[1:], "without its first chunk"),
    Fwd("2**32-1 chunks", LAST, chunked(2**32 - 1), "at most"),
    Fwd("two chunks of three, then the end", LAST, chunked(3, {}), "stream ended",
        published=False),
    Fwd("one chunk of two, then the end", FIRST, batch(S(1, L1, [1]), n_chunks=2),
        "stream ended", published=False),
    # guesses and their distributions
    Fwd("a NaN draft probability", LAST, batch(guess([dist([2], [NAN])]), hidden=rows(2),
                                               n_embd=N_EMBD), "not a probability"),
    Fwd("a negative draft probability", LAST, batch(guess([dist([2, 3], [-0.5, 1.5])]),
                                                    hidden=rows(2), n_embd=N_EMBD),
        "not a probability"),
    Fwd("probabilities summing to 0.5", LAST, batch(guess([dist([2], [0.5])]),
                                                    hidden=rows(2), n_embd=N_EMBD),
        "not a probability"),
    Fwd("an empty distribution", LAST, batch(guess([dist([], [])]), hidden=rows(2),
                                             n_embd=N_EMBD), "not a probability"),
    Fwd("one distribution for two guesses", LAST, batch(guess([dist([2], [1.0])], 2, 3),
                                                        hidden=rows(3), n_embd=N_EMBD),
        "draft distributions for"),
    Fwd("sampled guesses without distributions", LAST, batch(guess([]), hidden=rows(2),
                                                             n_embd=N_EMBD),
        "needs the draft's distributions"),
    Fwd("temperature NaN", LAST, batch(S(0, L0, [1], judge=True, sampling=sampled(NAN)),
                                       hidden=rows(1), n_embd=N_EMBD), "temperature"),
    Fwd("temperature -1", FIRST, batch(S(1, L1, [1], judge=True, sampling=sampled(-1.0))),
        "temperature"),
    Fwd("top_p 5", LAST, batch(S(0, L0, [1], judge=True, sampling=sampled(1.0, 5.0)),
                               hidden=rows(1), n_embd=N_EMBD), "top_p"),
    Fwd("top_p NaN", FIRST, batch(S(1, L1, [1], judge=True, sampling=sampled(1.0, NAN))),
        "top_p"),
    Fwd("as many guesses as tokens", LAST, batch(S(0, L0, [1, 2], n_draft=2), hidden=rows(2),
                                                 n_embd=N_EMBD), "draft guesses"),
    Fwd("2**32-1 guesses", FIRST, batch(S(1, L1, [1], n_draft=2**32 - 1)), "draft guesses"),
    Fwd("an empty slice that judges", LAST, batch(S(0, 0, [], judge=True)), "only truncates"),
    Fwd("an empty slice with guesses", FIRST, batch(S(0, 0, [], n_draft=1)),
        "only truncates"),
]


@dataclass(frozen=True)
class Call:
    """A call refused in its status (`code`, details holding `words`)."""

    name: str
    rpc: str  # Truncate, LoadStage or Forward
    request: Any
    code: grpc.StatusCode
    words: str
    worker: int = LAST
    auth: Callable[[str], Metadata] = lambda token: ((METADATA_KEY, f"Bearer {token}"),)


NO_TOKEN: Callable[[str], Metadata] = lambda token: ()  # noqa: E731
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
RESET_ALL = pb.TruncateRequest(length=0)  # would empty every sequence
FREE_SEQ_0 = pb.ForwardMessage(batch_id=FIRST_ID, slices=[S(0, 0, [])], n_chunks=1)


def calls(model: Path, junk: Path, torn: Path) -> list[Call]:
    """Calls to refuse: auth, LoadStage (`junk`: not a GGUF; `torn`: a GGUF header cut
    short), Truncate."""
    def load(**fields: Any) -> pb.LoadStageRequest:
        spec = {"model_path": str(model), "begin": CUT, "end": N_LAYER, "n_ctx": N_CTX,
                "n_seq_max": N_SEQ}
        return pb.LoadStageRequest(**{**spec, **fields})

    def token(make: Callable[[str], str]) -> Callable[[str], Metadata]:
        return lambda t: ((METADATA_KEY, make(t)),)

    # A stage the worker would load (n_ctx differs from its own) had it been allowed.
    other = load(n_ctx=128)
    return [
        Call("truncate all, no token", "Truncate", RESET_ALL, UNAUTH, "token", auth=NO_TOKEN),
        Call("truncate all, wrong token", "Truncate", RESET_ALL, UNAUTH, "token",
             auth=token(lambda t: "Bearer " + t[::-1])),
        Call("truncate all, lowercase scheme", "Truncate", RESET_ALL, UNAUTH, "token",
             auth=token(lambda t: "bearer " + t)),
        Call("truncate all, no scheme", "Truncate", RESET_ALL, UNAUTH, "token",
             auth=token(lambda t: t)),
        Call("truncate all, token and a space", "Truncate", RESET_ALL, UNAUTH, "token",
             auth=token(lambda t: f"Bearer {t} ")),
        Call("truncate all, token under another key", "Truncate", RESET_ALL, UNAUTH, "token",
             auth=lambda t: (("x-token", f"Bearer {t}"),)),
        Call("load, no token", "LoadStage", other, UNAUTH, "token", auth=NO_TOKEN),
        Call("load, wrong token", "LoadStage", other, UNAUTH, "token",
             auth=token(lambda t: "Bearer x" + t[1:])),
        Call("free a sequence, no token", "Forward", FREE_SEQ_0, UNAUTH, "token", FIRST,
             auth=NO_TOKEN),
        Call("free a sequence, wrong token", "Forward", FREE_SEQ_0, UNAUTH, "token", FIRST,
             auth=token(lambda t: "Bearer " + t.upper())),
        Call("layers past the model", "LoadStage", load(end=99), PRECONDITION, "out of bounds"),
        Call("layers backwards", "LoadStage", load(begin=3, end=2), PRECONDITION,
             "out of bounds"),
        Call("no layers", "LoadStage", load(begin=2, end=2), PRECONDITION, "out of bounds",
             FIRST),
        Call("no such model", "LoadStage", load(model_path="/nonexistent/m.gguf"),
             PRECONDITION, "not found"),
        Call("a directory as model", "LoadStage", load(model_path=str(model.parent)),
             PRECONDITION, "not found"),
        Call("an empty model path", "LoadStage", load(model_path=""), PRECONDITION,
             "not found", FIRST),
        Call("not a gguf", "LoadStage", load(model_path=str(junk)), PRECONDITION,
             "not a GGUF"),
        Call("a gguf cut short", "LoadStage", load(model_path=str(torn)), PRECONDITION,
             str(torn.name)),
        Call("n_ctx 0", "LoadStage", load(n_ctx=0), PRECONDITION, "n_ctx"),
        Call("unknown KV type", "LoadStage", load(type_k="q3_bogus"), PRECONDITION,
             "unknown KV type", FIRST),
        Call("quantized V without flash attention", "LoadStage", load(type_v="q8_0"),
             PRECONDITION, "flash attention"),
        Call("truncate sequence n_seq_max", "Truncate", pb.TruncateRequest(seqs=[N_SEQ]),
             INVALID, "unknown sequence"),
        Call("truncate a known and an unknown", "Truncate",
             pb.TruncateRequest(seqs=[0, 5], length=0), INVALID, "unknown sequence", FIRST),
        Call("truncate sequence 2**32-1", "Truncate",
             pb.TruncateRequest(seqs=[2**32 - 1], length=1), INVALID, "unknown sequence"),
        Call("truncate one twice and an unknown", "Truncate",
             pb.TruncateRequest(seqs=[1, 1, 99], length=0), INVALID, "unknown sequence",
             FIRST),
    ]
