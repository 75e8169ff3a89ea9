"""Benchmark commands (not tests): measure side by side in one process, interleaved, after
warm-up; report medians and ratios.

* ``knapspec bench ar``      our autoregressive decoding vs transformers' ``generate``, and ours as a
  fraction of the memory-bandwidth roofline measured on the spot.
* ``knapspec bench verify``  time of one verification pass over n tokens relative to a 1-token step.
* ``knapspec bench latency`` the latency model's predictions vs real decoding steps (MAPE).

No decoding logic lives here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of several full reductions over a large buffer."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(repeats))
    return nbytes / best


def context_ids(tokenizer, n: int) -> list[int]:
    """About ``n`` tokens of real text (a long document from the data folder); random ids for a
    checkpoint without a tokenizer (timing does not depend on the ids)."""
    if tokenizer is None:
        return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    from .datasets import long_doc_text
    ids = tokenizer(long_doc_text(0))["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bench_ar(model: str | None, *, device: str, threads: int | None, contexts: list[int],
             new_tokens: int, repeats: int, dtypes: list[str]) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from .api import load, resolve_dtype
    rows = []
    for dt in dtypes:
        llm = load(model, dtype=dt, device=device, threads=threads)
        hf = AutoModelForCausalLM.from_pretrained(str(llm.checkpoint.folder),
                                                  dtype=resolve_dtype(dt, device)).to(device).eval()
        dev = llm.model.device
        bw = measure_bandwidth(dev)
        cfg = llm.model.cfg
        for ctx in contexts:
            ids = context_ids(llm.tokenizer, ctx)
            inp = torch.tensor([ids], device=dev)

            def ours(n: int, ids=ids) -> None:
                llm.engine.generate(ids, max_new_tokens=n)

            def theirs(n: int, inp=inp) -> None:
                with torch.no_grad():
                    hf.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)
            for f in (ours, theirs):          # warm-up
                f(2)
            res: dict[str, list[float]] = {"ours": [], "hf": []}
            for _ in range(repeats):          # interleaved; decode rate = (N-1) / (t_N - t_1)
                for name, f in (("ours", ours), ("hf", theirs)):
                    t1 = timed(lambda f=f: f(1), dev)
                    tn = timed(lambda f=f: f(new_tokens), dev)
                    res[name].append((new_tokens - 1) / max(tn - t1, 1e-9))
            ours_tps = statistics.median(res["ours"])
            hf_tps = statistics.median(res["hf"])
            elt = llm.model.embed.element_size()
            kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (ctx + new_tokens // 2) * elt
            per_token = llm.model.weight_bytes() - cfg.vocab_size * cfg.hidden_size * elt * (
                0 if cfg.tie_embeddings else 1)   # the input embedding is a row lookup, not a read
            per_token += kv_bytes
            roof = bw / per_token
            rows.append(dict(dtype=dt, context=ctx, ours_tok_s=ours_tps, hf_tok_s=hf_tps,
                             ratio=ours_tps / hf_tps, bandwidth_gb_s=bw / 1e9,
                             bytes_per_token_mb=per_token / 1e6, roofline_tok_s=roof,
                             roofline_share=ours_tps / roof))
            log.info("%s", rows[-1])

    return rows


def bench_verify(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                 widths: list[int], repeats: int, dtypes: list[str]) -> list[dict]:
    from .api import load
    rows = []
    for dt in dtypes:
        llm = load(model, dtype=dt, device=device, threads=threads)
        m = llm.model
        dev = m.device
        for ctx in contexts:
            ids = context_ids(llm.tokenizer, ctx)
            cache = m.new_cache(ctx + max(widths) + 1)
            for s in range(0, ctx, 512):
                m.forward(torch.tensor([ids[s:s + 512]], device=dev), s, cache, logits=False)
            times: dict[int, list[float]] = {w: [] for w in widths}
            toks = {w: torch.tensor([ids[:w]], device=dev) for w in widths}

            def step(w: int) -> None:
                cache.rollback(ctx)
                m.forward(toks[w], ctx, cache)
            for w in widths:
                step(w)
                step(w)
            for _ in range(repeats):          # interleave widths
                for w in widths:
                    times[w].append(timed(lambda w=w: step(w), dev))
            base = statistics.median(times[widths[0]])
            for w in widths:
                med = statistics.median(times[w])
                rows.append(dict(dtype=dt, context=ctx, width=w, ms=1e3 * med, ratio=med / base))

    return rows


def bench_latency(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                  n_plans: int, repeats: int, quick: bool) -> list[dict]:
    """Real decoding steps (random plans, 1 token; full plan, 4 and 8 tokens) vs the prediction."""
    import random

    from .api import load
    from .latency import get_latency_model
    from .plan import Plan
    llm = load(model, dtype="auto", device=device, threads=threads)
    m = llm.model
    lm = get_latency_model(m, quick=quick, progress=True)
    rng = random.Random(0)
    rows = []
    n_sub = 2 * m.cfg.n_layers
    for ctx in contexts:
        ids = context_ids(llm.tokenizer, ctx + 8)
        cache = m.new_cache(ctx + 9)
        cache.set_length(ctx)            # timing does not depend on the cached values
        cases: list[tuple[Plan, int]] = []
        for _ in range(n_plans):
            share = rng.uniform(0.0, 0.7)
            run = tuple(rng.random() >= share for _ in range(n_sub))
            cases.append((Plan(run), 1))
        cases += [(Plan.full(m.cfg.n_layers), 1), (Plan.full(m.cfg.n_layers), 4), (Plan.full(m.cfg.n_layers), 8)]
        toks = {n: torch.tensor([ids[:n]], device=m.device) for n in (1, 4, 8)}

        def step(plan: Plan, n: int) -> None:
            cache.set_length(ctx)
            m.forward(toks[n], ctx, cache, plan, last_only=n == 1)
        for plan, n in cases:
            step(plan, n)
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(repeats):
            for j, (plan, n) in enumerate(cases):
                times[j].append(timed(lambda plan=plan, n=n: step(plan, n), m.device))
        for (plan, n), ts in zip(cases, times):
            real = statistics.median(ts)
            pred = lm.predict(plan, ctx, n)
            rows.append(dict(context=ctx, tokens=n, skipped=plan.n_skipped, real_ms=1e3 * real,
                             predicted_ms=1e3 * pred, error=abs(pred - real) / real))
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None
