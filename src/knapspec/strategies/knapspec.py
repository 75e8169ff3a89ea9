"""KnapSpec: choose the skipped, windowed and full attention/MLP sublayers as a knapsack, and the
draft length by TPT; step aside (plain decoding, nothing captured, nothing planned) where no draft
pays.

1. **Weights.** Each sublayer option's time saved at the current context from the latency model
   (attention grows with context, MLP does not; a windowed attention costs what its sink and
   window cost), in integer units of ``1/resolution`` of the cheapest sublayer, so the
   attention:MLP ratio keeps ``resolution`` steps of precision and is never capped.
2. **DP** (:func:`knapsack_dp`): a multiple-choice knapsack over the 2L sublayers in order. Each
   attention sublayer is full, windowed (sink + last W keys, W from ``windows``) or skipped; each
   MLP full or skipped. A state is (depth, time saved); it keeps the hidden states of the collected
   tokens (value: mean cosine similarity with the full model's residual stream at that depth).
   Every live state goes on with every option; all states of one option of one sublayer run in
   one batched call (``Model.sublayer(..., write=False)``: each branch reads the committed prefix
   KV and attends causally among its own tokens). States under ``min_cosine`` are dropped, and so
   are states another state beats on both time saved and value (exact for additive values; see
   the tests). The bookkeeping is vectorised (tensors of states, not Python loops).
3. **Selection.** For each final state: α = top-1 agreement of its logits with the full model's on
   the collected tokens as a posterior mean, (agreeing + 1) / (tokens + 2) (or the cosine proxy),
   then the (plan, d) maximising
   ``TPT = E(α, d) / (d·T_draft(plan) + T_verify(d+1))``. If no draft beats a plain decoding step
   (``1 / T_verify(1)``), the strategy decodes without drafting.
4. **When to plan.** Verdicts are kept per context bucket (powers of two) in a
   :class:`~knapspec.strategies.memory.PlanMemory`, across generations and (with a memory file)
   processes. A decision is due at the start of a generation, when the context enters another
   bucket, and when the acceptance measured while drafting no longer pays for the plan. Each
   decision takes, in order: the plan in use if it still pays (entering another bucket); the
   bucket's remembered plan if it still pays at this context; once per bucket, where windowed
   attention could pay, the *window probe* (:meth:`KnapSpecStrategy.probe`: the plans that window
   every attention sublayer, one per window size, priced at the agreement of their greedy tokens
   with the full model's on the last ``probe_tokens`` committed tokens; one window per
   generation, largest first, the next smaller one in a later generation that drafts with the
   plan found meanwhile; where it found nothing that pays, again after a back-off of
   ``2**probe_streak`` generations); the
   remembered "no draft" verdict while the back-off lasts (``2**streak`` decisions after ``streak``
   verdicts in a row, at most 64); "no draft" when a cheap upper bound on any plan's TPT
   (:meth:`KnapSpecStrategy.tpt_bound`) does not beat a plain step; plain steps, nothing
   remembered, beyond ``dp_context`` tokens of context while no DP has left candidates on this
   machine (a first DP there costs a third of a generation); and only then the DP, on the
   full model's residual stream over the last ``window`` committed tokens, computed read-only just
   before it (nothing is captured during decoding, so plain steps keep the fused native path).
   The probe and the DP score generated tokens only: at the start of a generation they wait, with
   plain steps, until there are enough (a prompt's last tokens are the chat template's, which any
   draft predicts).
5. **Latency checks.** Verification times are corrected online by the measured/predicted ratio
   per width (:class:`~knapspec.strategies.pricing.VerifyTimes`), draft steps by the measured ratio
   of the plan in use; a profile whose one-token steps are off by more than ``LatencyWatch.limit``
   is logged once and dropped from the cache folder, so that the next process measures it again.
   (The window probe no longer times verification passes of its own: see :meth:`probe`.)
6. **Draft vocabulary** (``draft_vocab``, the token ids' order by default; see ``vocab.py``): a
   plan may draft through a subset of the lm_head's rows, priced only at an acceptance measured
   with that subset (the probe measures each subset; drafting updates it), never from a DP's
   estimate.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..latency import LatencyModel, get_latency_model
from ..model import Model
from ..plan import SINK, Plan
from . import memory as plan_memory
from .base import AUTOREGRESSIVE, DEFAULT_THRESHOLD, REGISTRY, Draft, Outcome, RoundState, Strategy
from .memory import PlanMemory, bucket
from .pricing import LatencyWatch, VerifyTimes, best_length
from .vocab import DraftVocab, load_draft_vocab, subset_agreement

log = logging.getLogger(__name__)

# ---- the DP -------------------------------------------------------------------------------------
SKIP, FULL = 0, 1           # options of an item; any other option value is the item's own (a window)


@dataclass
class DPState:
    saved: int                  # time saved, in weight units
    value: float                # value at the final depth
    run: tuple[int, ...]        # one entry per item: the option taken (0 = skipped, 1 = full, W = window)
    index: int                  # row of this state in the final hidden batch


def pareto(saved: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Indices of the states no other state beats on both time saved and value (ties: one kept),
    in increasing time saved."""
    n = saved.shape[0]
    if n == 0:
        return saved.new_zeros(0, dtype=torch.long)
    order = torch.argsort(value, descending=True, stable=True)            # value desc, then ...
    order = order[torch.argsort(saved[order], descending=True, stable=True)]   # ... saved desc
    v = value[order]
    prev = torch.cat([v.new_full((1,), float("-inf")), torch.cummax(v, 0).values[:-1]])
    keep = order[v > prev]
    return keep.flip(0)


Items = Sequence[Sequence[tuple[int, int]]]


def knapsack_dp(items: Items | Sequence[int], x0: torch.Tensor,
                step: Callable[..., torch.Tensor],
                score: Callable[[int, torch.Tensor], torch.Tensor], *,
                min_value: float | None = None, max_states: int | None = None,
                allow: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                ) -> tuple[list[DPState], torch.Tensor]:
    """Approximate multiple-choice knapsack over items taken in order (the parallel DP).

    ``items[s]``: the options of item ``s`` as ``(option, weight)`` pairs; option 0 skips the item
    (the state tensor carried unchanged), any other is applied by ``step(s, X, option)`` to a batch
    of states ``X: [N, ...]``; ``weight`` is the time saved by that option. A plain list of ints
    means the two options (1, 0) and (0, w) per item, with ``step(s, X)``. ``x0`` is the state
    tensor before the first item (one row: ``[1, ...]``); ``score(depth, X) -> [N]`` is the value
    of states after ``depth`` items. Per depth: states below ``min_value`` dropped (the path of
    option 1 everywhere is never dropped); Pareto pruning on (saved, value), which keeps one state
    per time-saved cell; at most ``max_states`` kept (spread over the time-saved axis).
    ``allow(s, runs)`` may veto partial paths: ``runs: [N, s+1]`` option codes -> bool ``[N]``.
    Returns the final states (sorted by time saved) and their tensors.
    """
    if items and isinstance(items[0], int):
        plain = step
        items = [[(FULL, 0)] + ([(SKIP, w)] if w > 0 else []) for w in items]   # type: ignore[union-attr]

        def step(s: int, X: torch.Tensor, option: int) -> torch.Tensor:
            return plain(s, X)
    X = x0
    dev = x0.device
    saved = torch.zeros(1, dtype=torch.long, device=dev)
    runs = torch.zeros(1, 0, dtype=torch.long, device=dev)
    vals = torch.zeros(1, dtype=torch.float64, device=dev)
    for s, opts in enumerate(items):
        xs, sv, rs = [], [], []
        for opt, w in opts:
            xs.append(X if opt == SKIP else step(s, X, opt))
            sv.append(saved + w)
            rs.append(torch.cat([runs, runs.new_full((runs.shape[0], 1), opt)], 1))
        cand_x, cand_saved, cand_run = torch.cat(xs), torch.cat(sv), torch.cat(rs)
        cand_vals = score(s + 1, cand_x).to(torch.float64)
        ok = torch.ones(cand_saved.shape[0], dtype=torch.bool, device=dev)
        if allow is not None:
            ok &= allow(s, cand_run)
        if min_value is not None:
            ok &= (cand_vals >= min_value) | (cand_run == FULL).all(1)
        idx = ok.nonzero().flatten()
        keep = idx[pareto(cand_saved[idx], cand_vals[idx])]
        if max_states is not None and keep.shape[0] > max_states:
            # keep both ends of the front and an even spread in between
            pos = torch.linspace(0, keep.shape[0] - 1, max_states).round().long().unique()
            keep = keep[pos]
        X = cand_x.index_select(0, keep)
        saved, runs, vals = cand_saved[keep], cand_run[keep], cand_vals[keep]
    states = [DPState(saved=int(sv), value=float(v), run=tuple(r), index=i)
              for i, (sv, v, r) in enumerate(zip(saved.tolist(), vals.tolist(), runs.tolist()))]
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
    source: str = "dp"          # "dp" | "memory" (a remembered verdict) | "bound" (the TPT bound) |
                                # "carried" (the plan in use, still paying in a new bucket) |
                                # "probe" (the window probe) | "probe-wait" (plain steps until it) |
                                # "dp-wait" (plain steps until the DP has generated tokens to score) |
                                # "no-candidates" (no DP yet on this machine, and here one is dear)
    vocab: int | None = None    # the draft vocabulary's subset size (None: the full vocabulary)


# the acceptance at which an all-windowed plan must pay for the window probe to run
PROBE_ALPHA = 0.9
PROBE_GAIN = 0.15       # ... and by how much more than a plain step
# the probe tries a smaller window only where, at the acceptance of the larger one probed before it,
# it would pay this much more than the best plan probed so far: one token of the probe's 16 moves
# the acceptance by ~6%, so a smaller difference is not one the probe can tell (on the embedded
# model at 8k: W = 64 drafts ~5% faster than W = 256, whose pass was ~19 ms, 2% of a generation)
PROBE_STEP = 0.05

# a plan is adopted (from the probe, the memory at a generation's start, or the DP) only where its
# predicted tokens per time beat a plain step's by this much, and kept while it beats them at all
# (at the acceptance and draft time measured while drafting). The predictions of a plan's gain were
# measured optimistic by up to ~10% more than a plain step's (``knapspec bench tpt`` on the embedded
# model at 4k: a plan at 109 predicted / 98 measured tokens/s, plain steps 117 / 115); a window
# plan adopted at a predicted +2-6% ran 5-9% slower than plain steps on a 4k-token continuation
ADOPT_GAIN = 0.1


def adopts(tpt: float, tpt_ar: float, *, in_use: bool = False) -> bool:
    """Whether a plan predicted at ``tpt`` tokens/s is adopted over plain steps at ``tpt_ar``
    (``ADOPT_GAIN`` more), or, ``in_use``, kept (more at all)."""
    return tpt > (1.0 if in_use else 1.0 + ADOPT_GAIN) * tpt_ar

# the largest back-off: a "no draft" verdict is re-examined by the DP after at most this many
# decisions taken from the memory
MAX_BACKOFF = 64


def backoff(streak: int) -> int:
    """Decisions taken from the memory before the DP runs again, after ``streak`` "no draft"
    verdicts in a row."""
    return 0 if streak <= 0 else min(1 << min(streak, 6), MAX_BACKOFF)


class KnapSpecStrategy(Strategy):
    """The KnapSpec planner (see the module docstring). ``latency`` is a fitted latency model for
    this model on this device/dtype/threads; ``windows``: the attention windows the DP may choose
    (empty: full or skipped only); ``memory``: a :class:`PlanMemory`, a file for one, or None (this
    instance's own, across its generations); ``every``: the fewest rounds between two DPs of one
    generation (doubled per "no draft" verdict); ``margin``: how much higher than last measured
    the TPT bound lets acceptance be; ``score_prompt``: the DP may score the prompt's last
    ``window`` tokens, and the window probe its last ``probe_tokens``, instead of waiting for
    generated ones (for raw-text prompts whose tail is like the text to come; a chat prompt ends
    with the template's assistant header);
    ``dp_context``: the longest context at which a DP runs while the memory holds no DP's
    candidates at all (see :meth:`decide`)."""

    name = "knapspec"
    wants_hidden = False
    recent_decay = 0.9          # the weight of a draft in :meth:`recent_alpha` per later draft

    def __init__(self, model: Model, latency: LatencyModel | None = None, *, window: int = 8, d_max: int = 8,
                 every: int = 64, min_cosine: float = 0.5, max_states: int = 8, resolution: int = 8,
                 alpha: str = "top1", threshold: float | None = None, windows: Sequence[int] = (),
                 memory: PlanMemory | str | Any = None, margin: float = 0.1, probe_tokens: int = 16,
                 draft_vocab: DraftVocab | None = None, score_prompt: bool = False,
                 dp_context: int = 512) -> None:
        if alpha not in ("top1", "cosine"):
            raise ValueError(f"alpha estimate must be 'top1' or 'cosine', got {alpha!r}")
        if latency is not None and latency.n_layers != model.cfg.n_layers:
            raise ValueError("the latency model is for a different number of layers")
        for k, v in (("window", window), ("d_max", d_max), ("every", every), ("resolution", resolution),
                     ("max_states", max_states), ("probe_tokens", probe_tokens), ("dp_context", dp_context)):
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        if any(int(w) < 2 for w in windows):
            raise ValueError(f"attention windows must be at least 2 keys, got {list(windows)}")
        self.model, self._latency = model, latency
        self.window, self.d_max, self.every = window, d_max, every
        self.min_cosine, self.max_states, self.resolution = min_cosine, max_states, resolution
        self.alpha_mode, self.threshold, self.margin = alpha, threshold, margin
        self.exit_threshold = DEFAULT_THRESHOLD    # the generation's confidence exit (``start``)
        self.probe_tokens = probe_tokens
        self.dp_context = dp_context
        self.score_prompt = score_prompt               # the DP may score the prompt's last tokens
        self.vocab = draft_vocab
        self.probe_runs = 0                            # window probes run by this instance
        self.windows = tuple(sorted({int(w) for w in windows}))
        self.memory = memory if isinstance(memory, PlanMemory) else PlanMemory(memory)
        self.verify_times = VerifyTimes(d_max + 2)
        self.watch = LatencyWatch()
        self.choice: Choice | None = None
        self.history: list[Choice] = []
        self.dp_runs = 0                               # DPs run by this instance (all generations)
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
        """Forget the collected states, the plan and the plan history (a new generation); the
        memory and the latency corrections stay."""
        self._chunks: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()  # (start, hidden, targets)
        self._n = 0
        self._last_dp_round = -(1 << 30)
        self._bucket = -1
        self._streak_now = 0
        self.choice = None
        self.history = []
        self._used: list[Choice] = []              # the choice of every round
        self._tried = 0.0                          # draft tokens decided / accepted with the current plan
        self._acc = 0.0
        self._recent = [0.0, 0.0]                  # the same, each earlier draft weighted down (``recent_decay``)
        self._draft_ratio = 1.0                    # measured / predicted draft step time of the plan
        self._draft_obs = 0
        self._low = [0, 0]                         # drafts below the confidence exit: decided, accepted
        self._no_exit = False                      # drafting on past low-confidence tokens (``_exit_pays``)
        self._probe_at = -1                        # committed tokens at which the window probe runs
        self._probes_now = 0                       # window probe passes in this generation
        self._n_vocab = 0                          # tokens the draft vocabulary has seen
        self.verify_times.reset()

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
        """A new generation: decide (from the memory, the bound, or the DP on the prompt's last
        tokens) before the first round."""
        self.reset()
        self._cache = state.cache
        self.exit_threshold = state.threshold
        if self.vocab is not None:
            self.vocab.start(state.tokens[:state.n_prompt], capacity=state.remaining + 2)
            self._n_vocab = state.n_prompt
        self.decide(state, "start")

    def _sync_vocab(self, tokens: list[int]) -> None:
        """Show the draft vocabulary the tokens committed since it last looked (done only where a
        plan is priced or drafts, so plain steps pay nothing for it)."""
        if self.vocab is not None and len(tokens) > self._n_vocab:
            if self._n_vocab == 0:                 # a generation this instance did not start
                self.vocab.start(tokens, capacity=256)
            else:
                self.vocab.commit(tokens[self._n_vocab:])
            self._n_vocab = len(tokens)

    def collect_prompt(self, state: RoundState) -> None:
        """The full model's residual stream on the prompt's last ``window`` tokens, computed
        read-only against the prefilled cache (no KV is rewritten)."""
        self.collect(state, state.n_prompt)

    @torch.inference_mode()
    def collect(self, state: RoundState, end: int) -> None:
        """Restart collection from the full model's residual stream on the ``window`` committed
        tokens before position ``end`` (whose KV the cache holds), computed read-only."""
        self._chunks.clear()
        self._n = 0
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

    # ---- the protocol ---------------------------------------------------------------------------
    def propose(self, state: RoundState) -> Draft:
        ctx = state.context_length
        self._cache = state.cache
        if self.choice is None:
            self.decide(state, "start")
        elif self._probe_at >= 0 and len(state.tokens) >= self._probe_at:
            self.decide(state, "probe")
        elif bucket(ctx) != self._bucket:
            self.decide(state, "bucket")
        elif self.choice.plan is not None and not self._still_pays(ctx):
            self.decide(state, "acceptance")
        c = self.choice
        assert c is not None
        self._used.append(c)
        if c.plan is None:
            return AUTOREGRESSIVE
        head = ids = None
        if self.vocab is not None:
            self._sync_vocab(state.tokens)
            self.vocab.select(c.vocab)
            head, ids = self.vocab.head()
        return Draft(plan=c.plan, max_len=c.d, threshold=self.draft_threshold, source="knapspec", head=head,
                     head_ids=ids)

    def observe(self, outcome: Outcome) -> None:
        if outcome.hidden is not None:             # a subclass that captures (CLaSp)
            n = outcome.accepted + 1
            targets = torch.tensor(outcome.target_tokens[:n], device=outcome.hidden.device)
            self._add(outcome.context_length - 1, outcome.hidden, targets)
        self.observe_times(outcome)
        c = self.choice
        if (c is not None and c.plan is not None and outcome.draft.plan is c.plan
                and outcome.accepted >= outcome.n_lookup):          # the model's drafts were reached
            self.observe_acceptance(outcome.drafted - outcome.n_lookup, outcome.accepted - outcome.n_lookup)
            if self.threshold is None and outcome.draft_confidence:
                self.observe_confidence(outcome.draft_confidence, outcome.accepted - outcome.n_lookup,
                                        outcome.context_length)

    def observe_times(self, outcome: Outcome) -> None:
        """Measured verification (and draft) times against the latency model's predictions. An
        analytic model is taken as given (:attr:`LatencyModel.given`)."""
        if outcome.verify_s <= 0 or self.latency.given:
            return
        ctx = outcome.context_length
        pred = self.verify_times.predict(self.latency, ctx)
        self.verify_times.observe(outcome.drafted + 1, outcome.verify_s)
        if outcome.drafted == 0:
            # the step's prediction as of the last refresh (within ``refresh`` tokens of context:
            # ample for a check at 25% and 2x, and no pass over the layers every round)
            verdict = self.watch.observe(outcome.verify_s, pred[0])
            if verdict is not None:
                self.watch.report(self.latency, verdict)
        c = self.choice
        model_steps = outcome.drafted - outcome.n_lookup
        if c is not None and c.plan is not None and outcome.draft.plan is c.plan and model_steps > 0 \
                and outcome.draft_s > 0:
            pred = model_steps * self.latency.predict(c.plan, ctx, 1, head_scale=self._head_scale(c.vocab))
            r = outcome.draft_s / pred
            self._draft_obs += 1
            self._draft_ratio += (r - self._draft_ratio) / min(self._draft_obs, 16)

    def observe_acceptance(self, tried_drafts: int, accepted: int) -> None:
        """Drafts of the current plan decided (the accepted ones and the first rejected) and
        accepted in a round."""
        if tried_drafts <= 0:
            return
        decided = min(tried_drafts, accepted + 1)
        self._tried += decided
        self._acc += max(accepted, 0)
        r, lam = self._recent, self.recent_decay
        for j in range(decided):
            r[0] = lam * r[0] + (j < accepted)
            r[1] = lam * r[1] + 1.0

    def observe_confidence(self, confs: Sequence[float], accepted: int, ctx: int) -> None:
        """The confidence exit, measured: of the model's drafts decided this round (up to the first
        rejected), those drafted with a probability below the exit, and how many of them were
        accepted. A round that stops at such a token still verifies it, so this is measured while
        the exit holds. Drafting goes on past them while they are accepted often enough to pay
        (:meth:`_exit_pays`), and stops there again when they no longer are."""
        low = [i < accepted for i, q in enumerate(confs[:accepted + 1]) if q < self.exit_threshold]
        if not low:
            return
        self._low[0] += len(low)
        self._low[1] += sum(low)
        self._no_exit = self._exit_pays(ctx)

    @property
    def draft_threshold(self) -> float | None:
        """The confidence exit for this plan's drafts: the one given, else none (0) while drafting
        past low-confidence drafts pays, else the generation's (None)."""
        return 0.0 if self._no_exit and self.threshold is None else self.threshold

    def _exit_pays(self, ctx: int, prior: float = 4.0) -> bool:
        """Whether a draft step after a low-confidence draft pays: it adds a token only if that
        draft is accepted (measured: the share of low-confidence drafts accepted, shrunk towards
        1/2 with the weight of ``prior`` drafts) and its own draft is too (the plan's measured
        acceptance), and costs a draft step plus one more row of verification, priced at the
        widths this plan's rounds verify (the mean row up to ``d + 1`` tokens: at 8,000 tokens of
        context ~1.2 ms a row up to 4 tokens, where the mean over every width up to ``d_max + 2``,
        priced before, was ~2.2-3.9 ms and kept the exit while 90-96% of the low drafts were
        accepted). On the embedded
        model with every attention sublayer windowed at 8,000 tokens of context, 97-98% of the
        drafts that stopped a round at the exit of 0.9 were accepted, while a further draft step
        costs ~0.6 of a plain one."""
        c = self.choice
        if c is None or c.plan is None:
            return False
        tv = self.verify_times.at(self.latency, ctx)
        d = min(max(c.d, 1), len(tv) - 1)             # a row of verification at this plan's widths
        extra = self.draft_time(c.plan, ctx, c.vocab) + (tv[d] - tv[0]) / d
        a_low = (self._low[1] + prior / 2) / (self._low[0] + prior)
        return a_low * self.measured_alpha() * tv[0] > extra

    def measured_alpha(self, prior: float = 8.0) -> float:
        """The current plan's acceptance: measured while drafting, shrunk towards the predicted α
        with the weight of ``prior`` tokens."""
        c = self.choice
        a0 = c.alpha if c is not None else 0.0
        return (self._acc + prior * a0) / (self._tried + prior)

    def recent_alpha(self, prior: float = 4.0) -> float:
        """The current plan's acceptance over its last drafts (each earlier draft weighted down by
        ``recent_decay``: ~10 drafts at 0.9), shrunk towards :meth:`measured_alpha` with the weight
        of ``prior`` drafts. It sets the draft length (:meth:`_still_pays`)."""
        r = self._recent
        return (r[0] + prior * self.measured_alpha()) / (r[1] + prior)

    def _still_pays(self, ctx: int) -> bool:
        """Whether the current plan, at the acceptance measured so far and the draft time
        measured so far, still beats a plain step (checked once 16 drafts were decided). While it
        does, its draft length follows them: the length chosen at the estimate's acceptance (the
        probe's, from 16 tokens) is re-priced at the measured one (measured at 8,000 tokens of
        context: a plan probed at α 0.83 drafted 1 token a round while 98% of its drafts were
        accepted), and at the acceptance of the last drafts (:meth:`recent_alpha`), not of all:
        on the embedded model at 8,000 tokens of context the first generated tokens can be
        drafted worse than the rest (on one report, with every attention sublayer windowed to
        1,024 keys, 8 of the first 16 agreed and 79 of the other 80), and priced at the whole
        generation's acceptance the length stayed at 1-3 while every draft was accepted."""
        c = self.choice
        assert c is not None and c.plan is not None
        early = self._tried < 16 and self._draft_obs < 8
        if early and not self._recent[1]:
            return True
        tv = self.verify_times.at(self.latency, ctx)
        td = self.draft_time(c.plan, ctx, c.vocab)
        if not early and best_length(self.measured_alpha(), td, tv, self.d_max)[1] <= 1.0 / tv[0]:
            return False
        d = best_length(self.recent_alpha(), td, tv, self.d_max)[0]
        if d != c.d:
            self.choice = replace(c, d=d)
        return True

    def _head_scale(self, size: int | None) -> float:
        """The share of the lm_head a draft step with the subset of ``size`` frequent tokens
        computes (1: the full vocabulary)."""
        if size is None or self.vocab is None:
            return 1.0
        return self.vocab.rows_for(size) / self.vocab.V

    def draft_time(self, plan: Plan, ctx: int, vocab: int | None = None) -> float:
        """A draft step's time with ``plan`` (and the draft vocabulary's subset ``vocab``) at
        ``ctx``: the prediction corrected by the ratio measured on the current plan's draft steps
        (once 8 rounds drafted with it), else by the ratio measured on full steps."""
        c = self.choice
        if c is not None and c.plan == plan and c.vocab == vocab and self._draft_obs >= 8:
            scale = self._draft_ratio
        else:
            scale = self.verify_times.step_ratio()
        return scale * self.latency.predict(plan, ctx, 1, head_scale=self._head_scale(vocab))

    def price(self, plan: Plan, alpha: float, ctx: int, tv: Sequence[float],
              alphas: dict[int, float] | None = None) -> tuple[int | None, int, float, float]:
        """``(vocab, d, TPT, α)`` of the best way to draft with ``plan`` at ``ctx``: with the full
        vocabulary at acceptance ``alpha``, or with a subset of the draft vocabulary (a cheaper
        head) at ``alphas[size]``, the acceptance measured with it (by the window probe or while
        drafting). A subset is not priced from an estimate alone (a DP's, or α times its coverage):
        measured on Spec-Bench, pricing the DP's candidates that way let marginal plans through the
        TPT bound, and DPs that cost 21-50% of a generation ran on 5 of 26 prompts; gating the
        probe that way made it run, and pick bad plans, at 2k (see :meth:`_probe_windows`)."""
        d, v = best_length(alpha, self.draft_time(plan, ctx), tv, self.d_max)
        best: tuple[int | None, int, float, float] = (None, d, v, alpha)
        if self.vocab is None or not alphas:
            return best
        for size in self.vocab.sizes:
            if size not in alphas:
                continue
            a = alphas[size]
            d, v = best_length(a, self.draft_time(plan, ctx, size), tv, self.d_max)
            if v > best[2]:
                best = (size, d, v, a)
        return best

    @staticmethod
    def _probed(entry: dict[str, Any]) -> list[tuple[str, float, dict[str, float]]]:
        """The window probe's verdict in a memory entry: (plan, α, {subset size: α}) per plan
        (entries written before subsets were probed have no third item)."""
        out = []
        for item in entry.get("probed") or []:
            per = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
            out.append((str(item[0]), float(item[1]), {str(k): float(x) for k, x in per.items()}))
        return out

    @staticmethod
    def _alphas(entry: dict[str, Any]) -> dict[int, float]:
        """The per-subset acceptances a memory entry keeps for its plan (JSON keys are strings)."""
        return {int(k): float(x) for k, x in (entry.get("alphas") or {}).items()}

    # ---- deciding -------------------------------------------------------------------------------
    def tpt_bound(self, ctx: int, tv: list[float] | None = None) -> float:
        """An upper bound on the TPT any plan can reach at ``ctx``, cheap to compute (no model
        run). Always: the TPT at acceptance 1 of the cheapest draft step any plan allows (one
        sublayer of layer 0, the head and the per-forward overhead), which holds for every plan.
        Tighter where the DP ran before in this bucket (or the nearest bucket that has some): the
        best TPT of its candidate plans re-priced at this context with their acceptance raised by
        ``margin`` (the candidates are the DP's Pareto front of time saved and closeness, so this
        bounds what the DP would find again unless acceptance moved by more than the margin)."""
        lat = self.latency
        tv = tv if tv is not None else self.verify_times.at(lat, ctx)
        n = self.model.cfg.n_layers
        t_min = min(self.draft_time(Plan.from_sublayer_skips(n, set(range(2 * n)) - {s}), ctx) for s in (0, 1))
        _, structural = best_length(1.0, t_min, tv, self.d_max)
        cands = self._nearest_candidates(bucket(ctx))
        if cands is None:
            return structural
        best = 0.0
        for text, a in cands:
            try:
                plan = Plan.parse(text, n)
            except ValueError:
                return structural
            if not self._offered(plan):
                return structural
            _, v = best_length(min(1.0, a + self.margin), self.draft_time(plan, ctx), tv, self.d_max)
            best = max(best, v)
        return min(best, structural)

    def _offered(self, plan: Plan) -> bool:
        """Whether this planner could choose ``plan`` (its windows are among ``windows``)."""
        return all(w in self.windows for w in plan.attn_windowed.values())

    def _nearest_candidates(self, b: int) -> list[tuple[str, float]] | None:
        """The DP's candidates remembered for bucket ``b`` or the nearest bucket that has some.
        (A DP at short context offers no windowed plans, so at long context this bound leaves out
        plans a window would make cheaper. Letting the DP run there instead was measured on the
        embedded model at 4k and 8k: its first DP took 28-64% of a 96-token generation, and the
        windowed plan it chose at 8k was accepted on 1-2 of 8 drafted tokens: 0.27-1.00x. Kept.)"""
        entries = self.memory.buckets()
        have = [k for k, v in entries.items() if v.get("candidates") is not None]
        if not have:
            return None
        k = min(have, key=lambda x: (abs(x - b), -x))
        return [(str(t), float(a)) for t, a in entries[k]["candidates"]]

    def decide(self, state: RoundState, trigger: str) -> None:
        """Choose the plan for the rounds from here (see the module docstring, "When to plan")."""
        ctx = state.context_length
        b = bucket(ctx)
        self._bucket = b
        self._probe_at = -1                          # a decision ends any wait (probe or DP)
        lat = self.latency
        tv = self.verify_times.at(lat, ctx, exact=True)
        t_ar = 1.0 / tv[0]
        entry = self.memory.get(b)
        self._sync_vocab(state.tokens)
        n = self.model.cfg.n_layers
        old = self.choice
        if trigger == "acceptance" and old is not None and old.plan is not None:
            # what drafting measured replaces the estimate, in the plan and in the candidates
            a, text = round(self.measured_alpha(), 4), str(old.plan)
            upd: dict[str, Any] = {}
            if entry.get("plan") == text and old.vocab is not None:
                upd["alphas"] = {**(entry.get("alphas") or {}), str(old.vocab): a}
            elif entry.get("plan") == text:
                upd["alpha"] = a
            if entry.get("candidates") and old.vocab is None:
                upd["candidates"] = [[t, a if t == text else x] for t, x in entry["candidates"]]
            if entry.get("probed"):          # (a subset's acceptance bounds the full head's from below)
                upd["probed"] = [[t, min(x, a), {k: min(y, a) for k, y in per.items()}] if t == text else
                                 [t, x, per] for t, x, per in self._probed(entry)]
            if upd:
                self.memory.update(b, **upd)
                entry = self.memory.get(b)
        # 0. entering another bucket with a plan that still pays at the acceptance and draft time
        #    measured so far: keep it (and remember it there when the bucket knows no plan)
        if trigger == "bucket" and old is not None and old.plan is not None:
            a = self.measured_alpha()
            d, v = best_length(a, self.draft_time(old.plan, ctx, old.vocab), tv, self.d_max)
            if v > t_ar:
                if not entry.get("plan"):
                    alphas = {} if old.vocab is None else {str(old.vocab): round(a, 4)}
                    self.memory.update(b, plan=str(old.plan), alpha=round(a, 4), alphas=alphas, d=d, streak=0,
                                       gated=0)
                self._set(Choice(plan=old.plan, d=d, alpha=old.alpha, tpt=v, tpt_ar=t_ar, context=ctx,
                                 source="carried", vocab=old.vocab))
                return
        # the probe's next window, due in this bucket (``_probe_next``): tried once this generation
        # has generated ``probe_tokens`` tokens, drafting with the remembered plan meanwhile
        nxt = self._probe_next(entry, ctx, tv)
        cont = trigger == "probe" and nxt is not None
        kept = (self._tried, self._acc, list(self._recent), self._draft_ratio, self._draft_obs, list(self._low),
                self._no_exit)
        a_in = round(self.measured_alpha(), 4) if cont and self._tried > 0 else None   # (before the reset)
        self._tried = self._acc = 0.0
        self._recent = [0.0, 0.0]
        self._draft_ratio, self._draft_obs = 1.0, 0
        self._low, self._no_exit = [0, 0], False
        # 1. the bucket's remembered plan, if it still pays here
        if entry.get("plan") and trigger != "acceptance" and not cont:
            try:
                plan = Plan.parse(entry["plan"], n)
                voc, d, v, a = self.price(plan, float(entry.get("alpha", 0.0)), ctx, tv, self._alphas(entry))
                if adopts(v, t_ar) and self._offered(plan):
                    self._set(Choice(plan=plan, d=d, alpha=a, tpt=v, tpt_ar=t_ar, context=ctx, source="memory",
                                     vocab=voc))
                    if nxt is not None:
                        self._probe_at = state.n_prompt + self.probe_tokens + 1
                    return
            except ValueError:
                pass
        # 1b. the window probe, once per bucket where windowed attention could pay (again, after
        #     a back-off, where it found nothing that pays: see ``_reprobe_due``): plain steps
        #     until ``probe_tokens`` tokens were generated, then the probe on them
        if (trigger == "start" and self.windows and "probed" in entry and not entry.get("plan")
                and not self._reprobe_due(entry)):
            self.memory.update(b, probe_gated=int(entry.get("probe_gated", 0)) + 1)
        probe = self._probe_windows(entry, ctx, tv)
        if probe:
            need = state.n_prompt + self.probe_tokens + 1
            # (a due re-probe stays due while it waits; ``score_prompt``: the prompt's own last
            # tokens are probed at once, a raw text's tail being like the text to come)
            if len(state.tokens) < need and not (self.score_prompt and len(state.tokens) > self.probe_tokens):
                self._probe_at = need
                self._set(Choice(plan=None, d=0, alpha=0.0, tpt=t_ar, tpt_ar=t_ar, context=ctx,
                                 source="probe-wait"))
                return
            # the largest window first: one window per generation (``_probe_next``)
            order = sorted(probe, reverse=True)
            w, probed, best_v = order[0], [], t_ar
            streak_p = int(entry.get("probe_streak", 0))     # (0 before the bucket's first probe)
        elif cont:
            # the plan in use at the acceptance its drafts measured since this generation began,
            # beside the window probed now on the same tokens
            order = sorted(self._gate_windows(ctx, tv), reverse=True)
            w, probed = nxt, [[t, x, dict(per)] for t, x, per in self._probed(entry)]
            if old is not None and old.plan is not None and a_in is not None:
                for item in probed:
                    if item[0] == str(old.plan):
                        if old.vocab is None:
                            item[1] = a_in
                        else:
                            item[2][str(old.vocab)] = a_in
            best_v = max([t_ar] + [self._price_probed(t, x, per, ctx, tv)[1][2] for t, x, per in probed])
        if probe or cont:
            (plan, a, per), = self.probe(state, [w])
            self._probes_now += 1
            probed.append([str(plan), round(a, 4), {str(k): round(x, 4) for k, x in per.items()}])
            self.memory.update(b, probed=probed, probe_next=self._next_window(order, w, a, per, best_v, ctx, tv))
            entry = self.memory.get(b)
        # 1c. a probed bucket: the probed plan that pays best at the acceptances measured (by the
        #     probe, or while drafting with it), else no draft; no DP where the probe looked (the
        #     DP's bound re-prices short-context candidates there, and a DP at 8k tokens of context
        #     cost 0.8 s, 40% of a 96-token generation, after a probed plan stopped paying)
        if entry.get("probed"):
            best = None
            for text, a_full, per in self._probed(entry):
                r = self._price_probed(text, a_full, per, ctx, tv)
                if r[0] is not None and (best is None or r[1][2] > best[1][2]):
                    best = (r[0], r[1], a_full, per)
            # (the plan in use, priced at its measured acceptance, is kept while it pays at all)
            in_use = (best is not None and cont and old is not None and str(best[0]) == str(old.plan)
                      and best[1][0] == old.vocab)
            if best is not None and adopts(best[1][2], t_ar, in_use=in_use):
                plan, (voc, d, v, a), a_full, per = best
                self.memory.update(b, plan=str(plan), alpha=a_full, alphas=per, d=d, streak=0, gated=0,
                                   probe_streak=0, probe_gated=0)
                if in_use:                                                        # goes on
                    (self._tried, self._acc, self._recent, self._draft_ratio, self._draft_obs, self._low,
                     self._no_exit) = kept
                self._set(Choice(plan=plan, d=d, alpha=a, tpt=v, tpt_ar=t_ar, context=ctx, source="probe",
                                 vocab=voc))
                return
            if probe:                                # this decision probed and found nothing
                self.memory.update(b, plan=None, alphas={}, probe_streak=streak_p + 1, probe_gated=0,
                                   probe_next=None)
            else:
                self.memory.update(b, plan=None, alphas={}, probe_next=None)
            self._set(Choice(plan=None, d=0, alpha=0.0, tpt=t_ar, tpt_ar=t_ar, context=ctx, source="probe"))
            return
        # 2. a remembered "no draft" verdict, while the back-off lasts; and no second DP in one
        #    generation before ``every << streak`` rounds
        streak = int(entry.get("streak", 0))
        gated = int(entry.get("gated", 0))
        too_soon = state.round - self._last_dp_round < self.every << min(streak, 3)
        if (streak > 0 and gated < backoff(streak)) or too_soon:
            self.memory.update(b, gated=gated + 1)
            self._set(Choice(plan=None, d=0, alpha=0.0, tpt=t_ar, tpt_ar=t_ar, context=ctx, source="memory"))
            return
        # 3. the cheap bound
        bound = self.tpt_bound(ctx, tv)
        if not adopts(bound, t_ar):                  # a verdict as good as the DP's: the back-off grows
            self.memory.update(b, gated=0, streak=min(streak + 1, 7), plan=None)
            self._set(Choice(plan=None, d=0, alpha=0.0, tpt=bound, tpt_ar=t_ar, context=ctx, source="bound"))
            return
        # 3b. no DP has left candidates on this machine yet, and here one is dear: plain steps for
        #     this decision, nothing remembered. The DP's cost grows with the context (its branches
        #     attend over the whole prefix); measured on the embedded model in a first generation
        #     with a fresh memory: 0.24-0.31 s at 1k tokens (27-31% of a 96-token generation,
        #     0.74-0.81x), 0.36-0.38 s at 2k (33%, 0.66x), ~0.1-0.16 s at a few hundred tokens. Once
        #     a DP at a short context has left candidates, the bound above re-prices them here.
        if ctx > self.dp_context and self._nearest_candidates(b) is None:
            self._set(Choice(plan=None, d=0, alpha=0.0, tpt=t_ar, tpt_ar=t_ar, context=ctx,
                             source="no-candidates"))
            return
        # 4. the DP, on the residual stream of the last ``window`` committed tokens, once they are
        #    generated ones: plain steps until then. On the prompt's last tokens the chat template's
        #    own tokens (the assistant header a draft predicts as easily as the full model) made up
        #    ~5 of the 16 scored, and plans estimated at α 0.89 there drafted 1.5-1.75 tokens a
        #    round at d = 2 (`knapspec bench tpt`, r 0.58 on an EPYC host). Scored: the positions
        #    from the prompt's last one (which predicts the first generated token) on; the cache
        #    holds the positions before the last committed token. ``score_prompt``: no wait.
        need = state.n_prompt + self.window
        if len(state.tokens) < need and not self.score_prompt:
            self._probe_at = need
            self._set(Choice(plan=None, d=0, alpha=0.0, tpt=t_ar, tpt_ar=t_ar, context=ctx, source="dp-wait"))
            return
        self.collect(state, len(state.tokens) - 1)
        cands, c = self.optimise(ctx)
        self._last_dp_round = state.round
        keep = sorted(cands, key=lambda x: -x[1])[:16]
        if c.plan is None:
            self.memory.update(b, streak=streak + 1, gated=0, plan=None,
                               candidates=[[str(p), round(a, 4)] for p, a, _ in keep])
        else:
            self.memory.update(b, streak=0, gated=0, plan=str(c.plan), alpha=round(c.alpha, 4), d=c.d, alphas={},
                               candidates=[[str(p), round(a, 4)] for p, a, _ in keep])
        self._set(c)

    def probe_due(self, ctx: int) -> bool:
        """Whether a decision at ``ctx`` would start with the window probe."""
        entry = self.memory.get(bucket(ctx))
        if not self._probe_open(entry):                     # before pricing anything
            return False
        return bool(self._probe_windows(entry, ctx, self.verify_times.at(self.latency, ctx, exact=True)))

    def _probe_open(self, entry: dict[str, Any]) -> bool:
        """Whether the bucket may be probed: never probed yet, or its probe found nothing that
        pays and the back-off says again (:meth:`_reprobe_due`); windows offered."""
        if not self.windows:
            return False
        return "probed" not in entry or (not entry.get("plan") and self._reprobe_due(entry))

    @staticmethod
    def _reprobe_due(entry: dict[str, Any]) -> bool:
        """Whether a bucket whose probe found no plan that pays is probed again now: after
        ``backoff(probe_streak)`` generations (decisions at their start) that took the verdict
        from the memory. A probe's verdict depends on the text it scored (at 8,000 tokens of
        context, one report's windowed plan drafted at 98% acceptance, 1.2x, while on another
        none paid), and a plan that pays is re-checked by what drafting measures, while a
        "nothing pays" verdict would otherwise hold for good; a probe that finds nothing costs one
        pass over ``probe_tokens`` tokens (the largest window's plan does not pay), ~20 ms, 2% of
        a 96-token generation at 8k, and less once amortised by the back-off."""
        return int(entry.get("probe_gated", 0)) >= backoff(int(entry.get("probe_streak", 1)))

    @property
    def waiting_for_probe(self) -> bool:
        """Plain steps until the window probe or the DP runs (the tokens they score are being
        generated)."""
        return self._probe_at >= 0

    def _probe_windows(self, entry: dict[str, Any], ctx: int, tv: Sequence[float]) -> list[int]:
        """The windows a first probe (or a re-probe after its back-off) may try at ``ctx``: none
        where the bucket may not be probed (:meth:`_probe_open`: probed already, unless a "nothing
        pays" verdict's back-off is over); else :meth:`_gate_windows`."""
        if not self._probe_open(entry):
            return []
        return self._gate_windows(ctx, tv)

    def _gate_windows(self, ctx: int, tv: Sequence[float]) -> list[int]:
        """Each offered window that leaves out keys here and whose all-windowed plan would beat a plain
        step by ``PROBE_GAIN`` at acceptance ``PROBE_ALPHA`` with the full lm_head, about the
        best an all-windowed draft reached on the embedded model's long documents (0.86-0.92 at
        8k). Where even that would not pay enough, the probe's cost (a pass over ``probe_tokens``
        tokens per window) is saved: on the embedded model up to ~5k tokens of context, where
        attention is a smaller share of a step (measured there: at 4k the probe found no plan
        that pays, and probing cost up to 3.5% of a 96-token generation). The draft vocabulary's
        subsets do not open the probe (they are priced at what it measures): gated at α times
        their coverage, the probe ran at 2k and 4k on the embedded model, found nothing at 4k
        (0.96-0.97x autoregressive with its cost), and at 2k picked a plan from its 16 tokens
        that drafting then measured at 75% (0.89x)."""
        n, t_ar = self.model.cfg.n_layers, 1.0 / tv[0]
        out = []
        for w in self.windows:
            if ctx <= 2 * (w + SINK) + self.probe_tokens:
                continue
            _, v = best_length(PROBE_ALPHA, self.draft_time(windowed_plan(n, w), ctx), tv, self.d_max)
            if v > (1.0 + PROBE_GAIN) * t_ar:
                out.append(w)
        return out

    def _probe_next(self, entry: dict[str, Any], ctx: int, tv: Sequence[float]) -> int | None:
        """The window the probe tries next in this bucket, if it is due in this generation: the
        probe runs one window per generation, largest first, and goes on to the next smaller one
        (``probe_next`` in the memory, :meth:`_next_window`) in a later generation that drafts
        with the plan it found, on that generation's first ``probe_tokens`` tokens. A probe pass
        costs 17-24 ms at 8,000 tokens of context (embedded model, EPYC host); two in one
        96-token generation took 31 ms, 7% of the hybrid's decode time there."""
        w = entry.get("probe_next")
        if not w or self._probes_now or not entry.get("probed") or not entry.get("plan"):
            return None
        return int(w) if int(w) in self._gate_windows(ctx, tv) else None

    def _next_window(self, order: Sequence[int], w: int, a: float, per: dict[int, float], best: float,
                     ctx: int, tv: Sequence[float]) -> int | None:
        """After probing window ``w`` at acceptance ``a`` (``per``: per subset): the next smaller
        window of ``order`` (largest first) to probe, or None. A smaller window attends to a
        subset of a larger one's keys (and agreed less often wherever measured: 73% / 84% / 87%
        at W = 64 / 256 / 1024 on a 4k-token report), so the probe ends at a window whose plan
        does not pay, and where the next one would not pay ``PROBE_STEP`` more than ``best`` (the
        best TPT probed before) even at this one's acceptance."""
        n, t_ar = self.model.cfg.n_layers, 1.0 / tv[0]
        v = self.price(windowed_plan(n, w), a, ctx, tv, per)[2]
        if v <= t_ar or w not in order or order.index(w) + 1 == len(order):
            return None
        nxt = order[order.index(w) + 1]
        pays_more = self.price(windowed_plan(n, nxt), a, ctx, tv, per)[2] >= (1.0 + PROBE_STEP) * max(best, v)
        return nxt if pays_more else None

    def _price_probed(self, text: str, a_full: float, per: dict[str, float], ctx: int, tv: Sequence[float],
                      ) -> tuple[Plan | None, tuple[int | None, int, float, float]]:
        """A probed plan (memory text form) and :meth:`price` at its probed acceptances; (None,
        zero TPT) where it does not parse or is not offered."""
        try:
            plan = Plan.parse(text, self.model.cfg.n_layers)
        except ValueError:
            return None, (None, 0, 0.0, 0.0)
        if not self._offered(plan):
            return None, (None, 0, 0.0, 0.0)
        return plan, self.price(plan, a_full, ctx, tv, {int(k): y for k, y in per.items()})

    @torch.inference_mode()
    def probe(self, state: RoundState, windows: Sequence[int]) -> list[tuple[Plan, float, dict[int, float]]]:
        """``(plan, α, {size: α})`` for each plan that windows every attention sublayer to one of
        ``windows``: α is the posterior mean, (agreeing + 1) / (tokens + 2), of the plan's greedy
        token agreeing with the next committed token on the last ``probe_tokens`` committed tokens,
        and per subset size of the draft vocabulary the same with the greedy token taken among that
        subset: its frequent tokens and those of the text before the probed tokens. After plain
        steps the committed tokens are the full model's own greedy tokens; under sampling they are
        samples, and the agreement with them is only a proxy for speculative sampling's
        acceptance. Each plan
        runs as its drafts do, one pass over those tokens at their own positions (its own keys
        for them, the cache's before them), on the fused native path where the model has one;
        the cache entries it overwrites are put back after it.
        Windows are probed in the order given (the strategy probes one per generation:
        :meth:`_probe_next`). Costs one pass over ``probe_tokens`` tokens per window (about what
        verifying as many draft tokens costs at short context), where the DP's collection alone is
        a full-attention pass over its tokens and the DP many more.

        The probe used to time full-model passes over 2 and 4 tokens as well (three each), because
        the latency profile had mis-stated them at long context (EPYC host, float32-FMA attention:
        4 tokens at 8k 2.06x a step, the profile 1.45x). That cost 86 ms of the probe's 150 ms at
        8,000 tokens of context (14% of a 96-token generation's decode time). The profile is
        measured with the attention kernel in use (its key names it), and with the VDPBF16PS
        kernel it is within 12% of measured passes over 2-8 tokens at 4k-8k; the verification
        corrections (:class:`~knapspec.strategies.pricing.VerifyTimes`) learn the rest from the
        first drafting rounds, and a plan that stops paying at the measured times gives way."""
        model, cache = state.model, state.cache
        assert cache is not None
        n, k = model.cfg.n_layers, self.probe_tokens
        end = len(state.tokens) - 1                    # the cache holds the positions before `end`
        p0 = end - k
        ids = torch.tensor([state.tokens[p0:end]], device=model.device)
        targets = torch.tensor(state.tokens[p0 + 1:end + 1])
        seen = None
        if self.vocab is not None:
            seen = np.zeros(self.vocab.V, dtype=bool)
            seen[np.asarray(state.tokens[:p0 + 1], dtype=np.int64)] = True
        self.probe_runs += 1
        out = []

        def alpha(agreeing: int) -> float:
            return (agreeing + 1.0) / (k + 2.0)
        with cache.scratch(p0, end):
            for w in windows:
                plan = windowed_plan(n, w)
                logits = model.forward(ids, p0, cache, plan).logits[0].float().cpu()
                per_size: dict[int, float] = {}
                if self.vocab is not None:
                    per_size = {size: alpha(c) for size, c in subset_agreement(
                        logits, targets, seen, self.vocab.rank, self.vocab.sizes).items()}
                out.append((plan, alpha(int((logits.argmax(-1) == targets).sum())), per_size))
        return out

    def _set(self, c: Choice) -> None:
        self.choice = c
        self.history.append(c)
        if log.isEnabledFor(logging.DEBUG):
            if c.plan is None:
                log.debug("knapspec @ctx %d (%s): no draft (best draft TPT %.1f, decoding %.1f tok/s)",
                          c.context, c.source, c.tpt, c.tpt_ar)
            else:
                log.debug("knapspec @ctx %d (%s): plan %s; alpha %.2f, d %d, predicted %.1f tok/s (decoding "
                          "%.1f)", c.context, c.source, c.plan, c.alpha, c.d, c.tpt, c.tpt_ar)

    # ---- the DP on the collected tokens -----------------------------------------------------------
    def items(self, ctx: int) -> list[list[tuple[int, int]]]:
        """Per sublayer, its options with their time saved in weight units: full (0 saved), each
        window that saves time at ``ctx`` (attention only), skipped."""
        lat = self.latency
        times = lat.sublayer_times(ctx, 1)
        unit = min(t for t in times if t > 0) / self.resolution if any(t > 0 for t in times) else 1.0
        out = []
        for s, t in enumerate(times):
            opts = [(FULL, 0)]
            if s % 2 == 0:
                for w in self.windows:
                    if ctx > w + SINK + self.window:
                        saved = round((t - lat.window_time(s // 2, w, ctx, 1)) / unit)
                        if saved > 0:
                            opts.append((w, saved))
            w0 = max(round(t / unit), 0)
            if w0 > 0:
                opts.append((SKIP, w0))
            out.append(opts)
        return out

    @torch.inference_mode()
    def optimise(self, ctx: int) -> tuple[list[tuple[Plan, float, float]], Choice]:
        """Run the DP on the collected tokens at context ``ctx``. Returns the candidates
        ``(plan, alpha, mean cosine)`` and the chosen (plan, d)."""
        model, lat = self.model, self.latency
        self.dp_runs += 1
        start, hidden, targets = self._collected()
        ref = hidden.float()                                         # [2L+1, K, H]
        cache = self._cache
        assert cache is not None, "optimise() runs inside a generation (after start())"

        def step(s: int, X: torch.Tensor, option: int) -> torch.Tensor:
            return model.sublayer(s, X, start, cache, write=False, window=option if option > FULL else 0)

        def score(depth: int, X: torch.Tensor) -> torch.Tensor:
            return F.cosine_similarity(X.float(), ref[depth][None], dim=-1).mean(-1)

        def allow(s: int, runs: torch.Tensor) -> torch.Tensor:
            if s != 1:
                return torch.ones(runs.shape[0], dtype=torch.bool, device=runs.device)
            return (runs[:, 0] != SKIP) | (runs[:, 1] != SKIP)        # never skip all of layer 0

        states, X = knapsack_dp(self.items(ctx), hidden[0][None], step, score, min_value=self.min_cosine,
                                max_states=self.max_states, allow=allow)
        cands: list[tuple[Plan, float, float]] = []
        finals = [st for st in states if any(st.run) and not all(o == FULL for o in st.run)]
        if finals:
            Xf = X.index_select(0, torch.tensor([st.index for st in finals], device=X.device))
            top = model.head(Xf).argmax(-1)                          # [N, K]
            # the posterior mean under a uniform prior, (k + 1) / (K + 2), not the raw share k / K:
            # on K = 8 tokens a plan that agreed on all 8 would otherwise be priced at α = 1, i.e.
            # as if every draft of any length were accepted (measured: α 1 estimated, ~0.6 drafted)
            k_top = targets.shape[-1]
            agree = (((top == targets[None]).float().sum(-1) + 1.0) / (k_top + 2.0)).tolist()
            for st, a in zip(finals, agree):
                alpha = a if self.alpha_mode == "top1" else max(0.0, min(1.0, st.value))
                cands.append((Plan.from_options(st.run), alpha, st.value))
        tv = self.verify_times.at(lat, ctx, exact=True)
        v_ar = 1.0 / tv[0]
        best = max(((p, *self.price(p, a, ctx, tv)) for p, a, _ in cands), key=lambda x: x[3], default=None)
        if best is None or not adopts(best[3], v_ar):
            return cands, Choice(plan=None, d=0, alpha=0.0, tpt=v_ar, tpt_ar=v_ar, context=ctx)
        plan, voc, d, v, alpha = best
        return cands, Choice(plan=plan, d=d, alpha=alpha, tpt=v, tpt_ar=v_ar, context=ctx, vocab=voc)

    def describe(self) -> dict[str, Any]:
        """Plans made, and the skipped and windowed shares of attention / MLP sublayers averaged
        over the rounds that drafted with a plan (what the benchmark plots against context)."""
        n = self.model.cfg.n_layers
        used = [c for c in self._used if c.plan is not None]

        def share(f: Callable[[Plan], int]) -> float:
            return sum(f(c.plan) for c in used) / (n * len(used)) if used else 0.0
        out: dict[str, Any] = {"strategy": self.name, "plans": len(self.history), "dp_runs": self.dp_runs,
                               "draft_round_share": len(used) / len(self._used) if self._used else 0.0,
                               "attn_skip_share": share(lambda p: len(p.attn_skipped)),
                               "attn_window_share": share(lambda p: len(p.attn_windowed)),
                               "mlp_skip_share": share(lambda p: len(p.mlp_skipped))}
        if used:
            wins = [w for c in used for w in c.plan.attn_windowed.values()]
            if wins:
                out["mean_window"] = sum(wins) / len(wins)
        if self._used:
            out["predicted_tps"] = sum(c.tpt for c in self._used) / len(self._used)
        if self.history:
            last = self.history[-1]
            out["last_plan"] = str(last.plan) if last.plan is not None else "none"
            out["decided_by"] = [c.source for c in self.history]
        return out


def windowed_plan(n_layers: int, w: int) -> Plan:
    """The plan that runs every sublayer and windows every attention sublayer to ``w`` keys."""
    return Plan.from_options([w, FULL] * n_layers)


_KNAPSPEC_OPTIONS = ("window", "every", "min_cosine", "max_states", "resolution", "alpha", "margin",
                     "probe_tokens", "dp_context")


@REGISTRY.register("knapspec", options=_KNAPSPEC_OPTIONS + ("windows", "draft_vocab", "memory"))
def _knapspec(model: Model, *, latency: LatencyModel | None = None, max_draft: int | None = None,
              threshold: float | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in _KNAPSPEC_OPTIONS}
    kw["windows"] = parse_windows(options.get("windows", DEFAULT_WINDOWS))
    # the token ids' own order by default (no calibration needed; ``draft_vocab=off``: the full
    # head only). Measured side by side at 8,000 tokens of context on the embedded model (docs/
    # benchmarks.md, "KnapSpec through a draft vocabulary"): 1.22-1.23x autoregressive against
    # 1.13-1.18x without it, the same at 4k (0.97-1.00x: the probe finds nothing there).
    # It was off while the probe's estimates over its subsets picked plans that drafting then
    # found accepted half as often (0.91x at 8,000 tokens): the plan and its draft length now
    # follow the acceptance measured while drafting.
    kw["draft_vocab"] = load_draft_vocab(model, options.get("draft_vocab", "ids"))
    kw["memory"] = planner_memory(model, options.get("memory", "auto"), kw["windows"], kw["draft_vocab"])
    return KnapSpecStrategy(model, latency, d_max=max_draft or 8, threshold=threshold, **kw)


# The attention windows the planner may choose by default (keys besides the sink).
DEFAULT_WINDOWS = (64, 256, 1024)


def parse_windows(spec: Any) -> tuple[int, ...]:
    """``"64/256"`` or ``"64+256"`` (option strings), a sequence of ints, or ``"off"``/``"none"``."""
    if spec in (None, "off", "none", "", 0):
        return ()
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        try:
            return tuple(int(x) for x in spec.replace("+", "/").split("/") if x)
        except ValueError:
            raise ValueError(f"bad attention windows {spec!r}: expected sizes like 64/256/1024, or off") from None
    return tuple(int(x) for x in spec)


def planner_memory(model: Model, spec: Any, windows: Sequence[int] = (),
                   vocab: DraftVocab | None = None) -> PlanMemory:
    """``"auto"``: this set-up's file in the cache folder: one per set of attention windows the
    planner may choose and per draft vocabulary (its ranking), so that planners with other choices
    do not share verdicts (a plan that pays through a subset of the head may not pay without it,
    and a planner without one would record its probes without the subsets' acceptances);
    ``"off"``/None: in the process only; a path; or a :class:`PlanMemory`."""
    if isinstance(spec, PlanMemory):
        return spec
    if spec == "auto":
        path = plan_memory.default_memory_path(model)
        tag = f"-w{'-'.join(str(w) for w in sorted(windows))}" if windows else ""
        if vocab is not None:
            tag += f"-v{vocab.ranking_key(max(vocab.sizes, default=0))[:8]}"
        return PlanMemory(path.with_name(f"{path.stem}{tag}{path.suffix}"))
    if spec in ("off", None):
        return PlanMemory(None)
    return PlanMemory(spec)
