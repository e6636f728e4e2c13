"""The few libggml-base functions a stage needs that llama-cpp-python does not bind."""

import ctypes
from pathlib import Path

import llama_cpp

from cluster.model_info import RowToFloat

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


class _TypeTraits(ctypes.Structure):
    """ggml.h's `struct ggml_type_traits`."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_get_type_traits = _ggml_base.ggml_get_type_traits
_get_type_traits.argtypes = [ctypes.c_int]
_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def row_to_float(ggml_type: int) -> RowToFloat | None:
    """ggml's dequantizer for `ggml_type` (`to_float(src, dst, n)`), the one llama.cpp's
    CPU get_rows runs; None where ggml has none (f32 rows are read as they are)."""
    address = _get_type_traits(ggml_type).contents.to_float
    return _ToFloat(address) if address else None


LIB_DIR = _LIB_DIR
