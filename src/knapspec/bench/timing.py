"""Timing primitives for the benchmarks: synchronised timers, the read bandwidth, decode rates,
rounds of several generations in lockstep and their orders, and a frozen garbage collector.

Measure like a benchmark: warm-up, synchronise, median, ratios measured side by side in one
process. Nothing here knows a model or a strategy.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..clock import sync


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5,
                      buffer: torch.Tensor | None = None) -> float:
    """Read bandwidth in bytes/s: the best of several full reductions over a large buffer
    (``buffer``: one made earlier, to measure again without allocating)."""
    x = buffer if buffer is not None else torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(repeats))
    return x.numel() * x.element_size() / best


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s of decoding alone from the times each token was ready: ``(N - 1) / (t_N - t_1)``.
    The first token comes out of the prefill, so neither the prefill nor the set-up before it is
    counted (a difference of two whole generations, ``t(N) - t(1)``, carries two prefills' noise)."""
    if len(stamps) < 2:
        raise ValueError("need at least 2 generated tokens to measure a decode rate")
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def balanced_orders(k: int) -> list[list[int]]:
    """Orders of ``k`` strategies balanced for who runs right before whom (a Williams design):
    over the returned cycle each strategy takes every position equally often and follows every
    other strategy equally often. ``k`` rows for even ``k``; ``2k`` (the rows and their reverses)
    for odd ``k``. A plain rotation (A B C, B C A, C A B) runs B right after A whenever A is not
    last, and never A right after B."""
    if k <= 1:
        return [list(range(k))]
    steps = [0]
    for j in range(1, k):                        # 0, 1, k-1, 2, k-2, ...
        steps.append((j + 1) // 2 if j % 2 else k - j // 2)
    rows = [[(i + d) % k for d in steps] for i in range(k)]
    if k % 2:
        rows += [r[::-1] for r in rows]
    return rows


def lockstep(streams: list[Iterator], orders: list[list[int]], sync: Callable[[], None] = lambda: None,
             ) -> list[list[float]]:
    """Advance several iterators one item at a time, in turns, until every one is exhausted: turn
    ``t`` advances them in the order ``orders[t % len(orders)]`` (exhausted ones skipped). Returns
    each iterator's step durations: the time of every ``next`` call, the last one (which raises
    ``StopIteration``) included, so that their sum is the time spent inside that iterator alone.

    Measuring generations this way (one decoding round of each in turn) exposes them to the same
    machine load at a granularity of one round instead of one whole generation: on a shared
    machine, load that comes and goes over seconds then lands on all of them alike."""
    steps: list[list[float]] = [[] for _ in streams]
    live = set(range(len(streams)))
    t = 0
    while live:
        for i in orders[t % len(orders)]:
            if i not in live:
                continue
            sync()
            a = time.perf_counter()
            try:
                next(streams[i])
            except StopIteration:
                live.discard(i)
            sync()
            steps[i].append(time.perf_counter() - a)
        t += 1
    return steps


def turn_orders(k: int, turns: int = 4096, seed: int = 0) -> list[list[int]]:
    """Orders for :func:`lockstep`: a random permutation of ``k`` generations per turn (seeded),
    never starting with the one the previous turn ended with. Running a generation's round right
    after its own previous round finds its state still in the CPU caches; with fixed orders one
    generation gets that advantage and another never does (a fixed Williams cycle of 3 measured an
    identical strategy against itself ~1% slower), and a fixed order makes every generation always
    follow the same one."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for _ in range(turns):
        o = rng.permutation(k).tolist()
        if out and k > 1 and o[0] == out[-1][-1]:
            j = int(rng.integers(1, k))
            o[0], o[j] = o[j], o[0]
        out.append(o)
    return out


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Everything alive on entry (model, tokenizer, libraries: ~370k objects after loading the
    embedded model) leaves the garbage collector's view until exit: a full collection over them took
    ~0.17 s on a 2-core CPU and stalls whichever decoding round it lands in; after ``gc.freeze`` it
    takes under 1 ms. Objects made inside are collected as usual."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
