"""KnapSpec: choose the skipped attention/MLP sublayers as a knapsack, and the draft length by TPT.

Every few rounds the strategy re-plans from the verifier's residual stream on the last ``window``
committed tokens (collected through ``Outcome.hidden``; before the first round, from the prompt's
last tokens, computed read-only against the prefilled cache, so no round drafts blind):

1. **Weights.** Each sublayer's time at the current context from the latency model (attention
   grows with context, MLP does not), in integer units of ``1/resolution`` of the cheapest
   sublayer, so the attention:MLP ratio keeps ``resolution`` steps of precision and is never capped.
2. **DP** (:func:`knapsack_dp`) over the 2L sublayers in order. A state is (depth, time saved);
   it keeps the best hidden states of the collected tokens (value: mean cosine similarity with the
   full model's residual stream at that depth). Every live state goes on executed and skipped;
   all executed states of one sublayer run in one batched call
   (``Model.sublayer(..., write=False)``: each branch reads the committed prefix KV and attends
   causally among its own tokens). States under ``min_cosine`` are dropped, and so are states
   another state beats on both time saved and value (exact for additive values; see the tests).
3. **Selection.** For each final state: α = top-1 agreement of its logits with the full model's on
   the collected tokens (or the cosine proxy), then the (plan, d) maximising
   ``TPT = E(α, d) / (d·T_draft(plan) + T_verify(d+1))`` with times from the latency model. If no
   draft beats a plain decoding step (``1 / T_verify(1)``), the strategy decodes without drafting
   until the next re-plan.
4. **Schedule.** Re-plan every ``every`` rounds and whenever the context has grown by
   ``regrow`` (a fraction) since the last plan; after a no-draft verdict the interval doubles
   (up to 8x ``every``) so that planning stays cheap where drafting does not pay.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..latency import LatencyModel, get_latency_model
from ..model import Model
from ..plan import Plan
from .base import AUTOREGRESSIVE, REGISTRY, Draft, Outcome, RoundState, Strategy
from .pricing import best_plan

log = logging.getLogger(__name__)


# ---- the DP -------------------------------------------------------------------------------------
@dataclass
class DPState:
    saved: int                  # time saved, in weight units
    value: float                # value at the final depth
    run: tuple[bool, ...]       # one entry per item: executed?
    index: int                  # row of this state in the final hidden batch


def _pareto(saved: list[int], value: list[float]) -> list[int]:
    """Indices of the states no other state beats on both time saved and value (ties: one kept)."""
    order = sorted(range(len(saved)), key=lambda i: (-saved[i], -value[i]))
    keep, best = [], float("-inf")
    for i in order:
        if value[i] > best:
            keep.append(i)
            best = value[i]
    return sorted(keep, key=lambda i: saved[i])


def knapsack_dp(weights: Sequence[int], x0: torch.Tensor,
                step: Callable[[int, torch.Tensor], torch.Tensor],
                score: Callable[[int, torch.Tensor], torch.Tensor], *,
                min_value: float | None = None, max_states: int | None = None,
                allow: Callable[[int, tuple[bool, ...]], bool] | None = None,
                ) -> tuple[list[DPState], torch.Tensor]:
    """Approximate knapsack over items taken in order (the parallel DP).

    ``x0`` is the state tensor before the first item (one row: ``[1, ...]``). For item ``s``,
    ``step(s, X)`` applies it to a batch of states ``X: [N, ...]``; skipping it carries the row
    unchanged and adds ``weights[s]`` to the time saved. ``score(depth, X) -> [N]`` is the value of
    states after ``depth`` items. Per depth: one state per time-saved cell (the best value);
    states below ``min_value`` dropped; Pareto pruning on (saved, value); at most ``max_states``
    kept (spread over the time-saved axis). ``allow(s, run_so_far)`` may veto a partial path.
    Returns the final states (sorted by time saved) and their tensors.
    """
    X = x0
    saved: list[int] = [0]
    runs: list[tuple[bool, ...]] = [()]
    for s, w in enumerate(weights):
        Y = step(s, X)
        cand_x = torch.cat([Y, X]) if w > 0 else Y
        cand_saved = saved + ([v + w for v in saved] if w > 0 else [])
        cand_run = [r + (True,) for r in runs] + ([r + (False,) for r in runs] if w > 0 else [])
        vals = score(s + 1, cand_x).tolist()
        cells: dict[int, int] = {}
        for i, (sv, r) in enumerate(zip(cand_saved, cand_run)):
            if allow is not None and not allow(s, r):
                continue
            if min_value is not None and vals[i] < min_value and any(not b for b in r):
                continue            # the all-executed path is never pruned
            j = cells.get(sv)
            if j is None or vals[i] > vals[j]:
                cells[sv] = i
        idx = list(cells.values())
        keep = [idx[k] for k in _pareto([cand_saved[i] for i in idx], [vals[i] for i in idx])]
        if max_states is not None and len(keep) > max_states:
            # keep both ends of the front and an even spread in between
            pos = torch.linspace(0, len(keep) - 1, max_states).round().long().unique().tolist()
            keep = [keep[p] for p in pos]
        sel = torch.tensor(keep, device=cand_x.device)
        X = cand_x.index_select(0, sel)
        saved = [cand_saved[i] for i in keep]
        runs = [cand_run[i] for i in keep]
        last_vals = [vals[i] for i in keep]
    states = [DPState(saved=sv, value=v, run=r, index=i)
              for i, (sv, v, r) in enumerate(zip(saved, last_vals, runs))]
    return states, X


# ---- the strategy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    plan: Plan | None           # None: decode without drafting
    d: int
    alpha: float
    tpt: float                  # predicted tokens per second
    tpt_ar: float               # predicted tokens per second of plain decoding
    context: int


class KnapSpecStrategy(Strategy):
    """The KnapSpec planner (see the module docstring). ``latency`` is a fitted latency model for
    this model on this device/dtype/threads."""

    name = "knapspec"
    wants_hidden = True

    def __init__(self, model: Model, latency: LatencyModel | None = None, *, window: int = 8, d_max: int = 8,
                 every: int = 64, regrow: float = 0.5, min_cosine: float = 0.5, max_states: int = 8,
                 resolution: int = 8, alpha: str = "top1", threshold: float | None = None) -> None:
        if alpha not in ("top1", "cosine"):
            raise ValueError(f"alpha estimate must be 'top1' or 'cosine', got {alpha!r}")
        if latency is not None and latency.n_layers != model.cfg.n_layers:
            raise ValueError("the latency model is for a different number of layers")
        for k, v in (("window", window), ("d_max", d_max), ("every", every), ("resolution", resolution),
                     ("max_states", max_states)):
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        self.model, self._latency = model, latency
        self.window, self.d_max, self.every, self.regrow = window, d_max, every, regrow
        self.min_cosine, self.max_states, self.resolution = min_cosine, max_states, resolution
        self.alpha_mode, self.threshold = alpha, threshold
        self.choice: Choice | None = None
        self.history: list[Choice] = []
        self._cache: KVCache | None = None
        self.reset()

    @property
    def latency(self) -> LatencyModel:
        """The latency model (this machine's cached profile, measured on first use)."""
        if self._latency is None:
            self._latency = get_latency_model(self.model, quick=True)
        return self._latency

    def prepare(self, *, progress: bool = False) -> bool:
        if self._latency is None:
            self._latency = get_latency_model(self.model, quick=True, progress=progress)
        return False

    def reset(self) -> None:
        """Forget the collected states, the plan and the plan history (a new generation)."""
        self._chunks: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()  # (start, hidden, targets)
        self._n = 0
        self._last_round = 0
        self._last_ctx = 0
        self.choice = None
        self.history = []
        self._used: list[Choice] = []              # the choice of every round
        self._every_now = self.every

    # ---- collection -----------------------------------------------------------------------------
    def _add(self, start: int, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        if self._chunks:
            s0, h0, _ = self._chunks[-1]
            if s0 + h0.shape[1] != start:          # not contiguous (should not happen): restart
                self._chunks.clear()
                self._n = 0
        self._chunks.append((start, hidden, targets))
        self._n += hidden.shape[1]
        while self._chunks and self._n - self._chunks[0][1].shape[1] >= self.window:
            self._n -= self._chunks.popleft()[1].shape[1]

    def _collected(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(start position, hidden [2L+1, K, H], full-model top-1 [K]) of the last ``window`` tokens."""
        hid = torch.cat([h for _, h, _ in self._chunks], dim=1)
        tgt = torch.cat([t for _, _, t in self._chunks])
        cut = hid.shape[1] - min(self.window, hid.shape[1])
        return self._chunks[0][0] + cut, hid[:, cut:], tgt[cut:]

    def start(self, state: RoundState) -> None:
        """Collect the full model's residual stream on the prompt's last tokens and plan before
        the first round."""
        self.collect_prompt(state)
        self._plan(state.context_length, state.round)

    def collect_prompt(self, state: RoundState) -> None:
        """The full model's residual stream on the prompt's last ``window`` tokens, computed
        read-only against the prefilled cache (no KV is rewritten)."""
        self.collect(state, state.n_prompt)

    @torch.inference_mode()
    def collect(self, state: RoundState, end: int) -> None:
        """Restart collection from the full model's residual stream on the ``window`` committed
        tokens before position ``end`` (whose KV the cache holds), computed read-only."""
        self.reset()
        self._cache = state.cache
        model = state.model
        k = min(self.window, end)
        p0 = end - k
        x = model.embed_tokens(torch.tensor([state.tokens[p0:end]], device=model.device))
        hs = [x]
        for s in range(model.cfg.n_sublayers):
            x = model.sublayer(s, x, p0, state.cache, write=False)
            hs.append(x)
        hidden = torch.stack(hs)[:, 0]                             # [2L+1, k, H]
        targets = model.head(hidden[-1]).argmax(-1)
        self._add(p0, hidden, targets)

    def observe(self, outcome: Outcome) -> None:
        if outcome.hidden is None:
            return
        n = outcome.accepted + 1
        targets = torch.tensor(outcome.target_tokens[:n], device=outcome.hidden.device)
        self._add(outcome.context_length - 1, outcome.hidden, targets)

    def propose(self, state: RoundState) -> Draft:
        ctx = state.context_length
        self._cache = state.cache
        due = (state.round - self._last_round >= self._every_now
               or ctx >= self._last_ctx * (1.0 + self.regrow))
        if self.choice is None or due:
            self._plan(ctx, state.round)
        c = self.choice
        assert c is not None
        self._used.append(c)
        if c.plan is None:
            return AUTOREGRESSIVE
        return Draft(plan=c.plan, max_len=c.d, threshold=self.threshold, source="knapspec")

    # ---- planning -------------------------------------------------------------------------------
    @torch.inference_mode()
    def optimise(self, ctx: int) -> tuple[list[tuple[Plan, float, float]], Choice]:
        """Run the DP on the collected tokens at context ``ctx``. Returns the candidates
        ``(plan, alpha, mean cosine)`` and the chosen (plan, d)."""
        model, lat = self.model, self.latency
        start, hidden, targets = self._collected()
        ref = hidden.float()                                         # [2L+1, K, H]
        times = lat.sublayer_times(ctx, 1)
        unit = min(t for t in times if t > 0) / self.resolution if any(t > 0 for t in times) else 1.0
        weights = [max(round(t / unit), 0) for t in times]
        cache = self._cache
        assert cache is not None, "optimise() runs inside a generation (after start())"

        def step(s: int, X: torch.Tensor) -> torch.Tensor:
            return model.sublayer(s, X, start, cache, write=False)

        def score(depth: int, X: torch.Tensor) -> torch.Tensor:
            return F.cosine_similarity(X.float(), ref[depth][None], dim=-1).mean(-1)

        def allow(s: int, run: tuple[bool, ...]) -> bool:
            return s != 1 or run[0] or run[1]                        # never skip all of layer 0

        states, X = knapsack_dp(weights, hidden[0][None], step, score, min_value=self.min_cosine,
                                max_states=self.max_states, allow=allow)
        cands: list[tuple[Plan, float, float]] = []
        finals = [st for st in states if not all(st.run) and any(st.run)]
        if finals:
            Xf = X.index_select(0, torch.tensor([st.index for st in finals], device=X.device))
            top = model.head(Xf).argmax(-1)                          # [N, K]
            agree = (top == targets[None]).float().mean(-1).tolist()
            for st, a in zip(finals, agree):
                alpha = a if self.alpha_mode == "top1" else max(0.0, min(1.0, st.value))
                cands.append((Plan(run=st.run), alpha, st.value))
        plan, d, v, v_ar = best_plan([(p, a) for p, a, _ in cands], lat, ctx, self.d_max)
        alpha = next((a for p, a, _ in cands if p is plan), 0.0)
        return cands, Choice(plan=plan, d=d, alpha=alpha, tpt=v, tpt_ar=v_ar, context=ctx)

    def _plan(self, ctx: int, rnd: int) -> None:
        _, c = self.optimise(ctx)
        self.choice = c
        self.history.append(c)
        # back off while drafting does not pay (each no-draft verdict doubles the interval, up to
        # 8x): re-planning then costs little where the answer keeps being "decode normally"
        self._every_now = self.every if c.plan is not None else min(2 * self._every_now, 8 * self.every)
        self._last_round, self._last_ctx = rnd, ctx
        if log.isEnabledFor(logging.DEBUG):
            if c.plan is None:
                log.debug("knapspec plan @ctx %d: no draft (best draft TPT below decoding %.1f tok/s)",
                          ctx, c.tpt_ar)
            else:
                a, m = list(c.plan.attn_skipped), list(c.plan.mlp_skipped)
                log.debug("knapspec plan @ctx %d: skip attention %s, MLP %s; alpha %.2f, d %d, predicted "
                          "%.1f tok/s (decoding %.1f)", ctx, a, m, c.alpha, c.d, c.tpt, c.tpt_ar)

    def describe(self) -> dict[str, Any]:
        """Plans made, and the skipped shares of attention / MLP sublayers averaged over the
        rounds that drafted with a plan (what the benchmark plots against context length)."""
        n = self.model.cfg.n_layers
        used = [c for c in self._used if c.plan is not None]
        out: dict[str, Any] = {"strategy": self.name, "plans": len(self.history),
                               "draft_round_share": len(used) / len(self._used) if self._used else 0.0,
                               "attn_skip_share": sum(len(c.plan.attn_skipped) for c in used) / (n * len(used))
                               if used else 0.0,
                               "mlp_skip_share": sum(len(c.plan.mlp_skipped) for c in used) / (n * len(used))
                               if used else 0.0}
        if self._used:
            out["predicted_tps"] = sum(c.tpt for c in self._used) / len(self._used)
        if self.history:
            last = self.history[-1]
            out["last_plan"] = str(last.plan) if last.plan is not None else "none"
        return out


@REGISTRY.register("knapspec")
def _knapspec(model: Model, *, latency: LatencyModel | None = None, max_draft: int | None = None,
              threshold: float | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in ("window", "every", "regrow", "min_cosine", "max_states",
                                                    "resolution", "alpha")}
    return KnapSpecStrategy(model, latency, d_max=max_draft or 8, threshold=threshold, **kw)
