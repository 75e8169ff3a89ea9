"""A GGUF file, memory-mapped: its metadata and its tensors as views of the mapping (no copy).

GGUF (llama.cpp's container): a header (magic ``GGUF``, version 2 or 3, tensor and key counts),
typed key/value metadata, tensor descriptions (name, shape with the fastest dimension first, GGML
type, offset), then the data, aligned to ``general.alignment`` (32 by default). Parsing here is
lazy where it matters: arrays of strings (a tokenizer's 50k-250k tokens and merges) are skipped
over and read only when asked for, so opening a model file takes milliseconds, where gguf's
reader builds a numpy view per element (seconds).

:meth:`GGUFFile.release` tells the kernel that a range of the mapping will not be read again
(``MADV_DONTNEED``): the pages stay in the page cache, but leave this process's resident set, so
a weight repacked into the kernels' tiles is resident once.

This module knows no model and no block layout (``formats.py``).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f",
           _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}
_NUMPY = {_U8: np.uint8, _I8: np.int8, _U16: np.uint16, _I16: np.int16, _U32: np.uint32, _I32: np.int32,
          _F32: np.float32, _BOOL: np.bool_, _U64: np.uint64, _I64: np.int64, _F64: np.float64}

# GGML types: (weights per block, bytes per block) for the float types; the block types' sizes
# come from gguf's table (every type it knows)
_FLOAT_TYPES = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", None)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # GGUF order: the fastest (row) dimension first
    ggml_type: int
    offset: int                 # from the start of the file
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[0]

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


_NAMES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
          11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def type_name(ggml_type: int) -> str:
    if ggml_type in _NAMES:
        return _NAMES[ggml_type]
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# (weights, bytes) per block of the common block types; the others from gguf's table
_BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84), 11: (256, 110),
           12: (256, 144), 13: (256, 176), 14: (256, 210)}


def _block_size(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _BLOCKS:
        return _BLOCKS[ggml_type]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGML tensor type {ggml_type}") from None


class _Lazy:
    """An array of strings in the metadata, read when asked for."""

    __slots__ = ("count", "offset")

    def __init__(self, offset: int, count: int) -> None:
        self.offset, self.count = offset, count


class GGUFFile:
    """``GGUFFile(path)``: ``.metadata`` (key -> value; string arrays lazily), ``.tensors``
    (name -> :class:`TensorInfo`), ``.data(name)`` (a read-only uint8 or float view)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF model file ({e})") from None
        self._buf = memoryview(self._mm)
        try:
            self._parse()
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
            self.close()
            raise ValueError(f"{self.path} is not a readable GGUF model file ({e}); it may be truncated "
                             "or corrupt: re-download it or point --model at a valid .gguf") from None

    # ---- parsing ------------------------------------------------------------------------------------
    def _read(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self._read(_SCALAR[vtype])
        if vtype == _STR:
            return self._str()
        if vtype == _ARR:
            etype, count = self._read("<I"), self._read("<Q")
            if etype in _NUMPY:
                a = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
                self._pos += a.nbytes
                return a
            if etype == _STR:            # skipped now, read on demand
                lazy = _Lazy(self._pos, count)
                for _ in range(count):
                    n = struct.unpack_from("<Q", self._buf, self._pos)[0]
                    self._pos += 8 + n
                return lazy
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        self._pos = 0
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = tuple(int(self._read("<Q")) for _ in range(self._read("<I")))
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, t, off in infos:
            n = int(np.prod(dims)) if dims else 1
            if t in _FLOAT_TYPES:
                nbytes = n * (4 if t == 0 else 2)
            else:
                block, size = _block_size(t)
                nbytes = n // block * size
            if start + off + nbytes > len(self._buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = TensorInfo(name, dims, t, start + off, nbytes)

    # ---- access ---------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (an array of strings as a list; numbers as Python scalars)."""
        v = self.metadata.get(key, default)
        if isinstance(v, _Lazy):
            v = self.strings(key)
        elif isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        return v

    def strings(self, key: str) -> list[str]:
        lazy = self.metadata[key]
        assert isinstance(lazy, _Lazy), f"{key} is not an array of strings"
        out, pos, buf = [], lazy.offset, self._buf
        for _ in range(lazy.count):
            n = struct.unpack_from("<Q", buf, pos)[0]
            out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"))
            pos += 8 + n
        return out

    def array_len(self, key: str) -> int:
        v = self.metadata[key]
        return v.count if isinstance(v, _Lazy) else len(v)

    def data(self, name: str) -> np.ndarray:
        """The tensor's bytes, read-only, without a copy: ``uint8 [rows, row_bytes]`` for a block
        type, ``float32``/``float16 [rows, cols]`` (or ``[cols]``) for a float type."""
        t = self.tensors[name]
        if t.ggml_type in _FLOAT_TYPES and _FLOAT_TYPES[t.ggml_type][1] is not None:
            a = np.frombuffer(self._buf, dtype=_FLOAT_TYPES[t.ggml_type][1], count=int(np.prod(t.shape)),
                              offset=t.offset)
            return a.reshape(t.rows, t.cols) if len(t.shape) > 1 else a
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(t.rows, -1)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (they stay cached)."""
        t = self.tensors[name]
        self.release_bytes(t.offset, t.nbytes)

    def release_bytes(self, offset: int, nbytes: int) -> None:
        """Drop the pages that lie wholly in bytes ``offset .. offset+nbytes-1`` of the file from
        this process's resident set (they stay cached; a later read maps them again)."""
        page = mmap.PAGESIZE
        a, b = -(-offset // page) * page, (offset + nbytes) // page * page
        if b > a and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def release_all(self) -> None:
        """Drop every page of the file from this process's resident set (they stay cached; a
        later read maps them again)."""
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, 0, len(self._mm) // mmap.PAGESIZE * mmap.PAGESIZE)

    def close(self) -> None:
        try:
            self._buf.release()
            self._mm.close()
        except (BufferError, ValueError):      # views still alive: the mapping goes with them
            pass
