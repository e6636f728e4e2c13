"""The target model's vocabulary, loaded without weights: tokenize, detokenize, chat."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from worker.stage import init_backend

Message = dict[str, str]


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
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._lock = threading.Lock()
        template = header.values.get("tokenizer.chat_template")
        self._chat = None
        if isinstance(template, str):
            bos = llama_cpp.llama_vocab_bos(self._vocab)
            eos = llama_cpp.llama_vocab_eos(self._vocab)
            self._chat = Jinja2ChatFormatter(
                template=template, bos_token=self.text_of(bos), eos_token=self.text_of(eos))

    def text_of(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def encode(self, text: str, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (llama_cpp.llama_token * capacity)()
        with self._lock:
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity,
                                         self.add_bos, special)
        if n < 0:
            raise SpecshardError("tokenizer buffer too small")  # cannot happen: ≤ 1 per byte
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def chat_prompt(self, messages: list[Message]) -> str:
        if self._chat is None:
            raise SpecshardError("the model has no chat template; use --raw")
        return str(self._chat(messages=cast(Any, messages)).prompt)

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
