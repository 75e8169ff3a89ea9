"""Hybrid drafting: the per-round choice on constructed cases, and lossless output."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import strategies as st

from conftest import PATHS, drafting_property, tiny_model
from knapspec.engine import Engine
from knapspec.latency import LatencyModel
from knapspec.plan import Plan
from knapspec.strategies.base import Draft, Outcome
from knapspec.strategies.hybrid import HybridStrategy, Option
from knapspec.strategies.knapspec import Choice
from knapspec.strategies.lookup import find_continuation


def _lat(n_layers: int, draft_cheap: bool = True) -> LatencyModel:
    return LatencyModel.analytic(n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3,
                                 head=1e-5 if draft_cheap else 2e-2, width_factor=0.02)


def _with_plan(strat: HybridStrategy, alpha: float | None) -> None:
    n = strat.model.cfg.n_layers
    plan = None if alpha is None else Plan.from_skips(n, attn=(1,), mlp=(1, 2))
    strat.planner.choice = Choice(plan=plan, d=0 if plan is None else 4, alpha=alpha or 0.0, tpt=1.0,
                                  tpt_ar=1.0, context=100)
    strat._active = True                    # the planner runs (after enough lookup misses)


def test_long_match_picks_lookup(tiny_root):
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers))
    s.lookup_estimates.acc[3] += 50                      # long n-gram matches have been accepted often
    s.lookup_estimates.tried[3] += 50
    _with_plan(s, 0.3)
    best = s.choose(100, 3, list(range(10, 22)))
    assert best.kind in ("lookup", "lookup+skip") and best.n_lookup >= 6


def test_no_match_picks_skip_or_none(tiny_root):
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers))
    _with_plan(s, 0.9)                      # a good plan with cheap drafts: layer-skip drafting
    assert s.choose(100, 0, []).kind == "skip"
    _with_plan(s, None)                     # the planner found nothing worth drafting
    assert s.choose(100, 0, []).kind == "none"
    s2 = HybridStrategy(m, _lat(m.cfg.n_layers, draft_cheap=False))
    _with_plan(s2, 0.2)                     # poor acceptance, expensive drafts: plain decoding
    assert s2.choose(100, 0, []).kind == "none"


@pytest.mark.parametrize("lifted, given, want", [(False, None, None), (True, None, 0.0), (True, 0.7, 0.7)])
def test_skip_drafts_follow_the_planners_measured_confidence_exit(lifted, given, want, tiny_root):
    """Where the planner measured that drafting past low-confidence drafts pays, the hybrid's
    layer-skip drafts carry no exit (0), as KnapSpec's do; else the generation's (None); a
    threshold given to the hybrid is kept."""
    import torch

    from knapspec.sampling import SamplingParams
    from knapspec.strategies.base import RoundState
    from knapspec.strategies.memory import bucket
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers), threshold=given, memory="off")
    prompt = list(range(3, 60))                                      # no repeated n-gram: no lookup
    cache = m.new_cache(len(prompt) + 8)
    m.forward(torch.tensor([prompt]), 0, cache, last_only=True)
    state = RoundState(model=m, cache=cache, tokens=prompt + [61], n_prompt=len(prompt), round=0,
                       sampling=SamplingParams(), remaining=8, threshold=0.9)
    s.start(state)
    assert s.planner.exit_threshold == 0.9
    _with_plan(s, 0.9)
    s.planner._bucket, s.planner._no_exit = bucket(state.context_length), lifted
    d = s.propose(state)
    assert d.source == "skip" and d.plan is s.planner.choice.plan
    assert d.threshold == want


def test_rejected_lookups_lower_their_estimate(tiny_root):
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers), min_lookup=0)       # every lookup token priced
    s.lookup_estimates.tried[1, 0] += 200                  # 1-gram matches rejected at the first position
    _with_plan(s, None)
    assert s.choose(100, 1, [7, 8, 9]).kind == "none"
    s2 = HybridStrategy(m, _lat(m.cfg.n_layers), min_lookup=4, max_lookup=12)   # 4 tokens at least
    s2.lookup_estimates.tried[1, 0] += 200
    _with_plan(s2, 0.9)
    best = s2.choose(100, 1, list(range(10, 22)))
    assert (best.kind, best.n_lookup) == ("lookup", 4)               # not none, not skip, not longer
    s2.lookup_estimates.acc[1] += 200                    # the same matches always accepted: the whole lookup
    s2.lookup_estimates.tried[1] += 200
    assert s2.choose(100, 1, list(range(10, 22))).n_lookup == 12


def test_uncertain_lookup_estimates_are_still_explored(tiny_root):
    """A kind of match that was rejected a few times is still drafted now and then (Thompson
    sampling), so its estimate can recover; after many rejections it is (almost) never drafted."""
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers), min_lookup=0)
    s.lookup_estimates.tried[1, 0] += 58                   # 1 accepted of 60 tried at the first position
    picks = [s.choose(100, 1, [7, 8, 9], explore=True).kind for _ in range(300)]
    assert s.choose(100, 1, [7, 8, 9]).kind == "none"          # the posterior mean says no
    assert 0.05 < picks.count("lookup") / len(picks) < 0.95, picks.count("lookup")
    s.lookup_estimates.tried[1, 0] += 2000
    picks = [s.choose(100, 1, [7, 8, 9], explore=True).kind for _ in range(300)]
    assert picks.count("lookup") <= 3


def test_planner_starts_after_lookup_misses_and_backs_off(tiny_root, monkeypatch):
    """No residual stream is captured and no plan is made while lookups hit; after ``plan_after``
    misses in a row the planner runs; a "no draft pays" verdict doubles the wait for the next prompt."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    slow = _lat(m.cfg.n_layers, draft_cheap=False)          # layer-skip drafts never pay
    s = HybridStrategy(m, slow, plan_after=3)
    eng.generate([5, 6, 7, 8] * 10, s, max_new_tokens=3, stop_ids=())
    assert not s.planner.history and not s.wants_hidden      # lookups hit: no planning
    monkeypatch.setattr("knapspec.strategies.lookup.NgramIndex.find", lambda *a, **k: (0, []))
    out = eng.generate(list(range(3, 40)), s, max_new_tokens=12, stop_ids=())  # lookups never match
    # misses: the planner woke, waited for `window` generated tokens to score, and ran once
    assert [c.source for c in s.planner.history] == ["dp-wait", "dp"] and out.stats.new_tokens == 12
    assert s.planner.history[-1].plan is None                # ... found nothing worth drafting
    assert not s.wants_hidden and s._plan_after_now == 6     # ... and sleeps until 6 misses in a row
    eng.generate(list(range(3, 40)), s, max_new_tokens=6, stop_ids=())   # 5 misses < 6: no planner
    assert not s.wants_hidden


def test_the_back_off_is_remembered_across_instances(tiny_root, tmp_path, monkeypatch, caplog):
    """Created by name, the hybrid remembers the planner's "no draft" verdicts per context bucket
    in the cache folder (the planner's memory, shared with the knapspec strategy): a new instance
    (a new process) starts with the longer wait and, once awake, takes the remembered verdict
    without a DP until the back-off runs out; ``memory=off`` does not remember; a verdict with a
    plan resets it; an unreadable file is ignored with a warning; an unwritable one is kept in the
    process."""
    import json

    from knapspec.strategies import REGISTRY
    from knapspec.strategies.knapspec import DEFAULT_WINDOWS, planner_memory
    from knapspec.strategies.vocab import DraftVocab
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    slow = _lat(m.cfg.n_layers, draft_cheap=False)          # layer-skip drafts never pay
    path = planner_memory(m, "auto", DEFAULT_WINDOWS).path   # one file per set of windows on offer
    assert path != planner_memory(m, "auto", ()).path
    v = DraftVocab(m, list(range(128)), sizes=(16,))                 # ... and per draft vocabulary
    assert planner_memory(m, "auto", DEFAULT_WINDOWS, v).path not in (path, planner_memory(m, "auto", ()).path)
    assert planner_memory(m, "auto", DEFAULT_WINDOWS, v).path != planner_memory(
        m, "auto", DEFAULT_WINDOWS, DraftVocab(m, list(range(127, -1, -1)), sizes=(16,))).path
    assert not path.exists()
    s = REGISTRY.create("hybrid", m, latency=slow, plan_after=3)
    monkeypatch.setattr("knapspec.strategies.lookup.NgramIndex.find", lambda *a, **k: (0, []))
    prompt = list(range(3, 40))                              # bucket 8 (< 384 tokens)
    eng.generate(prompt, s, max_new_tokens=12, stop_ids=())     # (the DP waits for 8 generated tokens)
    assert s.planner.dp_runs == 1 and s.planner.history[-1].plan is None and s._plan_after_now == 6

    def entry() -> dict:
        return json.loads(path.read_text())["buckets"]["8"]
    assert entry()["streak"] == 1 and entry()["plan"] is None and entry()["candidates"]
    assert list(path.parent.glob("*.tmp")) == []
    again = REGISTRY.create("hybrid", m, latency=slow, plan_after=3)
    eng.generate(prompt, again, max_new_tokens=6, stop_ids=())   # 5 misses < 6: asleep
    assert not again.planner.history and again.describe()["plan_after_now"] == 6
    off = REGISTRY.create("hybrid", m, latency=slow, plan_after=3, memory="off")
    eng.generate(prompt, off, max_new_tokens=12, stop_ids=())    # 3 misses: awake, a DP of its own
    assert off.planner.dp_runs == 1
    # 19 rounds: awake after 6 misses, the remembered verdict (no DP); asleep; the same after 6
    # more; awake after 6 more: the back-off (2 decisions after one verdict) ran out, but the TPT
    # bound from the remembered candidates says no plan can pay: a second verdict, still no DP
    eng.generate(prompt, again, max_new_tokens=20, stop_ids=())
    assert [c.source for c in again.planner.history] == ["memory", "memory", "bound"]
    assert again.planner.dp_runs == 0
    assert entry()["streak"] == 2 and again._plan_after_now == 12
    assert REGISTRY.create("hybrid", m, latency=slow, plan_after=3)._backoff(entry()["streak"]) == 12
    fast = REGISTRY.create("hybrid", m, latency=_lat(m.cfg.n_layers), plan_after=3, alpha="cosine",
                           min_cosine=0.0, margin=1.0)
    fast.memory.update(8, gated=4)                           # the back-off has run out
    fast._wake_now = True                                    # and the planner wakes at once
    eng.generate(prompt, fast, max_new_tokens=12, stop_ids=())
    assert [c.source for c in fast.planner.history][:2] == ["dp-wait", "dp"]
    assert fast.planner.history[1].plan is not None
    assert entry()["streak"] == 0 and entry()["plan"] == str(fast.planner.history[1].plan)
    path.write_text("{not json")
    fresh = REGISTRY.create("hybrid", m, latency=slow, plan_after=3)
    eng.generate(prompt, fresh, max_new_tokens=2, stop_ids=())
    assert fresh._plan_after_now == 3
    assert "ignoring the planner's memory" in caplog.text
    (tmp_path / "a-file").write_text("")                    # a cache that cannot be written: no error
    stuck = HybridStrategy(m, slow, plan_after=3, memory=tmp_path / "a-file" / "memory.json")
    eng.generate(prompt, stuck, max_new_tokens=12, stop_ids=())
    assert stuck._plan_after_now == 6 and not (tmp_path / "a-file").is_dir()


def test_nothing_is_priced_while_the_planner_sleeps(tiny_root):
    """Planner asleep and lookups within the floor: the choice is fixed (the whole lookup, or a plain
    step), so no candidate is priced; the lookup estimates still learn. With every lookup token
    priced (``min_lookup=0``) each round with a match is priced (drafted or not)."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    calls = []
    s = HybridStrategy(m, _lat(m.cfg.n_layers), plan_after=10**6)
    real = s.choose
    s.choose = lambda *a, **k: calls.append(1) or real(*a, **k)
    out = eng.generate([5, 6, 7, 8] * 10, s, max_new_tokens=12, stop_ids=())
    assert not calls and out.stats.drafted > 0 and s.lookup_estimates.tried.sum() > 0
    assert s.counts.get("lookup", 0) > 0
    s0 = HybridStrategy(m, _lat(m.cfg.n_layers), plan_after=10**6, min_lookup=0)
    real0 = s0.choose
    s0.choose = lambda *a, **k: calls.append(1) or real0(*a, **k)
    out = eng.generate([5, 6, 7, 8] * 10, s0, max_new_tokens=12, stop_ids=())
    assert 0 < out.stats.draft_rounds <= len(calls) <= out.stats.rounds


@pytest.mark.parametrize("path", PATHS)
def test_greedy_hybrid_equals_autoregressive(path, tiny_root):
    def check(data) -> int:
        kind = data.draw(st.sampled_from(["llama", "qwen3"]), label="arch")
        m = tiny_model(kind, tiny_root, path)
        eng = Engine(m)
        base = data.draw(st.lists(st.integers(3, 30), min_size=1, max_size=8), label="base")
        prompt = (base * 5)[:data.draw(st.integers(1, 40), label="len")]
        n_new = data.draw(st.integers(1, 32), label="max_new_tokens")
        min_lookup = data.draw(st.integers(0, 8), label="min_lookup")
        strat = HybridStrategy(m, _lat(m.cfg.n_layers), alpha="cosine", min_cosine=0.0,
                               every=data.draw(st.integers(1, 8), label="every"),
                               max_lookup=data.draw(st.integers(1, 12), label="max_lookup"),
                               d_max=data.draw(st.integers(1, 6), label="d_max"),
                               plan_after=data.draw(st.integers(0, 4), label="plan_after"),
                               min_lookup=min_lookup, memory=None)
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,), threshold=0.0)
        assert got.tokens == ref
        # with a lookup floor, a match in the context after the first token is drafted at once
        _, cont = find_continuation(np.array(prompt + ref[:1]), max_ngram=3, max_len=8)
        if min_lookup and cont and n_new >= 3 and ref[0] != 2:
            assert got.stats.drafted > 0, "a lookup match was there and nothing was drafted"
        return got.stats.drafted
    drafted = drafting_property(check, max_examples=20 if path == "torch-f32" else 10)
    assert sum(d > 0 for d in drafted) >= len(drafted) // 4, "the hybrid rarely drafted on repetitive prompts"


def test_hybrid_uses_every_kind_of_draft_and_stays_lossless(tiny_root):
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = list(range(3, 30)) * 2 + list(range(40, 60))
    ref = eng.generate(prompt, max_new_tokens=60, stop_ids=(2,)).tokens
    strat = HybridStrategy(m, _lat(m.cfg.n_layers), alpha="cosine", min_cosine=0.0, every=4)
    got = eng.generate(prompt, strat, max_new_tokens=60, stop_ids=(2,), threshold=0.0)
    assert got.tokens == ref
    assert got.stats.drafted > 0 and len(strat.counts) >= 2, strat.counts


def test_learning_strategies_are_kept_across_calls(tiny_root):
    from knapspec.api import LLM
    m = tiny_model("llama", tiny_root)
    llm = LLM(m, None)
    a = llm.make_strategy("hybrid", latency=_lat(m.cfg.n_layers))
    assert llm.make_strategy("hybrid", latency=_lat(m.cfg.n_layers)) is not a   # other options: another one
    lat = _lat(m.cfg.n_layers)
    h = llm.make_strategy("hybrid", latency=lat)
    assert llm.make_strategy("hybrid", latency=lat) is h
    assert llm.make_strategy("hybrid", latency=lat, persist=False) is not llm.make_strategy(
        "hybrid", latency=lat, persist=False)
    assert llm.make_strategy("lookup") is not llm.make_strategy("lookup")
    prompt = [5, 6, 7, 8, 9] * 4
    llm.generate(prompt, strategy=h, max_new_tokens=12)
    tried = h.lookup_estimates.tried.sum()
    llm.generate(prompt, strategy="hybrid", latency=lat, max_new_tokens=12)
    assert h.lookup_estimates.tried.sum() > tried                      # the second call went on learning in h


def test_deferred_estimate_updates_count_like_per_position_updates(tiny_root):
    """Outcomes are logged and folded in when read (or when the log grows long): the counts equal
    one update per decided lookup position, positions past the last tracked one sharing it."""
    from knapspec.strategies.hybrid import MAX_POS
    m = tiny_model("llama", tiny_root)
    s = HybridStrategy(m, _lat(m.cfg.n_layers), max_lookup=MAX_POS + 6)
    acc0, try0 = s.lookup_estimates.acc.copy(), s.lookup_estimates.tried.copy()
    outcomes = [(1, 3, 2), (2, 1, 0), (3, MAX_POS + 4, MAX_POS + 2), (3, MAX_POS + 4, 5), (1, 8, 8)]
    for g, k, a in outcomes:
        s.lookup_estimates.log.append((g, k, a))
    for g, k, a in outcomes:
        for j in range(k):
            pos = min(j, MAX_POS - 1)
            try0[g, pos] += 1
            acc0[g, pos] += j < a
    est = s.lookup_estimates
    assert np.array_equal(est.tried, try0) and np.array_equal(est.acc, acc0) and not est.log
    held = est.tried                               # an array handed out: its writes count ...
    est.probs(1)
    held[1, 0] += 40
    assert est.probs(1)[0] == pytest.approx(acc0[1, 0] / (try0[1, 0] + 40))
    draft = Draft(plan=None, max_len=3, tokens=(5, 6, 7), source="lookup")
    for _ in range(600):                           # a long-lived instance: the log stays bounded
        s._pending = (Option("lookup", 3, 0, 1.0, 1.0), 2)
        s.observe(Outcome(draft=draft, drafted=3, accepted=1, context_length=10, n_lookup=3))
    assert 0 < len(s.lookup_estimates.log) < 512
    assert s.lookup_estimates.tried[2, 0] == try0[2, 0] + 600 and s.lookup_estimates.acc[2, 1] == acc0[2, 1]


def test_skip_rounds_that_deliver_less_than_priced_are_priced_down(tiny_root):
    """Rounds with layer-skip drafts that commit fewer tokens, or take longer, than priced lower
    every skip option by what they delivered (:meth:`HybridStrategy.skip_efficiency`), until plain
    steps win; another plan starts from its own pricing; a new generation keeps half the weight."""
    from knapspec.sampling import SamplingParams
    from knapspec.strategies.base import RoundState
    m = tiny_model("llama", tiny_root)
    lat = _lat(m.cfg.n_layers)
    lat.key = {"measured": True}                 # as a profile measured here: corrected by rounds
    s = HybridStrategy(m, lat, memory="off")
    _with_plan(s, 0.9)
    best = s.choose(100, 0, [])
    assert best.kind == "skip" and s.skip_efficiency() == 1.0
    plan = s.planner.choice.plan
    draft = Draft(plan=plan, max_len=best.n_skip, source="skip")
    for _ in range(6):                   # every draft accepted, each round 4x the time priced
        opt = s.choose(100, 0, [])
        assert opt.kind == "skip"
        s._pending = (opt, 0)
        s.observe(Outcome(draft=draft, drafted=opt.n_skip, accepted=opt.n_skip, context_length=100,
                          draft_s=2 * opt.seconds, verify_s=2 * opt.seconds))
    eff = s.skip_efficiency()
    assert eff < 0.6
    assert s.choose(100, 0, []).kind == "none"
    kept = s._sk_real
    s._sk_real = [0.0] * 5                       # what the acceptance alone says: drafting pays
    assert s.choose(100, 0, []).kind == "skip"
    s._sk_real = kept
    # a new generation: the same ratio, at half the weight (shrunk more towards 1)
    state = RoundState(model=m, cache=m.new_cache(8), tokens=[1, 2, 3], n_prompt=3, round=0,
                       sampling=SamplingParams(), remaining=4, threshold=0.9)
    s.start(state)
    _with_plan(s, 0.9)
    s.planner.choice = replace(s.planner.choice, plan=plan)
    assert eff < s.skip_efficiency() < 1.0
    # another plan: priced as the latency model and acceptance say
    _with_plan(s, 0.9)
    s.planner.choice = replace(s.planner.choice, plan=Plan.from_skips(m.cfg.n_layers, attn=(0,), mlp=(1,)))
    assert s.skip_efficiency() == 1.0 and s.choose(100, 0, []).kind == "skip"
