"""Latency profiler and model: fit recovery through a fake clock, JSON round trip, cache keys."""

from __future__ import annotations

import json

import pytest
import torch

from knapspec import latency
from knapspec.model import Arch, ModelConfig
from knapspec.plan import Plan

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

    class _Cache:
        def __init__(self) -> None:
            self.length = 0

        def set_length(self, n: int) -> None:
            self.length = n

    def new_cache(self, capacity: int):
        return self._Cache()

    def embed_tokens(self, toks):
        return toks

    def sublayer(self, s, x, ctx, cache):
        w = x.shape[1]
        self.clock.t += true_attn(s // 2, ctx, w) if s % 2 == 0 else true_mlp(s // 2, w)
        return x

    def head(self, x):
        self.clock.t += true_head(x.shape[1])

    def forward(self, toks, ctx, cache):
        for s in range(6):
            self.sublayer(s, toks, ctx, cache)
        self.head(toks)
        self.clock.t += self.over


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
