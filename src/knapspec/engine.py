"""The decoding loop: prefill, then rounds of draft -> verify -> accept -> roll back.

One loop serves every strategy; autoregressive decoding is the round with no drafts. Each round:

1. ``strategy.propose(state)`` gives a plan, a maximum draft length and optional lookup tokens.
2. Draft: lookup tokens first, then the model with the plan, one token at a time; drafting stops
   at the maximum, at a stop token, or when the draft's probability of its token falls below the
   confidence threshold (that token is still verified).
3. Verify: one full-model forward over ``[last committed, drafts...]`` writes every layer's KV at
   those positions and gives the target's logits.
4. Accept (greedy prefix match or speculative sampling), commit, roll the cache back to the
   accepted length (moves a length), tell the strategy.

The engine sees token ids only, never text, and never chooses plans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .cache import KVCache
from .clock import now
from .model import ForwardOut, Model, rms_norm
from .sampling import SamplingParams, accept, accept_greedy, greedy_confidence, greedy_ids, probs, sample
from .strategies.base import DEFAULT_THRESHOLD, Draft, Outcome, RoundState, Strategy

log = logging.getLogger(__name__)

# Prompts run through the model in chunks of this many tokens: bounded attention memory for long
# prompts, and every chunk within the native attention's limit (model.py).
PREFILL_CHUNK = 512


def prefill(model: Model, ids: list[int], cache: KVCache, *, chunk: int = PREFILL_CHUNK, logits: bool = True,
            on_chunk: Callable[[ForwardOut], None] | None = None) -> ForwardOut:
    """Run ``ids`` through the full model from position 0 in chunks of ``chunk`` tokens, writing
    the cache; ``on_chunk`` sees each chunk's output. Returns the last chunk's output, with the
    logits of its last token only (``logits=False``: none)."""
    if not ids:
        raise ValueError("nothing to prefill: give at least one token")
    out = None
    for s in range(0, len(ids), chunk):
        x = torch.tensor([ids[s:s + chunk]], device=model.device)
        out = model.forward(x, s, cache, last_only=True, logits=logits, prompt=True)
        if on_chunk is not None:
            on_chunk(out)
    assert out is not None
    return out


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0              # decoding rounds after prefill (an AR step is a round)
    draft_rounds: int = 0        # rounds that verified at least one draft
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    plan_s: float = 0.0
    total_s: float = 0.0
    stopped: str = ""            # "eos" | "length"
    reference_drafted: int = 0   # drafts copied from the reference (a predicted output), verified
    reference_accepted: int = 0  # of which accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per round, bonus/recovered token included."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    @property
    def tokens_per_s(self) -> float:
        """Decoding throughput: tokens after the first (which prefill yields) per decode second."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    @property
    def plan_share(self) -> float:
        return self.plan_s / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        d: dict[str, float | int | str] = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted=self.mean_accepted,
                 tokens_per_s=self.tokens_per_s, plan_share=self.plan_share)
        return d

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.total_s:.2f}s ({self.tokens_per_s:.1f} tok/s decode) | "
                f"prompt {self.prompt_tokens} | rounds {self.rounds} | drafted {self.drafted}, accepted "
                f"{self.accepted} ({100 * self.acceptance_rate:.0f}%) | {self.mean_accepted:.2f} tokens/round | "
                f"time: prefill {self.prefill_s:.2f}s, draft {self.draft_s:.2f}s, verify {self.verify_s:.2f}s, "
                f"planning {self.plan_s:.2f}s")


@dataclass
class Generation:
    tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine:
    """Runs generations of one model. Not thread-safe (one cache per generation)."""

    def __init__(self, model: Model, *, prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk
        self._device = model.device                    # (read once: _now runs several times a round)
        self.last_cache: KVCache | None = None

    def _now(self) -> float:
        return now(self._device)

    def generate(self, prompt: list[int], strategy: Strategy | None = None, **kw) -> Generation:
        gen = Generation(tokens=[])
        for chunk in self.stream(prompt, strategy, stats=gen.stats, **kw):
            gen.tokens.extend(chunk)
        return gen

    def stream(self, prompt: list[int], strategy: Strategy | None = None, *, max_new_tokens: int = 128,
               sampling: SamplingParams | None = None, stop_ids: tuple[int, ...] | list[int] = (),
               threshold: float = DEFAULT_THRESHOLD, stats: GenerationStats | None = None,
               reference: list[int] | tuple[int, ...] = (),
               ) -> Iterator[list[int]]:
        """Yield the committed new tokens of each round. ``stats`` is filled in as it runs (before
        each yield). ``reference``: a predicted output, offered to the strategy as a source of
        drafts (``RoundState.reference``); the output stays the model's own."""
        model, cfg = self.model, self.model.cfg
        strategy = strategy or Strategy()
        sampling = sampling or SamplingParams()
        st = stats if stats is not None else GenerationStats()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) + max_new_tokens > cfg.max_position:
            raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {cfg.max_position} tokens: shorten the prompt or "
                             "lower --max-new-tokens")
        bad = [t for t in (*prompt, *reference) if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary 0..{cfg.vocab_size - 1}")
        stops = frozenset(stop_ids)
        gen = None if sampling.greedy else sampling.generator(model.device)
        dev = model.device
        cache = model.new_cache(len(prompt) + max_new_tokens + 1)
        self.last_cache = cache                        # kept for inspection (tests, profiling)
        st.prompt_tokens = len(prompt)
        t0 = self._now()

        # ---- prefill (chunked: bounded attention memory for long prompts) ----
        sums: list[torch.Tensor] = []

        def embed(o: ForwardOut) -> None:                # KNN-SSD: mean last hidden state
            sums.append(rms_norm(o.last_hidden[0], model.final_norm, cfg.rms_norm_eps).float().sum(0))
        out = prefill(model, prompt, cache, chunk=self.prefill_chunk,
                      on_chunk=embed if strategy.wants_prompt_embedding else None)
        embed_sum = torch.stack(sums).sum(0) if sums else None
        last = out.logits[0, -1:]                                        # [1, V]
        first = greedy_ids(last)[0] if sampling.greedy else sample(probs(last[0], sampling), gen)
        tokens = list(prompt) + [first]
        st.new_tokens = 1
        st.prefill_s = self._now() - t0
        yield [first]
        if first in stops or max_new_tokens == 1:
            st.stopped = "eos" if first in stops else "length"
            st.total_s = self._now() - t0
            return

        state = RoundState(model=model, cache=cache, tokens=tokens, n_prompt=len(prompt), round=0,
                           sampling=sampling, remaining=max_new_tokens - 1,
                           prompt_embedding=None if embed_sum is None else embed_sum / len(prompt),
                           reference=tuple(reference), threshold=threshold)
        ta = self._now()
        strategy.start(state)
        st.plan_s += self._now() - ta
        while True:
            state.round = st.rounds
            state.remaining = max_new_tokens - st.new_tokens
            ta = self._now()
            draft = strategy.propose(state)
            tb = self._now()
            st.plan_s += tb - ta
            L = len(tokens) - 1                        # cache holds positions 0..L-1
            assert cache.length >= L
            cache.rollback(L)
            drafts, q_rows, confs = self._draft(draft, cache, tokens[-1], L, state.remaining - 1, sampling,
                                                gen, stops, threshold)
            tc = self._now()
            d = len(drafts)
            inp = torch.tensor([[tokens[-1]] + drafts], device=dev)
            out = model.forward(inp, L, cache, capture=strategy.wants_hidden)
            logits = out.logits[0]                     # [d+1, V]
            if sampling.greedy:
                res = accept_greedy(drafts, logits)
            else:
                p = probs(logits, sampling)
                q = None if d == 0 else torch.stack(q_rows)
                res = accept(drafts, q, p, gen)
            n = res.n_accepted
            new = drafts[:n] + [res.token]
            cache.rollback(L + n + 1)
            td = self._now()
            st.draft_s += tc - tb
            st.verify_s += td - tc
            st.rounds += 1
            st.drafted += d
            st.accepted += n
            st.draft_rounds += d > 0
            if draft.n_reference:                      # the reference's tokens lead the drafts
                st.reference_drafted += min(d, draft.n_reference)
                st.reference_accepted += min(n, draft.n_reference)
            # stop at the first stop token and at the length limit
            cut = next((i + 1 for i, t in enumerate(new) if t in stops), None)
            if cut is not None:
                new = new[:cut]
            new = new[:max_new_tokens - st.new_tokens]
            tokens.extend(new)
            st.new_tokens += len(new)
            hidden = out.hidden[:, 0, :n + 1] if out.hidden is not None else None
            outcome = Outcome(draft=draft, drafted=d, accepted=n, context_length=L + 1,
                              n_lookup=min(d, len(draft.tokens)), hidden=hidden, draft_s=tc - tb,
                              verify_s=td - tc, draft_tokens=tuple(drafts), draft_confidence=tuple(confs),
                              # the verifier's choices, for strategies that learn from the hidden
                              # states (an argmax over the vocabulary per row: not paid otherwise)
                              target_tokens=() if hidden is None else tuple(logits.argmax(-1).tolist()))
            ta = self._now()
            strategy.observe(outcome)
            st.plan_s += self._now() - ta
            yield new
            if cut is not None or st.new_tokens >= max_new_tokens:
                st.stopped = "eos" if cut is not None else "length"
                break
        st.total_s = self._now() - t0

    def _draft(self, draft: Draft, cache: KVCache, last: int, L: int, budget: int,
               sampling: SamplingParams,
               gen: torch.Generator | None, stops: frozenset[int], threshold: float,
               ) -> tuple[list[int], list[torch.Tensor], list[float]]:
        """Propose up to ``min(draft.max_len, budget)`` tokens; ``q_rows`` are their draft
        distributions (one-hot for lookup tokens), ``confs`` the model-drafted tokens' own
        probabilities. Writes draft KV at positions L.. of the cache."""
        model = self.model
        limit = min(draft.max_len, budget)
        confs: list[float] = []
        if limit <= 0:
            return [], [], confs
        thr = draft.threshold if draft.threshold is not None else threshold
        V = model.cfg.vocab_size
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        for t in draft.tokens[:limit]:
            drafts.append(int(t))
            if not sampling.greedy:
                q_rows.append(torch.zeros(V, device=model.device).index_fill_(0, torch.tensor(int(t)), 1.0))
            if t in stops:
                return drafts, q_rows, confs
        if draft.plan is None or len(drafts) >= limit:
            return drafts, q_rows, confs
        # the model drafts from here: first over [last, lookup tokens...], then one token a step
        inp = [last] + drafts
        pos = L
        while len(drafts) < limit:
            x = torch.tensor([inp], device=model.device)
            out = model.forward(x, pos, cache, draft.plan, last_only=True, head_weight=draft.head)
            pos += len(inp)
            logits = out.logits[0, -1]
            if sampling.greedy:
                tok, conf = greedy_confidence(logits)
                if draft.head_ids is not None:  # truncated vocabulary: the row's token id
                    tok = int(draft.head_ids[tok])
            else:
                if draft.head_ids is not None:  # truncated vocabulary: scattered back, -inf elsewhere
                    full = torch.full((V,), float("-inf"), device=logits.device)
                    logits = full.index_copy_(0, draft.head_ids, logits)
                q = probs(logits, sampling)
                tok = sample(q, gen)
                conf = float(q[tok])
                q_rows.append(q)
            drafts.append(tok)
            confs.append(conf)
            inp = [tok]
            if tok in stops or conf < thr:
                break
        return drafts, q_rows, confs
