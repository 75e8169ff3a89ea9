"""Prompt lookup decoding: drafts copied from earlier text, with no model run for drafting.

Each round, find the most recent earlier occurrence of the last ``n`` committed tokens (``n`` from
``max_ngram`` down to ``min_ngram``) in the prompt and the output so far, and propose the tokens
that followed it (at most ``max_draft``). Without a match the round is a plain decoding step.

A reference (``RoundState.reference``: a predicted output, e.g. OpenAI's Predicted Outputs) is
searched too, by :class:`ReferenceIndex`; its continuation is drafted when its n-gram match is at
least as long as the context's. It is only a source of drafts: verification keeps the output the
model's own.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from typing import Any

import numpy as np

from ..model import Model
from .base import AUTOREGRESSIVE, REGISTRY, Draft, RoundState, Strategy


def find_continuation(tokens: np.ndarray, *, max_ngram: int = 3, min_ngram: int = 1,
                      max_len: int = 8) -> tuple[int, list[int]]:
    """``(n, continuation)`` for the longest n-gram suffix of ``tokens`` (n in
    ``max_ngram..min_ngram``) that also occurs earlier: the up to ``max_len`` tokens that followed
    its most recent earlier occurrence. ``(0, [])`` when nothing matches.

    A scan over the whole context: the definition, kept as the reference that :class:`NgramIndex`
    (what the strategies use) is tested against."""
    total = len(tokens)
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        if n < 1:
            break
        suffix = tokens[total - n:]
        # windows starting at 0 .. total-n-1 (the suffix itself is excluded)
        win = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        hits = np.flatnonzero((win == suffix).all(axis=1))
        if hits.size:
            s = int(hits[-1]) + n                     # first token after the most recent match
            cont = tokens[s:s + max_len].tolist()
            if cont:
                return n, cont
    return 0, []


class NgramIndex:
    """The most recent earlier occurrence of every n-gram (n = 1..``max_ngram``) of a growing token
    sequence, kept up to date as tokens are committed: O(``max_ngram``) dictionary updates per new
    token and per query, however long the context (a scan like :func:`find_continuation` costs
    O(context) per round: ~0.3 ms a round at a few hundred tokens, more at 4k).

    ``find`` answers exactly what :func:`find_continuation` answers for the same tokens (tested)."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # _next[n][ngram] = index of the token that followed the ngram's most recent occurrence
        self._next: list[dict] = [{} for _ in range(max_ngram + 1)]

    def reset(self) -> None:
        self.tokens = []
        self._next = [{} for _ in range(self.max_ngram + 1)]

    def update(self, toks: list[int]) -> None:
        """Bring the index to ``toks``, which extends the tokens seen so far (committed tokens never
        change); anything shorter starts a new sequence."""
        if len(toks) < len(self.tokens):
            self.reset()
        t, p0 = self.tokens, len(self.tokens)
        t.extend(toks[p0:])
        end = len(t)
        # the n-grams ending at p-1 (p >= max(p0, n)) now have a successor p; dict.update keeps the
        # last p per n-gram, the most recent occurrence (a prompt's whole index in one C-level pass
        # per n: a loop of dictionary stores took ~10 ms for an 8,000-token prompt)
        for n in range(1, self.max_ngram + 1):
            start = max(p0, 1, n)
            if start >= end:
                continue
            keys = t[start - 1:end - 1] if n == 1 else zip(*(t[start - n + k:end - n + k] for k in range(n)))
            self._next[n].update(zip(keys, range(start, end)))

    def find(self, *, max_ngram: int, min_ngram: int = 1, max_len: int = 8) -> tuple[int, list[int]]:
        """``(n, continuation)`` for the current tokens, as :func:`find_continuation`."""
        t = self.tokens
        total = len(t)
        for n in range(min(max_ngram, self.max_ngram, total - 1), max(min_ngram, 1) - 1, -1):
            s = self._next[n].get(t[-1] if n == 1 else tuple(t[total - n:]))
            if s is not None:
                return n, t[s:s + max_len]
        return 0, []


class ReferenceIndex:
    """Every occurrence of every n-gram (n = 1..``max_ngram``) of a fixed reference sequence, and
    a cursor where the last answer's continuation began. ``find`` answers with the continuation of
    the first occurrence at or after the cursor, else of the nearest one before it: an output that
    follows its reference in order (an edited file, a rewritten paragraph) is then matched to the
    aligned copy of an n-gram the reference repeats, not to whichever copy came last."""

    def __init__(self, reference: list[int] | tuple[int, ...], max_ngram: int) -> None:
        self.reference = list(reference)
        self.max_ngram = max_ngram
        self.cursor = 0
        # _next[n][ngram] = indices of the tokens that follow its occurrences, ascending
        self._next: list[dict] = [{} for _ in range(max_ngram + 1)]
        r = self.reference
        for p in range(1, len(r)):
            for n in range(1, min(max_ngram, p) + 1):
                self._next[n].setdefault(r[p - 1] if n == 1 else tuple(r[p - n:p]), []).append(p)

    def find(self, tokens: list[int], *, max_ngram: int, min_ngram: int = 1,
             max_len: int = 8) -> tuple[int, list[int]]:
        """``(n, continuation)`` for the longest suffix of ``tokens`` found in the reference
        (``(0, [])`` when none); moves the cursor to the continuation's start."""
        total = len(tokens)
        for n in range(min(max_ngram, self.max_ngram, total), max(min_ngram, 1) - 1, -1):
            hits = self._next[n].get(tokens[-1] if n == 1 else tuple(tokens[total - n:]))
            if hits:
                i = bisect_left(hits, self.cursor)
                self.cursor = hits[i] if i < len(hits) else hits[i - 1]
                return n, self.reference[self.cursor:self.cursor + max_len]
        return 0, []


def best_continuation(context: tuple[int, list[int]], reference: tuple[int, list[int]]
                      ) -> tuple[int, list[int], bool]:
    """``(n, continuation, from_reference)``: the reference's match when it is at least as long
    as the context's (the reference is the output the caller predicted), else the context's."""
    if reference[1] and reference[0] >= context[0]:
        return reference[0], reference[1], True
    return context[0], context[1], False


class PromptLookupStrategy(Strategy):
    name = "lookup"

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, max_draft: int = 8) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_draft < 1:
            raise ValueError(f"max draft length must be >= 1, got {max_draft}")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self.index = NgramIndex(max_ngram)
        self.reference: ReferenceIndex | None = None
        self.matches = 0
        self.rounds = 0

    def start(self, state: RoundState) -> None:
        self.index.reset()
        self.matches = self.rounds = 0
        self.reference = ReferenceIndex(state.reference, self.max_ngram) if state.reference else None

    def propose(self, state: RoundState) -> Draft:
        self.rounds += 1
        self.index.update(state.tokens)
        found = self.index.find(max_ngram=self.max_ngram, min_ngram=self.min_ngram, max_len=self.max_draft)
        ref = False
        if self.reference is not None:
            n, cont, ref = best_continuation(found, self.reference.find(
                state.tokens, max_ngram=self.max_ngram, min_ngram=self.min_ngram, max_len=self.max_draft))
        else:
            n, cont = found
        if not cont:
            return AUTOREGRESSIVE
        self.matches += 1
        return Draft(plan=None, max_len=len(cont), tokens=tuple(cont),
                     source=f"reference{n}" if ref else f"lookup{n}", n_reference=len(cont) if ref else 0)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "match_share": self.matches / self.rounds if self.rounds else 0.0}


@REGISTRY.register("lookup", options=("max_ngram", "min_ngram"), common=("max_draft",))   # (copies: no confidence)
def _lookup(model: Model, *, max_draft: int | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in ("max_ngram", "min_ngram")}
    return PromptLookupStrategy(max_draft=max_draft or 8, **kw)


MAX_POS = 16          # lookup positions tracked separately (later ones share the last estimate)
# both Beta counts at least this: a Thompson draw from the normal approximation (``_beta_draw``)
BETA_NORMAL = 30.0


class LookupAcceptance:
    """How often lookup drafts are accepted, per n-gram match length and draft position: the
    probability that position j is accepted given that the ones before it were, as Beta posteriors
    (prior Beta(1, 1)); positions from ``MAX_POS - 1`` on share one estimate.

    A round's bookkeeping runs right after a forward pass, on cold caches, where numpy's per-call
    machinery is dear (~40 us a round for the record, ~25 us for folding one outcome into the
    arrays by slices, on the embedded model's Spec-Bench rounds of ~6 ms). So :meth:`record` only
    appends, the counts are plain Python lists that the log is folded into when they are read, and
    :attr:`acc` and :attr:`tried` are numpy arrays made from them on demand: writes to those arrays
    count (a caller may set the estimates) until an outcome next changes the counts."""

    def __init__(self, max_group: int) -> None:
        """Groups ``0..max_group``: n-gram lengths (a caller may add groups of its own above them,
        e.g. matches in a reference text)."""
        self.max_group = max_group
        self._accl = [[1.0] * MAX_POS for _ in range(max_group + 1)]
        self._triedl = [[2.0] * MAX_POS for _ in range(max_group + 1)]
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None    # (acc, tried) handed out
        self.log: list[tuple[int, int, int]] = []      # (n-gram, positions decided, accepted)

    def record(self, n_gram: int, decided: int, accepted: int) -> None:
        if decided:
            self.log.append((min(n_gram, self.max_group), decided, min(decided, accepted)))
            if len(self.log) >= 512:                   # bounded, for a long-lived strategy
                self._counts()

    def _counts(self) -> tuple[list[list[float]], list[list[float]]]:
        """The counts, with any writes to the arrays handed out and the log folded in (the arrays
        stay the counts' until the log changes them)."""
        if self._arrays is not None:
            self._accl, self._triedl = self._arrays[0].tolist(), self._arrays[1].tolist()
            if self.log:
                self._arrays = None
        acc, tried, last = self._accl, self._triedl, MAX_POS - 1
        for g, k, a in self.log:
            ta, tt = acc[g], tried[g]
            for j in range(min(k, last)):
                tt[j] += 1.0
            for j in range(min(a, last)):
                ta[j] += 1.0
            if k > last:                               # later positions share the last estimate
                tt[last] += k - last
                ta[last] += max(a - last, 0)
        self.log.clear()
        return acc, tried

    def _handed_out(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None or self.log:
            acc, tried = self._counts()
            self._arrays = (np.array(acc), np.array(tried))
        return self._arrays

    @property
    def acc(self) -> np.ndarray:
        """Accepted counts (plus the prior) ``[max_group + 1, MAX_POS]``."""
        return self._handed_out()[0]

    @property
    def tried(self) -> np.ndarray:
        """Decided counts (plus the prior) ``[max_group + 1, MAX_POS]``."""
        return self._handed_out()[1]

    def probs(self, n_gram: int, rng: random.Random | None = None, n: int = MAX_POS) -> list[float]:
        """P(position j accepted | positions < j accepted), ``j < n``, for an ``n_gram`` match: the
        posterior means, or with ``rng`` one draw from each Beta posterior (Thompson sampling).
        (Python's ``random``, not numpy's: a handful of draws right after a forward pass, where
        numpy's per-call machinery on cold caches cost ~70 us a round.)"""
        g = min(n_gram, self.max_group)
        acc_all, tried_all = self._counts()
        acc, tried = acc_all[g][:n], tried_all[g][:n]
        if rng is not None:
            return [_beta_draw(rng, a, t - a + 1e-9) for a, t in zip(acc, tried)]
        return [a / t for a, t in zip(acc, tried)]


def _beta_draw(rng: random.Random, a: float, b: float) -> float:
    """One draw from Beta(a, b): exact where either count is small, else from the normal with its
    mean and variance (skewness under ~0.3 there). ``betavariate`` costs two gamma draws, ~6 us;
    the hybrid draws one per lookup position every round (~40 us a round, a fifth of its planning
    on Spec-Bench prompts)."""
    if a < BETA_NORMAL or b < BETA_NORMAL:
        return rng.betavariate(a, b)
    n = a + b
    return min(max(rng.gauss(a / n, math.sqrt(a * b / (n * n * (n + 1.0)))), 0.0), 1.0)
