"""GGUF block types (``formats.py``) and the native quantized products (``native/quant.h``):
the dequantising reference against gguf's, the tiles against the reference, every kernel against
dequantise-then-matmul on random blocks (odd shapes, zero and extreme scales), and each row's
result bit-identical alone or within a batch of 1-16 rows, on both ISA paths."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from conftest import random_blocks
from knapspec.formats import BLOCK_TYPES, LANES, QType, QuantWeight, dequantize

ALL = sorted(BLOCK_TYPES)

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


# ---- the native products ----------------------------------------------------------------------------

def _need_kernels():
    from knapspec import native
    why = native.quant_available()
    if why is not None:
        pytest.skip(f"native quantized products unavailable here: {why}")
    return native


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """Each test below runs on both instruction-set paths (the AVX2 path forced on this CPU)."""
    native = _need_kernels()
    from knapspec.native import _ISAS, _cpu_flags
    if not all(f in _cpu_flags() for f in _ISAS[request.param]):
        pytest.skip(f"this CPU lacks {request.param}")
    native.set_isa(request.param)
    yield request.param
    native.set_isa(None)


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """The kernels' activation quantization, in numpy: per row and 32-block, d = max|x| / 127 and
    q = round-half-even(x * (127 / max|x|)) in float32; returns the dequantised activations d * q."""
    x = np.asarray(x, dtype=np.float32)
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    ok = amax >= np.float32(1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(ok, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint((b * iscale).astype(np.float32))
    d = np.where(ok, amax / np.float32(127), np.float32(0)).astype(np.float32)
    return (d.astype(np.float64) * q).reshape(x.shape)


def _check_product(native, qtype, n, k, rows, rng, *, extreme=False, x_scale=1.0):
    import torch
    raw = random_blocks(qtype, n, k, rng, extreme=extreme)
    w = QuantWeight.from_raw(raw, qtype, k)
    p = native.QPacked(w)
    x = torch.from_numpy((rng.standard_normal((rows, k)) * x_scale).astype(np.float32))
    x[0, :32] = 0.0                                            # a zero block
    y = native.quant_linear(x, p).numpy()
    ref = dequantize(raw, qtype, k).astype(np.float64)
    xd = quantize_activations(x.numpy())
    want = xd @ ref.T
    bound = (np.abs(xd) @ np.abs(ref).T) * 1e-6 * (k // 32) + 1e-30
    err = np.abs(y - want)
    assert (err <= bound).all(), (qtype.name, n, k, rows, float((err / bound).max()))
    return w, p, x, y


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_dequantised_rows_equal_the_reference(qtype):
    import torch
    native = _need_kernels()
    rng = np.random.default_rng(2)
    bt = BLOCK_TYPES[qtype]
    k = bt.block * 3
    raw = random_blocks(qtype, 35, k, rng, extreme=True)
    w = QuantWeight.from_raw(raw, qtype, k)
    rows = torch.tensor([[0, 34], [17, 16], [5, 33]])
    got = native.dequant_rows(w, rows)
    want = dequantize(raw, qtype, k)[rows.numpy()]
    np.testing.assert_array_equal(got.numpy(), want)
    bf = native.dequant_rows(w, rows, torch.bfloat16)
    assert torch.equal(bf, torch.from_numpy(want).to(torch.bfloat16))
    for bad in ([[0, 35]], [[-1]]):
        with pytest.raises(IndexError, match="out of range for a weight of 35 rows"):
            native.dequant_rows(w, torch.tensor(bad))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_products_equal_dequantise_then_matmul(qtype, isa):
    """Odd shapes (rows of a partial tile, inner sizes of an odd number of blocks), zero and
    extreme scales, 1-16 rows of activations, against float64 products of the dequantised
    weights and the kernels' quantized activations."""
    native = _need_kernels()
    rng = np.random.default_rng(3)
    b = BLOCK_TYPES[qtype].block
    for n, k, rows, extreme in ((37, b * 3, 5, False), (16, b, 1, True), (5, b * 7 if b == 32 else b * 2, 16, True),
                                (50, b * 2, 9, False)):
        _check_product(native, qtype, n, k, rows, rng, extreme=extreme)
    _check_product(native, qtype, 20, b * 2, 3, rng, x_scale=1e6)       # large activations
    _check_product(native, qtype, 20, b * 2, 3, rng, x_scale=1e-20)     # tiny activations


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_a_row_gives_the_same_bits_alone_or_in_a_batch_of_up_to_16(qtype, isa):
    import torch
    native = _need_kernels()
    rng = np.random.default_rng(4)
    b = BLOCK_TYPES[qtype].block
    raw = random_blocks(qtype, 70, b * 3, rng)
    p = native.QPacked(QuantWeight.from_raw(raw, qtype, b * 3))
    x = torch.from_numpy(rng.standard_normal((16, b * 3)).astype(np.float32))
    alone = torch.cat([native.quant_linear(x[i:i + 1], p) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(native.quant_linear(x[:m], p), alone[:m]), m
        assert torch.equal(native.quant_linear(x[16 - m:], p), alone[16 - m:]), m
    xb = x.to(torch.bfloat16)
    alone_b = torch.cat([native.quant_linear(xb[i:i + 1], p) for i in range(16)])
    assert alone_b.dtype == torch.bfloat16
    for m in (2, 7, 16):
        assert torch.equal(native.quant_linear(xb[:m], p), alone_b[:m]), m
    assert torch.equal(native.quant_linear(xb, p, torch.float32).to(torch.bfloat16), alone_b)


def test_both_instruction_sets_give_the_same_bits():
    """AVX2 and AVX-512 compute the same integers and the same float operations in order."""
    import torch
    native = _need_kernels()
    from knapspec.native import _ISAS, _cpu_flags
    if not all(f in _cpu_flags() for f in _ISAS["avx512"]):
        pytest.skip("this CPU lacks AVX-512 VNNI")
    rng = np.random.default_rng(5)
    try:
        for qtype in ALL:
            b = BLOCK_TYPES[qtype].block
            p = native.QPacked(QuantWeight.from_raw(random_blocks(qtype, 40, b * 2, rng, extreme=True), qtype, b * 2))
            x = torch.from_numpy(rng.standard_normal((6, b * 2)).astype(np.float32))
            out = {}
            for name in ("avx512", "avx2"):
                native.set_isa(name)
                out[name] = native.quant_linear(x, p)
            assert torch.equal(out["avx512"], out["avx2"]), qtype.name
    finally:
        native.set_isa(None)


def test_one_product_over_parts_of_different_block_types_with_a_bias(isa):
    import torch
    native = _need_kernels()
    rng = np.random.default_rng(6)
    k = 256
    parts, raws = [], []
    for qtype, n in ((QType.Q5_0, 48), (QType.Q8_0, 21), (QType.Q4_K, 32), (QType.Q6_K, 16)):
        raws.append((qtype, random_blocks(qtype, n, k, rng)))
        parts.append(QuantWeight.from_raw(raws[-1][1], qtype, k))
    bias = torch.randn(sum(w.n for w in parts))
    p = native.QPacked(parts, bias)
    x = torch.randn(3, k)
    y = native.quant_linear(x, p)
    pieces = [native.quant_linear(x, native.QPacked(w)) for w in parts]
    assert torch.equal(y, torch.cat(pieces, dim=1) + bias)


def test_products_on_real_blocks_equal_dequantise_then_matmul(real_ggufs, isa):
    """The first 48 rows of one tensor of each type in the two real files (SmolLM2: Q4_1, Q8_0;
    Gemma 3 270M: Q4_K, Q5_0, Q6_K, Q8_0), 1 and 7 rows of activations."""
    import torch

    from knapspec.gguffile import GGUFFile
    native = _need_kernels()
    rng = np.random.default_rng(7)
    seen = set()
    for path in real_ggufs:
        g = GGUFFile(path)
        for name, t in g.tensors.items():
            if t.ggml_type in seen or t.ggml_type not in {int(q) for q in QType} or len(t.shape) < 2:
                continue
            seen.add(t.ggml_type)
            raw = np.array(g.data(name)[:48])
            w = QuantWeight.from_raw(raw, QType(t.ggml_type), t.cols)
            ref = dequantize(raw, QType(t.ggml_type), t.cols).astype(np.float64)
            for rows in (1, 7):
                x = torch.from_numpy(rng.standard_normal((rows, t.cols)).astype(np.float32))
                y = native.quant_linear(x, native.QPacked(w)).numpy()
                xd = quantize_activations(x.numpy())
                bound = (np.abs(xd) @ np.abs(ref).T) * 1e-6 * (t.cols // 32) + 1e-30
                assert (np.abs(y - xd @ ref.T) <= bound).all(), (name, t.type_name, rows)
    assert seen == {int(q) for q in QType} - {int(QType.Q4_0)}


@pytest.mark.parametrize("n,run", [(5, False), (200, False), (64, True), (48, True)])
def test_rows_copied_from_another_weight_keep_their_bytes(n, run):
    """A row subset copied tile bytes to tile bytes (the draft vocabulary's lm_head) equals the
    same rows packed from the file's bytes, for a few rows (one by one), many (by lanes), and a
    run of whole tiles in order (a block copy), also into rows after others."""
    rng = np.random.default_rng(8)
    k = 64
    raw = random_blocks(QType.Q8_0, 300, k, rng)
    full = QuantWeight.from_raw(raw, QType.Q8_0, k)
    pick = 32 + np.arange(n) if run else rng.choice(300, size=n, replace=False)
    sub = QuantWeight.empty(QType.Q8_0, n, k)
    sub.copy_rows(np.arange(n), full, pick)
    assert np.array_equal(sub.tiles.numpy(), QuantWeight.from_raw(raw[pick], QType.Q8_0, k).tiles.numpy())
    if run:                                    # into rows 16.. of a larger weight, after one other row
        big = QuantWeight.empty(QType.Q8_0, n + 16, k)
        big.copy_rows([0], full, [7])
        big.copy_rows(16 + np.arange(n), full, pick)
        want = np.concatenate([raw[[7]], np.zeros_like(raw[:15]), raw[pick]])
        assert np.array_equal(big.tiles.numpy(), QuantWeight.from_raw(want, QType.Q8_0, k).tiles.numpy())


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_the_native_repacking_gives_the_reference_bytes(qtype):
    from knapspec.formats import pack
    native = _need_kernels()
    rng = np.random.default_rng(9)
    b = BLOCK_TYPES[qtype].block
    for n, k in ((37, b * 3), (16, b), (5, b * 2)):
        raw = random_blocks(qtype, n, k, rng, extreme=True)
        assert np.array_equal(native.pack(raw, qtype, k).numpy(), pack(raw, qtype, k).numpy()), (n, k)


def test_float_tensor_rounds_as_torch_does_bit_for_bit():
    """``formats.float_tensor`` (numpy's conversion, used by loading and the rotary tables) against
    ``Tensor.to``: random bit patterns, ties at both parities, subnormals, the largest finite values
    and infinities; a NaN stays a NaN."""
    import torch

    from knapspec.formats import float_tensor
    rng = np.random.default_rng(3)
    special = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x00008000, 0x00018000, 0x80008000, 0x00000001,
                        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x477FF000, 0x7F800000, 0xFF800000, 0, 0x80000000],
                       dtype=np.uint32)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32), special])
    a = bits.view(np.float32)
    nan = np.isnan(a)
    for dtype, view in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float32, torch.int32)):
        ours, theirs = float_tensor(a, dtype), torch.from_numpy(a.copy()).to(dtype)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours.view(view).numpy()[~nan], theirs.view(view).numpy()[~nan])
        assert torch.isnan(ours.float()).numpy()[nan].all()
    src = np.ones(4, dtype=np.float32)
    t = float_tensor(src, torch.float32)
    src[0] = 2.0
    assert t[0] == 1.0                                     # its own memory, never the array's
    with pytest.raises(ValueError, match="float_tensor makes"):
        float_tensor(src, torch.int32)
