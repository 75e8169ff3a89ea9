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
from knapspec.plan import Plan
from knapspec.sampling import SamplingParams
from knapspec.strategies.base import RoundState
from knapspec.strategies.knapspec import ADOPT_GAIN, KnapSpecStrategy, knapsack_dp
from knapspec.strategies.pricing import expected_tokens, tpt
from knapspec.strategies.static import StaticStrategy


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


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_multiple_choice_dp_equals_brute_force(data):
    """Items with several options (full, skipped, and up to two windows of their own time saved and
    value): with additive values the DP's best value at every budget equals brute force over every
    combination of options."""
    n = data.draw(st.integers(1, 6), label="items")
    items, gains = [], []
    for s in range(n):
        opts = [(1, 0)]
        g = {1: data.draw(st.floats(0, 5).map(lambda x: round(x, 3)), label=f"full{s}"), 0: 0.0}
        for k in range(data.draw(st.integers(0, 2), label=f"windows{s}")):
            w = data.draw(st.integers(1, 9), label=f"w{s}.{k}")
            opts.append((64 << k, w))
            g[64 << k] = data.draw(st.floats(0, 5).map(lambda x: round(x, 3)), label=f"g{s}.{k}")
        if data.draw(st.booleans(), label=f"skippable{s}"):
            opts.append((0, data.draw(st.integers(1, 12), label=f"skip{s}")))
        items.append(opts)
        gains.append(g)

    def step(s, X, opt):
        return X + gains[s][opt]

    states, X = knapsack_dp(items, torch.zeros(1, 1, dtype=torch.float64), step, lambda d, X: X[:, 0])
    for st_ in states:
        assert st_.saved == sum(dict(items[s])[o] for s, o in enumerate(st_.run))
        assert X[st_.index, 0].item() == pytest.approx(sum(gains[s][o] for s, o in enumerate(st_.run)))
    combos = list(itertools.product(*items))
    for budget in range(sum(max(w for _, w in opts) for opts in items) + 1):
        want = max((sum(gains[s][o] for s, (o, _) in enumerate(c)) for c in combos
                    if sum(w for _, w in c) >= budget), default=-math.inf)
        got = max((s_.value for s_ in states if s_.saved >= budget), default=-math.inf)
        assert got == pytest.approx(want), budget


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
    state = _state(m, list(range(3, 30)))
    strat.start(state)
    strat.collect_prompt(state)          # the DP's states (start() waits for generated tokens)
    cands, choice = strat.optimise(27)
    assert cands, "the DP produced no candidate"
    for plan, alpha, cos in cands:
        assert any(plan.run) and not all(plan.run)
        assert plan.run[0] or plan.run[1], f"plan {plan} skips all of layer 0"
        assert 0.0 <= alpha <= 1.0 and -1.0 <= cos <= 1.0 + 1e-6
    # the choice is the TPT maximum over the candidates and the draft lengths where it beats plain
    # decoding by ADOPT_GAIN, else plain decoding
    lat = strat.latency
    ar = 1 / lat.predict(None, 27, 1)
    best = max(tpt(a, d, lat.predict(p, 27, 1), lat.predict(None, 27, d + 1))
               for p, a, _ in cands for d in range(1, strat.d_max + 1))
    assert choice.tpt == pytest.approx(best if best > (1 + ADOPT_GAIN) * ar else ar)
    if choice.plan is not None:
        assert 1 <= choice.d <= strat.d_max and (choice.plan.run[0] or choice.plan.run[1])
    else:
        assert choice.d == 0 and choice.tpt == choice.tpt_ar


def test_planner_values_are_cosines_of_the_real_hidden_states(tiny_root):
    m = tiny_model("llama", tiny_root)
    strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers), min_cosine=-1.0, max_states=256)
    state = _state(m, list(range(3, 20)))
    strat.start(state)
    strat.collect_prompt(state)          # the DP's states (start() waits for generated tokens)
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
    agree = (out.logits[0].argmax(-1) == targets).float().sum().item()
    assert alpha == pytest.approx((agree + 1) / (targets.numel() + 2))      # the posterior mean


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_output_through_the_planner_equals_autoregressive(kind, path, tiny_root):
    m = tiny_model(kind, tiny_root, path)
    eng = Engine(m)

    def check(data) -> int:
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=24), label="prompt")
        n_new = data.draw(st.integers(1, 32), label="max_new_tokens")
        strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers),
                                 windows=data.draw(st.sampled_from([(), (2,), (3, 8)]), label="windows"),
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


# ---- stepping aside -------------------------------------------------------------------------------
def _drafts_never_pay(n_layers: int) -> LatencyModel:
    """The lm_head dominates a step and a pass over several tokens costs more than one: a draft
    step costs about a full step, so no draft can pay even if every draft were accepted."""
    return LatencyModel.analytic(n_layers, attn=1e-4, attn_per_token=0.0, mlp=1e-4, head=2e-2, width_factor=0.5)


def _drafts_pay_only_if_accepted(n_layers: int) -> LatencyModel:
    """Drafts would pay at high acceptance (a bound at acceptance 1 lets the DP run), but on a
    random tiny model the acceptance of plans that save enough is low."""
    return LatencyModel.analytic(n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=2e-2, width_factor=0.02)


class _Spy:
    """Counts the planner's model work and records every forward of the engine."""

    def __init__(self, monkeypatch, m, strat):
        from knapspec import native
        self.forwards: list[tuple[bool, bool]] = []        # (capture, drafted with a plan)
        self.stack_calls = 0
        self.collects = 0
        self.dps = 0
        real_forward, real_stack = m.forward, native.stack

        def forward(tokens, start, cache, plan=None, **kw):
            self.forwards.append((bool(kw.get("capture", False)), plan is not None))
            return real_forward(tokens, start, cache, plan, **kw)

        def stack(*a, **kw):
            self.stack_calls += 1
            return real_stack(*a, **kw)
        monkeypatch.setattr(m, "forward", forward)
        monkeypatch.setattr(native, "stack", stack)
        real_collect, real_opt = strat.collect, strat.optimise

        def collect(*a, **kw):
            self.collects += 1
            return real_collect(*a, **kw)

        def optimise(*a, **kw):
            self.dps += 1
            return real_opt(*a, **kw)
        monkeypatch.setattr(strat, "collect", collect)
        monkeypatch.setattr(strat, "optimise", optimise)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("profile", ["never", "low-acceptance"])
def test_where_no_draft_pays_plain_steps_run_fused_and_planning_stops(profile, path, tiny_root, tmp_path,
                                                                     monkeypatch):
    """A profile where every draft is slower than a plain step: the strategy takes plain steps,
    never captures the residual stream (so the native path runs each step as one fused call), and
    pays no planning: none at all when even perfect acceptance could not pay (the TPT bound), one
    DP in the first generation otherwise, and none in a second generation (a new instance, as in
    a new process: the verdict is remembered in the memory file)."""
    from knapspec.strategies.memory import PlanMemory
    m = tiny_model("llama", tiny_root, path)
    lat = (_drafts_never_pay if profile == "never" else _drafts_pay_only_if_accepted)(m.cfg.n_layers)
    eng = Engine(m)
    prompt = list(range(3, 40))
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens
    mem = tmp_path / "memory.json"
    dps = []
    for _ in range(2):
        strat = KnapSpecStrategy(m, lat, memory=PlanMemory(mem), min_cosine=0.5, every=1)
        spy = _Spy(monkeypatch, m, strat)
        out = eng.generate(prompt, strat, max_new_tokens=24, stop_ids=())
        monkeypatch.undo()
        assert out.tokens == ref and out.stats.drafted == 0
        assert all(c.plan is None for c in strat.history)
        assert spy.forwards and not any(cap or planned for cap, planned in spy.forwards)
        if path == "native-bf16":                          # every step one fused native call
            assert spy.stack_calls == len(spy.forwards)          # prefill and every round
        assert spy.collects == spy.dps
        dps.append(spy.dps)
    assert dps == ([0, 0] if profile == "never" else [1, 0]), dps


def test_no_first_dp_at_a_long_context_until_a_short_one_left_candidates(tiny_root, tmp_path):
    """With a memory that holds no DP's candidates, a decision beyond ``dp_context`` tokens of
    context takes plain steps and remembers nothing (a first DP there costs a third of a
    generation on the embedded model); once a DP at a short context has left candidates, the TPT
    bound re-prices them at the long one as before. Output stays the model's."""
    from knapspec.strategies.memory import PlanMemory
    m = tiny_model("llama", tiny_root)
    lat = _drafts_pay_only_if_accepted(m.cfg.n_layers)
    eng = Engine(m)
    mem = PlanMemory(tmp_path / "memory.json")
    long_prompt, short_prompt = list(range(3, 60)), list(range(3, 13))

    def run(prompt):
        strat = KnapSpecStrategy(m, lat, memory=mem, dp_context=32, score_prompt=True, every=1)
        ref = eng.generate(prompt, max_new_tokens=12, stop_ids=()).tokens
        assert eng.generate(prompt, strat, max_new_tokens=12, stop_ids=()).tokens == ref
        return strat
    strat = run(long_prompt)
    assert strat.dp_runs == 0 and strat.history[0].source == "no-candidates"
    assert not mem.buckets()                               # nothing remembered
    strat = run(short_prompt)                              # (a short context: the DP runs)
    assert strat.dp_runs == 1 and strat._nearest_candidates(0) is not None
    strat = run(long_prompt)                               # candidates known: decided as before
    assert strat.history[0].source in ("memory", "bound", "dp", "dp-wait")


def test_decisions_only_at_start_bucket_changes_and_acceptance_drops(tiny_root, monkeypatch):
    """The planner decides at the start, once when the DP's wait for generated tokens ends, when
    the context enters another bucket (here buckets of 16 tokens) and when the measured acceptance
    no longer pays for the plan, never on a timer."""
    monkeypatch.setattr("knapspec.strategies.knapspec.bucket", lambda ctx: ctx // 16)
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    strat = KnapSpecStrategy(m, _cheap_drafts(m.cfg.n_layers), alpha="cosine", min_cosine=0.0, every=1)
    triggers = []
    real = strat.decide

    def decide(state, trigger):
        triggers.append((trigger, state.context_length))
        return real(state, trigger)
    monkeypatch.setattr(strat, "decide", decide)
    prompt = list(range(3, 30))
    ref = eng.generate(prompt, max_new_tokens=60, stop_ids=()).tokens
    out = eng.generate(prompt, strat, max_new_tokens=60, stop_ids=(), threshold=0.0)
    assert out.tokens == ref
    assert triggers[0] == ("start", len(prompt) + 1)
    # the DP scores generated tokens: at the start it waits for `window` of them, once
    assert [x for x in triggers if x[0] == "probe"] == [("probe", len(prompt) + strat.window)]
    seen = {(len(prompt) + 1) // 16}
    for trig, ctx in triggers[1:]:
        assert trig in ("bucket", "acceptance", "probe"), trig
        if trig == "bucket":
            assert ctx // 16 not in seen
        if trig in ("bucket", "probe"):
            seen.add(ctx // 16)
    assert len([t for t, _ in triggers if t == "bucket"]) == len(seen) - 1 >= 2


def test_the_draft_length_follows_the_measured_acceptance(tiny_root):
    """A plan chosen at a low estimated acceptance drafts 1 token a round; once drafting has
    measured a high acceptance the length is re-priced there (longer), and once it measures one
    at which the plan no longer pays the strategy says so (a new decision follows)."""
    from knapspec.strategies.knapspec import Choice
    from knapspec.strategies.pricing import best_length
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    strat = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8)
    plan = Plan.from_sublayer_skips(n, {1})
    ctx = 40
    tv = strat.verify_times.at(strat.latency, ctx)
    td = strat.draft_time(plan, ctx)
    assert best_length(0.3, td, tv, 8)[0] == 1
    strat.choice = Choice(plan=plan, d=1, alpha=0.3, tpt=1.0, tpt_ar=1.0, context=ctx)
    strat._tried, strat._acc = 200.0, 196.0
    assert strat._still_pays(ctx)
    want = best_length(strat.measured_alpha(), td, tv, 8)[0]
    assert strat.choice.d == want > 1 and strat.choice.plan is plan
    strat._tried, strat._acc = 200.0, 0.0
    assert not strat._still_pays(ctx)


def test_the_draft_length_follows_the_recent_acceptance(tiny_root):
    """Acceptance moves within a generation (at 8,000 tokens of context the first generated
    tokens are drafted worse than the rest): the length is priced at the acceptance of the last
    drafts (:meth:`recent_alpha`), while whether the plan still pays is judged on all of them."""
    from knapspec.strategies.knapspec import Choice
    from knapspec.strategies.pricing import best_length
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    strat = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8)
    plan = Plan.from_sublayer_skips(n, set(range(1, 2 * n, 2)))    # every MLP skipped
    ctx = 40
    tv = strat.verify_times.at(strat.latency, ctx)
    td = strat.draft_time(plan, ctx)
    strat.choice = Choice(plan=plan, d=2, alpha=0.7, tpt=1.0, tpt_ar=1.0, context=ctx)
    for _ in range(10):                                   # a poor start: 1 of 2 drafts accepted
        strat.observe_acceptance(2, 1)
    assert strat._still_pays(ctx)
    d_start = strat.choice.d
    for _ in range(12):                                   # then every draft accepted
        strat.observe_acceptance(strat.choice.d, strat.choice.d)
        assert strat._still_pays(ctx)
    assert strat.recent_alpha() > strat.measured_alpha() + 0.1
    assert strat.choice.d == best_length(strat.recent_alpha(), td, tv, 8)[0]
    assert strat.choice.d > max(d_start, best_length(strat.measured_alpha(), td, tv, 8)[0])
    for _ in range(6):                                    # and back: every first draft rejected
        strat.observe_acceptance(strat.choice.d, 0)
        strat._still_pays(ctx)
    assert strat.recent_alpha() < strat.measured_alpha()
    assert strat.choice.d == best_length(strat.recent_alpha(), td, tv, 8)[0] < d_start + 1


def test_drafting_goes_on_past_low_confidence_drafts_while_they_pay(tiny_root):
    """The confidence exit, measured: while the drafts that fall below it are accepted often
    enough for a further draft step to pay, the strategy's drafts carry no exit (threshold 0);
    once they are mostly rejected, the generation's exit holds again. An explicit threshold is
    kept as given."""
    from knapspec.strategies.base import Outcome
    from knapspec.strategies.knapspec import Choice
    from knapspec.strategies.memory import bucket
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    plan = Plan.from_sublayer_skips(n, set(range(1, 2 * n)))        # a cheap draft: one sublayer runs
    ctx = 40
    prompt = list(range(3, 3 + ctx - 1))

    def run(strat, rounds):
        state = _state(m, prompt)
        strat.start(state)                                           # (the generation's exit: 0.9)
        strat.choice = Choice(plan=plan, d=3, alpha=0.9, tpt=1.0, tpt_ar=1.0, context=ctx)
        strat._bucket, strat._probe_at = bucket(ctx), -1
        tv = strat.verify_times.at(strat.latency, ctx)
        assert strat.draft_time(plan, ctx) + (tv[3] - tv[0]) / 3 < 0.5 * tv[0]
        out = []
        for confs, accepted in rounds:
            d = strat.propose(state)
            out.append(d.threshold)
            strat.observe(Outcome(draft=d, drafted=len(confs), accepted=accepted, context_length=ctx,
                                  draft_confidence=confs))
        return out, strat.propose(state).threshold

    stops_accepted = [((0.95, 0.3), 2)] * 6                           # rounds ended by a low, accepted draft
    strat = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8)
    seen, last = run(strat, stops_accepted)
    assert seen[0] is None and last == 0.0 and strat._low == [6, 6]
    # once lifted, low drafts are still counted: a run of rejected ones restores the exit
    seen, last = run(strat, stops_accepted + [((0.2, 0.1, 0.3), 0)] * 30)
    assert 0.0 in seen and last is None and strat._low == [36, 6]
    assert strat.choice.plan is plan                                 # (the plan itself still pays)
    # (drafts after the first rejected one are not decided: not counted)
    strat2 = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8)
    _, last = run(strat2, [((0.95, 0.9, 0.2), 0)] * 6)
    assert strat2._low == [0, 0] and last is None
    # an explicit threshold is the user's: kept
    fixed = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8, threshold=0.9)
    seen, last = run(fixed, stops_accepted)
    assert set(seen) == {0.9} and last == 0.9


def test_the_confidence_exit_prices_a_row_of_verification_at_the_plans_widths(tiny_root):
    """A further draft step costs one more row of verification at the widths the plan verifies,
    not the mean row over every width up to ``d_max + 2`` (long passes cost more per row)."""
    from knapspec.strategies.knapspec import Choice
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    strat = KnapSpecStrategy(m, _cheap_drafts(n), d_max=8)
    plan = Plan.from_sublayer_skips(n, set(range(1, 2 * n, 2)))
    ctx = 40
    t0 = strat.verify_times.at(strat.latency, ctx)[0]
    td = strat.draft_time(plan, ctx)
    # rows cost 0.05 of a step up to 4 tokens, then 2 steps each
    tv = [t0 * (1 + 0.05 * k) if k <= 3 else t0 * (1.15 + 2 * (k - 3)) for k in range(10)]
    strat.verify_times.at = lambda *a, **k: tv
    strat._tried, strat._acc, strat._low = 100.0, 95.0, [20, 19]
    for d, pays in ((3, True), (9, False)):
        strat.choice = Choice(plan=plan, d=d, alpha=0.95, tpt=1.0, tpt_ar=1.0, context=ctx)
        assert td < 0.5 * t0 and strat._exit_pays(ctx) is pays


# ---- windowed drafts --------------------------------------------------------------------------------
def _windowed_plans(n_layers: int):
    """Plans whose attention sublayers are full, skipped or windowed (sink + 2, 3 or 8 keys) and
    whose MLPs run or not, never the full plan."""
    opt = st.sampled_from([0, 1, 2, 3, 8])
    return st.lists(st.tuples(opt, st.booleans()), min_size=n_layers, max_size=n_layers).map(
        lambda xs: Plan.from_options([o for a, mm in xs for o in (a, int(mm))])).filter(
        lambda p: not p.is_full and p.last_layer_run() >= 0)


@pytest.mark.parametrize("path", PATHS)
def test_greedy_output_with_windowed_drafts_equals_autoregressive(path, tiny_root):
    """Any plan with windowed attention sublayers (the draft's own attention differs; the full
    model verifies): greedy output equals autoregressive output, prompts long enough that the
    windows cut."""
    m = tiny_model("llama", tiny_root, path)
    eng = Engine(m)

    def check(data) -> int:
        plan = data.draw(_windowed_plans(m.cfg.n_layers), label="plan")
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=12, max_size=60), label="prompt")
        n_new = data.draw(st.integers(1, 24), label="max_new_tokens")
        d = data.draw(st.integers(1, 6), label="max_draft")
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, StaticStrategy(plan, max_draft=d, threshold=0.0), max_new_tokens=n_new,
                           stop_ids=(2,), threshold=0.0)
        assert got.tokens == ref, str(plan)
        return got.stats.drafted
    drafting_property(check, max_examples=25 if path == "torch-f32" else 12)


def test_greedy_output_with_windowed_drafts_on_quantized_weights(tiny_root):
    """The same on a GGUF model's quantized weights (native quantized kernels)."""
    from conftest import tiny_gguf_model
    m = tiny_gguf_model("q4_1", tiny_root)
    eng = Engine(m)
    prompt = [(7 * i) % 90 + 3 for i in range(70)]
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens
    drafted = 0
    for text in ("a0w2,a1w3,a2w8", "a0w8,m1,a2w2", "a1,a2w3,m0"):
        got = eng.generate(prompt, StaticStrategy(Plan.parse(text, 3), max_draft=4, threshold=0.0),
                           max_new_tokens=24, stop_ids=(), threshold=0.0)
        assert got.tokens == ref, text
        drafted += got.stats.drafted
    assert drafted > 0


def test_the_planner_chooses_windows_where_they_keep_the_states_close(tiny_root):
    """With attention costly at this context and windows on offer, the DP's candidates include
    windowed attention sublayers, each priced by the latency model's windowed time."""
    m = tiny_model("llama", tiny_root)
    lat = LatencyModel.analytic(m.cfg.n_layers, attn=1e-4, attn_per_token=1e-4, mlp=2e-4, head=1e-5,
                                width_factor=0.01)
    strat = KnapSpecStrategy(m, lat, windows=(4, 16), min_cosine=-1.0, max_states=64)
    state = _state(m, list(range(3, 100)))
    strat.start(state)
    items = strat.items(98)
    assert all([o for o, _ in opts] == ([1, 4, 16, 0] if s % 2 == 0 else [1, 0]) for s, opts in enumerate(items))
    for s in range(0, 6, 2):             # a window saves less than skipping, more for a smaller window
        w = dict(items[s])
        assert 0 < w[16] < w[4] < w[0]
    strat.collect(state, len(state.tokens) - 1)       # the DP's states (start() waits for the probe)
    cands, choice = strat.optimise(98)
    assert any(p.attn_windowed for p, _, _ in cands)
    for p, _, _ in cands:
        assert lat.predict(p, 98, 1) <= lat.predict(None, 98, 1)


def test_context_buckets_hold_the_usual_sizes_whole():
    """A generation from a 4k (8k, 2k) prompt stays in one bucket: the boundaries lie at 3/4 of
    powers of two."""
    from knapspec.strategies.memory import bucket
    assert bucket(1) == bucket(383) == 8 and bucket(384) == 9
    for size, b in ((2048, 11), (4096, 12), (8192, 13)):
        assert bucket(size - 200) == bucket(size) == bucket(size + 512) == b
    assert bucket(3071) == 11 and bucket(3072) == 12 and bucket(6144) == 13


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0.3, 3.0)), min_size=1, max_size=120))
def test_verify_time_corrections_are_numpy_weighted_least_squares(passes):
    """VerifyTimes' running ratios and the line through them, against numpy on the same counts."""
    import numpy as np

    from knapspec.strategies.pricing import VerifyTimes

    class Flat:
        given = False

        def predict(self, plan, ctx, n):
            return 0.01 * n

    vt = VerifyTimes(12)
    vt.predict(Flat(), 100)
    ratio, count = np.ones(12), np.zeros(12)
    for w, r in passes:
        vt.observe(w + 1, r * 0.01 * (w + 1))
        ratio[w] = r if count[w] == 0 else ratio[w] + 0.1 * (r - ratio[w])
        count[w] += 1
        if w == 0:                                  # the other widths drift towards the step's ratio
            ratio[1:] = np.where(count[1:] > 0, ratio[1:] + vt.revert * (ratio[0] - ratio[1:]), ratio[1:])
    seen = np.flatnonzero(count >= 3)
    if seen.size >= 2 and np.ptp(seen) > 0:
        slope, icpt = np.polyfit(seen.astype(float), ratio[seen], 1, w=np.sqrt(np.minimum(count[seen], 50.0)))
        want = np.clip(icpt + slope * np.arange(12), 0.25, 4.0)
    elif seen.size == 1:
        want = np.full(12, ratio[seen[0]])
    else:
        want = np.ones(12)
    got = vt.at(Flat(), 100)
    assert np.allclose(vt.ratios(), want, rtol=1e-9, atol=1e-9)
    assert np.allclose(got, want * 0.01 * np.arange(1, 13), rtol=1e-9, atol=1e-12)


def test_a_transient_during_wide_passes_does_not_hold_their_correction_for_good():
    """Wide passes measured 3x slower than predicted during a transient, then only one-token steps
    at the prediction (a strategy that finds wide passes dear stops running them): their
    correction drifts back towards the step's, so drafting is priced again; while wide passes go
    on being measured, a real difference in shape (1.3x) is kept to within a few percent."""
    from knapspec.strategies.pricing import VerifyTimes

    class Flat:
        given = False

        def predict(self, plan, ctx, n):
            return 0.01 * n

    vt = VerifyTimes(10)
    vt.predict(Flat(), 100)
    for _ in range(5):
        for w in range(1, 9):
            vt.observe(w, (3.0 if w > 1 else 1.0) * 0.01 * w)
    assert min(vt.ratios()[1:8]) > 2.0                     # the transient, as measured
    for _ in range(150):
        vt.observe(1, 0.01)
    assert max(vt.ratios()) < 1.25                          # drifted back: wide passes priced again
    vt2 = VerifyTimes(10)
    vt2.predict(Flat(), 100)
    for _ in range(300):
        vt2.observe(1, 0.01)
        vt2.observe(5, 1.3 * 0.05)
    assert vt2.ratios()[4] == pytest.approx(1.3, rel=0.06)


# ---- the window probe ------------------------------------------------------------------------------
def _costly_attention(n_layers: int) -> LatencyModel:
    """Attention over the context dominates a step, so windowed drafts look very attractive."""
    return LatencyModel.analytic(n_layers, attn=1e-5, attn_per_token=1e-4, mlp=1e-5, head=1e-6,
                                 width_factor=0.01)


@pytest.mark.parametrize("path", ["torch-f32", "native-bf16"])
def test_the_window_probe_measures_what_stepwise_drafts_would_give(path, tiny_root):
    """The probe's α for an all-windowed plan is the share of committed tokens its greedy draft
    (teacher-forced, one token at a time, on a copy of the cache) agrees with, with the full
    vocabulary and with each subset of the draft vocabulary (its frequent tokens and those of
    the text before the probed tokens, drafted through those lm_head rows as drafts are), and it
    leaves the cache exactly as it was."""
    from knapspec.strategies.knapspec import windowed_plan
    from knapspec.strategies.vocab import DraftVocab
    m = tiny_model("llama", tiny_root, path)
    n = m.cfg.n_layers
    prompt = [3 + (7 * i) % 50 for i in range(100)]
    tokens = prompt + Engine(m).generate(prompt, max_new_tokens=20, stop_ids=()).tokens   # its own tokens
    end, k = len(tokens) - 1, 12
    cache = m.new_cache(len(tokens) + 8)
    m.forward(torch.tensor([tokens[:end]]), 0, cache, last_only=True)
    state = RoundState(model=m, cache=cache, tokens=tokens, n_prompt=100, round=0,
                       sampling=SamplingParams(), remaining=8)
    held = [(name, [t.clone() for t in getattr(cache, name)]) for name in ("k", "v", "kt", "vt")
            if getattr(cache, name) is not None]
    ranking = [(53 * i + 11) % 128 for i in range(128)]
    strat = KnapSpecStrategy(m, _costly_attention(n), windows=(8, 96), probe_tokens=k,
                             draft_vocab=DraftVocab(m, ranking, sizes=(8, 32)))
    got = {str(p): (a, per_size) for p, a, per_size in strat.probe(state, (8, 96))}
    assert cache.length == end
    for name, before in held:
        assert all(torch.equal(a, b) for a, b in zip(getattr(cache, name), before)), name
    assert [x for x in ("k", "v", "kt", "vt") if getattr(cache, x) is not None] == [x for x, _ in held]
    before = set(tokens[:end - k + 1])
    subsets = {size: torch.tensor(sorted(set(ranking[:size]) | before)) for size in (8, 32)}
    assert all(len(ids) < 128 for ids in subsets.values())
    for w in (8, 96):
        plan = windowed_plan(n, w)
        agree = {None: 0, 8: 0, 32: 0}
        for j in range(end - k, end):                  # one draft step per position, on a copy
            c2 = m.new_cache(len(tokens) + 8)
            m.forward(torch.tensor([tokens[:end - k]]), 0, c2, last_only=True)
            if j > end - k:
                m.forward(torch.tensor([tokens[end - k:j]]), end - k, c2, plan, logits=False)
            top = m.forward(torch.tensor([[tokens[j]]]), j, c2, plan).logits[0, -1].argmax().item()
            agree[None] += top == tokens[j + 1]
            for size, ids in subsets.items():
                c2.set_length(j)
                row = m.forward(torch.tensor([[tokens[j]]]), j, c2, plan, head_weight=m.lm_head[ids])
                agree[size] += ids[row.logits[0, -1].argmax()].item() == tokens[j + 1]
        a, per_size = got[str(plan)]
        assert a == pytest.approx((agree[None] + 1) / (k + 2)), w
        assert per_size == pytest.approx({size: (agree[size] + 1) / (k + 2) for size in (8, 32)}), w
    assert agree[None] > agree[8] > 0           # (w = 96: the check saw both kinds of token)


@pytest.mark.parametrize("pays", ["more for smaller windows", "the same for every window", "nothing"])
def test_the_probe_tries_one_window_a_generation_largest_first_and_stops_where_it_does_not_pay(pays, tiny_root):
    """The probe runs one window per generation, largest first: a window whose plan does not pay
    at its probed acceptance ends it (smaller windows see a subset of its keys), and so does one
    whose next smaller window would not pay ``PROBE_STEP`` more at that acceptance; otherwise the
    next generation drafts with the plan found, probes the next window once ``probe_tokens``
    tokens were generated, and keeps the better plan. The probe runs nothing but the windowed
    passes (no timed verification passes: the corrections learn from drafting rounds), and
    leaves the cache as it was."""
    from knapspec.strategies.knapspec import windowed_plan
    m = tiny_model("llama", tiny_root, "native-bf16")
    n = m.cfg.n_layers
    prompt = [3 + (7 * i) % 50 for i in range(200)]
    tokens = prompt + Engine(m).generate(prompt, max_new_tokens=20, stop_ids=()).tokens
    end = len(tokens) - 1
    cache = m.new_cache(len(tokens) + 8)
    m.forward(torch.tensor([tokens[:end]]), 0, cache, last_only=True)
    held = [(name, [t.clone() for t in getattr(cache, name)]) for name in ("k", "v", "kt", "vt")
            if getattr(cache, name) is not None]
    lat = _costly_attention(n)
    lat.key = {**lat.key, "analytic": False}                 # as if measured on this machine
    priced: list[int] = []

    class Probing(KnapSpecStrategy):
        def price(self, plan, alpha, ctx, tv, alphas=None):
            r = super().price(plan, alpha, ctx, tv, alphas)
            w = next(iter(plan.attn_windowed.values()))
            priced.append(w)
            v = {"more for smaller windows": 1e6 / w, "the same for every window": 1e6}.get(pays, 0.0)
            return (r[0], r[1], v, r[3])

    strat = Probing(m, lat, windows=(8, 32, 96), probe_tokens=12)
    state = RoundState(model=m, cache=cache, tokens=tokens, n_prompt=200, round=0,
                       sampling=SamplingParams(), remaining=8)

    def windows_probed() -> list[int]:
        entry = strat.memory.get(strat._bucket)
        return [next(iter(Plan.parse(t, n).attn_windowed.values())) for t, _, _ in entry["probed"]]
    strat.reset()
    strat.decide(state, "start")                             # a generation's first decision
    assert strat.probe_runs == 1 and windows_probed() == [96]
    assert priced[0] == 96                                   # priced as probed, largest first
    assert (strat.choice.plan is not None) == (pays != "nothing")
    nxt = strat.memory.get(strat._bucket).get("probe_next")
    assert nxt == (32 if pays == "more for smaller windows" else None)
    strat.decide(state, "bucket")                            # no second probe in this generation
    assert strat.probe_runs == 1 and strat._probe_at == -1
    for w in (32, 8):
        if pays != "more for smaller windows":
            break
        strat.reset()                                        # the next generation
        strat.decide(state, "start")
        assert strat.choice.source == "memory" and strat.probe_runs == (1 if w == 32 else 2)
        assert strat._probe_at == 200 + 12 + 1               # after probe_tokens generated tokens
        strat.decide(state, "probe")
        assert windows_probed()[-1] == w and strat.choice.source == "probe"
        assert strat.choice.plan == windowed_plan(n, w)      # the better plan is kept
    assert windows_probed() == ([96, 32, 8] if pays == "more for smaller windows" else [96])
    assert strat.memory.get(strat._bucket).get("probe_next") is None
    strat.reset()
    strat.decide(state, "start")                             # nothing left to probe
    assert strat._probe_at == -1 and strat.probe_runs == len(windows_probed())
    assert strat.verify_times._log == [] and all(c == 0 for c in strat.verify_times._count)
    assert cache.length == end
    for name, before in held:
        assert all(torch.equal(a, b) for a, b in zip(getattr(cache, name), before)), name


def test_knapspec_probes_windows_once_per_bucket_and_stays_exact(tiny_root):
    """Where attention dominates and windows are offered: plain steps until ``probe_tokens``
    tokens were generated, one probe, then drafts with an all-windowed plan; the output equals
    autoregressive decoding, and a second generation takes the plan from the memory without
    probing again."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=()).tokens
    strat = KnapSpecStrategy(m, _costly_attention(m.cfg.n_layers), windows=(64,), probe_tokens=6,
                             threshold=0.0)
    got = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(), threshold=0.0)
    assert got.tokens == ref
    assert strat.probe_runs == 1
    sources = [c.source for c in strat.history]
    assert sources[:2] == ["probe-wait", "probe"], sources
    assert strat.history[1].context == len(prompt) + 1 + 6      # the prefill's token, then 6 steps
    assert strat.history[1].plan is not None and len(strat.history[1].plan.attn_windowed) == m.cfg.n_layers
    assert got.stats.drafted > 0
    entry = strat.memory.get(strat._bucket)
    assert entry["probed"] and entry["plan"] == str(strat.history[1].plan)
    again = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(), threshold=0.0)
    assert again.tokens == ref and strat.probe_runs == 1
    assert strat.history[0].source == "memory"


def test_one_probe_pass_a_generation_and_every_output_exact(tiny_root):
    """Through the engine, where every smaller window pays more: each generation runs at most one
    probe pass (the first after ``probe_tokens`` plain steps, the later ones while drafting with
    the plan found before), the bucket ends on the smallest window, and every output equals
    autoregressive decoding."""
    from knapspec.strategies.knapspec import windowed_plan
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=()).tokens

    class Smaller(KnapSpecStrategy):
        def price(self, plan, alpha, ctx, tv, alphas=None):
            r = super().price(plan, alpha, ctx, tv, alphas)
            w = set(plan.attn_windowed.values())
            return (r[0], r[1], 1e6 / max(w), r[3]) if w else r

    strat = Smaller(m, _costly_attention(m.cfg.n_layers), windows=(8, 32, 64), probe_tokens=6, threshold=0.0)
    runs, sources = [], []
    for _ in range(4):
        got = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(), threshold=0.0)
        assert got.tokens == ref
        runs.append(strat.probe_runs)
        sources.append([c.source for c in strat.history][:2])
    assert runs == [1, 2, 3, 3]
    assert sources[0] == ["probe-wait", "probe"] and sources[1] == sources[2] == ["memory", "probe"]
    assert strat.history[0].source == "memory" and strat.history[0].plan == windowed_plan(m.cfg.n_layers, 8)
    assert got.stats.drafted > 0


def test_score_prompt_probes_the_prompts_tail_at_once(tiny_root):
    """With ``score_prompt`` (a raw-text prompt whose tail is like the text to come) the window
    probe scores the prompt's last ``probe_tokens`` tokens in the generation's first decision
    instead of waiting for as many generated ones; the output still equals autoregressive
    decoding."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens

    class Pays(KnapSpecStrategy):
        def price(self, plan, alpha, ctx, tv, alphas=None):
            r = super().price(plan, alpha, ctx, tv, alphas)
            return (r[0], r[1], 1e6, r[3]) if plan.attn_windowed else r

    lat = _costly_attention(m.cfg.n_layers)
    waits = Pays(m, lat, windows=(32,), probe_tokens=6, threshold=0.0)
    at_once = Pays(m, lat, windows=(32,), probe_tokens=6, threshold=0.0, score_prompt=True)
    for strat, first in ((waits, ["probe-wait", "probe"]), (at_once, ["probe"])):
        got = eng.generate(prompt, strat, max_new_tokens=24, stop_ids=(), threshold=0.0)
        assert got.tokens == ref
        assert [c.source for c in strat.history][:len(first)] == first and strat.probe_runs == 1
        assert strat.history[len(first) - 1].plan is not None and got.stats.drafted > 0


@pytest.mark.parametrize("gain", [0.05, 0.15])
def test_a_plan_is_adopted_only_where_it_is_predicted_to_pay_adopt_gain_more(gain, tiny_root):
    """A probed plan predicted to beat plain steps by less than ``ADOPT_GAIN`` (within the
    predictions' measured error) is not adopted: plain steps, and the bucket remembers no plan;
    one predicted to beat them by more drafts. Either way the output is autoregressive decoding's."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens

    class Gains(KnapSpecStrategy):
        def price(self, plan, alpha, ctx, tv, alphas=None):
            r = super().price(plan, alpha, ctx, tv, alphas)
            return (r[0], max(r[1], 1), (1 + gain) / tv[0], r[3]) if plan.attn_windowed else r

    strat = Gains(m, _costly_attention(m.cfg.n_layers), windows=(32,), probe_tokens=6, threshold=0.0)
    got = eng.generate(prompt, strat, max_new_tokens=24, stop_ids=(), threshold=0.0)
    assert got.tokens == ref and strat.probe_runs == 1
    adopted = gain > ADOPT_GAIN
    assert (strat.history[-1].plan is not None) == adopted and (got.stats.drafted > 0) == adopted
    assert bool(strat.memory.get(strat._bucket).get("plan")) == adopted


def test_knapspec_drafts_through_a_draft_vocabulary_where_the_head_is_dear(tiny_root):
    """With a draft vocabulary and a costly lm_head, the probe's verdict drafts through a subset
    of the lm_head rows (the draft step priced with the head scaled by its rows), the output
    equals autoregressive decoding, and the memory keeps the plan with its acceptance; where the
    subsets cover none of the output, the same decision keeps the full vocabulary."""
    from knapspec.strategies.vocab import DraftVocab
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=()).tokens
    lat = LatencyModel.analytic(n, attn=1e-5, attn_per_token=1e-4, mlp=1e-5, head=2e-2, width_factor=0.01)
    first = list(dict.fromkeys(ref))                      # the output's tokens ranked first
    vocab = DraftVocab(m, first + [t for t in range(128) if t not in first], sizes=(64,))
    strat = KnapSpecStrategy(m, lat, windows=(64,), probe_tokens=6, threshold=0.0, draft_vocab=vocab)
    drafts = []
    seen_propose = strat.propose

    def propose(state):
        d = seen_propose(state)
        drafts.append(d)
        return d
    strat.propose = propose
    got = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(), threshold=0.0)
    assert got.tokens == ref
    c = strat.history[1]
    assert c.source == "probe" and c.plan is not None and c.vocab == 64
    used = [d for d in drafts if d.plan is not None]
    assert used and all(d.head is not None and len(d.head_ids) < 128 for d in used)
    assert got.stats.drafted > 0
    # priced: the head share of the step scales with the subset's rows
    full, sub = strat.draft_time(c.plan, 200), strat.draft_time(c.plan, 200, 64)
    assert full - sub == pytest.approx(strat.verify_times.step_ratio() * 2e-2 * (1 - vocab.rows_for(64) / 128),
                                       rel=1e-6)
    assert strat.memory.get(strat._bucket)["plan"] == str(c.plan)
    assert strat.memory.get(strat._bucket)["alphas"] == {"64": pytest.approx(c.alpha, abs=1e-4)}
    tv = strat.verify_times.at(lat, 200, exact=True)
    # a subset is priced where its acceptance was measured, never from an estimate alone
    vocab.hits[:] = vocab.seen_outputs = 10_000                        # every output token covered
    assert strat.price(c.plan, 0.9, 200, tv)[0] is None
    assert strat.price(c.plan, 0.9, 200, tv, {64: 0.9})[0] == 64
    # nor do the subsets open the window probe: its gate is the full head's, with or without them
    bare = KnapSpecStrategy(m, lat, windows=(64,), probe_tokens=6, threshold=0.0)
    gates = []
    for ctx in (100, 140, 200, 400, 1000):
        tv = strat.verify_times.at(lat, ctx, exact=True)
        gates.append(strat._probe_windows({}, ctx, tv))
        assert gates[-1] == bare._probe_windows({}, ctx, tv)
    assert [64] in gates


def test_a_probed_plan_that_stops_paying_gives_way_without_a_dp(tiny_root):
    """In a bucket the probe looked at, a plan whose acceptance measured while drafting no longer
    pays is replaced by the best other probed plan at the acceptances known, or by plain steps;
    the memory's probed acceptances take what drafting measured, and no DP runs."""
    from knapspec.strategies.memory import PlanMemory, bucket
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=()).tokens
    bad = Plan.from_sublayer_skips(n, set(range(1, 2 * n - 1)))      # drafts almost never accepted
    mem = PlanMemory(None)
    b = bucket(len(prompt) + 1)
    mem.update(b, plan=str(bad), alpha=0.99, d=4, probed=[[str(bad), 0.99, {}]])
    strat = KnapSpecStrategy(m, _costly_attention(n), windows=(64,), memory=mem, threshold=0.0)
    got = eng.generate(prompt, strat, max_new_tokens=40, stop_ids=(), threshold=0.0)
    assert got.tokens == ref
    assert [c.source for c in strat.history][:2] == ["memory", "probe"]
    assert strat.history[1].plan is None and strat.dp_runs == 0 and strat.probe_runs == 0
    entry = mem.get(b)
    assert entry["plan"] is None and entry["probed"][0][1] < 0.5          # what drafting measured
    again = eng.generate(prompt, strat, max_new_tokens=20, stop_ids=(), threshold=0.0)
    assert again.tokens == ref[:20] and strat.dp_runs == 0
    assert [c.source for c in strat.history] == ["probe"] and strat.history[0].plan is None


def test_a_probe_that_found_nothing_runs_again_after_a_back_off(tiny_root):
    """A bucket whose window probe found no plan that pays is probed again after
    ``backoff(probe_streak)`` generations (2, then 4, ...) instead of never; a probe that finds a
    plan ends the back-off; outputs stay autoregressive ones."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens
    pays = [False]

    class Verdict(KnapSpecStrategy):
        def price(self, plan, alpha, ctx, tv, alphas=None):
            r = super().price(plan, alpha, ctx, tv, alphas)
            return (r[0], r[1], 1e9 if pays[0] else 0.0, r[3])

    strat = Verdict(m, _costly_attention(m.cfg.n_layers), windows=(64,), probe_tokens=6, threshold=0.0)
    runs = []
    for _ in range(8):
        assert eng.generate(prompt, strat, max_new_tokens=24, stop_ids=(), threshold=0.0).tokens == ref
        runs.append(strat.probe_runs)
    assert runs == [1, 1, 1, 2, 2, 2, 2, 2]                  # again after 2 generations, then after 4
    assert strat.memory.get(strat._bucket)["probe_streak"] == 2
    pays[0] = True
    for _ in range(4):
        assert eng.generate(prompt, strat, max_new_tokens=24, stop_ids=(), threshold=0.0).tokens == ref
        runs.append(strat.probe_runs)
    assert runs[8:] == [3, 3, 3, 3]                          # found a plan: kept, no probe
    entry = strat.memory.get(strat._bucket)
    assert entry["plan"] and entry["probe_streak"] == 0
    assert strat.history[0].source == "memory" and strat.history[0].plan is not None


def test_no_probe_where_windows_cannot_pay(tiny_root):
    """When a windowed plan cannot beat a plain step even if every draft were accepted (attention
    costs nothing here), or no windows are offered, the strategy does not probe."""
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(90)]
    flat = LatencyModel.analytic(m.cfg.n_layers, attn=1e-5, attn_per_token=0.0, mlp=1e-3, head=1e-5,
                                 width_factor=0.5)
    for strat in (KnapSpecStrategy(m, flat, windows=(8, 32), probe_tokens=6),
                  KnapSpecStrategy(m, _costly_attention(m.cfg.n_layers), probe_tokens=6)):
        eng.generate(prompt, strat, max_new_tokens=12, stop_ids=())
        assert strat.probe_runs == 0
        assert all(c.source not in ("probe", "probe-wait") for c in strat.history)


@pytest.mark.parametrize("plan_after", [0, 4])
def test_the_hybrid_stays_awake_for_the_window_probe_and_stays_exact(plan_after, tiny_root):
    """The hybrid's planner wakes at the first round where the window probe is due, without
    waiting for ``plan_after`` lookup misses in a row (lookups that match but are mostly rejected
    would keep it asleep), waits for the probe (lookups priced as usual meanwhile), probes once,
    and the output equals autoregressive decoding."""
    from knapspec.strategies.hybrid import HybridStrategy
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=40, stop_ids=()).tokens
    hyb = HybridStrategy(m, _costly_attention(m.cfg.n_layers), plan_after=plan_after, windows=(64,),
                         probe_tokens=6)
    got = eng.generate(prompt, hyb, max_new_tokens=40, stop_ids=(), threshold=0.0)
    assert got.tokens == ref
    assert hyb.planner.probe_runs == 1
    assert [c.source for c in hyb.planner.history][:2] == ["probe-wait", "probe"]
    assert hyb.planner.history[0].context == len(prompt) + 1          # the first round


def test_a_plan_remembered_while_waiting_for_the_probe_ends_the_wait(tiny_root):
    """Another strategy sharing the planner's memory probes the bucket first (the hybrid and
    KnapSpec share it): the next decision takes the remembered plan once, and the wait is over
    (no decision per round)."""
    from knapspec.strategies.knapspec import windowed_plan
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    prompt = [3 + (5 * i) % 40 for i in range(150)]
    ref = eng.generate(prompt, max_new_tokens=30, stop_ids=()).tokens

    class Shared(KnapSpecStrategy):
        def propose(self, state):
            if state.round == 2:             # the other strategy's verdict lands in the memory
                self.memory.update(self._bucket, probed=[], plan=str(windowed_plan(m.cfg.n_layers, 64)),
                                   alpha=0.99, d=3, streak=0)
            return super().propose(state)

    strat = Shared(m, _costly_attention(m.cfg.n_layers), windows=(64,), probe_tokens=6, threshold=0.0)
    got = eng.generate(prompt, strat, max_new_tokens=30, stop_ids=(), threshold=0.0)
    assert got.tokens == ref
    sources = [c.source for c in strat.history]
    assert sources[0] == "probe-wait" and sources[1] == "memory", sources
    assert sources.count("memory") + sources.count("acceptance") <= 3, sources
    assert strat.probe_runs == 0
