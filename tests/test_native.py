"""knapspec's native CPU sublayers (``native/sublayers.h``): whole attention and MLP sublayers in one call
each, equal to transformers' reference, and each token's row bit-identical alone or in a pass."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, assert_steps_equal_hf, build_tiny_hf
from knapspec import native
from knapspec.cache import KVCache
from knapspec.model import Model, ModelConfig
from knapspec.plan import Plan

# head_dim 32: the native sublayers need head sizes in multiples of 32 (the tiny defaults use 16)
_NATIVE = dict(head_dim=32, max_position_embeddings=700)


def _need(dtype: torch.dtype) -> None:
    why = native.available(dtype)
    if why is not None:
        pytest.skip(f"native kernels unavailable here: {why}")


def _ours(hf, dtype=torch.float32) -> Model:
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    m = Model.from_hf_tensors(cfg, {k: v.detach().clone() for k, v in hf.state_dict().items()}).to(dtype)
    assert m.pack_weights(kernels="native") and m.kernels == "native" and m._native_sublayers
    return m


@pytest.mark.parametrize("kind", sorted(TINY))
def test_native_sublayers_match_transformers(kind, monkeypatch):
    """float32, prefill of 250 tokens then 20 steps, across the 256-key chunk boundary (Mistral: its
    window of 8); then a 600-token prefill, over the native limit, which takes torch's attention."""
    _need(torch.float32)
    hf = build_tiny_hf(kind, **_NATIVE)
    ours = _ours(hf)
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 250))
    cache = ours.new_cache(400)
    calls = []                     # (tokens, start) of each native call of the whole stack
    mod = native._module()
    orig = mod.stack
    monkeypatch.setattr(mod, "stack", lambda *a: (calls.append((a[3], a[5])), orig(*a))[1])
    assert_steps_equal_hf(hf, ours, prompt, cache, steps=20)
    with torch.no_grad():
        # the native path ran, every sublayer in one call
        assert calls == [(250, 0)] + [(1, 250 + s) for s in range(20)]
        long = torch.randint(3, 128, (1, 600))
        out = ours.forward(long, 0, ours.new_cache(620))
        assert (hf(long).logits - out.logits).abs().max() <= 1e-4
        assert len(calls) == 21


def _set_bf16_kernel(kernel: str, request) -> None:
    """The bfloat16 attention's kernel for one test: "fma" (AVX-512 float32 multiply-adds), "dot"
    (VDPBF16PS pair products) or "amx" (tiles; skipped where the CPU or OS has none); restored after."""
    _need(torch.bfloat16)

    def restore():
        native.set_amx(None)
        native.set_dot(None)
    request.addfinalizer(restore)
    if kernel == "amx":
        if not native.set_amx(True):
            pytest.skip("no AMX tiles on this CPU / OS")
    else:
        native.set_amx(False)
        assert native.set_dot(kernel == "dot") == (kernel == "dot")


@pytest.fixture
def bf16_kernel(request):
    _set_bf16_kernel(request.param, request)
    return request.param


@pytest.fixture
def amx_attention():
    """The bfloat16 attention on AMX tiles for one test (skipped where the CPU or OS has none)."""
    _need(torch.bfloat16)
    if not native.set_amx(True):
        native.set_amx(None)
        pytest.skip("no AMX tiles on this CPU / OS")
    yield
    native.set_amx(None)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_pass_equals_one_token_steps_bit_for_bit(kind, dtype):
    """Passes of 2..10 tokens against one-token steps, across a 256-key chunk boundary and a 16-key
    block boundary, on caches of different capacities, with a plan that skips sublayers."""
    _need(dtype)
    _pass_equals_steps(kind, dtype, _NATIVE)


@pytest.mark.parametrize("bf16_kernel", ["fma", "dot", "amx"], indirect=True)
@pytest.mark.parametrize("kind,head_dim", [("llama", 32), ("gemma3", 64), ("qwen3", 96)])
def test_bfloat16_attention_kernels_pass_equals_one_token_steps_bit_for_bit(kind, head_dim, bf16_kernel):
    """The same for each bfloat16 attention kernel: 3 query heads per KV head, so 30 rows in a
    10-token pass (AMX: groups of 16 and 14 rows; others: 7 groups of 4 and one of 2); value passes
    of 2, 4 and 4 + 2 groups of 16 dimensions; the one-token steps on a cache whose capacity ends
    inside a 32-key span (and on an odd number of keys)."""
    assert native.amx() == (bf16_kernel == "amx") and native.dot() == (bf16_kernel == "dot")
    _pass_equals_steps(kind, torch.bfloat16, dict(_NATIVE, head_dim=head_dim, hidden_size=96, num_attention_heads=6,
                                                  num_key_value_heads=2), odd_capacity=True)


def test_amx_attention_is_as_close_to_the_float32_reference_as_the_avx512_path(amx_attention):
    """AMX rounds the probabilities to bfloat16 for the value product: the logits stay as close to
    transformers' float32 logits as the AVX-512 path's (bfloat16 noise, ~0.02-0.04 relative)."""
    hf = build_tiny_hf("llama", **_NATIVE)
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 300))
    with torch.no_grad():
        ref = hf(prompt).logits
    m = _ours(hf, torch.bfloat16)
    errs = []
    for on in (True, False):
        native.set_amx(on)
        cache = m.new_cache(310)
        m.forward(prompt[:, :250], 0, cache, logits=False)
        out = torch.cat([m.forward(prompt[:, 250:290], 250, cache).logits]
                        + [m.forward(prompt[:, j:j + 1], j, cache).logits for j in range(290, 300)], dim=1)
        errs.append(((out - ref[:, 250:]).abs().max() / ref.abs().max()).item())
    assert errs[0] <= max(0.06, 1.5 * errs[1]), errs


@pytest.mark.parametrize("bf16_kernel", ["dot"], indirect=True)
def test_dot_attention_is_as_close_to_the_float32_reference_as_the_fma_path(bf16_kernel):
    """VDPBF16PS takes the queries and probabilities in bfloat16 (as AMX tiles do): the logits of a
    250-token prefill, a 40-token pass and 10 steps stay as close to transformers' float32 logits
    as the float32-product path's (bfloat16 noise), and differ from them (another kernel ran)."""
    hf = build_tiny_hf("llama", **_NATIVE)
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 300))
    with torch.no_grad():
        ref = hf(prompt).logits
    m = _ours(hf, torch.bfloat16)
    errs, outs = [], []
    for on in (True, False):
        native.set_dot(on)
        cache = m.new_cache(310)
        m.forward(prompt[:, :250], 0, cache, logits=False)
        out = torch.cat([m.forward(prompt[:, 250:290], 250, cache).logits]
                        + [m.forward(prompt[:, j:j + 1], j, cache).logits for j in range(290, 300)], dim=1)
        outs.append(out)
        errs.append(((out - ref[:, 250:]).abs().max() / ref.abs().max()).item())
    assert not torch.equal(outs[0], outs[1])
    assert errs[0] <= max(0.06, 1.5 * errs[1]), errs


def test_dot_attention_is_chosen_by_the_measured_issue_rates(monkeypatch):
    """By default the VDPBF16PS attention runs where that instruction issues at >= 0.6x the FMA
    rate (measured once per process); KNAPSPEC_DOT=0/1 and set_dot decide over the measurement."""
    _need(torch.bfloat16)
    d, f = native.dot_rates()
    assert d > 0 and f > 0
    monkeypatch.delenv("KNAPSPEC_DOT", raising=False)
    try:
        native.set_dot(None)
        for rates, want in (((3.6, 3.6), True), ((1.9, 7.5), False), ((2.3, 3.6), True)):
            monkeypatch.setattr(native, "_dot_rates", [rates])
            assert native.dot() is want, rates
        monkeypatch.setattr(native, "_dot_rates", [(1.9, 7.5)])
        monkeypatch.setenv("KNAPSPEC_DOT", "1")
        assert native.dot() is True
        monkeypatch.setenv("KNAPSPEC_DOT", "0")
        monkeypatch.setattr(native, "_dot_rates", [(3.6, 3.6)])
        assert native.dot() is False
        assert native.set_dot(True) is True
    finally:
        monkeypatch.undo()
        native.set_dot(None)


def _pass_equals_steps(kind: str, dtype: torch.dtype, cfg: dict, odd_capacity: bool = False) -> None:
    m = _ours(build_tiny_hf(kind, **cfg), dtype)
    torch.manual_seed(3)
    toks = torch.randint(3, 128, (1, 600))
    for p in (5, 250, 507):
        for plan in (None, Plan((True, False, True, True, False, True))):
            ca, cb = m.new_cache(p + 16), m.new_cache(640)
            if odd_capacity:       # Model.new_cache rounds up to whole 64-key spans; this does not
                ca = KVCache(n_layers=m.cfg.n_layers, n_kv_heads=m.cfg.n_kv_heads, head_dim=m.cfg.head_dim,
                             capacity=p + 11, dtype=m.dtype, native=True)
            for cache in (ca, cb):
                m.forward(toks[:, :p], 0, cache, logits=False)
            steps = [m.forward(toks[:, p + j:p + j + 1], p + j, ca, plan, capture=True) for j in range(10)]
            hidden = torch.cat([s.hidden for s in steps], dim=2)
            logits = torch.cat([s.logits for s in steps], dim=1)
            for width in range(2, 11):
                out = m.forward(toks[:, p:p + width], p, cb, plan, capture=True)
                assert torch.equal(out.hidden, hidden[:, :, :width]), (p, width, plan)
                assert torch.equal(out.logits, logits[:, :width]), (p, width, plan)


def test_native_sublayers_step_aside_for_a_replaced_weight_and_a_full_cache():
    _need(torch.float32)
    hf = build_tiny_hf("llama", **_NATIVE)
    m, ref = _ours(hf), Model.from_hf_tensors(ModelConfig.from_hf(hf.config.to_dict()),
                                              {k: v.detach().clone() for k, v in hf.state_dict().items()})
    m.layers[1].w_down = m.layers[1].w_down * 0.5
    ref.layers[1].w_down = ref.layers[1].w_down * 0.5
    assert m._native_layer(1) is None and m._native_layer(0) is not None
    prompt = torch.randint(3, 128, (1, 20))
    a = m.forward(prompt, 0, m.new_cache(32)).logits
    b = ref.forward(prompt, 0, ref.new_cache(32)).logits
    assert (a - b).abs().max() <= 1e-4
    cache = m.new_cache(20)
    with pytest.raises(ValueError, match="KV cache is full"):
        m.forward(torch.randint(3, 128, (1, 21)), 0, cache)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_native_bfloat16_is_as_close_to_the_float32_reference_as_the_torch_path(kind):
    """bfloat16 (keys, values and activations in bfloat16, scores and probabilities in float32):
    the logits of a 250-token prefill (native attention) stay within bfloat16 noise of
    transformers' float32 logits, like the oneDNN / torch path's (measured relative max errors
    0.02-0.04 for both)."""
    _need(torch.bfloat16)
    hf = build_tiny_hf(kind, **_NATIVE)
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 250))
    with torch.no_grad():
        ref = hf(prompt).logits
    ours = _ours(hf, torch.bfloat16)
    torch_path = _ours(hf, torch.bfloat16)
    torch_path.pack_weights(False)
    errs = []
    for m in (ours, torch_path):
        out = m.forward(prompt, 0, m.new_cache(260)).logits
        errs.append(((out - ref).abs().max() / ref.abs().max()).item())
    assert errs[0] <= max(0.06, 1.5 * errs[1]), errs


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_attention_layouts_follow_every_write(kind, dtype):
    """A cache made for the native attention holds its layout alone (cache.py: the keys once; in
    float32 the values in torch's layout, which the kernel reads); torch's layout is made from it
    the first time torch's attention reads the cache, and from then on both stay equal whoever
    writes: native steps, then a 520-token chunk through torch's attention (KVCache.write), then
    native steps again (a new table of pointers), which must also match transformers in float32."""
    _need(dtype)
    hf = build_tiny_hf(kind, **_NATIVE)
    m = _ours(hf, dtype)
    torch.manual_seed(5)
    toks = torch.randint(3, 128, (1, 536))
    cache = m.new_cache(537)                   # neither a multiple of 16 nor of 2
    m.forward(toks[:, :10], 0, cache)          # native
    assert cache.kt is not None and cache.k is None
    assert (cache.vt is not None) == (dtype == torch.bfloat16) == (cache.v is None)
    one = cache.nbytes()
    m.forward(toks[:, 10:530], 10, cache)      # torch's attention: torch's layout made, then written
    assert cache.k is not None and cache.v is not None
    assert cache.nbytes() > (1.9 if dtype == torch.bfloat16 else 1.4) * one      # (blocks are padded)
    for p in range(530, 536):
        out = m.forward(toks[:, p:p + 1], p, cache)
    fresh = type(cache)(n_layers=len(cache.k), n_kv_heads=cache.k[0].shape[1],
                        head_dim=cache.k[0].shape[3], capacity=cache.capacity, dtype=dtype)
    for i in range(len(cache.k)):
        fresh.k[i].copy_(cache.k[i])
        fresh.v[i].copy_(cache.v[i])
    fresh.native_layout()
    for a, b in zip(cache.kt + (cache.vt or []), fresh.kt + (fresh.vt or [])):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        with torch.no_grad():
            ref = hf(toks).logits[:, -1]
        assert (out.logits[:, -1] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_stack_equals_the_sublayers_one_by_one(dtype):
    """The whole stack in one native call gives the bits of the sublayers called one by one (the
    path a forward that captures hidden states takes), with and without a plan; its pointer table
    follows a replaced weight and a new packing."""
    _need(dtype)
    hf = build_tiny_hf("qwen3", **_NATIVE)
    m = _ours(hf, dtype)
    torch.manual_seed(7)
    toks = torch.randint(3, 128, (1, 40))
    for plan in (None, Plan((True, False, True, True, False, True))):
        a, b = m.new_cache(48), m.new_cache(48)
        for s, e in ((0, 30), (30, 31), (31, 36)):
            x = m.forward(toks[:, s:e], s, a, plan)
            y = m.forward(toks[:, s:e], s, b, plan, capture=True)
            assert torch.equal(x.logits, y.logits)
            assert a.k is None and b.k is None                # the native layout alone
            for i in range(len(a.kt)):
                assert torch.equal(a.kt[i], b.kt[i])
                assert torch.equal(*(c.v[i][:, :, :e] if c.vt is None else c.vt[i] for c in (a, b)))
    cache = m.new_cache(48)
    first = m.forward(toks[:, :30], 0, cache).logits
    m.layers[1].mlp_norm = m.layers[1].mlp_norm * 2          # a replaced tensor: a new table
    cache.rollback(0)
    second = m.forward(toks[:, :30], 0, cache).logits
    assert not torch.equal(first, second)
    m.layers[1].mlp_norm = m.layers[1].mlp_norm / 2
    m.pack_weights(True, kernels="native")                   # new packs: a new table
    cache.rollback(0)
    assert torch.equal(m.forward(toks[:, :30], 0, cache).logits, first)


@pytest.mark.parametrize("head_dim", [160, 256])
def test_native_heads_wider_than_128_match_transformers_and_passes_equal_steps(head_dim):
    """Gemma 3's heads of 256 dimensions (and 160): the values run in passes of 128 dimensions.
    float32 logits against transformers over a 300-token prefill (window 8, two 256-key chunks) and
    steps; bfloat16 passes equal one-token steps bit for bit."""
    _need(torch.float32)
    hf = build_tiny_hf("gemma3", head_dim=head_dim, max_position_embeddings=700)
    ours = _ours(hf)
    torch.manual_seed(2)
    toks = torch.randint(3, 128, (1, 310))
    with torch.no_grad():
        ref = hf(toks).logits
    cache = ours.new_cache(320)
    out = ours.forward(toks[:, :300], 0, cache).logits
    steps = [ours.forward(toks[:, 300 + j:301 + j], 300 + j, cache).logits for j in range(10)]
    assert (torch.cat([out] + steps, dim=1) - ref).abs().max() <= 1e-4
    if native.available(torch.bfloat16) is None:
        m = _ours(hf, torch.bfloat16)
        ca, cb = m.new_cache(320), m.new_cache(400)
        for c in (ca, cb):
            m.forward(toks[:, :300], 0, c, logits=False)
        one = torch.cat([m.forward(toks[:, 300 + j:301 + j], 300 + j, ca).logits for j in range(8)], dim=1)
        assert torch.equal(m.forward(toks[:, 300:308], 300, cb).logits, one)


def test_prompts_take_the_amx_attention_and_every_strategy_still_equals_autoregressive(monkeypatch):
    """By default prompts (engine.prefill) take the AMX attention where the CPU has it, and
    decoding keeps the AVX-512 one: a 300-token prompt's logits stay within bfloat16 noise of the
    AVX-512 prefill's, and drafts verified on the same prefill give the autoregressive tokens.
    KNAPSPEC_AMX=0 keeps prompts off AMX too."""
    from knapspec.engine import Engine, prefill
    from knapspec.strategies.static import StaticStrategy
    _need(torch.bfloat16)
    native.set_amx(None)
    monkeypatch.delenv("KNAPSPEC_AMX", raising=False)
    if not native.amx_prompts():
        pytest.skip("no AMX tiles on this CPU / OS")
    assert not native.amx()
    m = _ours(build_tiny_hf("llama", **_NATIVE), torch.bfloat16)
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (300,)).tolist()
    calls = []
    mod = native._module()
    orig = mod.stack
    monkeypatch.setattr(mod, "stack", lambda *a: (calls.append((a[3], a[-1])), orig(*a))[1])
    amx_out = prefill(m, ids, m.new_cache(320)).logits
    assert calls == [(300, 1)]                    # the prompt's pass asked for AMX
    monkeypatch.setenv("KNAPSPEC_AMX", "0")
    assert not native.amx_prompts()
    avx_out = prefill(m, ids, m.new_cache(320)).logits
    assert calls[-1] == (300, -1)
    assert not torch.equal(amx_out, avx_out)      # two kernels ...
    assert ((amx_out - avx_out).abs().max() / avx_out.abs().max()).item() < 0.05   # ... both close
    monkeypatch.delenv("KNAPSPEC_AMX")
    eng = Engine(m)
    n = len(calls)
    ref = eng.generate(ids, max_new_tokens=24).tokens
    assert calls[n] == (300, 1) and all(c == (1, -1) for c in calls[n + 1:])   # decoding: the process's kernel
    for plan in (Plan((True, False, True, True, False, True)), Plan((False, True, True, True, True, False))):
        out = eng.generate(ids, StaticStrategy(plan, max_draft=4, threshold=0.0), max_new_tokens=24)
        assert out.tokens == ref and out.stats.drafted > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_final_norm_is_row_invariant_and_within_a_last_place_of_the_torch_norm(dtype):
    """``native.rms_norm`` (the head's norm where the stack runs natively): each row's bits the
    same alone or among others, and within a few units in the last place of ``model.rms_norm``
    (the sum of squares is taken in another order: float32 moves by a few ulps, bfloat16 by at
    most the one its rounding of the normalised value can flip)."""
    _need(dtype)
    from knapspec.model import rms_norm
    torch.manual_seed(4)
    x = (torch.randn(9, 576) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    w = (torch.rand(576) * 2).to(dtype)
    got = native.rms_norm(x[None], w, 1e-5)[0]
    for i in range(9):
        assert torch.equal(native.rms_norm(x[i:i + 1], w, 1e-5), got[i:i + 1])
    want = rms_norm(x, w, 1e-5)
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((got.float() - want.float()).abs() <= (2 if dtype == torch.bfloat16 else 8) * ulp).all()


def test_the_head_takes_the_native_norm_where_the_stack_runs_natively(monkeypatch):
    """A model on the native stack normalises every head call natively (no torch kernel for it),
    a model on the torch path with torch's norm."""
    _need(torch.bfloat16)
    import knapspec.model as km
    calls = {"native": 0, "torch": 0}
    nat, tor = native.rms_norm, km.rms_norm
    monkeypatch.setattr(native, "rms_norm", lambda *a: (calls.__setitem__("native", calls["native"] + 1), nat(*a))[1])
    hf = build_tiny_hf("llama", **_NATIVE)
    m = _ours(hf, torch.bfloat16)
    toks = torch.randint(3, 128, (1, 5))
    m.forward(toks, 0, m.new_cache(16))
    m.forward(toks, 0, m.new_cache(16), capture=True)               # a torch-path pass: the same norm
    assert calls["native"] == 2
    monkeypatch.setattr(km, "rms_norm", lambda *a: (calls.__setitem__("torch", calls["torch"] + 1), tor(*a))[1])
    m.pack_weights(False)
    m.forward(toks, 0, m.new_cache(16))
    assert calls["native"] == 2 and calls["torch"] >= 1


@pytest.mark.parametrize("kernel,dtype", [("fma", torch.bfloat16), ("avx512", torch.float32),
                                          ("dot", torch.bfloat16),
                                          ("amx", torch.bfloat16)])     # AMX serves bfloat16 caches
def test_attention_in_token_batches_gives_the_same_bits(kernel, dtype, request):
    """A pass whose partial results would outgrow the attention's budget is taken in batches of
    tokens: a 300-token prompt and a 7-token pass with a draft window (sink work items) give the
    same bits with batches of 1, 5 and all tokens."""
    _need(dtype)
    if dtype == torch.bfloat16:
        _set_bf16_kernel(kernel, request)
    mod = native._module()
    hf = build_tiny_hf("qwen3", **_NATIVE)
    m = _ours(hf, dtype)
    toks = torch.randint(3, 128, (1, 307))
    plan = Plan.from_options([16, 1, 64, 0, 1, 1])      # windows of 16 and 64 keys, an MLP skipped
    assert m.cfg.n_layers == 3
    outs = []
    try:
        # all tokens at once; one at a time; 5 (2 KV heads x 2 chunks x 2 rows x 34 floats a token)
        for budget in (0, 1, 5 * 2 * 2 * 2 * (32 + 2) * 4):
            mod.set_partial_bytes(budget)
            cache = m.new_cache(320)
            a = m.forward(toks[:, :300], 0, cache)
            b = m.forward(toks[:, 300:], 300, cache, plan)
            outs.append((a.logits, b.logits))
    finally:
        mod.set_partial_bytes(0)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])
