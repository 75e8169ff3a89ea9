"""knapspec's native CPU kernels: matrix products whose weights stream from memory in order, every
output summed in one SIMD lane, so that each row's result is the same whatever the number of rows
in the product (what exact mode needs, by construction); whole attention and MLP sublayers and
the whole stack built on them.

- ``dense.h``: bfloat16 / float32 weights packed once into 64-column tiles (:class:`Packed`).
  Measured on this project's 2-core AVX-512-BF16 CPU: 27 GB/s on the layer weights of the
  embedded model for one row, against 14-16 GB/s for oneDNN's prepacked kernels.
- ``quant.h``: GGUF block types as they are (``formats.py``'s tiles, :class:`QPacked`), times
  activations quantized per 32-block to int8: AVX-512 VNNI, or AVX2 (:func:`isa`).
- ``sublayers.h``: the fused sublayers, over either kind of weight.

The sources are one translation unit (``module.cpp``), compiled on first use with torch's
extension builder (a C++ compiler is needed; ~20 s) into ``$KNAPSPEC_CACHE/native/``, and reused
after. When it cannot be built or the CPU lacks the instructions, :func:`available` and
:func:`quant_available` say why; the model then keeps oneDNN's kernels (float weights) or
dequantised weights (GGUF block types). ``KNAPSPEC_NATIVE=0`` turns the native kernels off;
``KNAPSPEC_ISA=avx2`` makes the quantized products take the AVX2 path on an AVX-512 CPU.
Where the CPU has AMX tiles, prompts take an AMX attention for bfloat16 (:func:`amx_prompts`);
``KNAPSPEC_AMX=1`` puts every pass on it (:func:`amx`), ``KNAPSPEC_AMX=0`` none. Elsewhere the
bfloat16 attention takes VDPBF16PS pair products where they issue about as fast as float32 FMAs
(:func:`dot`, measured once per process; ``KNAPSPEC_DOT=0/1`` decides instead).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from ..formats import BLOCK_TYPES, QType, QuantWeight
from ..storage import cache_dir

log = logging.getLogger(__name__)

TILE = 64          # output columns per float tile (dense.h's kTile)
_DIR = Path(__file__).parent
_MAIN = _DIR / "module.cpp"
_SOURCES = ("module.cpp", "dense.h", "quant.h", "sublayers.h")
MAX_SEGMENTS = 8   # quant.h's kMaxSegments


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _missing_instructions(dtype: torch.dtype) -> list[str]:
    need = ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
    if dtype == torch.bfloat16:
        need.append("avx512_bf16")
    flags = _cpu_flags()
    return [f for f in need if f not in flags]


_ERROR: str | None = None

# the quantized products' instruction sets, best first, and what each needs
_ISAS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"),
         "avx2": ("avx2", "fma", "f16c")}
_ISA_CODES = {"avx512": 0, "avx2": 1}      # quant.h's Isa
_isa_override: str | None = None


def _isa_name() -> str | None:
    """The quantized products' instruction set on this CPU: the best one it has, or a lower one
    asked for by ``KNAPSPEC_ISA`` (or :func:`set_isa`); None without AVX2."""
    flags = _cpu_flags()
    have = [name for name, need in _ISAS.items() if all(f in flags for f in need)]
    want = _isa_override or os.environ.get("KNAPSPEC_ISA", "").strip().lower() or None
    if want is not None:
        if want not in _ISAS:
            raise ValueError(f"unknown instruction set {want!r} (KNAPSPEC_ISA): accepted are {', '.join(_ISAS)}")
        return want if want in have else None
    return have[0] if have else None


def isa() -> str | None:
    """``"avx512"`` (VNNI), ``"avx2"`` or None: which path the quantized products take."""
    return _isa_name()


def set_isa(name: str | None) -> None:
    """Make the quantized products take ``name``'s path from now on (None: the best one). A
    model decides whether its sublayers run fused when it packs its weights, so pack again after
    this."""
    global _isa_override
    if name is not None and name not in _ISAS:
        raise ValueError(f"unknown instruction set {name!r}: accepted are {', '.join(_ISAS)}")
    _isa_override = name
    mod = _module()
    current = _isa_name()
    if mod is not None and current is not None:
        mod.set_isa(_ISA_CODES[current])


_amx_override: bool | None = None


def _amx_setting() -> str:
    """``"all"``, ``"prompts"`` or ``"off"``: where the bfloat16 attention should use AMX tiles."""
    if _amx_override is not None:
        return "all" if _amx_override else "off"
    env = os.environ.get("KNAPSPEC_AMX", "").strip()
    return {"1": "all", "0": "off"}.get(env, "prompts")


def _amx_cpu() -> bool:
    return {"amx_tile", "amx_bf16"} <= _cpu_flags()


def _amx_all() -> bool:
    """Whether every pass should take the AMX attention: asked for, and the CPU has the tiles."""
    return _amx_setting() == "all" and _amx_cpu()


def amx() -> bool:
    """Whether the bfloat16 attention runs on AMX tiles in every pass: ``KNAPSPEC_AMX=1`` (or
    :func:`set_amx`) asked for it, the CPU has the tiles and Linux grants this process their
    state. Off by default: measured here, verification passes of 4-16 tokens at 4k-8k tokens of
    context cost 13-30% less, one-token steps 1-3% more. The two kernels round differently (each
    is row-invariant), so decoding and verification keep one kernel for a whole process."""
    mod = _module()
    return bool(mod is not None and mod.set_amx(int(_amx_all())))


@lru_cache(maxsize=1)
def _amx_prompts_cached(setting: str) -> bool:
    mod = _module()
    return bool(setting != "off" and _amx_cpu() and mod is not None and mod.amx_granted())


def amx_prompts() -> bool:
    """Whether prompts (:func:`knapspec.engine.prefill`) take the AMX attention: by default yes
    where the CPU has AMX tiles (a 4k-token prompt prefills ~28% faster here); ``KNAPSPEC_AMX=0``
    or ``set_amx(False)`` keeps them off. Every strategy prefills the same way, so outputs stay
    equal across strategies; decoding and verification take the kernel :func:`amx` says."""
    return _amx_prompts_cached(_amx_setting())


def set_amx(on: bool | None) -> bool:
    """AMX attention everywhere (True), nowhere (False) or as ``KNAPSPEC_AMX`` says (None: for
    prompts only, unless it says 0 or 1); returns :func:`amx`."""
    global _amx_override
    _amx_override = on
    return amx()


_dot_override: bool | None = None
_dot_rates: list[tuple[float, float]] = []


def dot_rates() -> tuple[float, float]:
    """(VDPBF16PS, float32 FMA) instructions a second on this CPU, in G/s, 512 bits wide: the best
    of three 2-ms timings each, taken once per process (~12 ms); (0, 0) without the instruction
    or the kernels."""
    mod = _module()
    if mod is None or "avx512_bf16" not in _cpu_flags():
        return (0.0, 0.0)
    return _measure_dot(mod)


def _measure_dot(mod: ModuleType) -> tuple[float, float]:
    if not _dot_rates:
        runs = [mod.dot_rate(2.0) for _ in range(3)]
        _dot_rates.append((max(r[0] for r in runs), max(r[1] for r in runs)))
    return _dot_rates[0]


def _dot_wanted(mod: ModuleType) -> bool:
    if "avx512_bf16" not in _cpu_flags():
        return False
    if _dot_override is not None:
        return _dot_override
    env = os.environ.get("KNAPSPEC_DOT", "").strip()
    if env in ("0", "1"):
        return env == "1"
    d, f = _measure_dot(mod)
    return d >= 0.6 * f


def dot() -> bool:
    """Whether the bfloat16 attention (outside AMX tiles) takes its products on VDPBF16PS, two
    bfloat16 multiply-adds per lane and instruction, with the probabilities rounded to bfloat16 as
    on AMX tiles. By default where that instruction issues at least 0.6x as fast as a float32 FMA
    (:func:`dot_rates`: the AMD EPYC measured issues both at the same rate, which halves the
    attention's arithmetic; the Xeon measured issues it at a quarter of the FMA rate);
    ``KNAPSPEC_DOT=0/1`` (or :func:`set_dot`) decides instead. One kernel for a whole process: the
    two round differently, each is row-invariant."""
    mod = _module()
    return bool(mod is not None and mod.set_dot(int(_dot_wanted(mod))))


def set_dot(on: bool | None) -> bool:
    """The VDPBF16PS attention on (True), off (False) or as measured / ``KNAPSPEC_DOT`` says
    (None); returns :func:`dot`."""
    global _dot_override
    _dot_override = on
    return dot()


def quant_available() -> str | None:
    """None when the native quantized products can run on this CPU, else why not."""
    if _isa_name() is None:
        return "this CPU lacks AVX2 (with FMA and F16C)"
    if _module() is None:
        return _ERROR
    return None


@lru_cache(maxsize=1)
def version() -> str:
    """The kernels' build tag: a hash of every source and torch's version. Latency profiles are
    keyed by it, since any change to the kernels changes their timings."""
    h = hashlib.sha256(torch.__version__.encode())
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def _configure_dot(mod: ModuleType) -> None:
    """The attention's products as :func:`dot` decides, set before any pass runs."""
    mod.set_dot(int(_dot_wanted(mod)))


@lru_cache(maxsize=1)
def _module() -> ModuleType | None:
    """Build (first time) and import the extension; None, with the reason in ``_ERROR``, if not."""
    global _ERROR
    if os.environ.get("KNAPSPEC_NATIVE", "1") == "0":
        _ERROR = "turned off by KNAPSPEC_NATIVE=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _ERROR = f"needs an x86-64 CPU with AVX-512 (this one is {platform.machine()})"
        return None
    tag = version()
    build = cache_dir() / "native" / tag
    name = f"knapspec_native_{tag}"
    built = build / f"{name}.so"
    if built.is_file():           # built before: import it directly (no compiler toolchain on the way)
        try:
            import importlib.machinery
            import importlib.util
            loader = importlib.machinery.ExtensionFileLoader(name, str(built))
            spec = importlib.util.spec_from_loader(name, loader)
            assert spec is not None
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
            mod.set_isa(_ISA_CODES.get(_isa_name(), 0))
            mod.set_amx(int(_amx_all()))
            _configure_dot(mod)
            return mod
        except (ImportError, OSError) as e:     # a broken build: built again below
            log.warning("rebuilding the native kernels (%s)", e)
    try:
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load
        log.warning("building the native kernels (once for this version and machine); cached in %s",
                    build)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = load(name=name, sources=[str(_MAIN)], build_directory=str(build),
                       extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                       verbose=False)
        mod.set_isa(_ISA_CODES.get(_isa_name(), 0))
        mod.set_amx(int(_amx_all()))
        _configure_dot(mod)
        log.warning("native kernels built in %.0f s (cached)", time.perf_counter() - t0)
        return mod
    except Exception as e:          # no compiler, no ninja, a failed build: oneDNN's kernels stay
        msg = str(e).strip().splitlines()
        _ERROR = f"could not build the native kernels ({msg[-1] if msg else type(e).__name__})"
        return None


def available(dtype: torch.dtype) -> str | None:
    """None when the native kernels can serve weights of ``dtype`` on this CPU, else why not."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"no native kernel for {dtype}"
    missing = _missing_instructions(dtype)
    if missing:
        return "this CPU lacks " + ", ".join(missing)
    if _module() is None:
        return _ERROR
    return None


class Packed:
    """A weight ``[N, K]`` (and its bias) in the tiled layout of ``dense.h``."""

    __slots__ = ("bias", "desc", "k", "n", "tiles")

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = w.shape
        if w.dtype == torch.bfloat16 and k % 2:
            raise ValueError("bfloat16 native products need an even inner size")
        pad = -n % TILE
        wp = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
        t = (n + pad) // TILE
        if w.dtype == torch.bfloat16:     # [N/64][K/2][64][2]
            self.tiles = wp.reshape(t, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        else:                             # [N/64][K][64]
            self.tiles = wp.reshape(t, TILE, k).permute(0, 2, 1).contiguous()
        self.n, self.k = n, k
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.desc = torch.tensor([1, 0, self.tiles.data_ptr(), n], dtype=torch.int64)   # quant.h's descriptor

    def nbytes(self) -> int:
        return self.tiles.numel() * self.tiles.element_size()


class QPacked:
    """One product's weight in GGUF block types: the rows of ``parts`` in order (several parts
    when the fused weight's pieces have different block types, e.g. Gemma's q/k in Q5_0 and v in
    Q8_0), with an optional bias. The tiles are the parts' own (no copy)."""

    __slots__ = ("bias", "desc", "k", "n", "parts")

    def __init__(self, parts: QuantWeight | list[QuantWeight] | tuple[QuantWeight, ...],
                 bias: torch.Tensor | None = None) -> None:
        parts = [parts] if isinstance(parts, QuantWeight) else list(parts)
        if not 1 <= len(parts) <= MAX_SEGMENTS or len({p.k for p in parts}) != 1:
            raise ValueError(f"a quantized product takes 1-{MAX_SEGMENTS} parts of one inner size")
        self.parts = parts
        self.k, self.n = parts[0].k, sum(p.n for p in parts)
        if self.k % 32:
            raise ValueError(f"quantized products need an inner size that is a multiple of 32, got {self.k}")
        self.bias = None if bias is None else bias.detach().float().contiguous()
        flat = [len(parts)]
        for p in parts:
            flat += [int(p.qtype), p.tiles.data_ptr(), p.n]
        self.desc = torch.tensor(flat, dtype=torch.int64)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


def quant_linear(x: torch.Tensor, p: QPacked, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T + b`` -> ``[M, N]`` for quantized ``W``: x float32 or bfloat16, the result
    in ``out_dtype`` (default x's; float32 or bfloat16)."""
    mod = _module()
    assert mod is not None, "native kernels unavailable"
    assert x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] == p.k, (x.dtype, x.shape, p.k)
    x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty((x.shape[0], p.n), dtype=out_dtype)
    mod.quant_linear(x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], p.k, p.desc.data_ptr(),
                     0 if p.bias is None else p.bias.data_ptr(), y.data_ptr(), out_dtype == torch.bfloat16)
    return y


def pack(raw: np.ndarray, qtype: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``formats.pack`` done natively (the same bytes; tested equal): rows of blocks ``raw uint8
    [N, row_bytes]`` -> tiles ``uint8 [ceil(N/16), tile_bytes]``, into ``out`` if given."""
    mod = _module()
    assert mod is not None, "native kernels unavailable"
    bt = BLOCK_TYPES[QType(int(qtype))]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if k % bt.block or raw.shape[1] != bt.row_bytes(k):
        raise ValueError(f"a {bt.name} weight needs rows of {bt.block}-weight blocks: got K={k} "
                         f"and {raw.shape[1]} bytes per row")
    shape = (-(-raw.shape[0] // 16), bt.tile_bytes(k))
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8)
    assert out.shape == shape and out.dtype == torch.uint8 and out.is_contiguous()
    mod.repack(int(bt.qtype), raw.ctypes.data, raw.shape[0], k, out.data_ptr())
    return out


def dequant_rows(w: QuantWeight, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``rows`` (any shape of int64 indices) of ``w`` dequantised: ``[*rows.shape, K]`` in
    ``dtype`` (float32, or bfloat16 rounded from it), the reference dequantiser's values."""
    mod = _module()
    assert mod is not None, "native kernels unavailable"
    idx = rows.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((idx.numel(), w.k), dtype=dtype)
    mod.dequant_rows(int(w.qtype), w.tiles.data_ptr(), w.n, w.k, idx.data_ptr(), idx.numel(), out.data_ptr(),
                     dtype == torch.bfloat16)          # an index out of [0, n): IndexError
    return out.view(*rows.shape, w.k)


def linear(x: torch.Tensor, p: Packed, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T + b`` -> ``[M, N]`` in ``out_dtype`` (default: x's dtype; a bfloat16
    product may also write float32)."""
    mod = _module()
    assert mod is not None, "native kernels unavailable"
    x = x.contiguous()
    m = x.shape[0]
    out_dtype = out_dtype or x.dtype
    y = torch.empty((m, p.n), dtype=out_dtype)
    bias = 0 if p.bias is None else p.bias.data_ptr()
    if x.dtype == torch.bfloat16:
        mod.linear_bf16(x.data_ptr(), m, p.k, p.tiles.data_ptr(), p.n, bias, y.data_ptr(),
                        out_dtype == torch.bfloat16)
    else:
        assert out_dtype == torch.float32
        mod.linear_f32(x.data_ptr(), m, p.k, p.tiles.data_ptr(), p.n, bias, y.data_ptr())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as ``model.rms_norm`` defines it (normalised in float32,
    rounded to x's dtype, scaled by ``w``), natively: bfloat16 or float32 ``x`` and ``w`` of one
    dtype, a last dimension that :func:`supports_sublayers` allows. The sum of squares is taken in
    another order than torch's, so the bits may differ from ``model.rms_norm`` in the last place."""
    mod = _module()
    assert mod is not None, "native kernels unavailable"
    n = x.shape[-1]
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float32) or n % 16 or w.shape != (n,):
        raise ValueError(f"native rms_norm takes bfloat16 or float32 rows of a multiple of 16 and a weight of "
                         f"their size and dtype: got {x.dtype} rows of {n}, a {w.dtype} weight {tuple(w.shape)}")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty_like(x)
    mod.rms_norm(x.dtype == torch.bfloat16, x.data_ptr(), x.numel() // n, n, w.data_ptr(), eps, y.data_ptr())
    return y


def supports_sublayers(hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether :func:`attention` and :func:`mlp` serve these sizes (AVX-512 rows of 16 floats and
    bfloat16 pairs of 32 in a head; heads over 128 dimensions in passes of 128)."""
    return hidden % 16 == 0 and intermediate % 16 == 0 and head_dim % 32 == 0 and head_dim <= 256


ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}     # sublayers.h's Act


def mlp(x: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_up: Packed | QPacked,
        down: Packed | QPacked, *, act: str = "silu", post_norm: torch.Tensor | None = None) -> torch.Tensor:
    """``x + down(act(gate) * up)`` with ``gate, up = gate_up(rms_norm(x))``: one call for the whole
    MLP sublayer of ``x [..., H]`` (rows independent); a new tensor. ``act``: ``silu`` or
    ``gelu_pytorch_tanh``; ``post_norm``: a norm of the product's output before the residual add
    (Gemma 3)."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, h = x.numel() // x.shape[-1], x.shape[-1]
    mod.mlp(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), rows, h, norm_w.data_ptr(), eps,
            gate_up.desc.data_ptr(), gate_up.n // 2, down.desc.data_ptr(), ACTS[act],
            0 if post_norm is None else post_norm.data_ptr())
    return out


def attention(x: torch.Tensor, start: int, *, norm_w: torch.Tensor, eps: float, qkv: Packed | QPacked,
              q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
              k_blocks: torch.Tensor, v_pairs: torch.Tensor | None, capacity: int, n_heads: int,
              n_kv_heads: int, head_dim: int, window: int | None, o: Packed | QPacked,
              draft_window: int = 0, sink: int = 0, scale: float | None = None,
              post_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The whole attention sublayer of one sequence ``x [1, T, H]`` at positions ``start..``: norm,
    qkv product, (q/k norms), rotary embedding (``cos``, ``sin``: float32 ``[T, D/2]``), the new keys
    and values written into the attention's own layouts ``k_blocks`` and ``v_pairs`` (bfloat16
    only; see ``cache.py``) and, when given, torch's ``k_cache, v_cache [1, Hkv, capacity, D]``
    (float32 reads its values from ``v_cache``, which it then needs), causal attention over
    positions ``0 .. start+T-1`` (or the sliding ``window``), output product and residual.
    ``draft_window`` > 0 (drafts): each token sees only its last ``draft_window`` positions and
    the first ``sink``. ``scale``: the scores' scale (None: ``head_dim ** -0.5``); ``post_norm``: a
    norm of the output product's result before the residual add (Gemma 3). Returns a new tensor."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    t, h = x.shape[1], x.shape[2]
    mod.attention(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), t, h, norm_w.data_ptr(), eps,
                  qkv.desc.data_ptr(), 0 if qkv.bias is None else qkv.bias.data_ptr(),
                  0 if q_norm is None else q_norm.data_ptr(), 0 if k_norm is None else k_norm.data_ptr(),
                  cos.data_ptr(), sin.data_ptr(), 0 if k_cache is None else k_cache.data_ptr(),
                  0 if v_cache is None else v_cache.data_ptr(), k_blocks.data_ptr(),
                  0 if v_pairs is None else v_pairs.data_ptr(), capacity,
                  start, n_heads, n_kv_heads, head_dim, window or 0, o.desc.data_ptr(), draft_window, sink,
                  scale or 0.0, 0 if post_norm is None else post_norm.data_ptr())
    return out


# sublayers.h's Field order: the columns of the table `stack` takes (the products: descriptors)
STACK_FIELDS = ("attn_norm", "qkv", "bqkv", "q_norm", "k_norm", "o", "mlp_norm", "gate_up", "down",
                "k_cache", "v_cache", "k_blocks", "v_pairs", "window", "post_attn_norm", "post_mlp_norm",
                "local_rope")


def stack(x: torch.Tensor, start: int, run: torch.Tensor, table: torch.Tensor, *, eps: float,
          cos: torch.Tensor, sin: torch.Tensor, capacity: int, n_heads: int, n_kv_heads: int,
          head_dim: int, intermediate: int, draft_windows: torch.Tensor | None = None,
          sink: int = 0, cos_local: torch.Tensor | None = None, sin_local: torch.Tensor | None = None,
          act: str = "silu", scale: float | None = None, amx: bool | None = None) -> torch.Tensor:
    """Every sublayer of the model over one sequence ``x [1, T, H]`` in one call: ``run`` (uint8,
    2L) says which run, ``table`` (int64 ``[L, len(STACK_FIELDS)]``) where each layer's weights
    and cache are (and, Gemma 3, its post-norms and whether it takes the local rotary table
    ``cos_local, sin_local``); ``draft_windows`` (int64 ``[L]``, optional) a draft window per
    layer's attention (0: none) with ``sink`` positions. The same arithmetic as :func:`attention`
    and :func:`mlp` one by one. ``amx``: the bfloat16 attention on AMX tiles for this call (True /
    False; None: as :func:`amx` says)."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    mod.stack(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), x.shape[1], x.shape[2], start,
              run.data_ptr(), table.shape[0], table.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
              capacity, n_heads, n_kv_heads, head_dim, intermediate,
              0 if draft_windows is None else draft_windows.data_ptr(), sink,
              0 if cos_local is None else cos_local.data_ptr(), 0 if sin_local is None else sin_local.data_ptr(),
              ACTS[act], scale or 0.0, -1 if amx is None else int(amx))
    return out
