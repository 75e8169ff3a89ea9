"""Draft & Verify (ACL 2024, arXiv 2309.08168): one static skip set per model, found offline.

``calibrate`` searches skip sets with Bayesian optimisation (optuna's TPE; the paper uses a
Gaussian-process optimiser) after a few random start-up trials, each trial *measured*: greedy
generation with that skip set on calibration prompts, the objective tokens per second. The best
set, its speed and the autoregressive speed measured in the same run are saved to a JSON file
that :class:`DraftVerifyStrategy` reads.

Drafting uses the adaptive draft-exit threshold of the paper: after each round the acceptance rate
is smoothed, AR <- b1 AR + (1 - b1) accepted/drafted, and the threshold moves towards
gamma + eps when AR falls below the target rate and towards gamma - eps otherwise,
gamma <- b2 gamma + (1 - b2) (gamma +/- eps).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..model import Model
from ..plan import Plan
from .base import REGISTRY, Draft, Outcome, RoundState, Strategy
from .search import SkipSearch, default_calibration_path, load_calibration, save_calibration

log = logging.getLogger(__name__)


class DraftVerifyStrategy(Strategy):
    name = "draft-verify"

    def __init__(self, plan: Plan, *, d_max: int = 12, threshold: float = 0.6, target: float = 0.8,
                 eps: float = 0.01, beta1: float = 0.5, beta2: float = 0.9, adaptive: bool = True) -> None:
        if plan.is_full:
            raise ValueError("the Draft & Verify skip set skips nothing: re-run knapspec calibrate")
        if d_max < 1:
            raise ValueError(f"max draft length must be >= 1, got {d_max}")
        self.plan, self.d_max, self.adaptive = plan, d_max, adaptive
        self.gamma0 = self.gamma = threshold
        self.target, self.eps, self.beta1, self.beta2 = target, eps, beta1, beta2
        self.rate = target
        self.history: list[float] = []

    def start(self, state: RoundState) -> None:
        self.gamma, self.rate = self.gamma0, self.target

    def propose(self, state: RoundState) -> Draft:
        return Draft(plan=self.plan, max_len=self.d_max, threshold=self.gamma, source="draft-verify")

    def observe(self, outcome: Outcome) -> None:
        if not self.adaptive or outcome.drafted == 0:
            return
        self.rate = self.beta1 * self.rate + (1 - self.beta1) * outcome.accepted / outcome.drafted
        step = self.gamma + self.eps if self.rate <= self.target else self.gamma - self.eps
        self.gamma = min(1.0, max(0.0, self.beta2 * self.gamma + (1 - self.beta2) * step))
        self.history.append(self.gamma)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "plan": str(self.plan), "threshold": round(self.gamma, 3)}


def measure_tps(engine, prompts: list[list[int]], strategy: Strategy | None, new_tokens: int,
                stop_ids: tuple[int, ...]) -> float:
    """Decode tokens per second over the prompts (prefill excluded), greedy."""
    tokens, secs = 0, 0.0
    for ids in prompts:
        g = engine.generate(ids, strategy, max_new_tokens=new_tokens, stop_ids=stop_ids)
        tokens += g.stats.new_tokens - 1
        secs += g.stats.decode_s
    return tokens / secs if secs > 0 else 0.0


def calibrate(llm, prompts: list[list[int]], *, trials: int = 30, new_tokens: int = 24, d_max: int = 12,
              n_random: int = 8, seed: int = 0, out=None, progress: bool = True) -> dict[str, Any]:
    """Search the static skip set (see the module docstring) and save it; returns the saved record."""
    if not prompts:
        raise ValueError("draft-verify calibration needs at least one prompt")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    model: Model = llm.model
    engine, stops = llm.engine, llm.stop_ids
    t0 = time.perf_counter()
    measure_tps(engine, prompts[:1], None, min(8, new_tokens), stops)            # warm-up
    ar = measure_tps(engine, prompts, None, new_tokens, stops)
    search = SkipSearch(model.cfg.n_layers, skip_count=None, bo_every=1, n_random=n_random, seed=seed)

    def objective(plans: list[Plan]) -> list[float]:
        out_ = []
        for p in plans:
            if p.is_full:
                out_.append(ar)
                continue
            out_.append(measure_tps(engine, prompts, DraftVerifyStrategy(p, d_max=d_max), new_tokens, stops))
        return out_

    best = search.run(objective, trials, progress="draft-verify search" if progress else None)
    ar_after = measure_tps(engine, prompts, None, new_tokens, stops)
    record = {"skip": str(best), "n_layers": model.cfg.n_layers, "tokens_per_s": round(search.best_value, 3),
              "ar_tokens_per_s": round((ar + ar_after) / 2, 3), "trials": trials, "new_tokens": new_tokens,
              "n_prompts": len(prompts), "d_max": d_max, "seconds": round(time.perf_counter() - t0, 1),
              "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device)}
    path = save_calibration(out or default_calibration_path("draft-verify", model), "draft-verify", model, record)
    record["path"] = str(path)
    return record


_DV_OPTIONS = ("adaptive", "target", "eps")


@REGISTRY.register("draft-verify", options=("calibration",) + _DV_OPTIONS)
def _draft_verify(model: Model, *, calibration: str | None = None, max_draft: int | None = None,
                  threshold: float | None = None, **options: Any) -> Strategy:
    doc, path = load_calibration(calibration, "draft-verify", model)
    try:
        plan = Plan.parse(str(doc["skip"]), model.cfg.n_layers)
    except KeyError:
        raise ValueError(f"calibration file {path} has no skip set; re-run knapspec calibrate") from None
    kw = {k: v for k, v in options.items() if k in _DV_OPTIONS}
    return DraftVerifyStrategy(plan, d_max=max_draft or int(doc.get("d_max", 12)),
                               threshold=0.6 if threshold is None else threshold, **kw)
