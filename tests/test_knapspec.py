"""KnapSpec: the DP against brute force, E[tokens]/TPT, planner constraints, losslessness."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PATHS, drafting_property, tiny_model
from knapspec.engine import Engine
from knapspec.latency import LatencyModel
from knapspec.sampling import SamplingParams
from knapspec.strategies.base import RoundState
from knapspec.strategies.knapspec import KnapSpecStrategy, knapsack_dp
from knapspec.strategies.pricing import expected_tokens, tpt


# ---- the DP is exact for additive values ----------------------------------------------------------
def _additive_dp(weights, gains):
    """State tensor = [N, 1] running value; running item s adds gains[s], skipping adds nothing."""
    g = torch.tensor(gains, dtype=torch.float64)

    def step(s, X):
        return X + g[s]

    def score(depth, X):
        return X[:, 0]

    return knapsack_dp(weights, torch.zeros(1, 1, dtype=torch.float64), step, score)


def _brute(weights, gains, budget):
    best = -math.inf
    for run in itertools.product([True, False], repeat=len(weights)):
        saved = sum(w for w, r in zip(weights, run) if not r)
        if saved >= budget:
            best = max(best, sum(v for v, r in zip(gains, run) if r))
    return best


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dp_equals_brute_force_for_every_budget(data):
    n = data.draw(st.integers(1, 8), label="items")
    weights = data.draw(st.lists(st.integers(1, 9), min_size=n, max_size=n), label="weights")
    gains = data.draw(st.lists(st.floats(0, 5, allow_nan=False).map(lambda x: round(x, 3)),
                               min_size=n, max_size=n), label="values")
    states, X = _additive_dp(weights, gains)
    for st_ in states:                      # each final state's bookkeeping is consistent
        assert st_.saved == sum(w for w, r in zip(weights, st_.run) if not r)
        assert X[st_.index, 0].item() == pytest.approx(sum(v for v, r in zip(gains, st_.run) if r))
    for budget in range(sum(weights) + 1):
        dp = max((s.value for s in states if s.saved >= budget), default=-math.inf)
        assert dp == pytest.approx(_brute(weights, gains, budget)), budget


def test_dp_hand_case():
    # skipping item 1 (weight 5, gain 1) is the best way to save >= 4; saving >= 6 needs items 1+2
    states, _ = _additive_dp([2, 5, 3], [4.0, 1.0, 2.0])
    best4 = max((s for s in states if s.saved >= 4), key=lambda s: s.value)
    assert best4.run == (True, False, True) and best4.value == 6.0
    best6 = max((s for s in states if s.saved >= 6), key=lambda s: s.value)
    assert best6.run == (True, False, False) and best6.value == 4.0


# ---- expected tokens and TPT ----------------------------------------------------------------------
def test_expected_tokens():
    for d in range(0, 9):
        assert expected_tokens(0.0, d) == 1.0                 # only the bonus/recovered token
        assert expected_tokens(1.0, d) == d + 1               # every draft accepted + bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert expected_tokens(1.3, 2) == 3.0 and expected_tokens(-0.2, 2) == 1.0   # clamped
    with pytest.raises(ValueError):
        expected_tokens(0.5, -1)


def test_tpt():
    assert tpt(0.0, 3, 0.01, 0.05) == pytest.approx(1 / 0.08)
    assert tpt(1.0, 3, 0.01, 0.05) == pytest.approx(4 / 0.08)
    assert tpt(0.5, 0, 0.01, 0.04) == pytest.approx(25.0)     # no draft: one verify step
    # the best d grows with alpha
    best = {a: max(range(1, 9), key=lambda d: tpt(a, d, 0.02, 0.05 + 0.002 * d)) for a in (0.3, 0.9)}
    assert best[0.3] < best[0.9]
    with pytest.raises(ValueError):
        tpt(0.5, 0, 0.01, 0.0)


# ---- the planner on a tiny model ------------------------------------------------------------------
def _cheap_drafts(n_layers: int) -> LatencyModel:
    """Sublayers dominate a step, so skipping looks very attractive to the planner."""
    return LatencyModel.analytic(n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=1e-5,
                                 width_factor=0.01)


def _state(m, prompt):
    cache = m.new_cache(len(prompt) + 8)
    m.forward(torch.tensor([prompt]), 0, cache, last_only=True)
    return RoundState(model=m, cache=cache, tokens=list(prompt) + [5], n_prompt=len(prompt), round=0,
                      sampling=SamplingParams(), remaining=8)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_planner_never_skips_everything_or_the_first_layer(kind, tiny_root):
    m = tiny_model(kind, tiny_root)
    strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers), min_cosine=-1.0, max_states=64)
    strat.start(_state(m, list(range(3, 30))))
    cands, choice = strat.optimise(27)
    assert cands, "the DP produced no candidate"
    for plan, alpha, cos in cands:
        assert any(plan.run) and not all(plan.run)
        assert plan.run[0] or plan.run[1], f"plan {plan} skips all of layer 0"
        assert 0.0 <= alpha <= 1.0 and -1.0 <= cos <= 1.0 + 1e-6
    # the choice is the TPT maximum over plain decoding, the candidates and the draft lengths
    lat = strat.latency
    best = max([1 / lat.predict(None, 27, 1)] + [tpt(a, d, lat.predict(p, 27, 1), lat.predict(None, 27, d + 1))
                                                  for p, a, _ in cands for d in range(1, strat.d_max + 1)])
    assert choice.tpt == pytest.approx(best)
    if choice.plan is not None:
        assert 1 <= choice.d <= strat.d_max and (choice.plan.run[0] or choice.plan.run[1])
    else:
        assert choice.d == 0 and choice.tpt == choice.tpt_ar


def test_planner_values_are_cosines_of_the_real_hidden_states(tiny_root):
    m = tiny_model("llama", tiny_root)
    strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers), min_cosine=-1.0, max_states=256)
    state = _state(m, list(range(3, 20)))
    strat.start(state)
    cands, _ = strat.optimise(17)
    _, hidden, targets = strat._collected()
    # recompute one candidate's final hidden state with the ordinary forward over the window
    plan, alpha, cos = cands[len(cands) // 2]
    k = hidden.shape[1]
    cache = m.new_cache(32)
    m.forward(torch.tensor([state.tokens[:17 - k]]), 0, cache, last_only=True)
    out = m.forward(torch.tensor([state.tokens[17 - k:17]]), 17 - k, cache, plan)
    want = torch.nn.functional.cosine_similarity(out.last_hidden[0], hidden[-1], dim=-1).mean().item()
    assert cos == pytest.approx(want, abs=1e-4)
    assert alpha == pytest.approx((out.logits[0].argmax(-1) == targets).float().mean().item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_output_through_the_planner_equals_autoregressive(kind, path, tiny_root):
    m = tiny_model(kind, tiny_root, path)
    eng = Engine(m)

    def check(data) -> int:
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=24), label="prompt")
        n_new = data.draw(st.integers(1, 32), label="max_new_tokens")
        strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers),
                                 window=data.draw(st.integers(1, 8), label="window"),
                                 every=data.draw(st.integers(1, 6), label="every"),
                                 d_max=data.draw(st.integers(1, 8), label="d_max"),
                                 min_cosine=data.draw(st.sampled_from([-1.0, 0.0, 0.5]), label="min_cosine"),
                                 max_states=data.draw(st.integers(1, 16), label="max_states"),
                                 alpha=data.draw(st.sampled_from(["top1", "cosine"]), label="alpha"))
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,), threshold=0.0)
        assert got.tokens == ref
        assert strat.history or got.stats.rounds == 0, "the planner never ran"
        for c in strat.history:
            assert c.plan is None or (c.plan.run[0] or c.plan.run[1])
        # a round whose plan drafts (room for a draft left) drafts: the engine honours the plan
        used = strat._used[:1]
        if used and used[0].plan is not None and n_new >= 3:
            assert got.stats.drafted > 0
        return got.stats.drafted
    drafting_property(check, max_examples=15 if path == "torch-f32" else 8)


def test_planner_drafts_and_stays_lossless_with_the_cosine_proxy(tiny_root):
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = list(range(3, 40))
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=(2,)).tokens
    strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers), alpha="cosine", min_cosine=0.0, every=4)
    got = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(2,), threshold=0.0)
    assert got.tokens == ref
    assert got.stats.drafted > 0 and any(c.plan is not None for c in strat.history)
