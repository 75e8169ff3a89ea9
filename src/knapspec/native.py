"""knapspec's native CPU matrix products (``native.cpp``): weights packed once into tiles that
stream from memory in order, every output summed in one SIMD lane, so that each row's result is
the same whatever the number of rows in the product (what exact mode needs, by construction).

Measured on this project's 2-core AVX-512-BF16 CPU: 27 GB/s on the layer weights of the embedded
model for one row, against 14-16 GB/s for oneDNN's prepacked kernels (docs/benchmarks.md).

The C++ file is compiled on first use with torch's extension builder (a C++ compiler is needed;
~10 s) into ``$KNAPSPEC_CACHE/native/``, and reused after. When it cannot be built or the CPU
lacks the instructions, :func:`available` says why and the model keeps oneDNN's kernels.
``KNAPSPEC_NATIVE=0`` turns the native kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from .storage import cache_dir

TILE = 64          # output columns per tile (native.cpp's kTile)
_SOURCE = Path(__file__).with_name("native.cpp")


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


@lru_cache(maxsize=1)
def version() -> str:
    """The kernels' build tag: a hash of ``native.cpp`` and torch's version. Latency profiles are
    keyed by it, since any change to the kernels changes their timings."""
    return hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]


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
    try:
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(name=f"knapspec_native_{tag}", sources=[str(_SOURCE)], build_directory=str(build),
                        extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
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
    """A weight ``[N, K]`` (and its bias) in the tiled layout of ``native.cpp``."""

    __slots__ = ("bias", "k", "n", "tiles")

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

    def nbytes(self) -> int:
        return self.tiles.numel() * self.tiles.element_size()


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


def supports_sublayers(hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether :func:`attention` and :func:`mlp` serve these sizes (AVX-512 rows of 16 floats and
    bfloat16 pairs of 32 in a head)."""
    return hidden % 16 == 0 and intermediate % 16 == 0 and head_dim % 32 == 0 and head_dim <= 128


def mlp(x: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_up: Packed, down: Packed) -> torch.Tensor:
    """``x + down(silu(gate) * up)`` with ``gate, up = gate_up(rms_norm(x))``: one call for the whole
    MLP sublayer of ``x [..., H]`` (rows independent); a new tensor."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, h = x.numel() // x.shape[-1], x.shape[-1]
    mod.mlp(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), rows, h, norm_w.data_ptr(), eps,
            gate_up.tiles.data_ptr(), gate_up.n // 2, down.tiles.data_ptr())
    return out


def attention(x: torch.Tensor, start: int, *, norm_w: torch.Tensor, eps: float, qkv: Packed,
              q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_blocks: torch.Tensor,
              v_pairs: torch.Tensor | None, n_heads: int,
              n_kv_heads: int, head_dim: int, window: int | None, o: Packed) -> torch.Tensor:
    """The whole attention sublayer of one sequence ``x [1, T, H]`` at positions ``start..``: norm,
    qkv product, (q/k norms), rotary embedding (``cos``, ``sin``: float32 ``[T, D/2]``), the new keys
    and values written into ``k_cache, v_cache [1, Hkv, capacity, D]`` and into the attention's own
    layouts ``k_blocks`` and ``v_pairs`` (bfloat16 only; see ``cache.py``), causal attention over
    positions ``0 .. start+T-1`` (or the sliding ``window``), output product and residual.
    Returns a new tensor."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    t, h = x.shape[1], x.shape[2]
    mod.attention(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), t, h, norm_w.data_ptr(), eps,
                  qkv.tiles.data_ptr(), 0 if qkv.bias is None else qkv.bias.data_ptr(),
                  0 if q_norm is None else q_norm.data_ptr(), 0 if k_norm is None else k_norm.data_ptr(),
                  cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_blocks.data_ptr(),
                  0 if v_pairs is None else v_pairs.data_ptr(), k_cache.shape[2],
                  start, n_heads, n_kv_heads, head_dim, window or 0, o.tiles.data_ptr())
    return out


# native.cpp's Field order: the columns of the table `stack` takes
STACK_FIELDS = ("attn_norm", "qkv", "bqkv", "q_norm", "k_norm", "o", "mlp_norm", "gate_up", "down",
                "k_cache", "v_cache", "k_blocks", "v_pairs", "window")


def stack(x: torch.Tensor, start: int, run: torch.Tensor, table: torch.Tensor, *, eps: float,
          cos: torch.Tensor, sin: torch.Tensor, capacity: int, n_heads: int, n_kv_heads: int,
          head_dim: int, intermediate: int) -> torch.Tensor:
    """Every sublayer of the model over one sequence ``x [1, T, H]`` in one call: ``run`` (uint8,
    2L) says which run, ``table`` (int64 ``[L, len(STACK_FIELDS)]``) where each layer's weights
    and cache are. The same arithmetic as :func:`attention` and :func:`mlp` one by one."""
    mod = _module()
    x = x.contiguous()
    out = torch.empty_like(x)
    mod.stack(x.dtype == torch.bfloat16, x.data_ptr(), out.data_ptr(), x.shape[1], x.shape[2], start,
              run.data_ptr(), table.shape[0], table.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
              capacity, n_heads, n_kv_heads, head_dim, intermediate)
    return out
