"""Preallocated KV cache with an explicit length and O(1) rollback.

One key and one value tensor per layer, ``[B, Hkv, capacity, D]``, allocated once. Entries are
written at explicit positions; ``length`` is the number of committed positions. Rolling back moves
``length`` only; nothing is copied or cleared: positions at or beyond ``length`` are garbage and
are overwritten before they are read.

The native attention (``native/sublayers.h``) reads its own copies, laid out for products with one key
or one output dimension per SIMD lane; :meth:`KVCache.native_layout` creates them from the cache
the first time they are needed, and every :meth:`KVCache.write` keeps them up to date:

- keys ``kt[i]``: ``[B, Hkv, capacity/16, D/u, 16, u]``, 16 keys per block, ``u`` = 2 dimensions
  per lane pair in bfloat16, 1 in float32;
- values ``vt[i]`` (bfloat16 only): ``[B, Hkv, capacity/2, D, 2]``, keys in pairs.

The cache knows nothing about drafts, plans or tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", batch: int = 1) -> None:
        assert capacity > 0
        shape = (batch, n_kv_heads, capacity, head_dim)
        # k[i], v[i]: [B, Hkv, capacity, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        self._length = 0
        self.kt: list[torch.Tensor] | None = None      # the native attention's layouts
        self.vt: list[torch.Tensor] | None = None

    def native_layout(self) -> None:
        """Create the native attention's copies of the keys and values (once) from the cache."""
        if self.kt is not None:
            return
        b, h, cap, d = self.k[0].shape
        u = 2 if self.k[0].dtype == torch.bfloat16 else 1
        nblk, npair = -(-cap // 16), -(-cap // 2)

        def pad(x: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([x, x.new_zeros(b, h, n - cap, d)], dim=2) if n > cap else x
        self.kt = [pad(k, 16 * nblk).reshape(b, h, nblk, 16, d // u, u).permute(0, 1, 2, 4, 3, 5)
                   .contiguous() for k in self.k]
        if u == 2:
            self.vt = [pad(v, 2 * npair).reshape(b, h, npair, 2, d).permute(0, 1, 2, 4, 3).contiguous()
                       for v in self.v]

    def _write_native(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, t, d = k.shape
        u = self.kt[layer].shape[-1]
        pos = torch.arange(start, start + t, device=k.device)
        kt = self.kt[layer].permute(0, 1, 2, 4, 3, 5)          # [B, Hkv, blocks, 16, D/u, u]
        kt[:, :, pos // 16, pos % 16] = k.reshape(b, h, t, d // u, u)
        if self.vt is not None:
            vt = self.vt[layer].permute(0, 1, 2, 4, 3)          # [B, Hkv, pairs, 2, D]
            vt[:, :, pos // 2, pos % 2] = v

    @property
    def length(self) -> int:
        return self._length

    def check_room(self, start: int, t: int) -> None:
        """Raise if positions ``start .. start+t-1`` do not fit (every writer checks here)."""
        if start + t > self.capacity:
            raise ValueError(f"KV cache is full: writing positions {start}..{start + t - 1} "
                             f"but the capacity is {self.capacity} positions")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [B, Hkv, T, D]`` at positions ``start .. start+T-1`` of ``layer``."""
        t = k.shape[2]
        self.check_room(start, t)
        self.k[layer][:, :, start:start + t] = k
        self.v[layer][:, :, start:start + t] = v
        if self.kt is not None:
            self._write_native(layer, start, k, v)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``0 .. end-1`` (no copy): ``[B, Hkv, end, D]`` each."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def set_length(self, n: int) -> None:
        assert 0 <= n <= self.capacity, f"length {n} outside 0..{self.capacity}"
        self._length = n

    def rollback(self, n: int) -> None:
        """Forget every position at or after ``n`` (O(1): moves the length)."""
        assert 0 <= n <= self._length, f"cannot roll back to {n}: length is {self._length}"
        self._length = n

    def reset(self) -> None:
        self._length = 0

    def nbytes(self) -> int:
        extra = (self.kt or []) + (self.vt or [])
        return sum(t.numel() * t.element_size() for t in self.k + self.v + extra)
