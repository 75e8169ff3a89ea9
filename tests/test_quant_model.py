"""Models with quantized weights (GGUF block types kept as they are): tiny GGUF files written here,
every strategy's greedy output equal to its own autoregressive output, sampling exact, the fused
stack equal to the sublayers one by one, passes equal to one-token steps, both instruction-set
paths; a type without a kernel dequantised or refused in one line; the embedded model on real
prompts."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_GGUF, spec_bench, tiny_gguf_model, write_tiny_gguf
from knapspec import native
from knapspec.checkpoint import GGUFCheckpoint
from knapspec.engine import Engine
from knapspec.formats import QuantWeight
from knapspec.latency import LatencyModel
from knapspec.plan import Plan
from knapspec.strategies import REGISTRY
from knapspec.strategies.draft_verify import DraftVerifyStrategy
from knapspec.strategies.hybrid import HybridStrategy
from knapspec.strategies.knapspec import KnapSpecStrategy
from knapspec.strategies.knn_ssd import KNNSSDStrategy
from knapspec.strategies.lookup import PromptLookupStrategy
from knapspec.strategies.static import StaticStrategy
from knapspec.strategies.swift import SWIFTStrategy
from knapspec.strategies.vocab import DraftVocab

pytestmark = pytest.mark.skipif(native.quant_available() is not None,
                                reason=f"native quantized products unavailable: {native.quant_available()}")

KINDS = sorted(TINY_GGUF)


def _lat(n_layers: int) -> LatencyModel:
    return LatencyModel.analytic(n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=2e-2,
                                 width_factor=0.02)


def test_tiny_gguf_models_keep_their_block_types(tiny_root):
    m = tiny_gguf_model("mixed", tiny_root)
    assert m.quantized and m.kernels == "native"
    L = m.layers[0]
    assert isinstance(L.wqkv, tuple) and [p.qtype.name for p in L.wqkv] == ["Q5_0", "Q8_0"]
    assert L.wo.qtype.name == "Q4_K" and L.w_down.qtype.name == "Q6_K" and L.w_gate_up.qtype.name == "Q4_0"
    assert m.embed.qtype.name == "Q6_K" and m.lm_head.qtype.name == "Q4_1"
    q = tiny_gguf_model("q4_1", tiny_root)
    assert isinstance(q.layers[0].wqkv, QuantWeight) and q.lm_head is q.embed and q.embed.qtype.name == "Q8_0"
    assert m._native_sublayers == (native.isa() == "avx512" and native.available(torch.bfloat16) is None)


def _quant_weights(m) -> list:
    ws = [m.embed, m.lm_head]
    for L in m.layers:
        for w in (L.wqkv, L.wo, L.w_gate_up, L.w_down):
            ws += list(w) if isinstance(w, tuple) else [w]
    return ws


@pytest.mark.parametrize("kind", KINDS)
def test_weights_packed_a_few_rows_at_a_time_equal_weights_packed_whole(kind, tiny_root, monkeypatch):
    """Loading packs each weight a slice of rows at a time, releasing the file's pages of each
    slice: with slices of one tile (16 rows) the tiles are those of whole-tensor packing."""
    from knapspec import checkpoint, formats
    from knapspec.gguffile import GGUFFile
    path = tiny_root / f"tiny-{kind}.gguf"
    whole = tiny_gguf_model(kind, tiny_root)          # writes the file too
    calls = []
    release = GGUFFile.release_bytes
    monkeypatch.setattr(GGUFFile, "release_bytes", lambda self, o, n: (calls.append((o, n)), release(self, o, n)))
    monkeypatch.setattr(checkpoint, "_PACK_CHUNK", 1)
    sliced = GGUFCheckpoint(path, kind).load_model(dtype=torch.bfloat16)
    emb = GGUFCheckpoint(path, kind).open().tensors["token_embd.weight"]
    slice_bytes = formats.LANES * emb.nbytes // emb.rows
    assert [o for o, n in calls if n == slice_bytes and emb.offset <= o < emb.offset + emb.nbytes] == \
        list(range(emb.offset, emb.offset + emb.nbytes, slice_bytes))       # released slice by slice
    a, b = _quant_weights(whole), _quant_weights(sliced)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.qtype == y.qtype and x.n == y.n and torch.equal(x.tiles, y.tiles)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_released_bytes_of_a_gguf_file_leave_the_resident_set():
    from knapspec.checkpoint import resolve
    from knapspec.gguffile import GGUFFile
    ck = resolve(None)
    g = GGUFFile(ck.path)
    t = g.tensors["token_embd.weight"]              # ~30 MB
    int(g.data(t.name).sum(dtype=np.uint64))        # every page read
    before = _mapped_rss_kb(ck.path.resolve())
    assert before * 1024 >= t.nbytes * 0.9
    g.release_bytes(t.offset, t.nbytes // 2)
    half = _mapped_rss_kb(ck.path.resolve())
    assert (before - half) * 1024 >= t.nbytes // 2 - 2 * 4096
    g.release(t.name)
    assert _mapped_rss_kb(ck.path.resolve()) * 1024 < t.nbytes * 0.1
    g.close()


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_logits_follow_the_dequantised_model(kind, tiny_root):
    """The same file dequantised (float32 weights and activations) gives nearly the same logits:
    what differs is the activations' int8 quantization and bfloat16."""
    path = tiny_root / f"tiny-{kind}.gguf"
    q = tiny_gguf_model(kind, tiny_root)
    f = GGUFCheckpoint(path, kind).load_model(dtype=torch.float32, quantized=False)
    assert not f.quantized
    toks = torch.randint(3, TINY_GGUF[kind]["vocab"], (1, 40), generator=torch.Generator().manual_seed(0))
    a = q.forward(toks, 0, q.new_cache(48)).logits
    b = f.forward(toks, 0, f.new_cache(48)).logits
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 0.05, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_passes_equal_one_token_steps_and_the_stack_equals_the_sublayers(kind, dtype, tiny_root):
    m = tiny_gguf_model(kind, tiny_root, dtype)
    torch.manual_seed(3)
    toks = torch.randint(3, TINY_GGUF[kind]["vocab"], (1, 300))
    for p in (5, 250):
        for plan in (None, Plan((True, False, True, True, False, True))):
            ca, cb, cc = m.new_cache(p + 16), m.new_cache(320), m.new_cache(320)
            for cache in (ca, cb, cc):
                m.forward(toks[:, :p], 0, cache, logits=False)
            steps = [m.forward(toks[:, p + j:p + j + 1], p + j, ca, plan, capture=True) for j in range(8)]
            logits = torch.cat([s.logits for s in steps], dim=1)
            for width in (2, 5, 8):
                out = m.forward(toks[:, p:p + width], p, cb, plan)          # the fused stack
                assert torch.equal(out.logits, logits[:, :width]), (p, width, plan)
                cap = m.forward(toks[:, p:p + width], p, cc, plan, capture=True)   # sublayers one by one
                assert torch.equal(cap.logits, logits[:, :width]), (p, width, plan)


def _strategies(m, d: int, skipped: set[int], ranking: list[int]):
    n = m.cfg.n_layers
    plan = Plan.from_sublayer_skips(n, skipped)
    vocab = DraftVocab(m, ranking, sizes=(8, 32))
    return {
        "static": StaticStrategy(plan, max_draft=d, threshold=0.0),
        "lookup": PromptLookupStrategy(max_draft=d),
        "clasp": REGISTRY.create("clasp", m, max_draft=d, skip_layers=1),
        "early-exit": REGISTRY.create("early-exit", m, max_draft=d),
        "del": REGISTRY.create("del", m, max_draft=d, latency=_lat(n)),
        "knapspec": KnapSpecStrategy(m, _lat(n), min_cosine=-1.0, every=2, d_max=d),
        "hybrid": HybridStrategy(m, _lat(n), alpha="cosine", min_cosine=0.0, every=2, d_max=d,
                                 plan_after=0, draft_vocab=vocab),
        "swift": SWIFTStrategy(m, skip_ratio=0.4, window=8, batch=2, max_trials=4, d_max=d, seed=0),
        "draft-verify": DraftVerifyStrategy(plan, d_max=d, threshold=0.0),
        "knn-ssd": KNNSSDStrategy(np.eye(2, m.cfg.hidden_size), [plan, Plan.from_sublayer_skips(n, [2])], d_max=d),
    }


def test_every_strategy_is_tested_here(tiny_root):
    m = tiny_gguf_model("q4_1", tiny_root)
    names = set(_strategies(m, 2, {1}, list(range(m.cfg.vocab_size))))
    assert names | {"autoregressive"} == set(REGISTRY.names())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_greedy_every_strategy_equals_autoregressive(kind, tiny_root, data):
    m = tiny_gguf_model(kind, tiny_root)
    eng = Engine(m)
    base = data.draw(st.lists(st.integers(3, m.cfg.vocab_size - 1), min_size=1, max_size=8), label="base")
    prompt = (base * 4)[:data.draw(st.integers(1, 30), label="len")]
    n_new = data.draw(st.integers(1, 24), label="max_new_tokens")
    ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
    n = m.cfg.n_layers
    d = data.draw(st.integers(1, 6), label="d")
    skipped = data.draw(st.sets(st.integers(1, 2 * n - 1), min_size=1, max_size=2 * n - 2), label="skip")
    ranking = data.draw(st.permutations(list(range(m.cfg.vocab_size))), label="ranking")
    for name, strat in _strategies(m, d, skipped, ranking).items():
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,), threshold=0.0)
        assert got.tokens == ref, name


def test_the_avx2_path_is_lossless_too(tiny_root, monkeypatch):
    """With the quantized products on AVX2 the model runs the torch sublayers (the fused ones are
    AVX-512): speculative output still equals autoregressive output."""
    from knapspec.native import _ISAS, _cpu_flags
    if not all(f in _cpu_flags() for f in _ISAS["avx2"]):
        pytest.skip("this CPU lacks AVX2")
    path = tiny_root / "tiny-mixed.gguf"
    if not path.is_file():
        write_tiny_gguf("mixed", path)
    native.set_isa("avx2")
    try:
        m = GGUFCheckpoint(path, "mixed").load_model(dtype=torch.bfloat16)
        m.pack_weights()
        m.set_row_invariant(True)
        assert m.kernels == "native" and not m._native_sublayers
        eng = Engine(m)
        prompt = [5, 6, 7, 8, 9] * 4
        ref = eng.generate(prompt, max_new_tokens=20, stop_ids=()).tokens
        for strat in (StaticStrategy(Plan.from_sublayer_skips(3, [1, 4]), max_draft=4, threshold=0.0),
                      PromptLookupStrategy(max_draft=5)):
            assert eng.generate(prompt, strat, max_new_tokens=20, stop_ids=(), threshold=0.0).tokens == ref
    finally:
        native.set_isa(None)


def test_speculative_sampling_is_exact_with_quantized_weights(tmp_path):
    """A 12-token vocabulary: the joint distribution of generated tokens 2 and 3 drawn in
    speculative rounds (a poor draft, a truncated draft vocabulary in the lm_head's block type)
    against the exact autoregressive distribution: chi-square over 8k samples."""
    from knapspec.sampling import SamplingParams
    from knapspec.strategies import Draft
    from test_engine import _chi2, _exact_joint
    TINY_GGUF["vocab12"] = dict(TINY_GGUF["q4_1"], vocab=12, layers=2)
    try:
        path = write_tiny_gguf("vocab12", tmp_path / "v12.gguf", seed=3)
    finally:
        del TINY_GGUF["vocab12"]
    m = GGUFCheckpoint(path, "v12").load_model(dtype=torch.bfloat16)
    m.pack_weights()
    sp = SamplingParams(temperature=1.0, seed=13)
    prompt, V = [3, 7, 1], 12
    exact = _exact_joint(m, prompt, sp, 3).sum(axis=0)
    eng = Engine(m)
    poor = Plan.from_skips(2, attn=[0, 1], mlp=[1])
    ids = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    head = QuantWeight.empty(m.lm_head.qtype, len(ids), m.lm_head.k)
    head.copy_rows(np.arange(len(ids)), m.lm_head, ids.numpy())
    strat = StaticStrategy(poor, max_draft=2, threshold=0.0)
    strat.draft = Draft(plan=poor, max_len=2, threshold=0.0, head=head, head_ids=ids)
    n = 8000
    samples = np.empty(n, dtype=np.int64)
    drafted = accepted = 0
    for i in range(n):
        g = eng.generate(prompt, strat, max_new_tokens=3,
                         sampling=SamplingParams(temperature=1.0, seed=13 * 1_000_003 + i))
        samples[i] = g.tokens[1] * V + g.tokens[2]
        drafted += g.stats.drafted
        accepted += g.stats.accepted
    assert 0 < accepted < drafted
    assert _chi2(samples, exact) > 0.01


def test_the_draft_vocabularys_quantized_rows_are_the_lm_heads(tiny_root):
    """The subset's lm_head rows (the frequent ones, kept per size across generations, and the
    prompt's and output's other tokens) are the lm_head's rows tile byte for tile byte, in every
    generation and for a size that is not whole tiles."""
    m = tiny_gguf_model("q4_1", tiny_root)
    V = m.cfg.vocab_size
    ranking = [(37 * i + 5) % V for i in range(V)]
    vocab = DraftVocab(m, ranking, sizes=(16, 24, 32))
    for prompt in ([1, 2, 3, 90, 91], [7, 8, 120, 64, 65, 66]):
        vocab.start(prompt, capacity=8)
        for size in (16, 24, 32):
            vocab.select(size)
            vocab.commit([100, 101])
            head, ids = vocab.head()
            want = QuantWeight.empty(m.lm_head.qtype, len(ids), m.lm_head.k)
            want.copy_rows(np.arange(len(ids)), m.lm_head, ids.numpy())
            assert set(ids.tolist()) >= set(ranking[:size]) | set(prompt) | {100, 101}
            assert torch.equal(head.tiles, want.tiles), (prompt, size)
    kept = m.__dict__["_draft_head_rows"]                   # kept with the model, per size and ranking
    assert {size for size, _ in kept} >= {16, 32} and not any(size == 24 for size, _ in kept)
    n_kept = len(kept)
    for rank, more in ((ranking, 0), (ranking[::-1], 1)):   # the same ranking reuses its rows
        other = DraftVocab(m, rank, sizes=(16,))
        other.start([1, 2], capacity=4)
        other.select(16)
        head, ids = other.head()
        want = QuantWeight.empty(m.lm_head.qtype, len(ids), m.lm_head.k)
        want.copy_rows(np.arange(len(ids)), m.lm_head, ids.numpy())
        assert torch.equal(head.tiles, want.tiles) and len(kept) == n_kept + more


def test_a_type_without_a_kernel_is_dequantised_or_refused_in_one_line(tmp_path, caplog, monkeypatch):
    # Q5_1 (gguf can dequantise it): the fused gate/up weight is dequantised, with a warning
    TINY_GGUF["q51"] = dict(TINY_GGUF["q4_1"], types=dict(TINY_GGUF["q4_1"]["types"], up="Q5_1"))
    try:
        path = write_tiny_gguf("q51", tmp_path / "q51.gguf")
    finally:
        del TINY_GGUF["q51"]
    with caplog.at_level(logging.WARNING):
        m = GGUFCheckpoint(path, "q51").load_model(dtype=torch.bfloat16)
    assert "no native kernel for Q5_1" in caplog.text
    assert isinstance(m.layers[0].w_gate_up, torch.Tensor) and isinstance(m.layers[0].wqkv, QuantWeight)
    m.pack_weights()
    Engine(m).generate([5, 6, 7], max_new_tokens=4)
    # Q8_1 (nothing can dequantise it): one line naming the tensor and its type
    TINY_GGUF["q81"] = dict(TINY_GGUF["q4_1"], types=dict(TINY_GGUF["q4_1"]["types"], v="Q8_1"))
    try:
        path = write_tiny_gguf("q81", tmp_path / "q81.gguf")
    finally:
        del TINY_GGUF["q81"]
    with pytest.raises(ValueError, match=r"^tensor blk.0.attn_v.weight has type Q8_1, which knapspec can neither") as e:
        GGUFCheckpoint(path, "q81").load_model()
    assert "\n" not in str(e.value)


# ---- the embedded model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized():
    import knapspec
    llm = knapspec.load()               # --dtype auto: the file's block types
    assert llm.model.quantized
    return llm


def test_gguf_config_equals_transformers(quantized):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from knapspec.checkpoint import embedded_gguf
    from knapspec.config import ModelConfig
    theirs = ModelConfig.from_hf(AutoConfig.for_model(**load_gguf_checkpoint(str(embedded_gguf()))["config"]).to_dict(),
                                 name=quantized.model.cfg.name)
    assert quantized.model.cfg == theirs


@pytest.mark.slow
def test_embedded_quantized_strategies_equal_autoregressive_on_real_prompts(quantized):
    llm = quantized
    m = llm.model
    n = m.cfg.n_layers
    for row in spec_bench(2):
        ids = llm.encode(row["turns"][0], chat=True)
        ref = llm.engine.generate(ids, max_new_tokens=40).tokens
        strategies = [HybridStrategy(m, _lat(n), alpha="cosine", min_cosine=0.0, every=4),
                      PromptLookupStrategy(max_draft=6),
                      StaticStrategy(Plan.parse("a5,a9,a13,a17,a21,m27", n), max_draft=6, threshold=0.3)]
        for strat in strategies:
            got = llm.engine.generate(ids, strat, max_new_tokens=40)
            assert got.tokens == ref, (row["question_id"], type(strat).__name__)


def test_latency_profiles_of_quantized_and_dequantised_weights_are_kept_apart(tiny_root):
    from knapspec.latency import profile_key
    q = tiny_gguf_model("mixed", tiny_root)
    f = GGUFCheckpoint(tiny_root / "tiny-mixed.gguf", "mixed").load_model(dtype=torch.bfloat16, quantized=False)
    f.pack_weights()
    f.set_row_invariant(True)
    kq, kf = profile_key(q), profile_key(f)
    assert kq["weights"] == "Q4_0+Q4_1+Q4_K+Q5_0+Q6_K+Q8_0" and "weights" not in kf
    assert {k: v for k, v in kq.items() if k != "weights"} == kf


def test_without_avx2_a_gguf_is_dequantised_with_one_warning(tiny_root, monkeypatch, caplog):
    import knapspec
    path = tiny_root / "tiny-q4_1.gguf"
    if not path.is_file():
        write_tiny_gguf("q4_1", path)
    monkeypatch.setattr(native, "quant_available", lambda: "this CPU lacks AVX2 (with FMA and F16C)")
    with caplog.at_level(logging.WARNING):
        llm = knapspec.load(path)
    assert not llm.model.quantized and llm.model.dtype == torch.bfloat16
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "lacks AVX2" in warnings[0].getMessage()
    assert len(llm.generate([5, 6, 7], max_new_tokens=3, strategy="autoregressive").tokens) == 3


def test_a_conversion_parses_the_file_once_and_puts_the_reader_back(tiny_root, monkeypatch):
    """transformers opens a GGUF three times to convert it (config, tensors, tokenizer): while a
    conversion runs every opening of the same file, transformers' own included, gets one parsed
    reader; afterwards gguf's own class is back."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from knapspec.checkpoint import _one_gguf_reader
    path = write_tiny_gguf("q4_1", tiny_root / "shared-reader.gguf")
    parsed = []

    class Counted(gguf.GGUFReader):
        def __init__(self, *a, **k):
            parsed.append(a[0])
            super().__init__(*a, **k)
    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    with _one_gguf_reader():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert a is b and "token_embd.weight" in {t.name for t in a.tensors}
        for _ in range(2):                         # transformers' reader, as a conversion calls it
            assert load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert len(parsed) == 1
    assert gguf.GGUFReader is Counted and gguf.GGUFReader(path) is not a
