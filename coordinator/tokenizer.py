"""The target model's vocabulary, loaded without weights: tokenize, detokenize, chat."""

from __future__ import annotations

import ctypes
import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import llama_cpp
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.llama.backend import init_backend

Message = dict[str, Any]


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face's filter, not Jinja's: Jinja's escapes <, > and & for HTML, which
    # would change the tool descriptions a template writes into the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _one_line(exc: Exception) -> str:
    where = f"line {exc.lineno}: " if isinstance(exc, jinja2.TemplateSyntaxError) else ""
    return where + " ".join(str(exc).split())


class ChatTemplate:
    """A Jinja chat template, rendered as Hugging Face's `apply_chat_template` renders it
    (the environment, `tojson` and `raise_exception` that model templates are written
    for), so `tools` and extra variables such as `enable_thinking` reach it."""

    def __init__(self, source: str) -> None:
        self.source = source  # what /props reports as the template in use
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[loopcontrols, Jinja2ChatFormatter.IgnoreGenerationTags])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise,
                           strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise SpecshardError(f"the chat template does not parse: {_one_line(exc)}"
                                 ) from None

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, **variables: Any) -> str:
        try:
            return self._template.render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
        # A template is a program: the messages it was given can make it fail (a role it
        # refuses, content that is not text); the caller answers with the message.
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise SpecshardError(f"the chat template failed: {_one_line(exc)}") from None


class Tokenizer:
    """Vocabulary of a GGUF model (llama.cpp's own tokenizer, `vocab_only`)."""

    def __init__(self, model_path: Path) -> None:
        init_backend()
        header = read_header(model_path)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self._model:
            raise SpecshardError(f"llama.cpp could not load the vocabulary of {model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._pieces: dict[int, bytes] = {}
        self._ends: dict[int, bool] = {}
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._lock = threading.Lock()
        template = header.values.get("tokenizer.chat_template")
        self.chat_template: ChatTemplate | None = None
        self._no_template = "the model has no chat template; use --raw"
        if isinstance(template, str):
            try:
                self.chat_template = ChatTemplate(template)
            except SpecshardError as exc:  # `serve --chat-template-file` does without it
                self._no_template = f"{model_path.name}: {exc}; use --chat-template-file"
        self._bos_text = self.text_of(llama_cpp.llama_vocab_bos(self._vocab))
        self._eos_text = self.text_of(llama_cpp.llama_vocab_eos(self._vocab))

    def text_of(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def encode(self, text: str, special: bool = True, add_bos: bool | None = None
               ) -> list[int]:
        """Token ids of `text`; a BOS first when the model wants one (unless told)."""
        bos = self.add_bos if add_bos is None else add_bos
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (llama_cpp.llama_token * capacity)()
        with self._lock:
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, bos,
                                         special)
        if n < 0:
            raise SpecshardError("tokenizer buffer too small")  # cannot happen: ≤ 1 per byte
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        # Pieces never change: cached, the engine's loop asks once per token id (~20 µs
        # of ctypes each time otherwise).
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        self._pieces[token] = buf.raw[:n]
        return self._pieces[token]

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        end = self._ends.get(token)
        if end is None:
            end = self._ends[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return end

    def chat_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    template: ChatTemplate | None = None, **variables: Any) -> str:
        """The prompt text of a conversation, by `template` or else the model's own."""
        template = template or self.chat_template
        if template is None:
            raise SpecshardError(self._no_template)
        return template.render(messages, tools, bos_token=self._bos_text,
                               eos_token=self._eos_text, **variables)

    def close(self) -> None:
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


class TextStream:
    """Turns tokens into text as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending = b""

    def push(self, token: int) -> str:
        self._pending += self._tokenizer.piece(token)
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                text = self._pending.decode("utf-8", errors="replace")
            else:
                text = self._pending[:exc.start].decode("utf-8")
                self._pending = self._pending[exc.start:]
                return text
        self._pending = b""
        return text
