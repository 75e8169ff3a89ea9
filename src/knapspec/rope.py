"""Rotary position embeddings: one table of angles, in the two layouts the forward needs.

* :meth:`RotaryTable.torch` -> ``cos, sin_signed: [T, D]`` in the model's dtype, for
  :func:`apply_rope` (the torch path; half-split layout as in transformers' Llama).
* :meth:`RotaryTable.native` -> ``cos, sin: [T, D/2]`` float32, for the native kernels.

Both come from the same float32 angles ``position * inv_freq``, grown on demand (doubling) so
that decoding never recomputes them per step. The tables are computed in numpy: cosine and sine
in float64 of the float32 angles, rounded once (within torch's float32 functions' last place), and
no torch kernel is touched for them. This module knows nothing of caches or layers.
"""

from __future__ import annotations

import numpy as np
import torch

from .formats import float_tensor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = [-x2, x1]``, written as ``[x2, x1] * [-sin, sin]`` (the same products and
    roundings, one copy instead of four ops). ``x: [..., D]``; ``cos``, ``sin_signed`` broadcast."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


class RotaryTable:
    """Angles for positions ``0 .. n-1`` (``n`` grows as asked), cached per layout."""

    def __init__(self, inv_freq: np.ndarray, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.inv_freq = np.asarray(inv_freq, dtype=np.float32)   # [D/2]
        self.dtype, self.device = dtype, torch.device(device)
        self._n = 0
        self._torch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._native: tuple[torch.Tensor, torch.Tensor] | None = None

    def _grow(self, end: int) -> None:
        if end <= self._n:
            return
        self._n = max(end, 2 * self._n, 256)
        self._torch = self._native = None

    def _float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [n, D/2]`` float32: cosine and sine in float64 of the float32 products
        ``position * inv_freq``, rounded once; both layouts are made from them."""
        if self._native is None:
            angles = np.multiply.outer(np.arange(self._n, dtype=np.float32), self.inv_freq).astype(np.float64)
            self._native = (torch.from_numpy(np.cos(angles).astype(np.float32)),
                            torch.from_numpy(np.sin(angles).astype(np.float32)))
        return self._native

    def torch(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin_signed: [t, D]`` (model dtype, model device) for positions ``start..``."""
        self._grow(start + t)
        if self._torch is None:
            cos, sin = (a.numpy() for a in self._float32())
            cos, sin = np.concatenate((cos, cos), axis=-1), np.concatenate((-sin, sin), axis=-1)  # [n, D]
            self._torch = (float_tensor(cos, self.dtype).to(self.device),  # sin signed for apply_rope
                           float_tensor(sin, self.dtype).to(self.device))
        cos, sin = self._torch
        return cos[start:start + t], sin[start:start + t]

    def native(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [t, D/2]`` float32 on the CPU for positions ``start..``."""
        self._grow(start + t)
        cos, sin = self._float32()
        return cos[start:start + t], sin[start:start + t]
