"""Prompt lookup: n-gram matching, and lossless output through the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PATHS, drafting_property, tiny_model
from knapspec.engine import Engine
from knapspec.strategies.lookup import (
    NgramIndex,
    PromptLookupStrategy,
    ReferenceIndex,
    best_continuation,
    find_continuation,
)


def test_longest_ngram_wins_and_most_recent_occurrence():
    t = np.array([1, 2, 3, 9, 9, 7, 3, 5, 6, 1, 2, 3])
    # "1 2 3" occurs at 0 (followed by 9 9 7 ...); "3" alone occurs later (followed by 5 6)
    n, cont = find_continuation(t, max_ngram=3, max_len=3)
    assert n == 3 and cont == [9, 9, 7]
    n, cont = find_continuation(t, max_ngram=1, max_len=2)
    assert n == 1 and cont == [5, 6]                # most recent earlier "3"
    n, cont = find_continuation(np.array([4, 5, 6, 7]), max_ngram=3)
    assert (n, cont) == (0, [])
    n, cont = find_continuation(np.array([4, 4, 4, 4]), max_ngram=2, max_len=5)
    assert n == 2 and cont == [4]                   # the match right before the suffix
    assert find_continuation(np.array([3]), max_ngram=3) == (0, [])


def test_min_ngram_is_respected():
    t = np.array([1, 5, 2, 8, 5])
    assert find_continuation(t, max_ngram=3, min_ngram=2) == (0, [])
    assert find_continuation(t, max_ngram=3, min_ngram=1) == (1, [2, 8, 5])


@pytest.mark.parametrize("path", PATHS)
def test_greedy_lookup_equals_autoregressive(path, tiny_root):
    m = tiny_model("qwen2", tiny_root, path)
    eng = Engine(m)

    def check(data) -> int:
        base = data.draw(st.lists(st.integers(3, 20), min_size=1, max_size=10), label="base")
        prompt = (base * 4)[:data.draw(st.integers(1, 40), label="len")]   # repetitive: lookups happen
        n_new = data.draw(st.integers(1, 30), label="max_new_tokens")
        max_ngram, max_draft = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 8))
        strat = PromptLookupStrategy(max_ngram=max_ngram, max_draft=max_draft)
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,))
        assert got.tokens == ref
        # where the context after the first token has an earlier match, the first round drafts
        # (the reference scan says so, not the strategy)
        _, cont = find_continuation(np.array(prompt + ref[:1]), max_ngram=max_ngram, max_len=max_draft)
        if cont and n_new >= 3 and ref[0] != 2:
            assert got.stats.drafted > 0, "a lookup match was there and nothing was drafted"
        return got.stats.drafted
    drafting_property(check, max_examples=25 if path == "torch-f32" else 12)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=60), steps=st.lists(st.integers(1, 5), max_size=20),
       max_ngram=st.integers(1, 4), min_ngram=st.integers(1, 4), max_len=st.integers(1, 9))
def test_ngram_index_answers_like_the_scan(seq, steps, max_ngram, min_ngram, max_len):
    """The incremental index gives find_continuation's answer after every extension of the tokens
    (small alphabet: many repeated n-grams), and starts over on a shorter sequence."""
    min_ngram = min(min_ngram, max_ngram)
    idx = NgramIndex(max_ngram)
    cuts = np.cumsum([1] + steps)
    for end in [int(c) for c in cuts if c <= len(seq)] + [len(seq), max(1, len(seq) // 2)]:
        idx.update(seq[:end])
        want = find_continuation(np.array(seq[:end]), max_ngram=max_ngram, min_ngram=min_ngram,
                                 max_len=max_len)
        assert idx.find(max_ngram=max_ngram, min_ngram=min_ngram, max_len=max_len) == want


def test_ngram_index_tables_hold_each_ngrams_most_recent_successor():
    """Built at once or token run by token run, the index's tables map every n-gram to the
    position after its most recent occurrence (the definition, written as a loop here)."""
    rng = np.random.default_rng(3)
    t = rng.integers(0, 40, size=700).tolist()
    want = [{} for _ in range(4)]
    for p in range(1, len(t)):
        for n in range(1, min(3, p) + 1):
            want[n][t[p - 1] if n == 1 else tuple(t[p - n:p])] = p
    whole, parts = NgramIndex(3), NgramIndex(3)
    whole.update(t)
    for k in range(0, len(t), 37):
        parts.update(t[:k])
    parts.update(t)
    for idx in (whole, parts):
        assert all(idx._next[n] == want[n] for n in range(1, 4))


def test_reference_index_follows_the_reference_in_order():
    # "1 2" occurs twice in the reference; the cursor picks the copy after the last answer
    ref = [1, 2, 3, 4, 1, 2, 5, 6]
    idx = ReferenceIndex(ref, max_ngram=3)
    assert idx.find([9, 1, 2], max_ngram=3, max_len=2) == (2, [3, 4])      # first copy
    assert idx.find([9, 1, 2, 3, 4, 1, 2], max_ngram=2, max_len=3) == (2, [3, 4, 1])   # at/after the cursor
    idx.cursor = 5
    assert idx.find([7, 1, 2], max_ngram=2, max_len=3) == (2, [5, 6])      # second copy, after the cursor
    idx.cursor = 8
    assert idx.find([7, 1, 2], max_ngram=2, max_len=3) == (2, [5, 6])      # none after: the nearest before
    assert idx.find([7, 9], max_ngram=3) == (0, [])
    assert ReferenceIndex([], 3).find([1, 2], max_ngram=3) == (0, [])
    assert best_continuation((2, [8]), (2, [9])) == (2, [9], True)          # ties go to the reference
    assert best_continuation((3, [8]), (2, [9])) == (3, [8], False)
    assert best_continuation((0, []), (0, [])) == (0, [], False)


def _copier(name: str, m):
    from knapspec.latency import LatencyModel
    from knapspec.strategies.hybrid import HybridStrategy
    if name == "lookup":
        return PromptLookupStrategy()
    lat = LatencyModel.analytic(m.cfg.n_layers, attn=1e-3, attn_per_token=1e-6, mlp=1.5e-3, head=1e-5,
                                width_factor=0.02)          # no profiling in a test
    return HybridStrategy(m, lat, use_skip=False)


@pytest.mark.parametrize("name", ["lookup", "hybrid"])
def test_a_reference_equal_to_the_output_is_drafted_and_accepted(tiny_root, name):
    """A predicted output is only a source of drafts: the output is the model's own, and a correct
    prediction is drafted and accepted (counted in reference_drafted / reference_accepted); a wrong
    one is rejected without changing a token."""
    m = tiny_model("qwen2", tiny_root)
    eng = Engine(m)
    prompt = [5, 9, 13, 7, 11, 3]
    ref = eng.generate(prompt, max_new_tokens=40).tokens
    got = eng.generate(prompt, _copier(name, m), max_new_tokens=40, reference=ref)
    assert got.tokens == ref
    assert got.stats.reference_accepted >= 30 and got.stats.reference_drafted >= got.stats.reference_accepted
    assert got.stats.rounds <= 12                      # long accepted drafts: few rounds
    wrong = [(t + 1) % m.cfg.vocab_size for t in ref]
    bad = eng.generate(prompt, _copier(name, m), max_new_tokens=40, reference=wrong)
    assert bad.tokens == ref
    assert bad.stats.reference_accepted < bad.stats.reference_drafted
    plain = eng.generate(prompt, _copier(name, m), max_new_tokens=40)
    assert plain.stats.reference_drafted == plain.stats.reference_accepted == 0


def test_thompson_draws_follow_the_beta_posterior():
    """A Thompson draw is Beta(a, b)'s own where a count is small (the same draws as
    ``betavariate``) and, where both are large, has the Beta's mean and spread within [0, 1]."""
    import random
    import statistics

    from knapspec.strategies.lookup import BETA_NORMAL, _beta_draw
    r1, r2 = random.Random(3), random.Random(3)
    assert [_beta_draw(r1, 2.0, 58.0) for _ in range(50)] == [r2.betavariate(2.0, 58.0) for _ in range(50)]
    rng = random.Random(0)
    for a, b in ((BETA_NORMAL, 400.0), (300.0, 120.0), (5000.0, 40.0)):
        xs = [_beta_draw(rng, a, b) for _ in range(20000)]
        n = a + b
        assert all(0.0 <= x <= 1.0 for x in xs)
        assert statistics.fmean(xs) == pytest.approx(a / n, abs=3e-3)
        assert statistics.stdev(xs) == pytest.approx(math.sqrt(a * b / (n * n * (n + 1))), rel=0.05)
