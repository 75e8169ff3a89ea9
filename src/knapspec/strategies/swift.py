"""SWIFT (ICLR 2025, arXiv 2410.06916): on-the-fly self-speculative decoding.

An optimisation phase early in generation searches skip sets with a fixed skip ratio (0.45 of the
sublayers, attention and MLP chosen separately) by alternating random search and Bayesian
optimisation, each candidate scored by its *matchness* on the context: the draft runs
teacher-forced over the last ``window`` committed tokens and its top-1 is compared with the full
model's. While it searches, and afterwards, drafting uses the best set found so far with SWIFT's
confidence early stop (0.8) and up to ``d_max`` drafts. The study lives as long as the strategy
object, so, as in SWIFT, the optimisation started on the first inputs carries over to the next
ones and ends after ``max_trials`` trials or ``patience`` trials without improvement.

Differences from the paper: candidates are scored in batches of ``batch`` per round (one batched
read-only pass, not one candidate per step); the Bayesian optimiser is optuna's TPE rather than a
Gaussian process, and it proposes every ``bo_every``-th trial (SWIFT: every 25th; our searches are
far shorter); the small draft tree SWIFT also builds is not used (the engine verifies one chain).
"""

from __future__ import annotations

from typing import Any

from ..model import Model
from ..plan import Plan
from .base import AUTOREGRESSIVE, REGISTRY, Draft, RoundState, Strategy
from .search import PlanScorer, SkipSearch, skippable


class SWIFTStrategy(Strategy):
    name = "swift"
    persists_across_prompts = True

    def __init__(self, model: Model, *, skip_ratio: float = 0.45, window: int = 32, batch: int = 4,
                 max_trials: int = 64, patience: int = 24, bo_every: int = 2, d_max: int = 25,
                 threshold: float | None = 0.8, seed: int = 0) -> None:
        if not 0.0 < skip_ratio < 1.0:
            raise ValueError(f"skip ratio must be in (0, 1), got {skip_ratio}")
        for k, v in (("window", window), ("batch", batch), ("max_trials", max_trials), ("d_max", d_max),
                     ("patience", patience)):
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        n = model.cfg.n_layers
        self.model = model
        self.skip_count = max(1, min(len(skippable(n)), round(skip_ratio * 2 * n)))
        self.search = SkipSearch(n, skip_count=self.skip_count, bo_every=bo_every, seed=seed)
        self.window, self.batch, self.max_trials, self.patience = window, batch, max_trials, patience
        self.d_max, self.threshold = d_max, threshold
        self._since_best = 0
        self.done = False

    def _optimise(self, state: RoundState) -> None:
        """One optimisation step: ``batch`` candidates scored on the last ``window`` committed tokens."""
        ctx = state.context_length
        k = min(self.window, ctx - 1)
        if k < 1:
            return
        start = ctx - 1 - k                  # the cache holds positions 0..ctx-2 (last token pending)
        scorer = PlanScorer(self.model, state.cache, state.tokens[start:ctx - 1], start)
        before = self.search.best_value
        n = min(self.batch, self.max_trials - self.search.n_trials)
        trials = [self.search.ask() for _ in range(n)]
        for t, v in zip(trials, scorer.score([t.plan for t in trials])):
            self.search.tell(t, v)
        self._since_best = 0 if self.search.best_value > before else self._since_best + n
        if self.search.n_trials >= self.max_trials or self._since_best >= self.patience:
            self.done = True

    def propose(self, state: RoundState) -> Draft:
        if not self.done:
            self._optimise(state)
        plan = self.search.best_plan
        if plan is None:
            return AUTOREGRESSIVE
        return Draft(plan=plan, max_len=self.d_max, threshold=self.threshold, source="swift")

    @property
    def best_plan(self) -> Plan | None:
        return self.search.best_plan

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "plan": str(self.search.best_plan),
                "matchness": round(self.search.best_value, 3), "trials": self.search.n_trials,
                "optimising": not self.done, "skip_count": self.skip_count}


_SWIFT_OPTIONS = ("skip_ratio", "window", "batch", "max_trials", "patience", "bo_every", "seed")


@REGISTRY.register("swift", options=_SWIFT_OPTIONS)
def _swift(model: Model, *, max_draft: int | None = None, threshold: float | None = None,
           **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in _SWIFT_OPTIONS}
    return SWIFTStrategy(model, d_max=max_draft or 25, threshold=0.8 if threshold is None else threshold, **kw)
