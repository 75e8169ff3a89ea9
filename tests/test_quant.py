"""GGUF block types (``formats.py``) and the native quantized products (``native/quant.h``):
the dequantising reference against gguf's, the tiles against the reference, every kernel against
dequantise-then-matmul on random blocks (odd shapes, zero and extreme scales), and each row's
result bit-identical alone or within a batch of 1-16 rows, on both ISA paths."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from knapspec.formats import BLOCK_TYPES, LANES, QType, QuantWeight, dequantize

ALL = sorted(BLOCK_TYPES)

# where each block type keeps its fp16 scales (byte offsets in a block)
_SCALES = {QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q8_0: (0,),
           QType.Q4_K: (0, 2), QType.Q6_K: (208,)}


def random_blocks(qtype: QType, n: int, k: int, rng: np.random.Generator, *, scale: float = 0.05,
                  extreme: bool = False) -> np.ndarray:
    """Rows of random blocks with sane fp16 scales (``extreme``: some zero, some the largest and
    smallest fp16 magnitudes): ``uint8 [n, row_bytes]``."""
    bt = BLOCK_TYPES[qtype]
    nb = k // bt.block
    raw = rng.integers(0, 256, size=(n, nb, bt.nbytes), dtype=np.uint8)
    for off in _SCALES[qtype]:
        s = (rng.normal(size=(n, nb)) * scale).astype(np.float16)
        if extreme:
            pick = rng.integers(0, 5, size=(n, nb))
            s[pick == 0] = 0.0
            s[pick == 1] = np.float16(6.0e4) * np.sign(rng.normal(size=(n, nb))[pick == 1])
            s[pick == 2] = np.float16(6e-8)
        raw[..., off:off + 2] = s.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * bt.nbytes)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_reference_dequantiser_equals_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    for extreme in (False, True):
        raw = random_blocks(qtype, 7, BLOCK_TYPES[qtype].block * 3, rng, extreme=extreme)
        ours = dequantize(raw, qtype, BLOCK_TYPES[qtype].block * 3)
        theirs = gguf_dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_tiles_keep_every_byte_of_each_row_and_rows_can_be_put_one_by_one(qtype):
    """Rows written one by one into an empty weight (any order, any tile) give the tiles of
    the whole matrix packed at once."""
    rng = np.random.default_rng(1)
    bt = BLOCK_TYPES[qtype]
    k, n = bt.block * 2, 37                          # 37 rows: a partial last tile
    raw = random_blocks(qtype, n, k, rng)
    whole = QuantWeight.from_raw(raw, qtype, k)
    assert whole.tiles.shape == (3, bt.tile_bytes(k))
    assert whole.nbytes() <= 3 * LANES * bt.row_bytes(k) * (1.03 if qtype is QType.Q4_K else 1) + 64 * 3
    one = QuantWeight.empty(qtype, n, k)
    order = rng.permutation(n)
    for i in range(0, n, 5):
        one.put_rows(order[i:i + 5], raw[order[i:i + 5]])
    assert np.array_equal(one.tiles.numpy(), whole.tiles.numpy())


def test_real_tensors_dequantise_like_gguf(real_ggufs):
    """Every quantized type of the two real files (all but Q4_0), on the first rows of one tensor
    each."""
    seen = set()
    for path in real_ggufs:
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            if t.tensor_type.value in seen or t.tensor_type.value not in {int(q) for q in QType}:
                continue
            seen.add(t.tensor_type.value)
            raw = np.asarray(t.data).reshape(int(t.shape[1]) if len(t.shape) > 1 else 1, -1)[:64]
            np.testing.assert_array_equal(dequantize(raw, QType(t.tensor_type.value), int(t.shape[0])),
                                          gguf_dequantize(raw, t.tensor_type))
    assert seen == {int(q) for q in QType} - {int(QType.Q4_0)}
