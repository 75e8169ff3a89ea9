"""Preallocated KV cache with an explicit length and O(1) rollback.

Entries are written at explicit positions; ``length`` is the number of committed positions.
Rolling back moves ``length`` only; nothing is copied or cleared: positions at or beyond ``length``
are garbage and are overwritten before they are read.

Two layouts of the same keys and values, each created the first time it is needed (a cache made
for the native attention starts with its layout alone, so the keys and values are held once):

- torch's, for the attention written in torch: keys ``k[i]`` and values ``v[i]``,
  ``[B, Hkv, capacity, D]`` per layer (:meth:`KVCache.view`);
- the native attention's (``native/sublayers.h``), laid out for products with one key or one
  output dimension per SIMD lane (:meth:`KVCache.native_layout`):

  - keys ``kt[i]``: ``[B, Hkv, capacity/16, D/u, 16, u]``, 16 keys per block, ``u`` = 2
    dimensions per lane pair in bfloat16, 1 in float32;
  - values ``vt[i]`` (bfloat16 only): ``[B, Hkv, capacity/2, D, 2]``, keys in pairs; in float32
    the kernel reads the values in torch's layout, ``v[i]``, which a native cache then holds.

Once both exist every :meth:`KVCache.write` (and the native kernel) keeps both up to date;
``layouts`` counts the layouts created, so that tables of pointers into them can be rebuilt.

The cache knows nothing about drafts, plans or tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class KVCache:
    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", batch: int = 1,
                 native: bool = False) -> None:
        assert capacity > 0
        self.shape = (batch, n_kv_heads, capacity, head_dim)
        self.n_layers, self.dtype, self.device = n_layers, dtype, torch.device(device)
        self.capacity = capacity
        self._length = 0
        self.k: list[torch.Tensor] | None = None       # torch's layout: [B, Hkv, capacity, D] each
        self.v: list[torch.Tensor] | None = None
        self.kt: list[torch.Tensor] | None = None      # the native attention's layouts
        self.vt: list[torch.Tensor] | None = None
        self.layouts = 0
        if native:
            self.native_layout()
        else:
            self._torch_layout()

    def _torch_layout(self) -> None:
        """torch's layout, from the native one when that exists (zeros otherwise)."""
        b, h, cap, d = self.shape
        if self.k is None:
            if self.kt is None:
                self.k = [torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.n_layers)]
            else:                                   # [B, Hkv, blocks, D/u, 16, u] -> [B, Hkv, S, D]
                self.k = [kt.permute(0, 1, 2, 4, 3, 5).reshape(b, h, -1, d)[:, :, :cap].contiguous()
                          for kt in self.kt]
        if self.v is None:
            if self.vt is None:
                self.v = [torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.n_layers)]
            else:                                   # [B, Hkv, pairs, D, 2] -> [B, Hkv, S, D]
                self.v = [vt.permute(0, 1, 2, 4, 3).reshape(b, h, -1, d)[:, :, :cap].contiguous()
                          for vt in self.vt]
        self.layouts += 1

    def native_layout(self) -> None:
        """The native attention's layout (once): from torch's when that exists, zeros otherwise
        (then, in float32, with torch's layout of the values, which the kernel reads)."""
        if self.kt is not None:
            return
        b, h, cap, d = self.shape
        u = 2 if self.dtype == torch.bfloat16 else 1
        nblk, npair = -(-cap // 16), -(-cap // 2)
        if self.k is None:
            self.kt = [torch.zeros((b, h, nblk, d // u, 16, u), dtype=self.dtype, device=self.device)
                       for _ in range(self.n_layers)]
            if u == 2:
                self.vt = [torch.zeros((b, h, npair, d, 2), dtype=self.dtype, device=self.device)
                           for _ in range(self.n_layers)]
            else:
                self.v = [torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.n_layers)]
            self.layouts += 1
            return

        def pad(x: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([x, x.new_zeros(b, h, n - cap, d)], dim=2) if n > cap else x
        self.kt = [pad(k, 16 * nblk).reshape(b, h, nblk, 16, d // u, u).permute(0, 1, 2, 4, 3, 5)
                   .contiguous() for k in self.k]
        if u == 2:
            self.vt = [pad(v, 2 * npair).reshape(b, h, npair, 2, d).permute(0, 1, 2, 4, 3).contiguous()
                       for v in self.v]
        self.layouts += 1

    def torch_kv(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``layer``'s keys and values in torch's layout where held (None where not), without
        creating them: what the native kernel also writes."""
        return (None if self.k is None else self.k[layer]), (None if self.v is None else self.v[layer])

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
        if self.k is not None:
            self.k[layer][:, :, start:start + t] = k
        if self.v is not None:
            self.v[layer][:, :, start:start + t] = v
        if self.kt is not None:
            self._write_native(layer, start, k, v)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``0 .. end-1`` in torch's layout (no copy; the layout is
        created the first time): ``[B, Hkv, end, D]`` each."""
        if self.k is None or self.v is None:
            self._torch_layout()
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    _LAYOUTS = ("k", "v", "kt", "vt")

    @contextmanager
    def scratch(self, start: int, end: int) -> Iterator[None]:
        """Inside: positions ``start .. end-1`` may be overwritten (a trial pass over committed
        tokens). On exit they hold what they held before, in every layout; a layout created inside
        is dropped (it was derived from overwritten entries) and made again when next needed; the
        length is restored."""
        had = [getattr(self, name) is not None for name in self._LAYOUTS]
        length = self._length
        snap = self.snapshot(start, end)
        try:
            yield
        finally:
            self.restore(snap)
            created = [name for name, h in zip(self._LAYOUTS, had) if not h and getattr(self, name) is not None]
            for name in created:
                setattr(self, name, None)
            self.layouts += bool(created)
            self._length = length

    def snapshot(self, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of what every held layout stores for positions ``start .. end-1`` (whole native
        key blocks and value pairs around them), for :meth:`restore` after a pass that overwrites
        them."""
        assert 0 <= start <= end <= self.capacity
        spans = {"k": (start, end), "v": (start, end), "kt": (start // 16, -(-end // 16)),
                 "vt": (start // 2, -(-end // 2))}           # vt: bfloat16 only, keys in pairs
        out = []
        for name in self._LAYOUTS:
            lo, hi = spans[name]
            for t in getattr(self, name) or []:
                part = t.narrow(2, lo, hi - lo)
                out.append((part, part.clone()))
        return out

    def restore(self, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back what :meth:`snapshot` copied (the layouts must not have been created since)."""
        for part, saved in snap:
            part.copy_(saved)

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
        held = (self.k or []) + (self.v or []) + (self.kt or []) + (self.vt or [])
        return sum(t.numel() * t.element_size() for t in held)
