"""Draft-only vocabulary truncation.

On a small model the lm_head is a large share of a draft step (SmolLM2-135M: 49152 x 576, ~21% of
the weights, read on every draft token). A draft may compute logits over a *subset* of the
vocabulary only: the most frequent tokens of calibration text plus every token of the prompt and
of the output so far (with quantized weights: those rows' tile bytes, in the lm_head's block type).
Verification always uses the full vocabulary, so greedy output is unchanged;
under sampling the draft distribution is zero outside the subset, a valid proposal for speculative
sampling, so the output distribution stays exact.

:class:`DraftVocab` keeps the subset's lm_head rows in one preallocated buffer (frequent tokens,
then the prompt's, then output tokens appended as they are committed: no rebuild while generating)
and tracks, for each candidate size, the *coverage*: how often a committed output token lies in the
subset of that size. A truncated draft can only propose covered tokens, so its per-token acceptance
is modelled as alpha x coverage; the strategy picks the size (or the full vocabulary) with the best
tokens per time, the lm_head's share of a draft step shrinking with the rows kept.

The ranking of frequent tokens comes from ``knapspec calibrate --strategy vocab`` (token counts of
calibration text under the model's tokenizer), saved as a calibration file.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import torch

from ..formats import LANES, QuantWeight
from ..model import Model

SIZES = (1024, 2048, 4096, 8192, 16384)
# larger subsets, offered where they are at most a quarter of the vocabulary: Gemma 3's 262,144
# tokens (its tied lm_head is ~70% of the 270M model's weight bytes), where 16k frequent tokens
# may cover too little of some outputs and 32k-64k rows still save most of the head
LARGE_SIZES = (32768, 65536)


def sizes_for(vocab_size: int) -> tuple[int, ...]:
    """The candidate subset sizes for a vocabulary of ``vocab_size`` tokens."""
    return SIZES + tuple(s for s in LARGE_SIZES if 4 * s <= vocab_size)


class DraftVocab:
    """A growing draft vocabulary over a fixed frequency ranking (``ranked``: token ids, most
    frequent first). ``size`` = how many frequent tokens are included (None = full vocabulary);
    ``sizes``: the candidates (default :func:`sizes_for` the model's vocabulary)."""

    def __init__(self, model: Model, ranked: list[int] | np.ndarray, *, sizes: tuple[int, ...] | None = None,
                 prior: float = 8.0) -> None:
        V = model.cfg.vocab_size
        sizes = sizes_for(V) if sizes is None else sizes
        arr = np.asarray(ranked, dtype=np.int64).reshape(-1)
        ranked = arr[(arr >= 0) & (arr < V)].tolist()
        if not ranked:
            raise ValueError("the vocabulary ranking is empty")
        self.model, self.V = model, V
        self.sizes = tuple(s for s in sorted(set(sizes)) if 0 < s < min(V, len(ranked) + 1))
        self.rank = np.full(V, V, dtype=np.int64)
        self.rank[ranked] = np.arange(len(ranked))
        self.ranked = ranked
        self.prior = prior
        self.size: int | None = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.hits = np.zeros(len(self.sizes))
        self.seen_outputs = 0

    # ---- per generation ---------------------------------------------------------------------------
    def start(self, prompt: list[int], capacity: int) -> None:
        """A new generation: the prompt's tokens are in every subset; the coverage prior is the
        coverage of the prompt by each size (a token counts as covered if frequent or seen before)."""
        self.seen = np.zeros(self.V, dtype=bool)
        p = np.asarray(prompt, dtype=np.int64).reshape(-1)
        repeat = np.ones(p.shape[0], dtype=bool)          # seen earlier in the prompt
        repeat[np.unique(p, return_index=True)[1]] = False
        covered = repeat[:, None] | (self.rank[p][:, None] < np.asarray(self.sizes, dtype=np.int64)[None])
        self.seen[p] = True
        self.prior_cov = covered.sum(0) / max(1, len(prompt))
        # per size: seen tokens outside its frequent ones (the subset's extra rows), kept up to date
        self._outside = (self.rank[np.unique(p)][:, None] >= np.asarray(self.sizes, dtype=np.int64)[None]).sum(0)
        self._reset_counts()
        self.capacity = capacity
        self.size = None
        self._rows = None

    def coverage(self) -> np.ndarray:
        """Estimated share of output tokens inside each candidate size's subset."""
        return (self.hits + self.prior * self.prior_cov) / (self.seen_outputs + self.prior)

    def commit(self, tokens: list[int]) -> None:
        """Committed output tokens: update the coverage counts, add unseen tokens to the subset."""
        sizes = np.asarray(self.sizes)
        for t in tokens:
            self.hits += self.seen[t] | (self.rank[t] < sizes)
            self.seen_outputs += 1
            if not self.seen[t]:
                self.seen[t] = True
                self._outside += self.rank[t] >= sizes
                if self._rows is not None and self.rank[t] >= self.size:
                    self._append(t)

    # ---- the head ---------------------------------------------------------------------------------
    def select(self, size: int | None) -> None:
        """Use ``size`` frequent tokens (plus every seen token) from now on; None = full vocabulary."""
        if size == self.size:
            return
        self.size = size
        self._rows = None
        if size is None:
            return
        extra = [int(t) for t in np.flatnonzero(self.seen) if self.rank[t] >= size]
        n = size + len(extra)
        cap = n + self.capacity
        lm, base = self.model.lm_head, self._base(size)
        self._ids = torch.empty(cap, dtype=torch.long, device=self.model.device)
        self._ids[:n] = torch.tensor(self.ranked[:size] + extra, dtype=torch.long)
        if isinstance(lm, QuantWeight):          # the rows in the lm_head's block type, tile bytes copied
            self._head = QuantWeight.empty(lm.qtype, cap, lm.k)
            if isinstance(base, QuantWeight):
                self._head.tiles[:base.tiles.shape[0]] = base.tiles
            else:                                # (a size that is not whole tiles: not kept)
                self._head.copy_rows(np.arange(size), lm, self.ranked[:size])
            if extra:
                self._head.copy_rows(np.arange(size, n), lm, extra)
        else:
            self._head = torch.empty(cap, lm.shape[1], dtype=lm.dtype, device=lm.device)
            self._head[:size] = base
            if extra:
                self._head[size:n] = lm[torch.tensor(extra, device=lm.device)]
        self._rows = n

    def _base(self, size: int) -> torch.Tensor | QuantWeight | None:
        """The lm_head rows of the ``size`` most frequent tokens, built once per size (they are the
        same in every generation: rebuilding them cost 15-45 ms per generation on the embedded
        model, 2-5% of a 96-token generation at 8k, where the rows of the prompt's other tokens are
        a few hundred). They are kept with the model, for every draft vocabulary over the same ranking
        (a benchmark or a server builds a strategy, and its vocabulary, per run), keyed by the
        size and the ranking's first ``size`` tokens. Quantized rows are kept as whole tiles of
        16 rows (None for another size)."""
        ids = self.ranked[:size]
        key = (size, self.ranking_key(size))
        cache = self.model.__dict__.setdefault("_draft_head_rows", {})
        if key not in cache:
            lm = self.model.lm_head
            if isinstance(lm, QuantWeight):
                if size % LANES:
                    return None
                head = QuantWeight.empty(lm.qtype, size, lm.k)
                head.copy_rows(np.arange(size), lm, ids)
                cache[key] = head
            else:
                cache[key] = lm[torch.tensor(ids, device=lm.device)].clone()
        return cache[key]

    def ranking_key(self, n: int) -> str:
        """A digest of the ranking's first ``n`` token ids: what names this vocabulary's cached
        head rows and its planner's memory file."""
        return hashlib.blake2b(np.asarray(self.ranked[:n], dtype=np.int64).tobytes(), digest_size=16).hexdigest()

    def _append(self, t: int) -> None:
        assert self._rows is not None
        lm = self.model.lm_head
        if self._rows >= self._ids.shape[0]:             # grow (rare: capacity is max new tokens)
            self._ids = torch.cat([self._ids, torch.empty_like(self._ids)])
            self._head = (self._head.grown(2 * self._head.n) if isinstance(self._head, QuantWeight)
                          else torch.cat([self._head, torch.empty_like(self._head)]))
        self._ids[self._rows] = t
        if isinstance(lm, QuantWeight):
            self._head.copy_rows([self._rows], lm, [t])
        else:
            self._head[self._rows] = lm[t]
        self._rows += 1

    @property
    def n_rows(self) -> int:
        return self.V if self._rows is None else self._rows

    def head(self) -> tuple[torch.Tensor | QuantWeight | None, torch.Tensor | None]:
        """(lm_head rows, their token ids) for the current subset; (None, None) = full vocabulary."""
        if self._rows is None:
            return None, None
        if isinstance(self._head, QuantWeight):
            return self._head.head_rows(self._rows), self._ids[:self._rows]
        return self._head[:self._rows], self._ids[:self._rows]

    def rows_for(self, size: int) -> int:
        """Rows the subset of ``size`` frequent tokens would have now."""
        if size in self.sizes:
            return size + int(self._outside[self.sizes.index(size)])
        return size + int(np.count_nonzero(self.seen & (self.rank >= size)))

    def describe(self) -> dict[str, Any]:
        return {"draft_vocab": self.size, "draft_vocab_rows": self.n_rows,
                "coverage": {s: round(float(c), 3) for s, c in zip(self.sizes, self.coverage())}}


def subset_agreement(logits: torch.Tensor, targets: torch.Tensor, seen: np.ndarray, rank: np.ndarray,
                     sizes: tuple[int, ...]) -> dict[int, int]:
    """Per subset size, how many rows' greedy token among that subset (``seen`` tokens, or ``rank``
    < size) is the row's target: the count of ``logits.masked_fill(~subset, -inf).argmax(-1) ==
    targets``, ties to the lowest id as ``argmax`` breaks them, without a masked copy of the
    logits per size. A row agrees at a size iff its target is in that subset and none of the tokens
    that would beat it (a higher logit, or an equal one at a lower id) is: none of them seen, and
    the best ranked of them at or beyond the size. Where the row's greedy token over the whole
    vocabulary is its target, nothing beats it; only the other rows are looked at. ~1 ms for
    16 x 49,152 logits, where a masked copy and argmax per size cost ~7 ms for 5 sizes (a fifth of
    a probed window on the embedded model)."""
    L = logits.detach().float().cpu().numpy()
    k, V = L.shape
    t = targets.reshape(-1).cpu().numpy().astype(np.int64)
    blocked = np.zeros(k, dtype=bool)
    best = np.full(k, V, dtype=np.int64)                     # the best rank among the beating tokens
    for r in np.flatnonzero(L.argmax(1) != t):
        row, tr = L[r], t[r]
        beats = row > row[tr]
        beats[:tr] |= row[:tr] == row[tr]
        ids = np.flatnonzero(beats)
        blocked[r] = seen[ids].any()
        best[r] = rank[ids].min()
    covered = [seen[t] | (rank[t] < s) for s in sizes]
    return {s: int(np.count_nonzero(c & ~blocked & (best >= s))) for s, c in zip(sizes, covered)}


def load_draft_vocab(model: Model, spec: str | DraftVocab | None) -> DraftVocab | None:
    """``None``/"off": no truncation; "auto": the ranking of this model's vocab calibration file if
    one exists, else none; "ids": the tokenizer's own order (:func:`id_ranking`, no calibration
    needed); a path: that calibration file (must exist); a :class:`DraftVocab`: itself. None where
    the vocabulary is no larger than the smallest subset."""
    from .search import default_calibration_path, load_calibration
    if spec is None or isinstance(spec, DraftVocab) or spec == "off":
        return None if spec == "off" else spec
    if model.cfg.vocab_size <= min(SIZES):
        return None
    if spec == "ids":
        return DraftVocab(model, id_ranking(model))
    if spec == "auto" and not default_calibration_path("vocab", model).is_file():
        return None
    doc, path = load_calibration(None if spec == "auto" else spec, "vocab", model)
    try:
        return DraftVocab(model, doc["ranked"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"calibration file {path} is malformed ({e}); "
                         "re-run knapspec calibrate --strategy vocab") from None


def id_ranking(model: Model) -> np.ndarray:
    """A ranking that needs no calibration (``draft_vocab=ids``): token ids in order. Byte-pair encodings number
    their tokens in the order their merges were learned, most frequent pairs first, and
    SentencePiece vocabularies by score, so low ids are the frequent tokens. Measured on the
    Spec-Bench prompts: the first 8,192 ids of SmolLM2's vocabulary cover 82% of their tokens (a
    ranking by token counts of 0.9 MB of other bundled text: 81%); the first 65,536 of Gemma 3's
    262,144 cover 75% (that ranking: 83% with its 15k distinct tokens). Every token of the prompt
    and of the output so far is in every subset besides."""
    return np.arange(model.cfg.vocab_size)


def rank_tokens(token_lists: list[list[int]]) -> list[int]:
    """Token ids by frequency (most frequent first; ties by id)."""
    c: Counter[int] = Counter()
    for ids in token_lists:
        c.update(ids)
    return [t for t, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]


def calibrate(llm, prompts: list[list[int]], *, new_tokens: int = 64, out=None,
              progress: bool = True) -> dict[str, Any]:
    """Rank tokens by their frequency in the calibration prompts and in the model's own greedy
    continuations of them (what drafts will have to propose); save the ranking."""
    import time

    from tqdm.auto import tqdm

    from .search import default_calibration_path, save_calibration
    if not prompts:
        raise ValueError("vocab calibration needs at least one prompt")
    t0 = time.perf_counter()
    lists: list[list[int]] = []
    n_out = 0
    for ids in tqdm(prompts, desc="vocab calibration", disable=not progress, leave=False):
        lists.append(ids)
        g = llm.engine.generate(ids, None, max_new_tokens=new_tokens, stop_ids=llm.stop_ids)
        lists.append(g.tokens)
        n_out += len(g.tokens)
    ranked = rank_tokens(lists)
    record = {"ranked": ranked, "distinct": len(ranked), "n_prompts": len(prompts), "new_tokens": new_tokens,
              "output_tokens": n_out, "seconds": round(time.perf_counter() - t0, 1)}
    path = save_calibration(out or default_calibration_path("vocab", llm.model), "vocab", llm.model, record)
    record["path"] = str(path)
    return record
