"""Preallocated KV cache with an explicit length and O(1) rollback.

One key and one value tensor per layer, ``[B, Hkv, capacity, D]``, allocated once. Entries are
written at explicit positions; ``length`` is the number of committed positions. Rolling back moves
``length`` only; nothing is copied or cleared: positions at or beyond ``length`` are garbage and
are overwritten before they are read.

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

    @property
    def length(self) -> int:
        return self._length

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [B, Hkv, T, D]`` at positions ``start .. start+T-1`` of ``layer``."""
        t = k.shape[2]
        if start + t > self.capacity:
            raise ValueError(f"KV cache is full: writing positions {start}..{start + t - 1} "
                             f"but the capacity is {self.capacity} positions")
        self.k[layer][:, :, start:start + t] = k
        self.v[layer][:, :, start:start + t] = v

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
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
