"""Search-based baselines: SWIFT (online), Draft & Verify (offline, static set), KNN-SSD (offline,
a set per cluster). Their selection logic, calibration files, and lossless output."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from conftest import PATHS, drafting_property, save_tiny_with_tokenizer, tiny_model
from knapspec.engine import Engine
from knapspec.plan import Plan
from knapspec.strategies.draft_verify import DraftVerifyStrategy
from knapspec.strategies.knn_ssd import KNNSSDStrategy, prompt_embedding
from knapspec.strategies.search import PlanScorer, SkipSearch, decode_plan, prompt_scorer
from knapspec.strategies.swift import SWIFTStrategy


def _quiet_sublayer(base, s):
    """A copy of ``base`` whose sublayer ``s`` is (almost) the identity."""
    m = copy.copy(base)
    m.layers = list(base.layers)
    layer = copy.copy(base.layers[s // 2])
    if s % 2 == 0:
        layer.wo = layer.wo * 0.0
    else:
        layer.w_down = layer.w_down * 0.0
    m.layers[s // 2] = layer
    return m


def test_decode_plan_top_k_and_threshold():
    v = {2: 0.9, 3: 0.1, 4: 0.7, 5: 0.6}
    assert decode_plan(3, v, 2).run == (True, True, False, True, False, True)
    assert decode_plan(3, v, None).run == (True, True, False, True, False, False)


def test_matchness_is_one_for_the_full_plan_and_for_skipping_an_identity(tiny_root):
    m = _quiet_sublayer(tiny_model("llama", tiny_root), 3)          # MLP of layer 1 does nothing
    sc = prompt_scorer(m, list(range(3, 40)), window=16)
    n = m.cfg.n_layers
    full, quiet, other = Plan.full(n), Plan.from_sublayer_skips(n, [3]), Plan.from_sublayer_skips(n, [2, 4, 5])
    s = sc.score([full, quiet, other])
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] < 1.0


def test_swift_search_finds_the_sublayer_whose_removal_changes_nothing(tiny_root):
    m = _quiet_sublayer(tiny_model("llama", tiny_root), 4)          # attention of layer 2
    prompt = list(range(3, 40))
    strat = SWIFTStrategy(m, skip_ratio=1 / 6, window=24, batch=4, max_trials=12, patience=12, seed=1)
    assert strat.skip_count == 1
    eng = Engine(m)
    eng.generate(prompt, strat, max_new_tokens=8)
    assert strat.search.n_trials >= 4
    assert strat.best_plan.run[4] is False and strat.best_plan.n_skipped == 1
    assert strat.search.best_value == 1.0
    kinds = {k for k, _ in strat.search.history}
    assert kinds == {"random", "bo"} or strat.search.n_trials <= strat.search.n_random


def test_search_alternates_random_and_bayesian_trials():
    s = SkipSearch(4, skip_count=2, bo_every=2, n_random=2, seed=0)
    for _ in range(8):
        t = s.ask()
        s.tell(t, float(sum(t.plan.run)))
    assert [k for k, _ in s.history] == ["random", "random"] + ["random", "bo"] * 3
    assert s.best_plan.n_skipped == 2


def test_draft_verify_threshold_adapts_to_acceptance():
    from knapspec.strategies.base import Outcome
    plan = Plan.from_sublayer_skips(3, [3])
    s = DraftVerifyStrategy(plan, threshold=0.6, target=0.8)
    d = s.propose(None)
    for _ in range(30):
        s.observe(Outcome(draft=d, drafted=4, accepted=0, context_length=10))
    raised = s.gamma
    assert raised > 0.6
    for _ in range(60):
        s.observe(Outcome(draft=d, drafted=4, accepted=4, context_length=10))
    assert s.gamma < raised
    assert s.propose(None).threshold == s.gamma


def test_knn_ssd_uses_the_nearest_cluster():
    cents = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    plans = [Plan.from_sublayer_skips(2, [s]) for s in (1, 2, 3)]
    s = KNNSSDStrategy(cents, plans)
    assert s.nearest(np.array([0.1, 0.2, 3.0])) == 2
    assert s.nearest(torch.tensor([5.0, 1.0, 0.0])) == 0
    with pytest.raises(ValueError, match="dimensions"):
        s.nearest(np.zeros(4))


def test_engine_hands_knn_ssd_the_prompt_embedding(tiny_root):
    m = tiny_model("llama", tiny_root)
    prompt_a, prompt_b = [5, 6, 7, 8] * 6, [100, 101, 102, 103] * 6
    ea, eb = prompt_embedding(m, prompt_a), prompt_embedding(m, prompt_b)
    plans = [Plan.from_sublayer_skips(3, [2]), Plan.from_sublayer_skips(3, [5])]
    s = KNNSSDStrategy(np.stack([ea, eb]), plans)
    Engine(m).generate(prompt_b, s, max_new_tokens=4)
    assert s.cluster == 1
    Engine(m).generate(prompt_a, s, max_new_tokens=4)
    assert s.cluster == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["swift", "draft-verify", "knn-ssd"])
def test_greedy_searched_baselines_equal_autoregressive(name, path, tiny_root):
    def check(data) -> int:
        kind = data.draw(st.sampled_from(["llama", "qwen2"]), label="arch")
        m = tiny_model(kind, tiny_root, path)
        n = m.cfg.n_layers
        prompt = data.draw(st.lists(st.integers(3, 127), min_size=1, max_size=24), label="prompt")
        n_new = data.draw(st.integers(1, 24), label="max_new_tokens")
        d = data.draw(st.integers(1, 8), label="d")
        skipped = data.draw(st.sets(st.integers(2, 2 * n - 1), min_size=1, max_size=2 * n - 2), label="skip")
        plan = Plan.from_sublayer_skips(n, skipped)
        if name == "swift":
            strat = SWIFTStrategy(m, skip_ratio=data.draw(st.floats(0.1, 0.6), label="ratio"), window=8,
                                  batch=2, max_trials=6, d_max=d, seed=0)
        elif name == "draft-verify":
            strat = DraftVerifyStrategy(plan, d_max=d, threshold=data.draw(st.floats(0.0, 0.9), label="gamma"))
        else:
            strat = KNNSSDStrategy(np.eye(2, m.cfg.hidden_size), [plan, Plan.from_sublayer_skips(n, [2])], d_max=d)
        eng = Engine(m)
        ref = eng.generate(prompt, max_new_tokens=n_new, stop_ids=(2,)).tokens
        got = eng.generate(prompt, strat, max_new_tokens=n_new, stop_ids=(2,))
        assert got.tokens == ref
        if name == "knn-ssd" and n_new >= 3 and ref[0] != 2:
            assert got.stats.drafted > 0            # a fixed plan drafts from the first round
        return got.stats.drafted
    drafting_property(check, max_examples=10 if path == "torch-f32" else 5)


def test_calibrate_commands_write_files_the_strategies_read(tmp_path, monkeypatch):
    """Both offline searches on a tiny model through the Python calls the CLI makes: files
    written atomically, read back by name, output lossless; bad files give one-line errors."""
    import knapspec
    from knapspec.strategies import draft_verify, knn_ssd
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    folder = save_tiny_with_tokenizer("llama", tmp_path / "tiny")
    llm = knapspec.load(str(folder), dtype="float32")
    prompts = [list(range(3 + i, 30 + i)) for i in range(4)]
    rec = draft_verify.calibrate(llm, prompts[:2], trials=3, new_tokens=6, n_random=2, progress=False)
    dv_path = rec["path"]
    doc = json.loads(open(dv_path).read())
    assert doc["method"] == "draft-verify" and doc["trials"] == 3 and doc["tokens_per_s"] > 0
    assert not list((tmp_path / "cache" / "calibration").glob("*.tmp"))
    strat = llm.make_strategy("draft-verify")                       # found in the cache folder
    assert str(strat.plan) == doc["skip"]
    ref = llm.generate(prompts[3], strategy="autoregressive", max_new_tokens=12).tokens
    assert llm.generate(prompts[3], strategy=strat, max_new_tokens=12).tokens == ref

    labelled = [("low", list(range(3, 20))), ("low", list(range(4, 21))),
                ("high", list(range(90, 110))), ("high", list(range(91, 111)))]
    out = tmp_path / "knn.json"
    rec = knn_ssd.calibrate(llm, labelled, clusters=2, trials=4, batch=2, window=8, out=out, progress=False)
    doc = json.loads(out.read_text())
    assert len(doc["centroids"]) == 2 and sum(c["size"] for c in doc["clusters"]) == 4
    assert sorted(sorted(c["labels"]) for c in doc["clusters"]) == [["high"], ["low"]]   # domains separate
    strat = llm.make_strategy("knn-ssd", calibration=str(out))
    assert llm.generate(prompts[3], strategy=strat, max_new_tokens=12).tokens == ref
    low = next(i for i, c in enumerate(doc["clusters"]) if "low" in c["labels"])
    llm.generate(list(range(5, 22)), strategy=strat, max_new_tokens=2)
    assert strat.cluster == low

    with pytest.raises(ValueError, match="not 'knn-ssd'"):
        llm.make_strategy("knn-ssd", calibration=dv_path)
    with pytest.raises(FileNotFoundError, match="knapspec calibrate --strategy knn-ssd"):
        llm.make_strategy("knn-ssd")


def test_plan_scorer_reads_but_never_writes_the_cache(tiny_root):
    m = tiny_model("llama", tiny_root)
    eng = Engine(m)
    eng.generate(list(range(3, 30)), max_new_tokens=2)
    cache = eng.last_cache
    before = [t.clone() for t in cache.k] + [t.clone() for t in cache.v]
    PlanScorer(m, cache, list(range(10, 20)), 10).score([Plan.from_sublayer_skips(3, [2, 5])])
    after = list(cache.k) + list(cache.v)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
