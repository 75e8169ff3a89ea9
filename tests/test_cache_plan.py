"""KV cache state API and plans."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from knapspec.plan import Plan


def test_rollback_then_decode_equals_fresh_run(tiny_root):
    m = tiny_model("llama", tiny_root)
    toks = torch.randint(3, 128, (1, 20))
    cache = m.new_cache(32)
    m.forward(toks[:, :10], 0, cache)
    m.forward(torch.randint(3, 128, (1, 5)), 10, cache)     # a detour of 5 other tokens
    assert cache.length == 15
    cache.rollback(10)
    assert cache.length == 10
    got = [m.forward(toks[:, i:i + 1], i, cache).logits for i in range(10, 20)]
    fresh = m.new_cache(32)
    m.forward(toks[:, :10], 0, fresh)
    ref = [m.forward(toks[:, i:i + 1], i, fresh).logits for i in range(10, 20)]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_cache_api():
    from knapspec.cache import KVCache
    c = KVCache(n_layers=2, n_kv_heads=1, head_dim=4, capacity=8, dtype=torch.float32)
    k = torch.ones(1, 1, 3, 4)
    c.write(0, 0, k, 2 * k)
    c.set_length(3)
    kk, vv = c.view(0, 3)
    assert kk.shape == (1, 1, 3, 4) and torch.equal(vv, 2 * k)
    assert kk.data_ptr() == c.k[0].data_ptr()            # a view, not a copy
    with pytest.raises(AssertionError):
        c.rollback(4)
    with pytest.raises(ValueError, match="KV cache is full"):
        c.write(0, 6, k, k)


def test_plan_text_round_trip_and_errors(tmp_path):
    p = Plan.parse("a3,m1,a0", 4)
    assert p.attn_skipped == (0, 3) and p.mlp_skipped == (1,)
    assert Plan.parse(str(p), 4) == p
    assert Plan.parse("full", 4).is_full and str(Plan.full(4)) == "full"
    assert p.n_skipped == 3 and p.n_sublayers == 8
    with pytest.raises(ValueError, match="bad skip entry 'x3'"):
        Plan.parse("a1,x3", 4)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        Plan.parse("m9", 4)
    f = tmp_path / "plan.json"
    p.save(f, note="test")
    assert Plan.load(f, 4) == p
    with pytest.raises(ValueError, match="this model has 5"):
        Plan.load(f, 5)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json", 4)
    assert Plan.from_skips(2, attn=[0, 1], mlp=[0, 1]).last_layer_run() == -1
    assert Plan.from_skips(2, mlp=[1]).last_layer_run() == 1
