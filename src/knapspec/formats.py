"""GGUF block types held as they are: each type's block layout, a dequantising reference (numpy),
and the repacking into the tiles that the native quantized products read (``native/quant.h``).

A quantized weight ``W [N, K]`` is stored in the file row by row, each row a run of blocks along K
(32 weights per block, 256 for the K-quants). The kernels want the same bytes in another order:
16 rows side by side, so that one 64-byte SIMD register holds 4 consecutive bytes of each of 16
rows (one lane per output row, ``vpdpbusd`` on 4 bytes at a time, no horizontal sums). A *tile*
is 16 rows; it holds, for each block along K in order,

- a *head*: the block's scales, lane by lane (``[16] fp16`` per scale), all blocks' heads first,
  padded to a multiple of 64 bytes;
- a *body*: the block's quantized values (and the K-quants' sub-block scales), 4 bytes per lane
  per 64-byte row, in a multiple of 64 bytes.

The repacking only moves bytes (no value is recomputed), except where a byte order that the
kernel can unpack cheaply needs it: Q8_0 values are stored as ``q + 128`` (unsigned, for
``vpdpbusd``; the kernel subtracts ``128 * sum(x)``), Q5_0's fifth bits are regrouped, and
Q4_K's 6-bit packed scales are stored one per byte. A tile takes the file's bytes for its 16 rows
(Q4_K: +3%), so a model keeps one copy of each weight, the size of the file's.

Each byte of a tile belongs to one row (lane); :meth:`QuantWeight.put_rows` uses that to fill a
row subset (the draft vocabulary's lm_head) one row at a time. Rows past N in the last tile are
zero.

This module knows no kernel and no model; it decides nothing about which kernel runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

LANES = 16            # rows per tile (outputs per 64-byte SIMD register of 32-bit lanes)


class QType(enum.IntEnum):
    """The block types with a native kernel; values are GGML's type ids (the kernels' codes)."""
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14


@dataclass(frozen=True)
class BlockType:
    qtype: QType
    block: int           # weights per block along K
    nbytes: int          # bytes per block in the file
    head: int            # tile head bytes per block (16 lanes of scales)
    body: int            # tile body bytes per block (a multiple of 64)

    @property
    def name(self) -> str:
        return self.qtype.name

    def tile_bytes(self, k: int) -> int:
        nb = k // self.block
        return -(-nb * self.head // 64) * 64 + nb * self.body

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.nbytes


BLOCK_TYPES: dict[QType, BlockType] = {b.qtype: b for b in (
    BlockType(QType.Q4_0, 32, 18, 32, 256),
    BlockType(QType.Q4_1, 32, 20, 64, 256),
    BlockType(QType.Q5_0, 32, 22, 32, 320),
    BlockType(QType.Q8_0, 32, 34, 32, 512),
    BlockType(QType.Q4_K, 256, 144, 64, 2304),
    BlockType(QType.Q6_K, 256, 210, 32, 3328),
)}


def block_type(ggml_type: int) -> BlockType | None:
    """The block type of a GGML type id, or None when it has no native kernel."""
    try:
        return BLOCK_TYPES[QType(int(ggml_type))]
    except ValueError:
        return None


# ---- the dequantising reference ------------------------------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    """fp16 from pairs of bytes ``[..., 2]`` -> float32 ``[...]``."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and mins ``[..., 12]`` -> ``(sc, m)`` uint8 ``[..., 8]``."""
    s = s.astype(np.uint8)
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


def dequantize(raw: np.ndarray, qtype: QType, k: int) -> np.ndarray:
    """The reference: rows of blocks ``raw uint8 [N, row_bytes]`` -> float32 ``[N, K]``."""
    bt = BLOCK_TYPES[QType(qtype)]
    n = raw.shape[0]
    nb = k // bt.block
    x = np.asarray(raw, dtype=np.uint8).reshape(n, nb, bt.nbytes)
    if bt.qtype in (QType.Q4_0, QType.Q4_1, QType.Q5_0):
        off = {QType.Q4_0: 2, QType.Q4_1: 4, QType.Q5_0: 6}[bt.qtype]
        qs = x[..., off:off + 16]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)     # [N, nb, 32]
        d = _f16(x[..., 0:2])[..., None]
        if bt.qtype is QType.Q4_1:
            return (d * q + _f16(x[..., 2:4])[..., None]).reshape(n, k)
        if bt.qtype is QType.Q5_0:
            qh = np.ascontiguousarray(x[..., 2:6]).view("<u4")                 # [N, nb, 1]
            q = q + 16 * ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)
            return (d * (q - 16)).reshape(n, k)
        return (d * (q - 8)).reshape(n, k)
    if bt.qtype is QType.Q8_0:
        q = x[..., 2:34].view(np.int8).astype(np.float32)
        return (_f16(x[..., 0:2])[..., None] * q).reshape(n, k)
    if bt.qtype is QType.Q4_K:
        d, dmin = _f16(x[..., 0:2]), _f16(x[..., 2:4])
        sc, m = _k_scales(x[..., 4:16])                                          # [N, nb, 8]
        qs = x[..., 16:144].reshape(n, nb, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, nb, 8, 32).astype(np.float32)
        w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]
        return w.reshape(n, k)
    # Q6_K: ql[128], qh[64], scales[16] (int8), d
    ql = x[..., 0:128].reshape(n, nb, 2, 2, 32)           # [half][a/b][32]
    qh = x[..., 128:192].reshape(n, nb, 2, 1, 32)
    sc = x[..., 192:208].view(np.int8).astype(np.float32).reshape(n, nb, 16)
    d = _f16(x[..., 208:210])
    lo = np.concatenate([ql & 15, ql >> 4], axis=3)       # [half][4 groups: a lo, b lo, a hi, b hi][32]
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    q = (lo | (hi << 4)).astype(np.float32) - 32          # [N, nb, 2, 4, 32] = weights in order
    scale = (d[..., None] * sc).reshape(n, nb, 2, 4, 2, 1)  # sub-blocks of 16
    return (scale * q.reshape(n, nb, 2, 4, 2, 16)).reshape(n, k)


# ---- repacking into tiles -------------------------------------------------------------------------

def _put_lanes(dst: np.ndarray, a: np.ndarray, t: int, nb: int, width: int) -> None:
    """Bytes ``a [T*16, nb, width]`` (``width`` per row and block, in runs of 4) into ``dst [T, nb,
    16*width]``: for each run of 4 bytes, the 16 rows side by side (moved as 4-byte words, 4x
    faster than byte by byte)."""
    words = (a if a.strides[-1] == 1 else np.ascontiguousarray(a)).view(np.uint32)
    out = dst.view(np.uint32).reshape(t, nb, width // 4, LANES)
    out[...] = words.reshape(t, LANES, nb, width // 4).transpose(0, 2, 3, 1)


def _put_bytes(dst: np.ndarray, a: np.ndarray, t: int, nb: int, width: int) -> None:
    """Bytes ``a [T*16, nb, width]`` one per lane into ``dst [T, nb, width*16]`` (byte i of the
    16 rows side by side)."""
    dst.reshape(t, nb, width, LANES)[...] = a.reshape(t, LANES, nb, width).transpose(0, 2, 3, 1)


def _put_scales(dst: np.ndarray, a: np.ndarray, t: int, nb: int, count: int) -> None:
    """fp16 scales ``a [T*16, nb, count*2]`` into ``dst [T, nb*count*32]`` (each scale's 16 lanes)."""
    dst.reshape(t, nb, count, LANES, 2)[...] = a.reshape(t, LANES, nb, count, 2).transpose(0, 2, 3, 1, 4)


@lru_cache(maxsize=1)
def _q5_bit_order() -> np.ndarray:
    """Q5_0's fifth bits regrouped: bit v of lane byte c = the file's bit ``16 (v & 1) + 4 (v >> 1)
    + c`` (vector v of the kernel: v = 2i low nibbles, 2i + 1 high nibbles of 4-byte run i)."""
    return np.array([[16 * (v & 1) + 4 * (v >> 1) + c for v in range(8)] for c in range(4)])


def _pack(raw: np.ndarray, bt: BlockType, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """``raw uint8 [T*16, row_bytes]`` -> tiles ``uint8 [T, tile_bytes]`` (into ``out``)."""
    rows = raw.shape[0]
    t, nb = rows // LANES, k // bt.block
    x = raw.reshape(rows, nb, bt.nbytes)
    if out is None:
        out = np.empty((t, bt.tile_bytes(k)), dtype=np.uint8)
    hb = nb * bt.head
    hpad = bt.tile_bytes(k) - nb * bt.body
    out[:, hb:hpad] = 0
    head, body = out[:, :hb], out[:, hpad:].reshape(t, nb, bt.body)
    q = bt.qtype
    if q is QType.Q4_0:
        _put_scales(head, x[..., 0:2], t, nb, 1)
        _put_lanes(body, x[..., 2:18], t, nb, 16)
    elif q is QType.Q4_1:
        _put_scales(head, x[..., 0:4], t, nb, 2)
        _put_lanes(body, x[..., 4:20], t, nb, 16)
    elif q is QType.Q5_0:
        _put_scales(head, x[..., 0:2], t, nb, 1)
        bits = np.unpackbits(x[..., 2:6], axis=-1, bitorder="little")          # [rows, nb, 32]
        qh = np.packbits(bits[..., _q5_bit_order()], axis=-1, bitorder="little")[..., 0]  # [rows, nb, 4]
        _put_lanes(body[..., :64], qh, t, nb, 4)
        _put_lanes(body[..., 64:], x[..., 6:22], t, nb, 16)
    elif q is QType.Q8_0:
        _put_scales(head, x[..., 0:2], t, nb, 1)
        _put_lanes(body, x[..., 2:34] ^ np.uint8(0x80), t, nb, 32)
    elif q is QType.Q4_K:
        _put_scales(head, x[..., 0:4], t, nb, 2)
        sc, m = _k_scales(x[..., 4:16])                                          # [rows, nb, 8]
        _put_bytes(body[..., :256], np.concatenate([sc, m], axis=-1), t, nb, 16)
        _put_lanes(body[..., 256:], x[..., 16:144], t, nb, 128)
    else:  # Q6_K
        _put_scales(head, x[..., 208:210], t, nb, 1)
        _put_bytes(body[..., :256], x[..., 192:208], t, nb, 16)
        _put_lanes(body[..., 256:2304], x[..., 0:128], t, nb, 128)
        _put_lanes(body[..., 2304:], x[..., 128:192], t, nb, 64)
    return out


@lru_cache(maxsize=32)
def _lane_map(qtype: QType, k: int) -> np.ndarray:
    """For each byte of a tile, the row (lane) it belongs to, or -1 (padding): int8
    ``[tile_bytes]``. Found by packing probes: row j's bytes all set."""
    bt = BLOCK_TYPES[qtype]
    rb = bt.row_bytes(k)
    zero = _pack(np.zeros((LANES, rb), dtype=np.uint8), bt, k)[0]
    lanes = np.full(zero.shape, -1, dtype=np.int8)
    for j in range(LANES):
        probe = np.zeros((LANES, rb), dtype=np.uint8)
        probe[j] = 0xFF
        changed = _pack(probe, bt, k)[0] != zero
        assert not (changed & (lanes >= 0)).any(), "a byte of a tile belongs to two rows"
        lanes[changed] = j
    return lanes


def pack(raw: np.ndarray, qtype: QType, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of blocks ``raw uint8 [N, row_bytes]`` -> the kernels' tiles ``uint8 [ceil(N/16),
    tile_bytes]`` (a torch tensor: 64-byte aligned), written into ``out`` if given."""
    bt = BLOCK_TYPES[QType(qtype)]
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if k % bt.block or raw.shape[1] != bt.row_bytes(k):
        raise ValueError(f"a {bt.name} weight needs rows of {bt.block}-weight blocks: got K={k} "
                         f"and {raw.shape[1]} bytes per row")
    t = -(-n // LANES)
    if out is None:
        out = torch.empty((t, bt.tile_bytes(k)), dtype=torch.uint8)
    assert out.shape == (t, bt.tile_bytes(k)) and out.dtype == torch.uint8 and out.is_contiguous()
    step = max(1, (2 << 20) // max(1, LANES * raw.shape[1]))       # ~2 MB of rows at a time
    o = out.numpy()
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        chunk = raw[t0 * LANES:min(n, t1 * LANES)]
        if chunk.shape[0] < (t1 - t0) * LANES:
            chunk = np.concatenate([chunk, np.zeros(((t1 - t0) * LANES - chunk.shape[0], chunk.shape[1]),
                                                    dtype=np.uint8)])
        _pack(chunk, bt, k, o[t0:t1])
    return out


class QuantWeight:
    """A weight ``[N, K]`` in a GGUF block type, held in the kernels' tiles (``tiles``), with an
    optional float32 ``bias [N]``. ``put_rows`` fills rows of a preallocated one (row subsets)."""

    __slots__ = ("__weakref__", "bias", "btype", "k", "n", "tiles")

    def __init__(self, btype: BlockType, n: int, k: int, tiles: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        assert tiles.dtype == torch.uint8 and tiles.shape == (-(-n // LANES), btype.tile_bytes(k))
        self.btype, self.n, self.k, self.tiles = btype, n, k, tiles
        self.bias = bias

    @classmethod
    def from_raw(cls, raw: np.ndarray, qtype: QType, k: int, packer: Callable | None = None) -> QuantWeight:
        """``packer``: another implementation of :func:`pack` (the native one), else this module's."""
        return cls(BLOCK_TYPES[QType(qtype)], raw.shape[0], k, (packer or pack)(raw, qtype, k))

    @classmethod
    def stacked(cls, parts: list[np.ndarray], qtype: QType, k: int, packer: Callable | None = None) -> QuantWeight:
        """The rows of several tensors of one block type in one weight, each packed straight into
        its share of the tiles (every part but the last a whole number of tiles)."""
        bt = BLOCK_TYPES[QType(qtype)]
        assert all(p.shape[0] % LANES == 0 for p in parts[:-1]), "parts must fill whole tiles"
        n = sum(p.shape[0] for p in parts)
        tiles = torch.empty((-(-n // LANES), bt.tile_bytes(k)), dtype=torch.uint8)
        t0 = 0
        for p in parts:
            t1 = t0 + -(-p.shape[0] // LANES)
            (packer or pack)(p, qtype, k, out=tiles[t0:t1])
            t0 = t1
        return cls(bt, n, k, tiles)

    @classmethod
    def empty(cls, qtype: QType, n: int, k: int) -> QuantWeight:
        bt = BLOCK_TYPES[QType(qtype)]
        zero = pack(np.zeros((LANES, bt.row_bytes(k)), dtype=np.uint8), qtype, k)    # all rows 0
        return cls(bt, n, k, zero.expand(-(-n // LANES), -1).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def qtype(self) -> QType:
        return self.btype.qtype

    def nbytes(self) -> int:
        return self.tiles.numel()

    def put_rows(self, rows: np.ndarray | list[int], raw: np.ndarray) -> None:
        """Set rows ``rows`` (indices < N) from the file's bytes ``raw [len(rows), row_bytes]``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return
        lanes = _lane_map(self.qtype, self.k)
        packed = pack(np.asarray(raw, dtype=np.uint8).reshape(rows.size, -1), self.qtype, self.k).numpy()
        dst = self.tiles.numpy()
        src_idx = [np.flatnonzero(lanes == j) for j in range(LANES)]
        for i, r in enumerate(rows.tolist()):
            idx_src, idx_dst = src_idx[i % LANES], src_idx[r % LANES]
            dst[r // LANES, idx_dst] = packed[i // LANES, idx_src]

    def copy_rows(self, rows: np.ndarray | list[int], src: QuantWeight, src_rows: np.ndarray | list[int]) -> None:
        """Set rows ``rows`` to rows ``src_rows`` of ``src`` (same block type and K), tile bytes
        to tile bytes."""
        assert src.qtype is self.qtype and src.k == self.k, (src, self)
        lanes = _lane_map(self.qtype, self.k)
        idx = [np.flatnonzero(lanes == j) for j in range(LANES)]
        dst, s = self.tiles.numpy(), src.tiles.numpy()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        src_rows = np.asarray(src_rows, dtype=np.int64).reshape(-1)
        n = rows.size
        if (n and n % LANES == 0 and rows[0] % LANES == 0 and src_rows[0] % LANES == 0
                and np.array_equal(rows, rows[0] + np.arange(n))
                and np.array_equal(src_rows, src_rows[0] + np.arange(n))):
            # whole tiles in order (the first rows of a vocabulary ranked by id): a block copy
            # (the byte gather below takes ~5 us a row: 45 ms for 8,192 rows of SmolLM2's head)
            r0, s0 = rows[0] // LANES, src_rows[0] // LANES
            dst[r0:r0 + n // LANES] = s[s0:s0 + n // LANES]
            return
        if rows.size < 64:             # a few rows (the draft vocabulary's appends): one by one
            for r, t in zip(rows.tolist(), src_rows.tolist()):
                dst[r // LANES, idx[r % LANES]] = s[t // LANES, idx[t % LANES]]
            return
        # many rows: gathered by source lane into rows of lane bytes, scattered by destination lane
        tmp = np.empty((rows.size, idx[0].size), dtype=np.uint8)
        for j in range(LANES):
            sel = np.flatnonzero(src_rows % LANES == j)
            if sel.size:
                tmp[sel] = s[(src_rows[sel] // LANES)[:, None], idx[j][None, :]]
        for j in range(LANES):
            sel = np.flatnonzero(rows % LANES == j)
            if sel.size:
                dst[(rows[sel] // LANES)[:, None], idx[j][None, :]] = tmp[sel]

    def head_rows(self, n: int) -> QuantWeight:
        """The first ``n`` rows (a view: the same tiles)."""
        assert 0 < n <= self.n
        return QuantWeight(self.btype, n, self.k, self.tiles[:-(-n // LANES)])

    def grown(self, n: int) -> QuantWeight:
        """A copy with room for ``n >= self.n`` rows (the new rows zero)."""
        out = QuantWeight.empty(self.qtype, n, self.k)
        out.tiles[:self.tiles.shape[0]] = self.tiles
        return out

    def __repr__(self) -> str:
        return f"QuantWeight({self.btype.name}, [{self.n}, {self.k}])"


def concat_raw(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of several tensors of one block type, stacked (the fused qkv and gate/up weights)."""
    return np.concatenate([np.asarray(p, dtype=np.uint8) for p in parts], axis=0)


# ---- float tensors from numpy --------------------------------------------------------------------

_NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def float_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Float values ``a`` as a CPU tensor of ``dtype``, rounded as ``Tensor.to`` rounds (to nearest,
    ties to even; a NaN stays a NaN, its payload aside), converted by numpy: bfloat16 is a float32's
    upper half after rounding. Loading and the rotary tables use it instead of torch's conversion kernels,
    whose code (about 2 MiB) would otherwise stay resident in every process (tested bit for bit
    against ``Tensor.to``). The tensor owns new memory, never ``a``'s."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == torch.bfloat16:
        u = a.view(np.uint32)
        r = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
        r[np.isnan(a)] = 0x7FC0
        return torch.from_numpy(r).view(torch.bfloat16)
    np_dtype = _NUMPY_FLOATS.get(dtype)
    if np_dtype is None:
        raise ValueError(f"float_tensor makes float16, bfloat16, float32 or float64 tensors, not {dtype}")
    with np.errstate(over="ignore"):                  # out of float16's range: inf, as torch gives
        return torch.from_numpy(a.astype(np_dtype))               # a copy: `a` may map a file
