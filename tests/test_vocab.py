"""Draft-only vocabulary truncation: the subset, its coverage, the size chosen by TPT, and lossless
output (greedy here; exact sampling in test_engine.py)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from knapspec.engine import Engine
from knapspec.latency import LatencyModel
from knapspec.plan import Plan
from knapspec.strategies.base import Draft, Strategy
from knapspec.strategies.hybrid import HybridStrategy
from knapspec.strategies.knapspec import Choice
from knapspec.strategies.vocab import DraftVocab, rank_tokens, subset_agreement


def test_rank_tokens_by_frequency():
    assert rank_tokens([[5, 5, 7], [7, 5, 9]]) == [5, 7, 9]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.sampled_from([4, 40]))
def test_subset_agreement_counts_what_a_masked_argmax_per_size_counts(seed, k, levels):
    """The probe's per-size agreement equals its definition, a masked argmax per subset size, with
    ties to the lowest id as argmax breaks them (few logit levels: many ties)."""
    g = np.random.default_rng(seed)
    V, sizes = 64, (4, 8, 16, 32)
    logits = torch.from_numpy(g.integers(0, levels, size=(k, V)).astype(np.float32))
    targets = torch.from_numpy(np.where(g.random(k) < 0.5, logits.argmax(-1).numpy(), g.integers(0, V, k)))
    seen = g.random(V) < 0.2
    rank = np.full(V, V, dtype=np.int64)
    ranked = g.permutation(V)[:g.integers(1, V)]
    rank[ranked] = np.arange(len(ranked))
    want = {s: int((logits.masked_fill(~torch.from_numpy(seen | (rank < s)), float("-inf")).argmax(-1)
                    == targets).sum()) for s in sizes}
    assert subset_agreement(logits, targets, seen, rank, sizes) == want


def test_subset_holds_frequent_prompt_and_output_tokens(tiny_root):
    m = tiny_model("llama", tiny_root)
    v = DraftVocab(m, list(range(100, 128)) + list(range(0, 100)), sizes=(8, 16))
    v.start([3, 4, 4, 5], capacity=10)
    assert v.head() == (None, None) and v.n_rows == 128
    v.select(8)
    head, ids = v.head()
    assert set(ids.tolist()) == set(range(100, 108)) | {3, 4, 5}
    assert np.allclose(head.numpy(), m.lm_head[ids].numpy())
    v.commit([50, 101, 50])                       # 50 unseen and not frequent: appended once
    head, ids = v.head()
    assert sorted(ids.tolist()) == sorted(list(range(100, 108)) + [3, 4, 5, 50])
    assert np.allclose(head.numpy(), m.lm_head[ids].numpy())
    # coverage of output tokens 50 (no: unseen, rank 50+28), 101 (yes), 50 (yes: seen) with the prompt's prior
    assert v.hits.tolist() == [2.0, 2.0] and v.seen_outputs == 3
    assert v.rows_for(8) == len(ids)              # the selected subset's rows, kept up to date
    assert v.rows_for(16) == 16 + np.count_nonzero(v.seen & (v.rank >= 16))
    assert 0.0 <= v.coverage().min() <= v.coverage().max() <= 1.0


def _lat(n: int, head: float) -> LatencyModel:
    return LatencyModel.analytic(n, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=head, width_factor=0.02)


def test_truncation_is_chosen_when_the_head_is_costly_and_coverage_high(tiny_root):
    m = tiny_model("llama", tiny_root)
    n = m.cfg.n_layers
    vocab = DraftVocab(m, list(range(128)), sizes=(16, 32))
    s = HybridStrategy(m, _lat(n, head=2e-2), draft_vocab=vocab)
    vocab.start(list(range(3, 12)), capacity=20)         # prompt tokens all inside the top 16
    s.planner.choice = Choice(plan=Plan.from_skips(n, attn=(1,), mlp=(2,)), d=4, alpha=0.8, tpt=1.0,
                              tpt_ar=1.0, context=100)
    s._active = True                                      # the planner runs
    best = s.choose(100, 0, [])
    assert best.kind == "skip" and best.vocab == 16       # the smallest subset: most of the head saved
    vocab.hits[:] = 0                                     # outputs never covered by the subsets
    vocab.seen_outputs = 1000
    best = s.choose(100, 0, [])
    assert best.vocab is None                             # truncation would never be accepted
    s2 = HybridStrategy(m, _lat(n, head=1e-6), draft_vocab=DraftVocab(m, list(range(128)), sizes=(16,)))
    s2.vocab.start(list(range(3, 12)), capacity=20)
    s2.vocab.hits[:] = 0.5 * 1000
    s2.vocab.seen_outputs = 1000
    s2.planner.choice = s.planner.choice
    s2._active = True
    assert s2.choose(100, 0, []).vocab is None            # a free head is not worth half the acceptance


class _Truncated(Strategy):
    def __init__(self, plan, ids, model, d):
        import torch
        ids_t = torch.tensor(sorted(ids))
        self.draft = Draft(plan=plan, max_len=d, threshold=0.0, head=model.lm_head[ids_t], head_ids=ids_t)

    def propose(self, state):
        return self.draft


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_greedy_with_truncated_draft_vocabulary_equals_autoregressive(tiny_root, data):
    kind = data.draw(st.sampled_from(["llama", "qwen3"]), label="arch")
    m = tiny_model(kind, tiny_root)
    n = m.cfg.n_layers
    prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=20), label="prompt")
    ids = data.draw(st.sets(st.integers(0, 127), min_size=1, max_size=127), label="subset")
    skipped = data.draw(st.sets(st.integers(1, 2 * n - 1), max_size=2 * n - 2), label="skip")
    plan = Plan.from_sublayer_skips(n, skipped)
    n_new = data.draw(st.integers(1, 24), label="n_new")
    eng = Engine(m)
    ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
    strat = _Truncated(plan, ids, m, data.draw(st.integers(1, 6), label="d"))
    assert eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,)).tokens == ref
    # the hybrid with a draft vocabulary, whatever it chooses
    vocab = DraftVocab(m, data.draw(st.permutations(list(range(128))), label="ranking"), sizes=(8, 32))
    hyb = HybridStrategy(m, _lat(n, head=2e-2), draft_vocab=vocab, alpha="cosine", min_cosine=0.0, every=2,
                         plan_after=0)
    assert eng.generate(prompt, hyb, max_new_tokens=n_new, stop_ids=(2,)).tokens == ref


def test_the_tokenizers_order_as_a_ranking_and_auto_without_a_calibration(tiny_root, monkeypatch, tmp_path):
    """``draft_vocab=ids``: token ids in order (merge / score order), no calibration needed;
    ``auto`` with no calibration file and ``off``: none; none where the vocabulary is no larger
    than the smallest subset."""
    from types import SimpleNamespace

    from knapspec.strategies import search
    from knapspec.strategies.vocab import SIZES, load_draft_vocab
    monkeypatch.setattr(search, "default_calibration_path", lambda method, model: tmp_path / "missing.json")
    big = SimpleNamespace(cfg=SimpleNamespace(vocab_size=3000))
    v = load_draft_vocab(big, "ids")
    assert v is not None and v.ranked == list(range(3000)) and v.sizes == (1024, 2048)
    assert load_draft_vocab(big, "auto") is None and load_draft_vocab(big, "off") is None
    assert load_draft_vocab(tiny_model("llama", tiny_root), "ids") is None    # 128 tokens
    assert min(SIZES) >= 128
