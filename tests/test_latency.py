"""Latency profiler and model: fit recovery through a fake clock, JSON round trip, cache keys,
windowed attention, robustness to transients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from knapspec import latency
from knapspec.model import Arch, ModelConfig
from knapspec.plan import SINK, Plan

CFG = ModelConfig(arch=Arch.LLAMA, vocab_size=32, hidden_size=8, intermediate_size=16, n_layers=3,
                  n_heads=2, n_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position=4096, tie_embeddings=True)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def true_attn(i, ctx, w):
    return (1 + i) * 1e-4 + (2 + i) * 1e-7 * ctx * (1 + 0.1 * w)


def true_mlp(i, w):
    return (3 + 2 * i) * 1e-4 * (1 + 0.05 * w)


def true_head(w):
    return 5e-4 + 1e-5 * w


class FakeModel:
    """Same interface as Model; every call advances a fake clock by a known latency."""

    cfg = CFG
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, clock: FakeClock, overhead: float = 2e-4) -> None:
        self.clock, self.over = clock, overhead
        # a transient: the next `left` calls of the matching kind at context `ctx` (and width
        # `width`) take `extra` seconds more
        self.transient: dict | None = None
        self.slow = 1.0                     # every time multiplied by this (the machine's load)

    class _Cache:
        def __init__(self) -> None:
            self.length = 0

        def set_length(self, n: int) -> None:
            self.length = n

    def new_cache(self, capacity: int):
        return self._Cache()

    def embed_tokens(self, toks):
        return toks

    def _stall(self, kind, s, ctx, w):
        tr = self.transient
        if tr and tr["left"] > 0 and tr["ctx"] == ctx and tr.get("width", w) == w and kind in tr["kinds"] \
                and s in tr.get("sublayers", (s,)):
            tr["left"] -= 1
            self.clock.t += tr["extra"]

    def sublayer(self, s, x, ctx, cache, window=0):
        w = x.shape[1]
        span = min(ctx, window + SINK) if window else ctx
        self.clock.t += self.slow * (true_attn(s // 2, span, w) if s % 2 == 0 else true_mlp(s // 2, w))
        self._stall("sublayer", s, ctx, w)
        return x

    def head(self, x):
        self.clock.t += self.slow * true_head(x.shape[1])

    def forward(self, toks, ctx, cache):
        for s in range(6):
            self.sublayer(s, toks, ctx, cache)
        self.head(toks)
        self.clock.t += self.slow * self.over
        self._stall("forward", -1, ctx, toks.shape[1])


def fitted() -> latency.LatencyModel:
    clock = FakeClock()
    prof = latency.measure(FakeModel(clock), contexts=[64, 512, 2048, 4000], widths=[1, 2, 4, 8],
                           repeats=3, clock=clock)
    return latency.LatencyModel.fit(prof)


def test_fit_recovers_synthetic_latency():
    lm = fitted()
    assert lm.fit_error["attention_mape"] < 1e-6
    for ctx in (100, 1000, 3000, 6000):            # 6000 extrapolates beyond the grid
        for w in (1, 2, 4, 8):
            for i in range(3):
                assert lm.attn_time(i, ctx, w) == pytest.approx(true_attn(i, ctx, w), rel=1e-6)
                assert lm.mlp_time(i, w) == pytest.approx(true_mlp(i, w), rel=1e-6)
            assert lm.overhead(ctx, w) == pytest.approx(2e-4, rel=1e-6)
    plan = Plan.from_skips(3, attn=[1], mlp=[0, 2])
    want = 2e-4 + true_head(1) + true_attn(0, 1500, 1) + true_attn(2, 1500, 1) + true_mlp(1, 1)
    assert lm.predict(plan, 1500, 1) == pytest.approx(want, rel=1e-6)
    full = lm.predict(None, 1500, 4)
    assert full == pytest.approx(2e-4 + true_head(4) + sum(true_attn(i, 1500, 4) + true_mlp(i, 4)
                                                          for i in range(3)), rel=1e-6)
    assert len(lm.sublayer_times(1500)) == 6


def test_predictions_remembered_per_plan_context_and_width_are_the_computed_ones():
    """``predict`` remembers the sublayers' sum per (plan, context, width): asked again, with any
    lm_head scale, it gives what a model that never answered computes, for every key apart."""
    lm = fitted()
    plans = [None, Plan.from_skips(3, attn=[1], mlp=[0, 2]), Plan.from_options([64, 1, 1, 0, 16, 1])]
    asks = [(p, ctx, n, hs) for p in plans for ctx in (100, 1500, 6000) for n in (1, 4) for hs in (1.0, 0.25)]
    first = [lm.predict(p, ctx, n, head_scale=hs) for p, ctx, n, hs in asks]
    again = [lm.predict(p, ctx, n, head_scale=hs) for p, ctx, n, hs in reversed(asks)][::-1]
    fresh = [latency.LatencyModel.from_json(lm.to_json()).predict(p, ctx, n, head_scale=hs) for p, ctx, n, hs in asks]
    assert first == again == fresh
    assert len(set(first)) > len(asks) // 2                   # the keys do tell the answers apart
    for p, ctx, n, _ in asks[:6]:
        assert lm.predict(p, ctx, n, head_scale=0.25) == pytest.approx(
            lm.predict(p, ctx, n) - 0.75 * lm.head_time(n), rel=1e-12)


def test_json_round_trip():
    lm = fitted()
    back = latency.LatencyModel.from_json(lm.to_json())
    plan = Plan.from_skips(3, attn=[0])
    assert back.predict(plan, 777, 2) == lm.predict(plan, 777, 2)
    assert back.profile.contexts == lm.profile.contexts


def test_cache_key_changes_with_dtype_and_threads(monkeypatch):
    m = FakeModel(FakeClock())
    k1 = latency.profile_key(m)
    monkeypatch.setattr(FakeModel, "dtype", torch.bfloat16)
    k2 = latency.profile_key(m)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        k3 = latency.profile_key(m)
    finally:
        torch.set_num_threads(old)
    assert k1 != k2 and k2 != k3
    assert latency.profile_path(k1) != latency.profile_path(k2) != latency.profile_path(k3)
    # the native kernels: their own profiles, and new ones whenever their source changes
    from knapspec import native
    monkeypatch.setattr(FakeModel, "kernels", "native", raising=False)
    k4 = latency.profile_key(m)
    monkeypatch.setattr(native, "version", lambda: "another-build")
    k5 = latency.profile_key(m)
    assert k4["kernels"] == "native" and k4 != k2 and k4 != k5
    assert latency.profile_path(k4) != latency.profile_path(k5)


def test_corrupt_json_is_reported_and_reprofiled(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    clock = FakeClock()
    m = FakeModel(clock)
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    path = latency.profile_path(latency.profile_key(m))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level("WARNING"):
        lm = latency.get_latency_model(m, contexts=[64, 1024], repeats=2)
    assert "is corrupt" in caplog.text and "re-profiling" in caplog.text
    assert json.loads(path.read_text())["key"] == lm.key                # a fresh profile replaced it
    assert latency.get_latency_model(m).to_json() == lm.to_json()       # and is reused


# ---- fits: clamps keep the line a least-squares line ------------------------------------------------
def test_fit_line_clamps_consistently():
    c = np.array([64.0, 2048.0, 4000.0])
    a, b = latency.fit_line(c, np.array([3.0, 2.0, 1.0]))         # falling: a constant, the mean
    assert (a, b) == (pytest.approx(2.0), 0.0)
    a, b = latency.fit_line(c, np.array([0.0, 2.0, 4.0]) * 1e-3 - 1e-4)   # negative intercept: through 0
    assert a == 0.0 and b == pytest.approx(float(np.dot(c, np.array([0.0, 2.0, 4.0]) * 1e-3 - 1e-4) / np.dot(c, c)))
    a, b = latency.robust_line(np.array([1.0, 2, 3, 4, 5, 6, 7, 8]),
                               np.array([1.0, 2, 3, 40, 5, 6, 7, 8]))     # one point far off the line: left out
    assert (a, b) == (pytest.approx(0.0, abs=1e-9), pytest.approx(1.0))


# ---- windowed attention ----------------------------------------------------------------------------
def test_windowed_attention_is_profiled_and_predicted():
    clock = FakeClock()
    prof = latency.measure(FakeModel(clock), contexts=[64, 512, 2048, 4000], widths=[1, 4], repeats=3,
                           clock=clock, windows=(64, 256))
    lm = latency.LatencyModel.fit(prof)
    assert set(lm.win_attn) == {"64", "256"}
    for i in range(3):
        assert lm.window_time(i, 64, 4000) == pytest.approx(true_attn(i, 64 + SINK, 1), rel=1e-6)
        assert lm.window_time(i, 256, 200) == pytest.approx(lm.attn_time(i, 200))   # never above full
    plan = Plan.parse("a1w64,m2", 3)
    want = 2e-4 + true_head(1) + true_attn(0, 3000, 1) + true_attn(1, 64 + SINK, 1) + true_attn(2, 3000, 1) \
        + true_mlp(0, 1) + true_mlp(1, 1)
    assert lm.predict(plan, 3000, 1) == pytest.approx(want, rel=1e-6)


# ---- transients -----------------------------------------------------------------------------------------
def _profile(transient=None, **kw):
    clock = FakeClock()
    m = FakeModel(clock)
    m.transient = transient
    lm, ok = latency.profile(m, contexts=[64, 2048, 4000], widths=[1, 4, 16], repeats=3, windows=(64,),
                             clock=clock, **kw)
    return lm, ok


@pytest.mark.parametrize("transient", [
    # every sublayer of one point slowed, over all its repeats (another process took the cores)
    dict(ctx=2048, width=1, kinds=("sublayer",), extra=3e-3, left=5 * 12),
    # a few attention sublayers of one point
    dict(ctx=4000, width=4, kinds=("sublayer",), sublayers=(2,), extra=2e-2, left=10),
    # the real forwards of one point (which give the per-forward overhead)
    dict(ctx=2048, width=1, kinds=("forward",), extra=5e-2, left=5),
])
def test_a_transient_in_profiling_leaves_the_model_and_the_plan_unchanged(transient, tiny_root):
    from knapspec.strategies.knapspec import KnapSpecStrategy
    from test_knapspec import _state
    clean, ok = _profile()
    assert ok
    # the transient is in what is measured: points off by far (medians of repeats do not help)
    clock = FakeClock()
    raw_model = FakeModel(clock)
    raw_model.transient = dict(transient)
    raw = latency.measure(raw_model, contexts=[64, 2048, 4000], widths=[1, 4, 16], repeats=3, clock=clock,
                          retries=0)
    pts = [(raw.attn, clean.profile.attn), (raw.mlp, clean.profile.mlp)]
    worst = max(abs(x / y - 1) for a, b in pts for ra, rb in zip(a, b) for xa, xb in zip(ra, rb)
                for x, y in zip(xa, xb))
    worst = max([worst] + [abs(x / y - 1) for ra, rb in zip(raw.overhead, clean.profile.overhead)
                           for x, y in zip(ra, rb)])
    assert worst > 0.5, worst
    robust, ok = _profile(dict(transient))
    assert ok
    for c in (64, 1024, 2048, 4000, 8000):
        for w in (1, 4, 16):
            assert robust.predict(None, c, w) == pytest.approx(clean.predict(None, c, w), rel=0.05)
    # and the planner, on a tiny model of 3 layers, chooses the same as with the clean profile
    m = tiny_model("llama", tiny_root)
    choices = []
    for lm in (clean, robust):
        strat = KnapSpecStrategy(m, lm, min_cosine=-1.0, max_states=64)
        state = _state(m, list(range(3, 30)))
        strat.collect_prompt(state)
        strat._cache = state.cache
        _, c = strat.optimise(2048)
        choices.append((c.plan, c.d))
    assert choices[0] == choices[1]


def test_a_profile_that_disagrees_with_real_steps_is_not_cached(tmp_path, monkeypatch, caplog):
    """A transient that outlasts every retry (here: every real forward at one context is slow): the
    profile is used in the process, with a warning, but not written to the cache folder."""
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    clock = FakeClock()
    m = FakeModel(clock)
    m.transient = dict(ctx=2048, kinds=("forward",), extra=5e-2, left=10**6)
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    with caplog.at_level("WARNING"):
        lm = latency.get_latency_model(m, contexts=[64, 2048, 4000], repeats=2)
    assert "disagree with real steps" in caplog.text
    assert not latency.profile_path(latency.profile_key(m)).exists()
    assert latency.get_latency_model(m) is lm                      # this process keeps using it
    latency._MEMO.clear()


def test_a_machine_that_slows_down_alike_everywhere_still_caches_its_profile(tmp_path, monkeypatch, caplog):
    """Real steps all 1.5x slower than profiled whenever they are checked (the machine's load
    moves): every time scales alike, no decision changes, so the profile is cached (with a
    warning)."""
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    clock = FakeClock()
    m = FakeModel(clock)
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    real_check = latency.check

    def check(model, lm, **kw):
        model.slow = 1.5
        try:
            return real_check(model, lm, **kw)
        finally:
            model.slow = 1.0
    monkeypatch.setattr(latency, "check", check)
    with caplog.at_level("WARNING"):
        latency.get_latency_model(m, contexts=[64, 2048, 4000], repeats=2)
    assert "alike at every context" in caplog.text
    assert latency.profile_path(latency.profile_key(m)).exists()
    latency._MEMO.clear()


def test_sliding_window_layers_stop_growing_at_their_window():
    """Gemma 3's local layers (here layers 0 and 2, window 512) cost as at 512 keys beyond it, the
    global layer keeps growing: the fit and every prediction use each layer's own context."""
    clock = FakeClock()

    class Windowed(FakeModel):
        def sublayer(self, s, x, ctx, cache):
            keys = ctx if s // 2 == 1 else min(ctx, 512)
            self.clock.t += true_attn(s // 2, keys, x.shape[1]) if s % 2 == 0 else true_mlp(s // 2, x.shape[1])
            return x

    prof = latency.measure(Windowed(clock), contexts=[64, 512, 2048, 4000], widths=[1, 4], repeats=3, clock=clock)
    lm = latency.LatencyModel.fit(prof, (512, None, 512))
    assert lm.fit_error["attention_mape"] < 1e-6
    for ctx in (100, 3000, 8000):
        assert lm.attn_time(0, ctx) == pytest.approx(true_attn(0, min(ctx, 512), 1), rel=1e-6)
        assert lm.attn_time(1, ctx) == pytest.approx(true_attn(1, ctx, 1), rel=1e-6)
        assert lm.sublayer_times(ctx)[4] == pytest.approx(true_attn(2, min(ctx, 512), 1), rel=1e-6)
    plan = Plan.from_skips(3, attn=[1])
    want = 2e-4 + true_head(1) + sum(true_attn(i, 512, 1) + true_mlp(i, 1) for i in (0, 2)) + true_mlp(1, 1)
    assert lm.predict(plan, 8000) == pytest.approx(want, rel=1e-6)
    assert latency.LatencyModel.from_json(lm.to_json()).predict(plan, 8000) == lm.predict(plan, 8000)
    # without the windows, a straight line through all contexts misses the short ones badly
    blind = latency.LatencyModel.fit(prof)
    assert abs(blind.attn_time(0, 64) - true_attn(0, 64, 1)) > 0.1 * true_attn(0, 64, 1)
