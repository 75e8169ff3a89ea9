"""Pricing drafts: expected tokens per round, tokens per time (TPT), the best draft length, and
verification times corrected by what decoding measures. Every strategy that chooses by predicted
speed (KnapSpec, DEL, the hybrid, ``bench tpt``) prices through these functions.

Times come from a latency model (``latency.py``); this module decides nothing and runs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..plan import Plan


def expected_tokens(alpha: float, d: int) -> float:
    """Expected tokens committed by a round of ``d`` drafts with i.i.d. acceptance ``alpha``:
    ``(1 - α^(d+1)) / (1 - α)`` = 1 + α + ... + α^d (bonus token included; d+1 at α = 1)."""
    if d < 0:
        raise ValueError(f"draft length must be >= 0, got {d}")
    a = min(max(float(alpha), 0.0), 1.0)
    if a >= 1.0:
        return float(d + 1)
    return (1.0 - a ** (d + 1)) / (1.0 - a)


def tpt(alpha: float, d: int, t_draft: float, t_verify: float) -> float:
    """Tokens per second of a round: ``E(α, d) / (d·t_draft + t_verify)``, where ``t_verify`` is
    the time of the verification pass over ``d + 1`` tokens."""
    t = d * t_draft + t_verify
    if t <= 0:
        raise ValueError("round time must be positive")
    return expected_tokens(alpha, d) / t


def verify_times(latency: Any, ctx: int, n: int) -> list[float]:
    """``[k]``: the predicted time of a full-model pass over ``k + 1`` tokens at context ``ctx``,
    for ``k < n`` (``[0]`` is a plain decoding step)."""
    return [latency.predict(None, ctx, k + 1) for k in range(n)]


def best_length(alpha: float, t_draft: float, t_verify: Sequence[float], d_max: int) -> tuple[int, float]:
    """The draft length ``d`` in ``1..d_max`` with the highest :func:`tpt`, and that TPT
    (``t_verify[d]``: the pass over ``d + 1`` tokens)."""
    best = max(range(1, d_max + 1), key=lambda d: tpt(alpha, d, t_draft, t_verify[d]))
    return best, tpt(alpha, best, t_draft, t_verify[best])


def best_plan(candidates: Sequence[tuple[Plan, float]], latency: Any, ctx: int, d_max: int,
              ) -> tuple[Plan | None, int, float, float]:
    """Among ``(plan, alpha)`` candidates and plain decoding: ``(plan, d, tpt, tpt of plain
    decoding)`` with the highest predicted TPT at ``ctx`` (plan None, d 0 when no draft beats a
    plain step)."""
    tv = verify_times(latency, ctx, d_max + 1)
    t_ar = 1.0 / tv[0]
    best: tuple[Plan | None, int, float] = (None, 0, t_ar)
    for plan, alpha in candidates:
        d, v = best_length(alpha, latency.predict(plan, ctx, 1), tv, d_max)
        if v > best[2]:
            best = (plan, d, v)
    return (*best, t_ar)


class VerifyTimes:
    """Verification times at a context, corrected online: the latency model's prediction for a
    pass of each width times a running ratio of measured to predicted time, so that a profile
    that mis-states how a pass grows with its width (a noisy profiling run, another load on the
    machine) cannot make a strategy refuse drafts that cost almost nothing to verify.

    ``observe`` only appends (its numpy work on a round's cold caches cost ~40 us a round); the
    ratios are folded in when :meth:`at` reads them."""

    def __init__(self, n_widths: int, *, refresh: int = 64) -> None:
        self.n_widths, self.refresh = n_widths, refresh
        self._ratio = np.ones(n_widths)           # measured / predicted per width (index = width - 1)
        self._count = np.zeros(n_widths)
        self._log: list[tuple[int, float]] = []
        self.ctx = -1
        self.predicted: list[float] = []

    def reset(self) -> None:
        """Forget the predictions (a new generation); the learnt ratios stay."""
        self.ctx = -1

    def predict(self, latency: Any, ctx: int) -> list[float]:
        """The latency model's times at ``ctx`` (refreshed when the context moved by ``refresh``)."""
        if self.ctx < 0 or abs(ctx - self.ctx) >= self.refresh:
            self.predicted = verify_times(latency, ctx, self.n_widths)
            self.ctx = ctx
        return self.predicted

    def observe(self, width: int, seconds: float) -> None:
        """A measured pass over ``width`` tokens (ignored before any prediction)."""
        w = width - 1
        if 0 <= w < self.n_widths and self.ctx >= 0 and seconds > 0:
            self._log.append((w, seconds / self.predicted[w]))
            if len(self._log) >= 512:               # bounded, for a long-lived strategy
                self._fold()

    def _fold(self) -> None:
        for w, r in self._log:
            self._ratio[w] = r if self._count[w] == 0 else self._ratio[w] + 0.1 * (r - self._ratio[w])
            self._count[w] += 1
        self._log.clear()

    def at(self, latency: Any, ctx: int) -> list[float]:
        """``[k]``: the corrected time of a pass over ``k + 1`` tokens at ``ctx``: the prediction
        times the measured/predicted ratio of recent passes of that width (a weighted straight
        line through the widths measured at least 3 times; 1 before any)."""
        pred = self.predict(latency, ctx)
        self._fold()
        seen = np.flatnonzero(self._count >= 3)
        if seen.size >= 2:                          # single widths are noisy
            wts = np.minimum(self._count[seen], 50.0)
            slope, icpt = np.polyfit(seen.astype(float), self._ratio[seen], 1, w=np.sqrt(wts))
            ratio = np.clip(icpt + slope * np.arange(self.n_widths), 0.25, 4.0)
            return (np.asarray(pred) * ratio).tolist()
        if seen.size == 1:
            return [t * float(self._ratio[seen[0]]) for t in pred]
        return list(pred)
