"""A fast GGUF reader and writer for headers.

The `gguf` package's reader parses every vocabulary string into numpy views (7.7 s for
the demo target's header on the 2-core CI machine); this one skips array bodies and
keeps each key/value's raw bytes, so a stage cut copies metadata verbatim.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from cluster.errors import SpecshardError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dimension
    type: GGMLQuantizationType
    offset: int  # absolute, in the file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.shape[0] // block * size


@dataclass
class GGUFHeader:
    path: Path
    version: int
    values: dict[str, object]  # scalars and strings decoded; arrays as their length
    raw_kv: dict[str, bytes]  # each key/value exactly as stored (key included)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


class _Cursor:
    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> object:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise SpecshardError(f"{self.path} has a truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = int(self.take("<Q"))  # type: ignore[call-overload]
        if self.pos + n > len(self.buf):
            raise SpecshardError(f"{self.path} has a truncated GGUF header")
        text = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def skip_array(self, item: GGUFValueType, count: int) -> None:
        if item == GGUFValueType.STRING:
            for _ in range(count):
                length = int(self.take("<Q"))  # type: ignore[call-overload]
                self.pos += length
        elif item in _SCALAR:
            self.pos += count * struct.calcsize(_SCALAR[item])
        else:
            raise SpecshardError(f"{self.path}: nested GGUF arrays are not supported")

    def value(self, vtype: GGUFValueType) -> object:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item = GGUFValueType(int(self.take("<I")))  # type: ignore[call-overload]
            count = int(self.take("<Q"))  # type: ignore[call-overload]
            self.skip_array(item, count)
            return count
        return self.take(_SCALAR[vtype])


def read_header(path: Path) -> GGUFHeader:
    if not path.is_file():
        raise SpecshardError(f"model file not found: {path}")
    # Headers of real models are a few MiB (vocabulary + merges); read more if needed.
    size = 1 << 24
    while True:
        with open(path, "rb") as f:
            buf = f.read(size)
        if buf[:4] != MAGIC:
            raise SpecshardError(f"{path} is not a GGUF file (bad magic)")
        try:
            return _parse(path, buf)
        except SpecshardError:
            if len(buf) < size:
                raise
            size *= 4


def _parse(path: Path, buf: bytes) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.pos = 4
    try:
        version = int(cur.take("<I"))  # type: ignore[call-overload]
        n_tensors = int(cur.take("<Q"))  # type: ignore[call-overload]
        n_kv = int(cur.take("<Q"))  # type: ignore[call-overload]
        header = GGUFHeader(path=path, version=version, values={}, raw_kv={})
        for _ in range(n_kv):
            start = cur.pos
            key = cur.string()
            vtype = GGUFValueType(int(cur.take("<I")))  # type: ignore[call-overload]
            header.values[key] = cur.value(vtype)
            header.raw_kv[key] = buf[start:cur.pos]
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = int(cur.take("<I"))  # type: ignore[call-overload]
            shape = tuple(int(cur.take("<Q")) for _ in range(n_dims))  # type: ignore[call-overload]
            ttype = GGMLQuantizationType(int(cur.take("<I")))  # type: ignore[call-overload]
            infos.append((name, shape, ttype, int(cur.take("<Q"))))  # type: ignore[call-overload]
    except ValueError as exc:  # unknown enum values: not a GGUF we understand
        raise SpecshardError(f"{path} has a corrupt GGUF header: {exc}") from None
    if version not in (2, 3):
        raise SpecshardError(f"{path}: GGUF version {version} is not supported")
    align = int(header.values.get("general.alignment", DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
    header.data_offset = -(-cur.pos // align) * align
    header.tensors = [TensorInfo(n, s, t, header.data_offset + o) for n, s, t, o in infos]
    file_size = path.stat().st_size
    end = max((t.offset + t.n_bytes for t in header.tensors), default=header.data_offset)
    if end > file_size:
        raise SpecshardError(
            f"{path} is truncated: tensor data ends at byte {end}, the file has {file_size}")
    return header


def encode_kv(key: str, vtype: GGUFValueType, value: object) -> bytes:
    """One scalar or string key/value in GGUF encoding."""
    out = _encode_string(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return out + _encode_string(str(value))
    return out + struct.pack(_SCALAR[vtype], value)


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its info and where its bytes come from."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    n_bytes: int
    source_offset: int | None = None  # copy n_bytes from the source file here
    data: bytes | None = None  # or these bytes


def write_gguf(out: BinaryIO, kv: list[bytes], tensors: list[OutTensor],
               alignment: int = DEFAULT_ALIGNMENT) -> list[int]:
    """Write header and tensor infos; return each tensor's absolute data offset."""
    head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for item in kv:
        head += item
    relative, offsets = 0, []
    for t in tensors:
        head += _encode_string(t.name) + struct.pack("<I", len(t.shape))
        head += b"".join(struct.pack("<Q", d) for d in t.shape)
        head += struct.pack("<IQ", int(t.type), relative)
        offsets.append(relative)
        relative += -(-t.n_bytes // alignment) * alignment
    data_offset = -(-len(head) // alignment) * alignment
    out.write(head + b"\0" * (data_offset - len(head)))
    return [data_offset + o for o in offsets]
