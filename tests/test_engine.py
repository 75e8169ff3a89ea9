"""The engine's promise: speculative output == autoregressive output; sampling is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from scipy.stats import chisquare

from conftest import PATHS, Scripted, build_tiny_hf, drafting_property, tiny_model
from knapspec.engine import Engine
from knapspec.model import Model, ModelConfig
from knapspec.plan import Plan
from knapspec.sampling import SamplingParams
from knapspec.strategies import Draft
from knapspec.strategies.static import StaticStrategy


def _plans(n_layers: int):
    n = 2 * n_layers
    single = st.integers(0, n - 1).map(lambda keep: Plan(tuple(i == keep for i in range(n))))
    rand = st.lists(st.booleans(), min_size=n, max_size=n).map(lambda r: Plan(tuple(r)))
    full = st.just(Plan.full(n_layers))
    return st.one_of(full, single, rand)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "gemma3"])
def test_greedy_speculative_equals_autoregressive(kind, path, tiny_root):
    m = tiny_model(kind, tiny_root, path)
    eng = Engine(m)

    def check(data) -> int:
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=20), label="prompt")
        n_new = data.draw(st.integers(1, 24), label="max_new_tokens")
        plans = data.draw(st.lists(_plans(m.cfg.n_layers), min_size=1, max_size=3), label="plans")
        lens = data.draw(st.lists(st.integers(1, 8), min_size=len(plans), max_size=len(plans)), label="d")
        thr = data.draw(st.floats(0.0, 1.0), label="threshold")
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        strat = Scripted([Draft(plan=p, max_len=d) for p, d in zip(plans, lens)])
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,), threshold=thr)
        assert got.tokens == ref
        s = got.stats
        assert s.new_tokens == len(ref) and s.accepted <= s.drafted
        # every round proposes a draft: with room for one (3+ tokens asked, no stop after the
        # first) the first round drafts; each round commits its accepted drafts plus one token
        if s.rounds and n_new >= 3:
            assert s.draft_rounds >= 1
        assert s.new_tokens - 1 <= s.accepted + s.rounds
        return s.drafted
    drafting_property(check, max_examples=25 if path == "torch-f32" else 12)


@pytest.mark.parametrize("thr", [0.0, 0.5, 0.9])
def test_each_model_draft_reports_its_own_probability_and_the_exit_stops_after_the_first_below(thr, tiny_root):
    """``Outcome.draft_confidence``: one probability per model-drafted token (after lookup
    tokens), the draft's top one under greedy decoding; every one before the last is at or above
    the exit, and a round that stopped short of its length without a stop token or the budget
    stopped at one below it. The generation's exit reaches the strategy as ``RoundState.threshold``."""
    from knapspec.sampling import greedy_confidence
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    plan = Plan.from_skips(m.cfg.n_layers, attn=[1], mlp=[0])
    seen: list = []
    thresholds: list = []

    class Record(Scripted):
        def start(self, state):
            thresholds.append(state.threshold)

        def observe(self, outcome):
            seen.append(outcome)
    strat = Record([Draft(plan=plan, max_len=5, tokens=(7,)), Draft(plan=plan, max_len=4)])
    prompt = list(range(3, 20))
    g = eng.generate(prompt, strat, max_new_tokens=40, threshold=thr)
    assert g.tokens == eng.generate(prompt, max_new_tokens=40).tokens
    assert thresholds == [thr]
    assert sum(len(o.draft_confidence) for o in seen) > 0
    for o in seen:
        confs = o.draft_confidence
        assert len(confs) == o.drafted - o.n_lookup and all(0.0 < q <= 1.0 for q in confs)
        assert all(q >= thr for q in confs[:-1])
        short = o.drafted < o.draft.max_len and o.context_length + o.drafted + 1 < len(prompt) + 40
        if confs and short:
            assert confs[-1] < thr
    # the reported probability is the draft's own: recompute one round's first model draft
    o = next(o for o in seen if o.draft_confidence and o.n_lookup == 0)
    L = o.context_length - 1
    cache = m.new_cache(L + 8)
    toks = (prompt + g.tokens)[:L + 1]
    m.forward(torch.tensor([toks[:L]]), 0, cache, last_only=True)
    out = m.forward(torch.tensor([[toks[L]]]), L, cache, plan, last_only=True)
    assert greedy_confidence(out.logits[0, -1])[1] == pytest.approx(o.draft_confidence[0], rel=1e-5)


def test_cache_after_rejections_equals_autoregressive_cache(tiny_root):
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = list(range(3, 15))
    plan = Plan.from_skips(m.cfg.n_layers, attn=[1, 2], mlp=[0])
    got = eng.generate(prompt, StaticStrategy(plan, max_draft=6, threshold=0.0), max_new_tokens=30)
    assert got.stats.drafted > got.stats.accepted > 0     # some rounds had rejections
    spec_cache = eng.last_cache
    ref = eng.generate(prompt, max_new_tokens=30)
    assert ref.tokens == got.tokens
    ar_cache = eng.last_cache
    assert spec_cache.length == ar_cache.length == len(prompt) + 30 - 1
    n = ar_cache.length
    for layer in range(m.cfg.n_layers):
        torch.testing.assert_close(spec_cache.k[layer][:, :, :n], ar_cache.k[layer][:, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(spec_cache.v[layer][:, :, :n], ar_cache.v[layer][:, :, :n], atol=1e-5, rtol=1e-5)


def _small_vocab_model(vocab: int = 12, kind: str = "llama") -> Model:
    extra = dict(initializer_range=0.4)
    if kind == "gemma3":       # a local layer whose window (2) the 6 positions of a sample outgrow, and a global one
        # (Gemma scales its embeddings by sqrt(hidden): at 0.4 the tiny model's next-token
        # distribution is nearly one-hot, and a poor draft is accepted always or never)
        extra = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=2, initializer_range=0.1)
    hf = build_tiny_hf(kind, seed=3, vocab_size=vocab, num_hidden_layers=2, **extra)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    return Model.from_hf_tensors(cfg, {k: v.detach().clone() for k, v in hf.state_dict().items()})


def _exact_joint(m: Model, prompt: list[int], sp: SamplingParams, n: int) -> np.ndarray:
    """Exact autoregressive distribution of the first n generated tokens (by enumeration),
    computed as autoregressive decoding computes it: the prompt prefilled (engine.prefill: its
    attention kernel may differ from a step's, e.g. AMX tiles), then one-token steps."""
    from knapspec.engine import prefill
    from knapspec.sampling import probs
    V = m.cfg.vocab_size
    out = np.zeros((V,) * n)
    def rec(prefix, mass, depth, idx):
        if depth == n:
            out[idx] = mass
            return
        cache = m.new_cache(len(prefix) + 1)
        logits = prefill(m, list(prompt), cache).logits
        for pos in range(len(prompt), len(prefix)):
            logits = m.forward(torch.tensor([[prefix[pos]]]), pos, cache).logits
        p = probs(logits[0, -1], sp).double().numpy()
        for t in range(V):
            if p[t] > 0:
                rec(prefix + [t], mass * p[t], depth + 1, idx + (t,))
    rec(list(prompt), 1.0, 0, ())
    return out


def _chi2(samples: np.ndarray, expected_p: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=expected_p.size).astype(float)
    exp = expected_p.ravel() * len(samples)
    keep = exp >= 5                         # pool sparse bins
    obs = np.append(counts[keep], counts[~keep].sum())
    ex = np.append(exp[keep], exp[~keep].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    return float(chisquare(obs, ex * obs.sum() / ex.sum()).pvalue)


@pytest.mark.parametrize("sp, vocab_trunc, kind", [
    (SamplingParams(temperature=1.0, seed=11), False, "llama"),
    (SamplingParams(temperature=0.8, top_k=6, top_p=0.9, seed=12), False, "llama"),
    (SamplingParams(temperature=1.0, seed=13), True, "llama"),
    (SamplingParams(temperature=1.0, seed=14), True, "gemma3"),
])
def test_speculative_sampling_is_exact(sp, vocab_trunc, kind):
    """Joint distribution of generated tokens 2 and 3 (drawn in a speculative round with a poor
    draft) against the exact autoregressive distribution: chi-square over 10k samples."""
    m = _small_vocab_model(kind=kind)
    prompt = [3, 7, 1]
    V = m.cfg.vocab_size
    exact = _exact_joint(m, prompt, sp, 3).sum(axis=0)        # marginalise token 1 -> [V, V]
    eng = Engine(m)
    poor = Plan.from_skips(2, attn=[0, 1], mlp=[1])
    strat = StaticStrategy(poor, max_draft=2, threshold=0.0)
    if vocab_trunc:          # draft-only vocabulary: 7 of the 12 tokens, zero probability elsewhere
        ids = torch.tensor([0, 2, 3, 5, 7, 8, 11])
        strat.draft = Draft(plan=poor, max_len=2, threshold=0.0, head=m.lm_head[ids], head_ids=ids)
    n = 10000
    samples = np.empty(n, dtype=np.int64)
    drafted = accepted = 0
    for i in range(n):
        spi = SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                             seed=sp.seed * 1_000_003 + i)
        g = eng.generate(prompt, strat, max_new_tokens=3, sampling=spi)
        samples[i] = g.tokens[1] * V + g.tokens[2]
        drafted += g.stats.drafted
        accepted += g.stats.accepted
    assert 0 < accepted < drafted                 # the draft really is poor and really is used
    assert _chi2(samples, exact) > 0.01


def test_speculative_sampling_is_exact_with_windowed_drafts():
    """As above, with a draft whose attention sublayers are windowed to the sink and 2 or 3 keys
    (a prompt long enough that the windows cut)."""
    m = _small_vocab_model()
    prompt = [3, 7, 1, 9, 4, 4, 10, 2, 6, 8, 5, 1]
    V = m.cfg.vocab_size
    sp = SamplingParams(temperature=1.0, seed=31)
    exact = _exact_joint(m, prompt, sp, 3).sum(axis=0)
    eng = Engine(m)
    strat = StaticStrategy(Plan.parse("a0w2,a1w3,m1", 2), max_draft=2, threshold=0.0)
    n = 6000
    samples = np.empty(n, dtype=np.int64)
    drafted = accepted = 0
    for i in range(n):
        spi = SamplingParams(temperature=1.0, seed=sp.seed * 1_000_003 + i)
        g = eng.generate(prompt, strat, max_new_tokens=3, sampling=spi)
        samples[i] = g.tokens[1] * V + g.tokens[2]
        drafted += g.stats.drafted
        accepted += g.stats.accepted
    assert 0 < accepted < drafted
    assert _chi2(samples, exact) > 0.01


def _hybrid_for_sampling(m: Model):
    from knapspec.latency import LatencyModel
    from knapspec.strategies.hybrid import HybridStrategy
    lat = LatencyModel.analytic(m.cfg.n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=1e-5,
                                width_factor=0.02)
    # the planner from the first round, over a 2-token window: skip drafts and lookups both happen
    return HybridStrategy(m, lat, alpha="cosine", min_cosine=-1.0, plan_after=0, window=2, every=1,
                          d_max=2, max_lookup=2, min_lookup=0, persist=False, memory=None,
                          score_prompt=True)       # skip drafts from the first round (3 tokens here)


@pytest.mark.parametrize("name, kind", [("lookup", "llama"), ("hybrid", "llama"), ("hybrid", "gemma3")])
def test_speculative_sampling_is_exact_with_lookup_and_hybrid_drafts(name, kind):
    """As above, with the drafts that the default strategies make: lookup drafts (one-hot draft
    distributions, copied from the context) and the hybrid's mix of lookups and layer-skip drafts."""
    from knapspec.strategies.lookup import PromptLookupStrategy
    m = _small_vocab_model(kind=kind)
    prompt = [3, 7, 1, 3, 7, 1, 3, 7]          # repetitive: most continuations have a match
    V = m.cfg.vocab_size
    sp = SamplingParams(temperature=1.0, seed=21)
    exact = _exact_joint(m, prompt, sp, 3).sum(axis=0)
    eng = Engine(m)
    n = 8000 if name == "lookup" else 4000
    samples = np.empty(n, dtype=np.int64)
    drafted = accepted = 0
    kinds: dict[str, int] = {}
    for i in range(n):
        strat = PromptLookupStrategy(max_ngram=2, max_draft=2) if name == "lookup" else _hybrid_for_sampling(m)
        spi = SamplingParams(temperature=1.0, seed=sp.seed * 1_000_003 + i)
        g = eng.generate(prompt, strat, max_new_tokens=3, sampling=spi, threshold=0.0)
        samples[i] = g.tokens[1] * V + g.tokens[2]
        drafted += g.stats.drafted
        accepted += g.stats.accepted
        for k, v in getattr(strat, "counts", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    assert 0 < accepted < drafted                 # drafts are made, some accepted, some not
    if name == "hybrid":
        assert kinds.get("lookup", 0) + kinds.get("lookup+skip", 0) > 0 and kinds.get("skip", 0) > 0, kinds
    assert _chi2(samples, exact) > 0.01
