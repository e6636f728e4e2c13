"""The few libggml-base functions a stage needs that llama-cpp-python does not bind."""

import ctypes
from pathlib import Path

import llama_cpp

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"
_ggml_base = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))

ggml_get_name = _ggml_base.ggml_get_name
ggml_get_name.argtypes = [ctypes.c_void_p]
ggml_get_name.restype = ctypes.c_char_p

ggml_nbytes = _ggml_base.ggml_nbytes
ggml_nbytes.argtypes = [ctypes.c_void_p]
ggml_nbytes.restype = ctypes.c_size_t

ggml_backend_tensor_get = _ggml_base.ggml_backend_tensor_get
ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_size_t]
ggml_backend_tensor_get.restype = None

LIB_DIR = _LIB_DIR
