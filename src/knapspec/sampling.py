"""Sampling and acceptance, pure functions of logits / probabilities and a seeded generator.

* :func:`probs` turns logits into the distribution actually sampled from (temperature, top-k,
  top-p); temperature 0 means greedy (argmax), returned as a one-hot distribution.
* :func:`accept` decides, for a round of drafts, how many are accepted and which token follows,
  with the outcome named as vLLM's rejection sampler names them: *accepted* drafts, then either a
  *recovered* token (sampled from the residual ``max(0, p - q)`` after a rejection) or a *bonus*
  token (sampled from ``p`` after every draft was accepted). Under greedy decoding this is the
  longest prefix of drafts equal to the target's argmax plus the target's next argmax.

Shaping (temperature, top-k, top-p) is applied to the draft's and the target's logits alike, so
the output follows the target's shaped distribution exactly. This module never touches a model
or a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature == self.temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed() & 0xFFFF_FFFF)
        return g


def probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """``logits: [..., V]`` -> probabilities ``[..., V]`` float32 after temperature/top-k/top-p."""
    logits = logits.float()
    if sp.greedy:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sp_sorted, idx = torch.sort(p, dim=-1, descending=True)
        cum = sp_sorted.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (cum - sp_sorted) >= sp.top_p
        sp_sorted = sp_sorted.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sp_sorted)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token from ``p: [V]`` (argmax if ``p`` is one-hot or ``gen`` is None)."""
    if gen is None:
        return int(p.argmax())
    return int(torch.multinomial(p, 1, generator=gen))


@dataclass(frozen=True)
class Acceptance:
    n_accepted: int       # drafts accepted (a prefix)
    token: int            # the token that follows them: recovered or bonus
    bonus: bool           # True when every draft was accepted


def greedy_ids(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``logits [..., V]`` (the first index of the maximum, as torch and
    numpy both break ties). On a CPU numpy's one-threaded argmax: torch's splits the 49k-wide row
    over its thread pool, a fork and a join that cost ~60 µs a call, 1–2% of a decoding step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def greedy_confidence(logits: torch.Tensor) -> tuple[int, float]:
    """``logits [V]`` -> (the argmax, its softmax probability): a greedy draft's token and the
    confidence its stop rule reads; on a CPU in numpy, one thread (see :func:`greedy_ids`)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        x = logits.detach().numpy()
        tok = int(x.argmax())
        return tok, float(1.0 / np.exp(x - x[tok]).sum())
    tok = int(logits.argmax())
    return tok, float(torch.softmax(logits.float(), -1)[tok])


def accept_greedy(drafts: list[int], target_logits: torch.Tensor) -> Acceptance:
    """``target_logits: [d+1, V]``: row j is the target's prediction after drafts[:j]."""
    tgt = greedy_ids(target_logits)
    n = 0
    while n < len(drafts) and drafts[n] == tgt[n]:
        n += 1
    return Acceptance(n, tgt[n], n == len(drafts))


def accept(drafts: list[int], q: torch.Tensor | None, p: torch.Tensor,
           gen: torch.Generator | None) -> Acceptance:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    ``p: [d+1, V]`` target probabilities, ``q: [d, V]`` draft probabilities of the drafted tokens'
    positions (``None`` = the drafts were proposed deterministically, i.e. ``q`` is one-hot).
    Accept draft x_j with probability min(1, p_j(x)/q_j(x)); on the first rejection sample from
    normalise(max(0, p_j - q_j)); if all are accepted sample the bonus from p_d.
    """
    d = len(drafts)
    assert p.shape[0] == d + 1, f"p has {p.shape[0]} rows for {d} drafts"
    for j, x in enumerate(drafts):
        pj = p[j]
        if q is None:
            qj = torch.zeros_like(pj)
            qj[x] = 1.0
        else:
            qj = q[j]
        px, qx = float(pj[x]), float(qj[x])
        if qx <= 0.0:
            # min(1, p/q) with q(x) = 0: accept when p(x) > 0 (ratio +inf), reject when 0/0
            ok = px > 0.0
        elif px >= qx:
            ok = True
        else:
            u = 1.0 if gen is None else float(torch.rand((), generator=gen, device=pj.device))
            ok = u < px / qx
        if not ok:
            resid = (pj - qj).clamp_min(0.0)
            z = float(resid.sum())
            if z <= 0.0:       # p == q up to rounding: the residual is empty, fall back to p
                resid, z = pj, float(pj.sum())
            return Acceptance(j, sample(resid / z, gen), False)
    return Acceptance(d, sample(p[d], gen), True)
