"""Sampling shapes and the speculative acceptance rule on hand-made distributions."""

from __future__ import annotations

import pytest
import torch

from knapspec.sampling import SamplingParams, accept, accept_greedy, greedy_confidence, greedy_ids, probs


def test_probs_greedy_topk_topp():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert probs(logits, SamplingParams()).tolist() == [0, 1, 0, 0]
    p = probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[0] == 0 and p[3] == 0 and abs(float(p.sum()) - 1) < 1e-6
    full = torch.softmax(logits, -1)
    # top-p keeps the smallest set whose mass reaches p: {1} has 0.665 < 0.7, {1,2} has 0.91
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (p > 0).tolist() == [False, True, True, False]
    torch.testing.assert_close(p[1] / p[2], full[1] / full[2])
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (p > 0).sum() == 1
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top-p"):
        SamplingParams(top_p=1.5)


def test_accept_greedy_prefix_and_bonus():
    V = 5
    tgt = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), V).float()
    r = accept_greedy([1, 2, 0], tgt)
    assert (r.n_accepted, r.token, r.bonus) == (2, 3, False)
    r = accept_greedy([1, 2, 3], tgt)
    assert (r.n_accepted, r.token, r.bonus) == (3, 4, True)
    r = accept_greedy([], tgt[:1])
    assert (r.n_accepted, r.token) == (0, 1)


def test_greedy_ids_equal_torch_argmax_ties_included():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=g)
    x[1, 7] = x[1, 900] = x[1].max() + 1                 # a tie: the first index, as torch's
    x[2] = 0.0                                           # all equal
    x[3, 5] = float("inf")
    for rows in (x, x[:, ::2], x[4], x.to(torch.bfloat16)):    # strided; one row; not float32
        want = rows.argmax(-1).tolist()
        assert greedy_ids(rows) == want
    assert greedy_ids(x)[1] == 7 and greedy_ids(x)[2] == 0
    for row in (x[0], x[1], x[4].to(torch.bfloat16), torch.cat([x[0], torch.full((5,), float("-inf"))])):
        tok, conf = greedy_confidence(row)
        assert tok == int(row.argmax())
        assert conf == pytest.approx(float(torch.softmax(row.float(), -1)[tok]), rel=1e-5)


def _accept_freq(p_row, q_row, x, n=20000, seed=0):
    """Empirical acceptance probability of draft x and the distribution of what is emitted."""
    g = torch.Generator().manual_seed(seed)
    p = torch.stack([p_row, p_row])
    q = q_row[None]
    acc = 0
    emitted = torch.zeros_like(p_row)
    for _ in range(n):
        r = accept([x], q, p, g)
        acc += r.n_accepted
        emitted[x if r.n_accepted else r.token] += 1
    return acc / n, emitted / n


def test_accept_rule_hand_made():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.25, 0.6, 0.15, 0.0])
    # x=0: p >= q -> always accepted
    a, _ = _accept_freq(p, q, 0, n=500)
    assert a == 1.0
    # x=1: accepted with p/q = 0.5; on rejection the residual max(0, p-q) = [.25, 0, .05, 0]/.3
    a, em = _accept_freq(p, q, 1)
    assert abs(a - 0.5) < 0.02
    assert abs(float(em[1]) - 0.5) < 0.02 and em[3] == 0
    assert abs(float(em[0]) / float(em[2]) - 5.0) < 0.6
    # p == q: always accepted
    a, _ = _accept_freq(p, p.clone(), 1, n=500)
    assert a == 1.0
    # q(x) = 0 < p(x): min(1, p/q) = 1 -> accepted; p(x) = q(x) = 0 -> rejected, residual from p - q
    q0 = torch.tensor([0.5, 0.5, 0.0, 0.0])
    a, _ = _accept_freq(p, q0, 2, n=200)
    assert a == 1.0
    a, em = _accept_freq(p, q0, 3, n=2000)
    assert a == 0.0 and em[2] == 1.0             # residual max(0, p - q0) = [0, 0, .2, 0]
    # deterministic (lookup) drafts: q = None means one-hot, accepted with probability p(x)
    g = torch.Generator().manual_seed(3)
    pp = torch.stack([p, p])
    accepted = sum(accept([1], None, pp, g).n_accepted for _ in range(20000)) / 20000
    assert abs(accepted - 0.3) < 0.02
