"""Baselines: each one's own selection logic, and lossless output through the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import strategies as st

from conftest import PATHS, drafting_property, tiny_model
from knapspec.engine import Engine
from knapspec.latency import LatencyModel
from knapspec.sampling import SamplingParams
from knapspec.strategies import REGISTRY
from knapspec.strategies.base import RoundState
from knapspec.strategies.baselines import CLaSpStrategy, DELStrategy, EarlyExitStrategy, exit_plan


def _lat(n):
    return LatencyModel.analytic(n, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=1e-5, width_factor=0.02)


def test_exit_plan_is_an_early_exit():
    p = exit_plan(4, 2)
    assert p.run == (True, True, True, True, False, False, False, False)
    with pytest.raises(ValueError):
        exit_plan(4, 4)


def test_clasp_skips_the_layer_that_changes_the_hidden_state_least(tiny_root):
    base = tiny_model("llama", tiny_root)
    m = copy.copy(base)
    m.layers = list(base.layers)
    quiet = copy.copy(base.layers[1])           # layer 1 nearly an identity: tiny output projections
    quiet.wo = base.layers[1].wo * 1e-3
    quiet.w_down = base.layers[1].w_down * 1e-3
    m.layers[1] = quiet
    prompt = list(range(3, 25))
    cache = m.new_cache(40)
    m.forward(torch.tensor([prompt]), 0, cache, last_only=True)
    s = CLaSpStrategy(m, skip_layers=1, window=6)
    s.start(RoundState(model=m, cache=cache, tokens=prompt + [5], n_prompt=len(prompt), round=0,
                       sampling=SamplingParams(), remaining=8))
    assert s.choice.plan.attn_skipped == (1,) and s.choice.plan.mlp_skipped == (1,)


def test_del_picks_the_exit_with_the_best_tokens_per_time(tiny_root):
    m = tiny_model("llama", tiny_root)
    s = DELStrategy(m, _lat(m.cfg.n_layers), candidates=2)
    assert s.layers == [1, 2]
    s.alpha = {1: 0.05, 2: 0.95}
    assert s._choose(50)[0] == 2
    s.alpha = {1: 0.0, 2: 0.0}
    assert s._choose(50) is None                   # nothing pays: plain decoding


def test_del_learns_acceptance_from_shadow_exits(tiny_root):
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    s = DELStrategy(m, _lat(m.cfg.n_layers), every=1, candidates=2)
    before = dict(s.alpha)
    eng.generate(list(range(3, 20)), s, max_new_tokens=20)
    assert s.alpha != before and all(0.0 <= a <= 1.0 for a in s.alpha.values())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["clasp", "early-exit", "del"])
def test_greedy_baselines_equal_autoregressive(name, path, tiny_root):
    def check(data) -> int:
        kind = data.draw(st.sampled_from(["llama", "mistral"]), label="arch")
        m = tiny_model(kind, tiny_root, path)
        eng = Engine(m)
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=24), label="prompt")
        n_new = data.draw(st.integers(1, 30), label="max_new_tokens")
        opts = {"max_draft": data.draw(st.integers(1, 6), label="d")}
        if name == "del":
            opts["latency"] = _lat(m.cfg.n_layers)
        if name == "clasp":
            opts["skip_layers"] = data.draw(st.integers(1, m.cfg.n_layers - 1), label="M")
        strat = REGISTRY.create(name, m, **opts)
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,), threshold=0.0)
        assert got.tokens == ref
        if name == "early-exit" and len(ref) > 2:
            # a round with at least two tokens still to go may draft (threshold 0 never stops it)
            assert got.stats.drafted > 0 and isinstance(strat, EarlyExitStrategy)
        return got.stats.drafted
    drafting_property(check, max_examples=12 if path == "torch-f32" else 6)
