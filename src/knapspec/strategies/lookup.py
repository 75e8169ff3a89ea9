"""Prompt lookup decoding: drafts copied from earlier text, with no model run for drafting.

Each round, find the most recent earlier occurrence of the last ``n`` committed tokens (``n`` from
``max_ngram`` down to ``min_ngram``) in the prompt and the output so far, and propose the tokens
that followed it (at most ``max_draft``). Without a match the round is a plain decoding step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model import Model
from .base import AUTOREGRESSIVE, REGISTRY, Draft, RoundState, Strategy


def find_continuation(tokens: np.ndarray, *, max_ngram: int = 3, min_ngram: int = 1,
                      max_len: int = 8) -> tuple[int, list[int]]:
    """``(n, continuation)`` for the longest n-gram suffix of ``tokens`` (n in
    ``max_ngram..min_ngram``) that also occurs earlier: the up to ``max_len`` tokens that followed
    its most recent earlier occurrence. ``(0, [])`` when nothing matches."""
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


class PromptLookupStrategy(Strategy):
    name = "lookup"

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, max_draft: int = 8) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_draft < 1:
            raise ValueError(f"max draft length must be >= 1, got {max_draft}")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self._buf = np.zeros(0, dtype=np.int64)
        self._n = 0
        self.matches = 0
        self.rounds = 0

    def _tokens(self, toks: list[int]) -> np.ndarray:
        """The committed tokens as a growing numpy buffer (appended to, never rebuilt)."""
        if len(toks) > len(self._buf):
            buf = np.zeros(max(2 * len(toks), 256), dtype=np.int64)
            buf[:self._n] = self._buf[:self._n]
            self._buf = buf
        if len(toks) < self._n:
            self._n = 0
        self._buf[self._n:len(toks)] = toks[self._n:]
        self._n = len(toks)
        return self._buf[:self._n]

    def start(self, state: RoundState) -> None:
        self._n = 0
        self.matches = self.rounds = 0

    def propose(self, state: RoundState) -> Draft:
        self.rounds += 1
        n, cont = find_continuation(self._tokens(state.tokens), max_ngram=self.max_ngram,
                                    min_ngram=self.min_ngram, max_len=self.max_draft)
        if not cont:
            return AUTOREGRESSIVE
        self.matches += 1
        return Draft(plan=None, max_len=len(cont), tokens=tuple(cont), source=f"lookup{n}")

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "match_share": self.matches / self.rounds if self.rounds else 0.0}


@REGISTRY.register("lookup")
def _lookup(model: Model, *, max_draft: int | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in ("max_ngram", "min_ngram")}
    return PromptLookupStrategy(max_draft=max_draft or 8, **kw)
