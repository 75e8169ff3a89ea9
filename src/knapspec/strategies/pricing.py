"""Pricing drafts: expected tokens per round, tokens per time (TPT), the best draft length, and
verification times corrected by what decoding measures. Every strategy that chooses by predicted
speed (KnapSpec, DEL, the hybrid, ``bench tpt``) prices through these functions.

Times come from a latency model (``latency.py``); this module decides nothing and runs nothing.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

log = logging.getLogger(__name__)


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


class VerifyTimes:
    """Verification times at a context, corrected online: the latency model's prediction for a
    pass of each width times a running ratio of measured to predicted time, so that a profile
    that mis-states how a pass grows with its width (a noisy profiling run, another load on the
    machine) cannot make a strategy refuse drafts that cost almost nothing to verify.

    Every one-token step pulls the other widths' ratios a little (``revert``) towards its own, so
    that a transient measured in wide passes does not keep them dear after it ended.

    ``observe`` only appends; the ratios are folded in and the line refitted when :meth:`at` reads
    them after ``refit`` new passes (every round's refit cost ~0.2 ms, 5% of a 4 ms step; the
    running ratios move by a tenth of a pass each). Plain Python on a dozen widths: numpy's
    per-call machinery, right after a forward pass on cold caches, cost ~40 us a read and ~0.3 ms
    a refit (``np.polyfit``)."""

    def __init__(self, n_widths: int, *, refresh: int = 64, refit: int = 8, revert: float = 0.02) -> None:
        self.n_widths, self.refresh, self.refit, self.revert = n_widths, refresh, refit, revert
        self._fitted: list[float] | None = None    # the last line through the ratios
        self._ratio = [1.0] * n_widths             # measured / predicted per width (index = width - 1)
        self._count = [0] * n_widths
        self._log: list[tuple[int, float]] = []
        self.ctx = -1
        self.predicted: list[float] = []

    def reset(self) -> None:
        """Forget the predictions (a new generation); the learnt ratios stay."""
        self.ctx = -1

    def predict(self, latency: Any, ctx: int, *, exact: bool = False) -> list[float]:
        """The latency model's times at ``ctx`` (refreshed when the context moved by ``refresh``,
        or at all with ``exact``)."""
        if self.ctx < 0 or abs(ctx - self.ctx) >= (1 if exact else self.refresh):
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
        self._fitted = None
        for w, r in self._log:
            self._ratio[w] = r if self._count[w] == 0 else self._ratio[w] + 0.1 * (r - self._ratio[w])
            self._count[w] += 1
            if w == 0:
                # every one-token step pulls the other widths' ratios ``revert`` of the way towards
                # its own (the profile's shape across widths): a width measured only during a
                # transient would otherwise keep its inflated ratio until it is run again, and a
                # strategy that finds wide passes dear runs them less. (Simulated on the embedded
                # model: wide passes timed 3x slow in one generation left ratios of 1.2-3.2 in the
                # next; with the drift 1.0-1.5. In one side-by-side run, after another load on the
                # machine, the hybrid chose plain steps over lookups twice as often as the same
                # strategy without windows from then on: 1.26x against 1.38x. Without a transient
                # the drift changed nothing measurable: 1.32x both, 12 Spec-Bench prompts.)
                for x in range(1, self.n_widths):
                    if self._count[x]:
                        self._ratio[x] += self.revert * (self._ratio[0] - self._ratio[x])
        self._log.clear()

    def at(self, latency: Any, ctx: int, *, exact: bool = False) -> list[float]:
        """``[k]``: the corrected time of a pass over ``k + 1`` tokens at ``ctx``: the prediction
        times the measured/predicted ratio of recent passes of that width (a weighted straight
        line through the widths measured at least 3 times; 1 before any)."""
        pred = self.predict(latency, ctx, exact=exact)
        return [p * r for p, r in zip(pred, self.ratios())]

    def ratios(self) -> list[float]:
        """``[k]``: the measured/predicted ratio of passes over ``k + 1`` tokens (see :meth:`at`)."""
        if self._fitted is not None and len(self._log) < self.refit:
            return self._fitted
        self._fold()
        self._fitted = self._line()
        return self._fitted

    def _line(self) -> list[float]:
        seen = [w for w in range(self.n_widths) if self._count[w] >= 3]
        if len(seen) >= 2:                          # single widths are noisy
            # weighted least squares (weights sqrt(min(count, 50)) on the residuals, as polyfit's w)
            wts = [min(self._count[w], 50) for w in seen]
            sw = sum(wts)
            mx = sum(c * w for c, w in zip(wts, seen)) / sw
            my = sum(c * self._ratio[w] for c, w in zip(wts, seen)) / sw
            sxx = sum(c * (w - mx) ** 2 for c, w in zip(wts, seen))
            sxy = sum(c * (w - mx) * (self._ratio[w] - my) for c, w in zip(wts, seen))
            slope = sxy / sxx
            icpt = my - slope * mx
            return [min(max(icpt + slope * k, 0.25), 4.0) for k in range(self.n_widths)]
        if len(seen) == 1:
            return [self._ratio[seen[0]]] * self.n_widths
        return [1.0] * self.n_widths

    def step_ratio(self) -> float:
        """The measured/predicted ratio of a one-token step: what a draft step's prediction is
        corrected by too (the same kernels; correcting only verification would make drafts look
        cheaper than they are on a machine slower than its profile)."""
        return float(self.ratios()[0])


class LatencyWatch:
    """Measured one-token steps against the latency model's predictions. Once ``n`` steps were
    seen, a median ratio measured/predicted off by more than ``correct`` (25%) is a disagreement
    (logged once; the strategies' :class:`VerifyTimes` correct their verification and draft times
    by what they measure), and one beyond ``limit`` (2x either way) means the profile itself is
    wrong: :meth:`report` logs it once and drops the cached profile, so that the next process
    measures it again."""

    _reported: ClassVar[set[str]] = set()     # profiles reported in this process

    def __init__(self, n: int = 16, *, correct: float = 0.25, limit: float = 2.0) -> None:
        self._log: deque[float] = deque(maxlen=n)
        self.correct, self.limit = correct, limit
        self.ratio: float | None = None           # the last median, once n steps were seen
        self._seen = 0
        self._told = False

    def observe(self, measured: float, predicted: float) -> float | None:
        """A measured one-token step; returns the median ratio when it is beyond ``limit``."""
        if measured <= 0 or predicted <= 0:
            return None
        self._log.append(measured / predicted)
        self._seen += 1
        if len(self._log) < (self._log.maxlen or 1) or self._seen % 8:
            return None
        self.ratio = statistics.median(self._log)
        if abs(self.ratio - 1.0) > self.correct and not self._told:
            self._told = True
            log.info("one-token steps take %.2fx the latency profile's prediction: predicted times are "
                     "corrected by what is measured", self.ratio)
        if self.ratio > self.limit or self.ratio < 1.0 / self.limit:
            return self.ratio
        return None

    def report(self, latency: Any, ratio: float) -> None:
        """Log once per profile that it is wrong, and drop it from the cache folder."""
        key = repr(sorted(getattr(latency, "key", {}).items()))
        if key in LatencyWatch._reported:
            return
        LatencyWatch._reported.add(key)
        from ..latency import drop_cached
        dropped = drop_cached(latency) if getattr(latency, "profile", None) is not None else False
        log.warning("one-token steps take %.2fx the latency profile's prediction: the profile is wrong%s",
                    ratio, " and was dropped from the cache folder (the next run measures it again)"
                    if dropped else "")
