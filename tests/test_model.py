"""The forward equals transformers' reference implementation for every supported architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, assert_steps_equal_hf, build_tiny_hf
from knapspec.model import Model, ModelConfig
from knapspec.plan import Plan


def ours_from_hf(hf) -> Model:
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    return Model.from_hf_tensors(cfg, {k: v.detach().clone() for k, v in hf.state_dict().items()})


@pytest.mark.parametrize("kind", sorted(TINY))
def test_logits_match_transformers_prefill_and_decode(kind):
    hf = build_tiny_hf(kind)
    ours = ours_from_hf(hf)
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 12))
    cache = ours.new_cache(64)
    assert_steps_equal_hf(hf, ours, prompt, cache, steps=20)
    assert cache.length == 32


def test_config_parsing_variants():
    hf = build_tiny_hf("mistral")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.sliding_window == (8, 8, 8)
    q3 = ModelConfig.from_hf(build_tiny_hf("qwen3").config.to_dict())
    assert q3.qk_norm and q3.head_dim == 32 and not q3.qkv_bias
    q2 = ModelConfig.from_hf(build_tiny_hf("qwen2").config.to_dict())
    assert q2.qkv_bias and q2.tie_embeddings
    l3 = ModelConfig.from_hf(build_tiny_hf("llama3").config.to_dict())
    assert dict(l3.rope_scaling)["rope_type"] == "llama3"
    # the older transformers 4.x layout: rope_theta + rope_scaling at top level
    old = dict(hf.config.to_dict(), model_type="llama", rope_theta=1e4, rope_parameters=None,
               rope_scaling={"type": "linear", "factor": 2.0})
    assert dict(ModelConfig.from_hf(old).rope_scaling)["factor"] == 2.0
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        ModelConfig.from_hf(dict(hf.config.to_dict(), rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))


def test_capture_returns_residual_after_every_sublayer_and_plan_skips_are_identity():
    hf = build_tiny_hf("llama")
    m = ours_from_hf(hf)
    toks = torch.randint(3, 128, (1, 6))
    full = m.forward(toks, 0, m.new_cache(16), capture=True)
    n = 2 * m.cfg.n_layers
    assert full.hidden.shape == (n + 1, 1, 6, 64)
    torch.testing.assert_close(full.hidden[-1], full.last_hidden)
    # skipping sublayer s leaves the stream unchanged across it
    plan = Plan.from_skips(m.cfg.n_layers, attn=[1], mlp=[0])
    part = m.forward(toks, 0, m.new_cache(16), plan, capture=True)
    torch.testing.assert_close(part.hidden[2], part.hidden[1])     # m0 skipped
    torch.testing.assert_close(part.hidden[3], part.hidden[2])     # a1 skipped
    torch.testing.assert_close(part.hidden[1], full.hidden[1])     # a0 ran in both


def test_sublayer_without_write_matches_batched_branches():
    """write=False: B branches share the prefix KV and attend causally within their own tokens."""
    m = ours_from_hf(build_tiny_hf("qwen2"))
    prefix = torch.randint(3, 128, (1, 10))
    cache = m.new_cache(32)
    m.forward(prefix, 0, cache)
    x = torch.randn(3, 4, 64)
    out = m.sublayer(0, x, 10, cache, write=False)
    assert cache.length == 10
    for b in range(3):   # each branch alone, written into a scratch copy of the cache
        c2 = m.new_cache(32)
        m.forward(prefix, 0, c2)
        ref = m.sublayer(0, x[b:b + 1], 10, c2)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["native", "onednn"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])   # untied / tied head; qkv bias
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.02), (torch.float32, 1e-5)])
def test_packed_kernels_match_plain_linear(kind, dtype, tol, kernels):
    """On CPU the linear layers use prepacked products where supported (knapspec's native kernels or
    oneDNN's); they must compute the same layer as ``F.linear`` (to the dtype's rounding) for 1..10
    rows, and a weight replaced after packing must fall back to the plain product, never a stale
    packed copy."""
    from knapspec import native
    plain = ours_from_hf(build_tiny_hf(kind)).to(dtype)
    packed = ours_from_hf(build_tiny_hf(kind)).to(dtype)
    if kernels == "native" and native.available(dtype) is not None:
        pytest.skip(f"native kernels unavailable here: {native.available(dtype)}")
    if not packed.pack_weights(kernels=kernels):
        pytest.skip(f"this CPU's oneDNN has no {dtype} kernels; plain F.linear is used")
    assert not plain.packed and packed.kernels == kernels
    torch.manual_seed(2)
    prompt = torch.randint(3, 128, (1, 10))
    c_plain, c_packed = plain.new_cache(64), packed.new_cache(64)
    pos = 0
    for width in (10, 1, 3, 8, 1):
        toks = prompt[:, :width]
        a = plain.forward(toks, pos, c_plain).logits
        b = packed.forward(toks, pos, c_packed).logits
        assert (a - b).abs().max() <= tol * a.abs().max(), f"width {width}"
        pos += width
    # a weight replaced after packing: the packed copy of the old one must not be used
    packed.layers[1].w_down = packed.layers[1].w_down * 0.0
    plain.layers[1].w_down = plain.layers[1].w_down * 0.0
    a = plain.forward(prompt, 0, c_plain).logits
    b = packed.forward(prompt, 0, c_packed).logits
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_load_packs_weights_unless_told_not_to(tmp_path):
    import knapspec
    from conftest import save_tiny
    folder = save_tiny("llama", tmp_path / "tiny")
    from knapspec import native
    onednn = torch.backends.mkldnn.is_available()
    bf16 = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    bf16 = bf16 or native.available(torch.bfloat16) is None
    onednn = onednn or native.available(torch.float32) is None
    assert knapspec.load(str(folder), dtype="bfloat16").model.packed is bf16
    assert knapspec.load(str(folder), dtype="bfloat16", pack=False).model.packed is False
    assert knapspec.load(str(folder), dtype="float32").model.packed is onednn
    assert knapspec.load(str(folder), dtype="float32", pack=False).model.packed is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_products_are_row_invariant_and_match_float64(dtype):
    """The native kernels give each row the same bits whatever the number of rows in the product (1..9,
    i.e. across the kernel's 4-row blocks) and agree with a float64 reference to the inputs'
    rounding; odd output widths (padded tiles) and a bias included."""
    from knapspec import native
    if native.available(dtype) is not None:
        pytest.skip(f"native kernels unavailable here: {native.available(dtype)}")
    torch.manual_seed(0)
    w = (torch.randn(200, 96) * 0.1).to(dtype)
    b = torch.randn(200).to(dtype)
    p = native.Packed(w, b)
    x = torch.randn(9, 96).to(dtype)
    full = native.linear(x, p, torch.float32)
    ref = x.double() @ w.double().T + b.double()
    assert (full.double() - ref).abs().max() < 1e-4
    for m in range(1, 10):
        for s in range(0, 10 - m):
            assert torch.equal(native.linear(x[s:s + m], p, torch.float32), full[s:s + m]), (m, s)
    if dtype == torch.bfloat16:   # rounded output: the float32 sums rounded to nearest even
        assert torch.equal(native.linear(x, p), full.to(torch.bfloat16))


# ---- windowed attention (drafts) ------------------------------------------------------------------
def _window_mask(n: int, window: int, sink: int, first: int = 0) -> torch.Tensor:
    """Additive ``[1, 1, n, n]``: causal, and each query from position ``first`` on sees the first
    ``sink`` positions and its last ``window``."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    ok = (k <= q) & ((k < sink) | (k > q - window) | (q < first))
    return torch.zeros(n, n).masked_fill(~ok, float("-inf"))[None, None]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_windowed_attention_matches_transformers_with_a_sink_and_window_mask(kind):
    """Every attention sublayer windowed to W keys plus the sink equals transformers' model run
    with that attention mask (one pass, and a pass after a prefix in the cache, on the torch path)."""
    from knapspec.plan import SINK
    hf = build_tiny_hf(kind)
    ours = ours_from_hf(hf)
    n, w = 40, 7
    plan = Plan.parse(",".join(f"a{i}w{w}" for i in range(ours.cfg.n_layers)), ours.cfg.n_layers)
    assert plan.attn_windowed == {i: w for i in range(ours.cfg.n_layers)} and str(Plan.parse(str(plan), 3)) == str(plan)
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids, attention_mask=_window_mask(n, w, SINK)).logits
        out = ours.forward(ids, 0, ours.new_cache(64), plan).logits
        assert (ref - out).abs().max() <= 1e-4
        # a draft's pass over positions 30.. after a prefix the full model wrote into the cache
        cache = ours.new_cache(64)
        ours.forward(ids[:, :30], 0, cache)
        ref = hf(ids, attention_mask=_window_mask(n, w, SINK, first=30)).logits[:, 30:]
        out = ours.forward(ids[:, 30:], 30, cache, plan).logits
        assert (ref - out).abs().max() <= 1e-4


def test_windowed_plan_runs_the_same_natively_as_on_the_torch_path(tiny_root):
    """The native stack's draft windows (sink + last W keys) agree with the torch path's windowed
    attention on the same bfloat16 weights, up to bfloat16 rounding, at every window size."""
    from conftest import tiny_model
    m = tiny_model("llama", tiny_root, "native-bf16")
    L = m.cfg.n_layers
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(5))
    for w in (2, 5, 16, 40, 200):
        plan = Plan.parse(f"a0w{w},a2w{w},m1", L)
        cache = m.new_cache(128)
        m.forward(ids[:, :100], 0, cache)
        got = m.forward(ids[:, 100:103], 100, cache, plan).logits              # one native call
        cache.rollback(100)
        with torch.inference_mode():
            x = m.embed_tokens(ids[:, 100:103])
            for s in range(2 * L):                                             # torch attention
                if plan.run[s]:
                    x = (m.attention(s // 2, x, 100, cache, window=plan.window_of(s)) if s % 2 == 0
                         else m.mlp(s // 2, x))
            want = m.head(x)
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), w
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or w < 8


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen3", "gemma3"])
def test_rotary_frequencies_and_tables_within_a_last_place_of_transformers(kind):
    """The inverse frequencies (numpy: the power in float64, rounded) against transformers'
    buffers (default, llama3 scaling, Gemma 3's two bases), and the tables' cosines and sines
    (float64 of the float32 angles, rounded once) against torch's float32 functions."""
    from knapspec.config import rope_inv_freq
    from knapspec.rope import RotaryTable
    hf = build_tiny_hf(kind)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    rot = hf.model.rotary_emb
    pairs = [(rope_inv_freq(cfg), getattr(rot, "inv_freq", None))]
    if kind == "gemma3":
        pairs = [(rope_inv_freq(cfg), rot.full_attention_inv_freq),
                 (rope_inv_freq(cfg, local=True), rot.sliding_attention_inv_freq)]
    for ours, theirs in pairs:
        assert ours.dtype == np.float32
        theirs = theirs.float().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=2.0 ** -23, atol=0)
        table = RotaryTable(ours, dtype=torch.float32, device="cpu")
        cos, sin = table.native(0, 3000)
        angles = torch.outer(torch.arange(3000, dtype=torch.float32), torch.from_numpy(ours))
        for got, ref in ((cos, angles.cos()), (sin, angles.sin())):      # within one float32 ulp of torch's
            ulp = np.spacing(np.abs(ref.numpy()))
            assert (np.abs(got.numpy() - ref.numpy()) <= ulp).all()
        tcos, tsin = table.torch(5, 7)                    # the half-split layout, sine signed
        torch.testing.assert_close(tcos, torch.cat([cos[5:12], cos[5:12]], -1), rtol=0, atol=0)
        torch.testing.assert_close(tsin, torch.cat([-sin[5:12], sin[5:12]], -1), rtol=0, atol=0)
