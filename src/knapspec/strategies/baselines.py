"""Baselines on the same engine: CLaSp (layer DP), LayerSkip-style early exit, DEL (dynamic early
exit). See docs/strategies.md for what each follows and where it differs.

An early exit after layer k is the plan that runs layers 0..k-1 and skips the rest: skipped
sublayers leave the residual stream unchanged, so the final norm + lm_head read the hidden state at
depth 2k, exactly an early exit with the shared head. The engine then verifies as for any plan.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..latency import LatencyModel
from ..model import Model
from ..plan import Plan
from .base import AUTOREGRESSIVE, REGISTRY, Draft, Outcome, RoundState, Strategy
from .knapspec import Choice, KnapSpecStrategy, knapsack_dp
from .pricing import best_length, verify_times


def exit_plan(n_layers: int, k: int) -> Plan:
    """Run layers 0..k-1, skip layers k..L-1 (an early exit after k layers)."""
    if not 1 <= k < n_layers:
        raise ValueError(f"exit layer must be in 1..{n_layers - 1}, got {k}")
    rest = tuple(range(k, n_layers))
    return Plan.from_skips(n_layers, attn=rest, mlp=rest)


# ---- CLaSp -----------------------------------------------------------------------------------------
class CLaSpStrategy(KnapSpecStrategy):
    """CLaSp (arXiv 2505.24196): a DP over whole layers (attention and MLP together) choosing M
    skipped layers that keep the last verified tokens' hidden states closest (cosine) to the full
    model's; re-optimised every ``every`` rounds; fixed maximum draft length with the confidence
    exit. Shares KnapSpec's collection of verified hidden states and its batched DP."""

    name = "clasp"
    wants_hidden = True                     # the verifier's residual stream, every round

    def __init__(self, model: Model, *, skip_layers: int | None = None, d_max: int = 6, every: int = 8,
                 window: int = 4, threshold: float | None = None) -> None:
        n = model.cfg.n_layers
        m = skip_layers if skip_layers is not None else max(1, round(0.4 * n))
        if not 1 <= m < n:
            raise ValueError(f"CLaSp skips 1..{n - 1} layers, got {m}")
        self.skip_layers = m
        super().__init__(model, LatencyModel.analytic(n, attn=1.0, attn_per_token=0.0, mlp=1.0, head=1.0),
                         window=window, d_max=d_max, every=every, min_cosine=-1.0,
                         max_states=n + 1, threshold=threshold)

    def start(self, state: RoundState) -> None:
        self.reset()
        self._cache = state.cache
        self.collect_prompt(state)
        self._replan(state)

    def propose(self, state: RoundState) -> Draft:
        self._cache = state.cache
        if self.choice is None or state.round - self._last_dp_round >= self.every:
            self._replan(state)
        c = self.choice
        assert c is not None
        self._used.append(c)
        if c.plan is None:
            return AUTOREGRESSIVE
        return Draft(plan=c.plan, max_len=c.d, threshold=self.threshold, source=self.name)

    def _replan(self, state: RoundState) -> None:
        _, c = self.optimise(state.context_length)
        self._last_dp_round = state.round
        self._set(c)

    @torch.inference_mode()
    def optimise(self, ctx: int) -> tuple[list[tuple[Plan, float, float]], Choice]:
        model = self.model
        n = model.cfg.n_layers
        start, hidden, _ = self._collected()
        ref = hidden.float()
        cache = self._cache

        def step(i: int, X: torch.Tensor) -> torch.Tensor:
            X = model.sublayer(2 * i, X, start, cache, write=False)
            return model.sublayer(2 * i + 1, X, start, cache, write=False)

        def score(depth: int, X: torch.Tensor) -> torch.Tensor:
            return F.cosine_similarity(X.float(), ref[2 * depth][None], dim=-1).mean(-1)

        def allow(i: int, runs: torch.Tensor) -> torch.Tensor:
            return runs[:, 0] != 0                               # layer 0 always runs

        states, _ = knapsack_dp([1] * n, hidden[0][None], step, score, allow=allow)
        ok = [s for s in states if s.saved >= self.skip_layers] or states
        best = max(ok, key=lambda s: s.value)
        skipped = tuple(i for i, r in enumerate(best.run) if not r)
        plan = Plan.from_skips(n, attn=skipped, mlp=skipped)
        c = Choice(plan=plan if skipped else None, d=self.d_max, alpha=0.0, tpt=0.0, tpt_ar=0.0, context=ctx)
        return [(plan, 0.0, best.value)], c

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.pop("predicted_tps", None)
        d["skip_layers"] = self.skip_layers
        return d


# ---- LayerSkip-style early exit --------------------------------------------------------------------
class EarlyExitStrategy(Strategy):
    """LayerSkip's inference algorithm (ACL 2024) on an ordinary model: draft with the first k
    layers and the shared lm_head, verify with the full model. LayerSkip's training (layer dropout,
    early-exit loss) is what makes early exits accurate; without it this is a baseline of the
    algorithm only. (LayerSkip also reuses the draft's early-layer KV in verification; here the
    verify pass recomputes all layers, as for every strategy.)"""

    name = "early-exit"

    def __init__(self, model: Model, *, exit_layer: int | None = None, d_max: int = 4,
                 threshold: float | None = None) -> None:
        n = model.cfg.n_layers
        k = exit_layer if exit_layer is not None else n // 2
        self.exit_layer = k
        self.draft = Draft(plan=exit_plan(n, k), max_len=d_max, threshold=threshold, source="early-exit")

    def propose(self, state: RoundState) -> Draft:
        return self.draft

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "exit_layer": self.exit_layer}


# ---- DEL (training-free) ---------------------------------------------------------------------------
class DELStrategy(Strategy):
    """DEL (arXiv 2504.05598), training-free: the exit layer k and the draft length are chosen per
    round from per-layer acceptance estimates. The estimates come from "shadow" early exits on the
    verified tokens: every ``every`` rounds the lm_head reads the verifier's hidden state after each
    candidate layer and its top-1 is compared with the full model's; an exponential moving average
    per layer gives α_k. The (k, d) maximising E(α_k, d) / (d·T_draft(k) + T_verify(d+1)) wins
    (times from the latency model, where DEL counts layers)."""

    name = "del"
    wants_hidden = True

    def __init__(self, model: Model, latency: LatencyModel | None = None, *, d_max: int = 6, every: int = 4,
                 candidates: int = 6, decay: float = 0.9, threshold: float | None = None) -> None:
        from .knapspec import get_latency_model
        n = model.cfg.n_layers
        self.model, self.d_max, self.every, self.decay, self.threshold = model, d_max, every, decay, threshold
        self._lat = latency
        self._get = get_latency_model
        self.layers = sorted({max(1, min(n - 1, round(n * f / (candidates + 1)))) for f in range(1, candidates + 1)})
        self.alpha = dict.fromkeys(self.layers, 0.5)
        self.rounds = 0
        self.choice: tuple[int, int] | None = None
        self.used: dict[int, int] = {}

    @property
    def latency(self) -> LatencyModel:
        if self._lat is None:
            self._lat = self._get(self.model, quick=True)
        return self._lat

    def prepare(self, *, progress: bool = False) -> bool:
        if self._lat is None:
            self._lat = self._get(self.model, quick=True, progress=progress)
        return False

    def start(self, state: RoundState) -> None:
        self.rounds = 0
        self.alpha = dict.fromkeys(self.layers, 0.5)

    def _choose(self, ctx: int) -> tuple[int, int] | None:
        lat = self.latency
        tv = verify_times(lat, ctx, self.d_max + 1)
        best, best_v = None, 1.0 / tv[0]
        for k in self.layers:
            d, v = best_length(self.alpha[k], lat.predict(exit_plan(self.model.cfg.n_layers, k), ctx, 1), tv,
                               self.d_max)
            if v > best_v:
                best, best_v = (k, d), v
        return best

    def propose(self, state: RoundState) -> Draft:
        if self.rounds % self.every == 0 or self.choice is None:
            self.choice = self._choose(state.context_length)
        self.rounds += 1
        if self.choice is None:
            self.used[0] = self.used.get(0, 0) + 1
            return Draft(plan=None, max_len=0)
        k, d = self.choice
        self.used[k] = self.used.get(k, 0) + 1
        return Draft(plan=exit_plan(self.model.cfg.n_layers, k), max_len=d, threshold=self.threshold,
                     source=f"exit{k}")

    @torch.inference_mode()
    def observe(self, outcome: Outcome) -> None:
        if outcome.hidden is None or (self.rounds - 1) % self.every:
            return
        n = outcome.accepted + 1
        tgt = torch.tensor(outcome.target_tokens[:n], device=outcome.hidden.device)
        h = torch.stack([outcome.hidden[2 * k] for k in self.layers])          # [C, n, H]
        agree = (self.model.head(h).argmax(-1) == tgt[None]).float().mean(-1).tolist()
        for k, a in zip(self.layers, agree):
            self.alpha[k] = self.decay * self.alpha[k] + (1 - self.decay) * a

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "exit_layers_used": dict(self.used),
                "alpha": {k: round(v, 3) for k, v in self.alpha.items()}}


_CLASP_OPTIONS = ("skip_layers", "every", "window")


@REGISTRY.register("clasp", options=_CLASP_OPTIONS)
def _clasp(model: Model, *, max_draft: int | None = None, threshold: float | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in _CLASP_OPTIONS}
    return CLaSpStrategy(model, d_max=max_draft or 6, threshold=threshold, **kw)


@REGISTRY.register("early-exit", options=("exit_layer",))
def _early_exit(model: Model, *, max_draft: int | None = None, threshold: float | None = None,
                **options: Any) -> Strategy:
    return EarlyExitStrategy(model, exit_layer=options.get("exit_layer"), d_max=max_draft or 4, threshold=threshold)


_DEL_OPTIONS = ("every", "candidates", "decay")


@REGISTRY.register("del", options=_DEL_OPTIONS)
def _del(model: Model, *, latency: LatencyModel | None = None, max_draft: int | None = None,
         threshold: float | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in _DEL_OPTIONS}
    return DELStrategy(model, latency, d_max=max_draft or 6, threshold=threshold, **kw)
