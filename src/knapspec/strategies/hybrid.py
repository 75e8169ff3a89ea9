"""Hybrid drafting: prompt lookup, KnapSpec layer-skip drafting, both, or none — chosen per round
by predicted tokens per time.

Each round the strategy prices four drafts with the latency model at the current context:

* **lookup**: the tokens that followed the most recent earlier occurrence of the last n tokens
  (no model cost); possibly truncated to its best prefix;
* **skip**: ``d`` tokens drafted with the current KnapSpec plan (the embedded KnapSpec planner
  chooses the plan; its acceptance is tracked online, starting from the planner's α);
* **lookup + skip**: the lookup tokens, then ``d`` more drafted with the plan after them;
* **none**: a plain decoding step.

A lookup draft, when one exists, is drafted at least up to ``min_lookup`` tokens. With the
native CPU kernels the default is 0: every lookup token is priced like any other draft, because
their one-token steps are ~2-3x faster while passes over several tokens grow with the attention's
arithmetic (8 tokens cost 1.1-1.5x a step at 128 tokens of context, 1.7-2.0x at 4k), and pricing
won on all 13 Spec-Bench categories (1.34x against plain lookup's 1.16x over 52 prompts, rounds in
lockstep) and overall in `make bench` since. On the other
kernels (oneDNN, CUDA) the default is 8, plain prompt lookup's length: there verifying a few copied
tokens cost little (8 extra tokens ~25% of a step), and versions that priced every lookup token
lost up to 30% to plain lookup on categories with short, frequent matches. Beyond that floor
(longer lookups up to ``max_lookup``, skip drafts after them) and in rounds without a match (skip
draft or none), the choice is by predicted TPT.
``max_lookup`` defaults to 8: longer lookups
were verified but not accepted often enough to pay (float32 Spec-Bench run, docs/benchmarks.md).

Expected tokens use acceptance estimates tracked online: for lookup, per n-gram match length and
draft position (the probability that the token is accepted given that the ones before it were,
Beta(1, 1) prior); for skip drafts, per token. The draft with the highest
``E[tokens] / (model drafting time + verification time)`` wins.

A reference (``RoundState.reference``: a predicted output) is a second source of lookup drafts:
its match is taken when it is at least as long as the context's, and its acceptance is tracked
apart from the context's matches.

Verification times come from the latency model, corrected online: for each verification width
the strategy keeps a running ratio of measured to predicted time, so a profile that mis-states how
a pass grows with its width (a noisy profiling run, another load on the machine) cannot make it
refuse drafts that cost almost nothing to verify.

The lookup estimates are *sampled* from their Beta posteriors when a round is decided (Thompson
sampling), not taken at their means: an estimate only learns from the lookups that were drafted,
so a greedy choice that once finds a kind of match unprofitable never drafts it again and never
learns otherwise. Sampling keeps trying such matches in proportion to the remaining uncertainty.

The KnapSpec planner costs a full-model pass over its window plus a dynamic program, so it starts
late and backs off: it wakes only once ``plan_after`` rounds in a row found no lookup match; a "no
draft pays" verdict puts it back to sleep and doubles that number for its next start (up to 64; a
verdict with a plan resets it). On hardware where layer-skip drafts never pay, the hybrid then
costs what prompt lookup costs. Nothing is captured during verification: the planner computes the
residual stream it needs just before a dynamic program.

That back-off is the planner's own memory (``memory.PlanMemory``: per context bucket, a small JSON
file in the cache folder keyed like the latency profile by model shape, device, dtype and threads,
shared with the ``knapspec`` strategy where that drafts without a draft vocabulary, and per set of
attention windows on offer), so that every new ``knapspec generate`` does not pay the
planner's first wake (a full-model pass over its window and the DP: ~0.2 s for the embedded model
on a CPU) to learn again what the last one found; once awake, the planner itself decides from that
memory before it runs a DP. Created by name (the CLI, the API, the benchmark) the strategy uses
the default file; ``memory="off"`` or deleting the file forgets it.

With a draft vocabulary (``draft_vocab``, see ``vocab.py``) every skip option also comes in one
variant per subset size: the draft step is cheaper by the lm_head rows left out, and its acceptance
is tracked per size (prior: the full-vocabulary estimate times the subset's coverage).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, ClassVar

from ..latency import LatencyModel
from ..model import Model
from ..plan import Plan
from .base import AUTOREGRESSIVE, REGISTRY, Draft, Outcome, RoundState, Strategy
from .knapspec import DEFAULT_WINDOWS, KnapSpecStrategy, parse_windows, planner_memory
from .lookup import MAX_POS, LookupAcceptance, NgramIndex, ReferenceIndex, best_continuation
from .memory import PlanMemory, bucket
from .pricing import VerifyTimes
from .vocab import DraftVocab, load_draft_vocab

log = logging.getLogger(__name__)



@dataclass(slots=True)
class Option:
    # (not frozen: up to ~100 are built a round, and a frozen dataclass sets its fields through
    # ``object.__setattr__``: 1.4 us an option against 0.3 us. With the sums below taken once,
    # the pricing of a round at 8,000 tokens of context fell from 135 to 111 us on average, of
    # ~0.7 ms of planning a round)
    kind: str                   # "none" | "lookup" | "skip" | "lookup+skip"
    n_lookup: int
    n_skip: int
    expected: float
    seconds: float
    vocab: int | None = None    # draft vocabulary size of the skip drafts (None = full)

    @property
    def tpt(self) -> float:
        return self.expected / self.seconds


class HybridStrategy(Strategy):
    name = "hybrid"
    # plan in the benchmark's code-path warm-up too, without remembering what it finds there (the
    # verdict a machine keeps is learned by ``prepare``, as ``generate`` and ``serve`` do)
    warm_up_options: ClassVar[dict[str, Any]] = {"plan_after": 0, "memory": "off"}
    reproducible: ClassVar[bool] = False     # its choices follow measured verification times

    def __init__(self, model: Model, latency: LatencyModel | None = None, *, max_ngram: int = 3,
                 max_lookup: int = 8, d_max: int = 8, skip_prior: float = 4.0, use_skip: bool = True,
                 plan_after: int = 4, draft_vocab: DraftVocab | None = None, persist: bool = True,
                 threshold: float | None = None, seed: int = 0, min_lookup: int | None = None,
                 memory: PlanMemory | str | os.PathLike[str] | None = None, **planner: Any) -> None:
        self.model = model
        # the acceptance estimates carry over to the next prompts (the benchmark and the API keep
        # one instance), instead of starting every generation from the Beta(1, 1) priors
        self.persists_across_prompts = persist
        self.memory = memory if isinstance(memory, PlanMemory) else PlanMemory(memory)
        self.planner = KnapSpecStrategy(model, latency, d_max=d_max, memory=self.memory, **planner)
        self.max_ngram, self.max_lookup, self.d_max = max_ngram, max_lookup, d_max
        self.skip_prior, self.use_skip, self.threshold = skip_prior, use_skip, threshold
        self.plan_after = plan_after
        # the floor of a lookup draft: 0 (price every token) with the native kernels, whose one-token
        # steps are fast enough that verifying copied tokens no longer costs little; 8 otherwise
        # (see the module docstring and docs/benchmarks.md, "Native CPU kernels")
        if min_lookup is None:
            min_lookup = 0 if getattr(model, "kernels", "") == "native" else 8
        self.min_lookup = min_lookup
        self._plan_after_now = plan_after
        self._bucket = -1
        self._wake_now = False
        self._active = False                       # the planner runs in this prompt
        self._rng = random.Random(seed)
        self._misses = 0
        # lookup acceptance per (n-gram length, position); the last group is for matches in the
        # reference (a predicted output), whatever their length
        self._ref_group = max_ngram + 1
        self.lookup_estimates = LookupAcceptance(self._ref_group)
        self._sk_acc = 0.0
        self._sk_try = 0.0
        # rounds with layer-skip drafts of one plan: [rounds, expected tokens, predicted seconds,
        # tokens committed, seconds measured] (see :meth:`skip_efficiency`)
        self._sk_real = [0.0, 0.0, 0.0, 0.0, 0.0]
        self._sk_plan: Plan | None = None
        self._pending: tuple[Option, int] | None = None
        self.verify_times = VerifyTimes(max_lookup + d_max + 2)
        self.counts: dict[str, int] = {}
        self._index = NgramIndex(max_ngram)          # the lookup matches
        self._reference: ReferenceIndex | None = None
        self.vocab = draft_vocab
        self._vk: dict[int | None, list[float]] = {}     # per vocabulary size: [accepted, tried]
        self._n_committed = 0

    @property
    def latency(self) -> LatencyModel:
        return self.planner.latency

    # ---- the planner's back-off, remembered per context bucket -------------------------------------
    def _backoff(self, streak: int) -> int:
        """Lookup misses in a row that wake the planner after ``streak`` "no draft" verdicts in a
        row: ``plan_after``, doubled per verdict, at most 64."""
        if streak <= 0:
            return self.plan_after
        return min(max(self.plan_after, 1) << min(streak, 7), 64)

    def _recall(self, ctx: int) -> None:
        """The wait for the planner at this context's bucket, from the planner's memory: none
        where the bucket remembers a plan or the window probe is due there (lookups that match
        but are mostly rejected would otherwise keep the planner asleep where its windowed drafts
        pay), else ``plan_after`` lookup misses in a row, doubled per "no draft" verdict."""
        self._bucket = bucket(ctx)
        entry = self.memory.get(self._bucket)
        self._plan_after_now = self._backoff(int(entry.get("streak", 0)))
        if self.use_skip and (entry.get("plan") or self.planner.probe_due(ctx)):
            self._plan_after_now = 0

    @property
    def _remembered(self) -> bool:
        """Whether the memory holds a verdict at all (a file with at least one bucket)."""
        return bool(self.memory.buckets())

    def prepare(self, *, progress: bool = False) -> bool:
        """The planner's latency profile; and, when this machine's verdict on layer-skip drafts is
        not remembered yet, a warm-up generation to learn it (the planner wakes at once there)."""
        self.planner.prepare(progress=progress)
        if self.use_skip and self.memory.path is not None and not self._remembered:
            self._wake_now = True
            return True
        return False

    wants_hidden = False                          # the planner computes what it needs when it runs

    # ---- estimates --------------------------------------------------------------------------------
    def lookup_accept(self, n: int, *, sample: bool = False, positions: int = MAX_POS) -> list[float]:
        """P(position j accepted | positions < j accepted), ``j < positions``, for an n-gram match
        (see :class:`LookupAcceptance`; ``sample``: Thompson sampling)."""
        return self.lookup_estimates.probs(n, self._rng if sample else None, min(positions, MAX_POS))

    def skip_alpha(self, vocab: int | None = None) -> float:
        c = self.planner.choice
        prior = c.alpha if c is not None and c.plan is not None else 0.0
        full = (self._sk_acc + self.skip_prior * prior) / (self._sk_try + self.skip_prior)
        if vocab is None or self.vocab is None:
            return full
        cov = float(self.vocab.coverage()[self.vocab.sizes.index(vocab)])
        acc, tried = self._vk.get(vocab, (0.0, 0.0))
        return (acc + self.skip_prior * full * cov) / (tried + self.skip_prior)

    def skip_efficiency(self, prior: float = 4.0) -> float:
        """What rounds with layer-skip drafts delivered against their pricing: measured tokens per
        second over predicted, over the rounds of the current plan (this generation's and, at half
        weight per generation, earlier ones'), shrunk towards 1 with the weight of ``prior``
        rounds. It multiplies the expected tokens of every option with layer-skip drafts.

        Each part of the pricing is measured (acceptance, verification times), but not what they
        miss together: an acceptance pooled over easy and hard stretches of text overstates a
        round's tokens (i.i.d. at the pooled rate), a draft step's time is predicted with the
        one-token step's correction, and drafts end early at the confidence exit. Measured on the
        embedded model at 8,000 tokens of context (raw report text, every attention sublayer
        windowed to 1,024 keys): skip rounds priced at 3.6 tokens in 37 ms committed 3.0 tokens
        in 41 ms, 13.6 ms a token against 13.2 ms for a plain step; side by side, the hybrid with
        windowed drafts ran at 0.95-0.97x the hybrid without them on each of four reports. An
        analytic latency model is taken as given (nothing is measured against it)."""
        c = self.planner.choice
        if c is None or not self._tallied(c.plan):
            return 1.0
        n, e, sec, tok, real = self._sk_real
        if n <= 0 or e <= 0 or real <= 0:
            return 1.0
        r = (tok / real) / (e / sec)
        return (n * r + prior) / (n + prior)

    def _tallied(self, plan: Plan | None) -> bool:
        """Whether the skip rounds tallied for :meth:`skip_efficiency` are ``plan``'s."""
        return plan is not None and (plan is self._sk_plan or plan == self._sk_plan)

    def options(self, ctx: int, n_gram: int, lookup: list[int], *, explore: bool = False) -> list[Option]:
        """Every candidate draft of this round with its expected tokens and predicted time
        (``explore``: lookup acceptances sampled from their posteriors)."""
        tv = self.verify_times.at(self.latency, ctx)
        lookup = lookup[:self.max_lookup]
        opts = [Option("none", 0, 0, 1.0, tv[0])]
        k = len(lookup)
        reach = [1.0]                             # P(first i lookup tokens all accepted)
        if k:
            p = self.lookup_accept(n_gram, sample=explore, positions=k)
            for i in range(k):
                reach.append(reach[-1] * p[min(i, MAX_POS - 1)])
            floor = min(k, self.min_lookup)
            if floor:
                opts.pop()                        # a lookup draft exists: drafting it is the floor
            for kk in range(max(floor, 1), k + 1):
                opts.append(Option("lookup", kk, 0, sum(reach[:kk + 1]), tv[kk]))
        c = self.planner.choice
        if self.use_skip and self._active and c is not None and c.plan is not None:
            vocabs: list[int | None] = [None] + (list(self.vocab.sizes) if self.vocab is not None else [])
            step = self.verify_times.step_ratio()
            eff = self.skip_efficiency()
            plain = not (k and self.min_lookup)
            reached, last = sum(reach), reach[-1]
            for v in vocabs:
                a = self.skip_alpha(v)
                scale = 1.0 if v is None else self.vocab.rows_for(v) / self.vocab.V
                # corrected like verification (the same kernels; see VerifyTimes.step_ratio)
                td = step * self.latency.predict(c.plan, ctx, 1, head_scale=scale)
                e_skip, p = 0.0, 1.0
                for d in range(1, self.d_max + 1):
                    p *= a
                    e_skip += p                   # a + a^2 + ... + a^d
                    if plain:
                        opts.append(Option("skip", 0, d, eff * (1.0 + e_skip), d * td + tv[d], v))
                    if k:
                        opts.append(Option("lookup+skip", k, d, eff * (reached + last * e_skip),
                                           d * td + tv[k + d], v))
        return opts

    def choose(self, ctx: int, n_gram: int, lookup: list[int], *, explore: bool = False) -> Option:
        return max(self.options(ctx, n_gram, lookup, explore=explore), key=lambda o: o.tpt)

    # ---- the protocol -------------------------------------------------------------------------------
    def start(self, state: RoundState) -> None:
        # the layer-skip planner runs lazily: only once lookups have missed ``plan_after`` rounds
        # in a row (where lookups keep hitting, its DP would be pure overhead)
        self._active = False
        self.planner.reset()                      # no plan, no collected states, no history yet
        self.planner.exit_threshold = state.threshold
        self.counts = {}
        self._misses = 0
        self._index.reset()
        self._reference = ReferenceIndex(state.reference, self.max_ngram) if state.reference else None
        self._pending = None
        self.verify_times.reset()
        self._vk = {}
        # what skip rounds delivered carries over at half weight (the text changes), else none
        self._sk_real = [x * 0.5 for x in self._sk_real] if self.persists_across_prompts else [0.0] * 5
        if self.vocab is not None:
            self.vocab.start(state.tokens[:state.n_prompt], capacity=state.remaining + 2)
        self._n_committed = state.n_prompt
        self._recall(state.context_length)
        if self._wake_now:                        # prepare's warm-up: the planner wakes at once
            self._plan_after_now = 0
            self._wake_now = False

    def propose(self, state: RoundState) -> Draft:
        if self.vocab is not None and len(state.tokens) > self._n_committed:
            self.vocab.commit(state.tokens[self._n_committed:])
            self._n_committed = len(state.tokens)
        self._index.update(state.tokens)
        n_gram, cont = self._index.find(max_ngram=self.max_ngram, max_len=self.max_lookup)
        from_ref = False
        if self._reference is not None:          # a predicted output: its matches keep their own estimates
            n_gram, cont, from_ref = best_continuation((n_gram, cont), self._reference.find(
                state.tokens, max_ngram=self.max_ngram, max_len=self.max_lookup))
            n_gram = self._ref_group if from_ref else n_gram
        self._misses = 0 if cont else self._misses + 1
        ctx = state.context_length
        if bucket(ctx) != self._bucket and not self._active:
            self._recall(ctx)
        decided = len(self.planner.history)
        if self.use_skip and not self._active and self._misses >= self._plan_after_now:
            self._active = True                    # the planner decides now (memory, bound or DP)
            self.planner.decide(state, "start")
        elif self._active:
            self.planner.propose(state)            # its own triggers: bucket change, acceptance
        if len(self.planner.history) > decided:
            pays = self.planner.choice is not None and self.planner.choice.plan is not None
            self._recall(ctx)
            if not pays and not self.planner.waiting_for_probe:
                # sleep until that many misses in a row again (awake while the window probe waits)
                self._active = False
                self._misses = 0
        k = min(len(cont), self.max_lookup)
        if not self._active and k <= self.min_lookup:
            # nothing to price: without the planner the only candidate is the whole lookup draft
            # (the floor) or, with no match, a plain step; the estimates still learn in observe
            self.verify_times.predict(self.latency, state.context_length)
            best = Option("lookup", k, 0, 1.0, 1.0) if k else Option("none", 0, 0, 1.0, 1.0)
        else:
            best = self.choose(state.context_length, n_gram, cont, explore=True)
        self._pending = (best, n_gram)
        self.counts[best.kind] = self.counts.get(best.kind, 0) + 1
        if best.kind == "none":
            return AUTOREGRESSIVE
        plan = self.planner.choice.plan if best.n_skip else None
        head = ids = None
        if best.n_skip and self.vocab is not None:
            self.vocab.select(best.vocab)
            head, ids = self.vocab.head()
        # (skip drafts: without the confidence exit while the planner measures that it pays)
        thr = self.planner.draft_threshold if best.n_skip and self.threshold is None else self.threshold
        return Draft(plan=plan, max_len=best.n_lookup + best.n_skip, tokens=tuple(cont[:best.n_lookup]),
                     threshold=thr, source=best.kind, head=head, head_ids=ids,
                     n_reference=best.n_lookup if from_ref else 0)

    def observe(self, outcome: Outcome) -> None:
        self.planner.observe(outcome)
        if self._pending is None:
            return
        opt, n_gram = self._pending
        self._pending = None
        measured = not self.planner.latency.given            # an analytic model is not corrected
        if measured:
            self.verify_times.observe(outcome.drafted + 1, outcome.verify_s)
        acc, nl = outcome.accepted, outcome.n_lookup
        if opt.n_skip and outcome.drafted and opt.seconds > 0 and measured:
            if not self._tallied(outcome.draft.plan):
                self._sk_plan, self._sk_real = outcome.draft.plan, [0.0] * 5           # another plan
            eff = self.skip_efficiency()
            r = self._sk_real
            r[0] += 1
            r[1] += opt.expected / eff                  # (before the correction)
            r[2] += opt.seconds
            r[3] += acc + 1
            r[4] += outcome.draft_s + outcome.verify_s
        # lookup positions 0..k-1 were decided, 0..min(k, acc)-1 of them accepted
        self.lookup_estimates.record(n_gram, min(nl, acc + 1), acc)
        if acc >= nl:                              # the skip drafts were reached
            tried = min(outcome.drafted - nl, acc - nl + 1)
            ok = acc - nl
            if opt.vocab is None:
                self._sk_try += tried
                self._sk_acc += ok
            else:
                v = self._vk.setdefault(opt.vocab, [0.0, 0.0])
                v[0] += ok
                v[1] += tried

    def describe(self) -> dict[str, Any]:
        d = self.planner.describe()
        d["strategy"] = self.name
        d["plan_after_now"] = self._plan_after_now
        total = sum(self.counts.values()) or 1
        d.update({f"share_{k}": v / total for k, v in self.counts.items()})
        if self.vocab is not None:
            d.update(self.vocab.describe())
        return d


_HYBRID_OPTIONS = ("max_ngram", "max_lookup", "use_skip", "plan_after", "window", "every", "min_cosine",
                   "max_states", "resolution", "alpha", "persist", "skip_prior", "seed", "min_lookup",
                   "margin", "dp_context")


@REGISTRY.register("hybrid", options=_HYBRID_OPTIONS + ("draft_vocab", "windows", "memory"))
def _hybrid(model: Model, *, latency: LatencyModel | None = None, max_draft: int | None = None,
            threshold: float | None = None, **options: Any) -> Strategy:
    kw = {k: v for k, v in options.items() if k in _HYBRID_OPTIONS}
    vocab = load_draft_vocab(model, options.get("draft_vocab", "auto"))
    windows = parse_windows(options.get("windows", DEFAULT_WINDOWS))
    return HybridStrategy(model, latency, d_max=max_draft or 8, threshold=threshold, draft_vocab=vocab,
                          memory=planner_memory(model, options.get("memory", "auto"), windows),
                          windows=windows, **kw)
