"""Reading a non-last stage's output: the residual stream after its last layer.

llama.cpp's scheduler asks the eval callback about every graph node before computing,
then hands over the node that was asked for (docs/architecture.md, "Stages",
points 4 and 9). The callback matches `l_out-{n_layer-1}`, copies its rows into a buffer
this object owns, and stops the split (the final norm and the dummy head are skipped).
Rows accumulate across the ubatches of one `llama_decode` until `reset`.

Two implementations: `CCapture`, a C function (`capture.c`, built on first use by
`capture_build`) that answers the ~550 asks of a decode without the GIL, and
`PythonCapture`, the fallback when no C compiler is at hand (~0.9 ms of Python per
decode on the demo target's first stage; bench/overhead.py measures both).
`SPECSHARD_CAPTURE=python` forces the fallback (an A/B switch; default `c`), as does
`make_capture(..., kind="python")`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Any, Protocol

import llama_cpp
import numpy as np

from cluster.errors import SpecshardError
from cluster.llama import capture_build
from cluster.llama.ggml import ggml_backend_tensor_get, ggml_get_name, ggml_nbytes

log = logging.getLogger(__name__)
KINDS = ("c", "python")


class Capture(Protocol):
    kind: str  # "c" or "python": reported by the worker (NodeInfo, /v1/cluster)
    timing: bool  # accumulate the time spent in the callback (bench/overhead.py)

    def install(self, cparams: Any) -> None: ...  # set cb_eval (+ user data) on the params

    def reset(self) -> None: ...  # forget the rows (and calls, time) captured so far

    def rows(self) -> np.ndarray: ...  # the rows captured since reset: n × n_embd f32 view

    @property
    def calls(self) -> int: ...  # callback calls since reset: every ask, and each copy

    @property
    def callback_ns(self) -> int: ...  # time inside the callback since reset, if timing


class PythonCapture:
    """The fallback: a Python function entered through ctypes for every graph node."""

    kind = "python"

    def __init__(self, out_name: bytes, n_embd: int, max_rows: int) -> None:
        self._name = out_name
        self._n_embd = n_embd
        self._buffer = np.empty((max_rows, n_embd), dtype=np.float32)
        self._n = 0
        self._overflow = False
        self._callback: Any = None
        self.timing = False
        self.calls = 0
        self.callback_ns = 0

    def install(self, cparams: Any) -> None:
        # Keep a reference: the C side holds only the pointer.
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
        cparams.cb_eval = self._callback

    def _on_eval(self, tensor: int, ask: bool, _user: int) -> bool:
        self.calls += 1
        if not self.timing:
            return self._eval(tensor, ask)
        # Minus an empty interval, so the clock's own cost cancels (as in capture.c).
        t0 = time.perf_counter_ns()
        result = self._eval(tensor, ask)
        t1 = time.perf_counter_ns()
        self.callback_ns += 2 * t1 - t0 - time.perf_counter_ns()
        return result

    def _eval(self, tensor: int, ask: bool) -> bool:
        if ask:
            return bool(ggml_get_name(tensor) == self._name)
        if ggml_get_name(tensor) != self._name:
            return True
        nbytes = ggml_nbytes(tensor)
        n = nbytes // (4 * self._n_embd)
        if self._n + n > len(self._buffer):  # reported by rows(): raising here is lost in C
            self._overflow = True
        else:
            ggml_backend_tensor_get(tensor, self._buffer[self._n:].ctypes.data, 0, nbytes)
            self._n += n
        return False  # skip the rest of the split: the final norm and the dummy head

    def reset(self) -> None:
        self._n = 0
        self._overflow = False
        self.calls = self.callback_ns = 0

    def rows(self) -> np.ndarray:
        if self._overflow:
            raise _overflow_error(len(self._buffer))
        return self._buffer[:self._n]


class CaptureState(ctypes.Structure):
    """`struct specshard_capture` in capture.c, field for field."""

    _fields_ = [
        ("get_name", ctypes.c_void_p), ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p), ("name", ctypes.c_char_p),
        ("buffer", ctypes.c_void_p), ("capacity", ctypes.c_size_t),
        ("offset", ctypes.c_size_t), ("overflow", ctypes.c_int32),
        ("timing", ctypes.c_int32), ("calls", ctypes.c_int64), ("nanos", ctypes.c_int64),
        ("name_at", ctypes.c_int64),
    ]


def _address(function: Any) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value or 0


class CCapture:
    """The C callback: llama_decode runs its whole length without the GIL."""

    kind = "c"

    def __init__(self, library: ctypes.CDLL, out_name: bytes, n_embd: int,
                 max_rows: int) -> None:
        self._n_embd = n_embd
        self._buffer = np.empty((max_rows, n_embd), dtype=np.float32)
        # The struct, the name and the buffer live as long as this object, which the
        # Stage keeps for its context's lifetime: llama.cpp holds raw pointers to them.
        self._name = out_name
        self._state = CaptureState(
            get_name=_address(ggml_get_name), nbytes=_address(ggml_nbytes),
            tensor_get=_address(ggml_backend_tensor_get), name=self._name,
            buffer=self._buffer.ctypes.data, capacity=self._buffer.nbytes, name_at=-1)
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(
            _address(library.specshard_capture_eval))

    def install(self, cparams: Any) -> None:
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = ctypes.addressof(self._state)

    @property
    def timing(self) -> bool:
        return bool(self._state.timing)

    @timing.setter
    def timing(self, on: bool) -> None:
        self._state.timing = int(on)

    @property
    def calls(self) -> int:
        return int(self._state.calls)

    @property
    def callback_ns(self) -> int:
        return int(self._state.nanos)

    def reset(self) -> None:
        s = self._state
        s.offset = s.overflow = s.calls = s.nanos = 0

    def rows(self) -> np.ndarray:
        if self._state.overflow:
            raise _overflow_error(len(self._buffer))
        return self._buffer[:self._state.offset // (4 * self._n_embd)]


def _overflow_error(max_rows: int) -> SpecshardError:
    # max_rows is the stage's n_batch, the most rows one llama_decode takes: a bug if hit.
    return SpecshardError(f"the stage output overflowed its capture buffer of {max_rows} rows")


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_library_error = ""


def c_library() -> ctypes.CDLL | None:
    """The C capture library, built and loaded once per process; None (and one WARNING
    saying why) when this machine cannot build or load it."""
    global _library, _library_error
    with _lock:
        if _library is None and not _library_error:
            try:
                library = ctypes.CDLL(str(capture_build.library()))
                library.specshard_capture_eval  # noqa: B018 — fail here, into the fallback
                _library = library
            except (SpecshardError, OSError, AttributeError) as exc:
                _library_error = str(exc) or type(exc).__name__
                log.warning("stage output is captured by the Python fallback (~1 ms of "
                            "Python per decode): %s", _library_error)
    return _library


def make_capture(out_name: bytes, n_embd: int, max_rows: int,
                 kind: str | None = None) -> Capture:
    """The capture `kind` asks for (default `$SPECSHARD_CAPTURE`, else "c"); "c" falls
    back to Python when the C library cannot be had."""
    kind = kind or os.environ.get("SPECSHARD_CAPTURE") or "c"
    if kind not in KINDS:
        raise SpecshardError(f"unknown capture {kind!r} (SPECSHARD_CAPTURE): use c or python")
    library = c_library() if kind == "c" else None
    if library is not None:
        return CCapture(library, out_name, n_embd, max_rows)
    return PythonCapture(out_name, n_embd, max_rows)
