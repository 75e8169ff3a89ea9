"""Component benchmarks (commands, not tests), each measured side by side in one process,
interleaved, after warm-up, reported as medians and ratios:

* ``knapspec bench ar``      our autoregressive decoding vs transformers' ``generate``, and ours as a
  fraction of the memory-bandwidth roofline measured on the spot.
* ``knapspec bench verify``  time of one verification pass over n tokens relative to a 1-token step.
* ``knapspec bench latency`` the latency model's predictions vs real decoding steps (MAPE).
* ``knapspec bench tpt``     predicted tokens-per-time vs measured speed across the DP's plans.

No decoding logic lives here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ..engine import prefill
from .timing import decode_rate, measure_bandwidth, sync, timed

log = logging.getLogger(__name__)


def context_ids(tokenizer, n: int) -> list[int]:
    """About ``n`` tokens of real text (a long document from the data folder); random ids for a
    checkpoint without a tokenizer (timing does not depend on the ids)."""
    if tokenizer is None:
        return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    from ..datasets import long_doc_text
    ids = tokenizer(long_doc_text(0))["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bench_ar(model: str | None, *, device: str, threads: int | None, contexts: list[int],
             new_tokens: int, repeats: int, dtypes: list[str], exact: bool | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from ..api import load, resolve_dtype
    rows = []
    for dt in dtypes:
        llm = load(model, dtype=dt, device=device, threads=threads, exact=exact)
        hf = AutoModelForCausalLM.from_pretrained(str(llm.checkpoint.folder),
                                                  dtype=resolve_dtype(dt, device)).to(device).eval()
        dev = llm.model.device
        # the bandwidth is measured again right before each of our timed runs: on a shared machine
        # it moves by up to ~2x between minutes (neighbours' load), so each run is paired with the
        # bandwidth of its moment
        buf = torch.ones((1 << 30) // 4, dtype=torch.float32, device=dev)
        cfg = llm.model.cfg
        for ctx in contexts:
            ids = context_ids(llm.tokenizer, ctx)
            inp = torch.tensor([ids], device=dev)

            def ours(n: int, ids=ids) -> float:
                stamps = []
                for _ in llm.engine.stream(ids, max_new_tokens=n):      # one yield per token
                    sync(dev)
                    stamps.append(time.perf_counter())
                return decode_rate(stamps)

            def theirs(n: int, inp=inp) -> float:
                stamps: list[float] = []

                def stamp(input_ids, scores):   # called once per step, after that step's forward
                    sync(dev)
                    stamps.append(time.perf_counter())
                    return scores
                with torch.no_grad():
                    hf.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                logits_processor=LogitsProcessorList([stamp]))
                return decode_rate(stamps)
            for f in (ours, theirs):          # warm-up
                f(2)
            res: dict[str, list[float]] = {"ours": [], "hf": []}
            bws: list[float] = []
            for _ in range(repeats):          # interleaved
                bws.append(measure_bandwidth(dev, repeats=3, buffer=buf))
                for name, f in (("ours", ours), ("hf", theirs)):
                    res[name].append(f(new_tokens))
            ours_tps = statistics.median(res["ours"])
            hf_tps = statistics.median(res["hf"])
            elt = torch.empty(0, dtype=llm.model.dtype).element_size()      # the KV cache's
            kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (ctx + new_tokens // 2) * elt
            # the weights as stored (a GGUF's block types at --dtype auto); the input embedding is
            # a row lookup, not a read
            per_token = llm.model.streamed_bytes() + kv_bytes
            bw = statistics.median(bws)
            roof = bw / per_token
            # share: median over the runs of (run's tok/s) / (roofline at that run's bandwidth); and,
            # the strictest reading, the median tok/s against the highest bandwidth seen
            share = statistics.median(t * per_token / b for t, b in zip(res["ours"], bws))
            rows.append(dict(dtype=dt if dt != "auto" or not llm.model.quantized else "auto (GGUF types)",
                             context=ctx, ours_tok_s=ours_tps, hf_tok_s=hf_tps,
                             ratio=ours_tps / hf_tps, bandwidth_gb_s=bw / 1e9,
                             bytes_per_token_mb=per_token / 1e6, roofline_tok_s=roof,
                             roofline_share=share,
                             share_of_best_bw=ours_tps * per_token / max(bws)))
            log.info("%s", rows[-1])

    return rows


_ATTENTIONS = ("fma", "dot", "amx", "avx512")      # avx512: fma's earlier name


def _check_attentions(attentions: list[str]) -> None:
    """Raise unless each is a kernel of the native bfloat16 attention ("fma": AVX-512 float32
    multiply-adds; "dot": VDPBF16PS pair products; "amx": AMX tiles; "avx512": fma) usable here."""
    from .. import native
    for att in attentions:
        if att not in _ATTENTIONS:
            raise ValueError(f"unknown attention kernels {att!r}: choose fma, dot or amx")
    if "amx" in attentions:
        usable = native.set_amx(True)
        native.set_amx(None)
        if not usable:
            raise ValueError("--attention amx: this CPU / OS has no AMX tiles for bfloat16")


def _use_attention(att: str | None) -> None:
    """The native bfloat16 attention on kernel ``att`` for every pass (prompts included) from now
    on; None: the defaults (``native.set_amx(None)``, ``native.set_dot(None)``)."""
    from .. import native
    if att is None:
        native.set_amx(None)
        native.set_dot(None)
        return
    native.set_amx(att == "amx")
    if att != "amx":
        native.set_dot(att == "dot")


def bench_verify(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                 widths: list[int], repeats: int, dtypes: list[str], exact: bool | None = None,
                 modes: list[str] | None = None, attentions: list[str] | None = None) -> list[dict]:
    """One full-model pass over n tokens vs a 1-token step. ``modes``: "exact" and/or "fused"
    (``Model.set_row_invariant`` on / off), timed interleaved on the same weights and cache;
    None = the mode ``exact`` gives (None: the device's default). ``attentions``: "fma", "dot"
    and/or "amx", the native bfloat16 attention's kernels (:func:`_use_attention`), interleaved
    likewise; None = the defaults (``native.amx`` / ``native.dot``)."""
    from ..api import load
    for mode in modes or []:
        if mode not in ("exact", "fused"):
            raise ValueError(f"unknown mode {mode!r}: choose exact or fused")
    _check_attentions(attentions or [])
    atts = attentions or [None]
    rows = []
    for dt in dtypes:
        llm = load(model, dtype=dt, device=device, threads=threads, exact=exact)
        m = llm.model
        if not modes:
            modes = ["exact" if m.row_invariant else "fused"]
        for ctx in contexts:
            cases = [(mode, att, w) for mode in modes for att in atts for w in widths]

            def setup(mode: str, att: str | None, w: int) -> None:
                m.set_row_invariant(mode == "exact")
                if att is not None:
                    _use_attention(att)
            med = _pass_times(llm, ctx, cases, repeats, setup)
            for mode, att, w in cases:
                row = dict(dtype=dt, context=ctx, width=w, ms=1e3 * med[mode, att, w],
                           ratio=med[mode, att, w] / med[mode, att, widths[0]])
                if len(modes) > 1:
                    row = dict(row, mode=mode, vs_fused=med[mode, att, w] / med["fused", att, w]
                               if "fused" in modes else None)
                if att is not None:
                    row = dict(row, attention=att)
                rows.append(row)
    if attentions:
        _use_attention(None)

    return rows


def _pass_times(llm, ctx: int, cases: list[tuple], repeats: int,
                setup: Callable[..., None] | None = None) -> dict[tuple, float]:
    """Median seconds of one full-model pass over ``w`` tokens after ``ctx`` tokens of context, per
    case ``(..., w)`` (its last entry the width; ``setup(*case)`` runs before each pass), the cases
    interleaved ``repeats`` times after two warm-up passes each. The model's exact mode is left as
    it was found."""
    m = llm.model
    dev = m.device
    widths = sorted({c[-1] for c in cases})
    ids = context_ids(llm.tokenizer, ctx + max(widths))
    cache = m.new_cache(ctx + max(widths) + 1)
    exact = m.row_invariant
    m.set_row_invariant(False)
    prefill(m, ids[:ctx], cache, logits=False)
    m.set_row_invariant(exact)
    toks = {w: torch.tensor([ids[ctx:ctx + w]], device=dev) for w in widths}
    times: dict[tuple, list[float]] = {c: [] for c in cases}

    def step(c: tuple) -> None:
        if setup is not None:
            setup(*c)
        cache.rollback(ctx)
        m.forward(toks[c[-1]], ctx, cache)
    try:
        for c in cases:
            step(c)
            step(c)
        for _ in range(repeats):          # interleaved
            for c in cases:
                times[c].append(timed(lambda c=c: step(c), dev))
    finally:
        m.set_row_invariant(exact)
    return {c: statistics.median(v) for c, v in times.items()}


def pass_speed(llm, context: int = 4096, width: int = 8, repeats: int = 9) -> dict | None:
    """A one-token step and a ``width``-token pass at ``context`` tokens (medians, interleaved):
    ``{"context", "width", "step_ms", "pass_ms", "ratio"}``, or None where the model's context is
    too short. A benchmark records it before and after its runs: on a shared host the passes over
    several tokens can run at another speed for a while than the steps do (docs/benchmarks.md)."""
    context = min(context, llm.model.cfg.max_position - width - 1)
    if context < 16:
        return None
    med = _pass_times(llm, context, [(1,), (width,)], repeats)
    return {"context": context, "width": width, "step_ms": 1e3 * med[(1,)], "pass_ms": 1e3 * med[(width,)],
            "ratio": med[(width,)] / med[(1,)]}


def bench_prefill(model: str | None, *, device: str, threads: int | None, contexts: list[int], repeats: int,
                  attentions: list[str] | None = None) -> list[dict]:
    """Prefill time of prompts of each length (``engine.prefill``, its 512-token chunks), the
    attention kernels of ``attentions`` ("fma", "dot", "amx": :func:`_use_attention`; AMX is
    prompts' default where the CPU has it) interleaved on the same weights; medians of ``repeats``
    after one warm-up each."""
    from ..api import load
    from ..engine import prefill
    attentions = attentions or ["fma", "amx"]
    _check_attentions(attentions)
    llm = load(model, dtype="auto", device=device, threads=threads)
    m = llm.model
    rows = []
    try:
        for ctx in contexts:
            ids = context_ids(llm.tokenizer, ctx)
            cache = m.new_cache(ctx + 1)
            times: dict[str, list[float]] = {att: [] for att in attentions}
            for rep in range(repeats + 1):
                for att in attentions:
                    _use_attention(att)
                    cache.rollback(0)
                    t0 = time.perf_counter()
                    prefill(m, ids, cache)
                    if rep:
                        times[att].append(time.perf_counter() - t0)
            base = statistics.median(times[attentions[0]])
            for att in attentions:
                med = statistics.median(times[att])
                rows.append(dict(context=ctx, attention=att, s=med, tokens_per_s=ctx / med,
                                 speedup=base / med))
                log.info("%s", rows[-1])
    finally:
        _use_attention(None)
    return rows


def bench_latency(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                  n_plans: int, repeats: int, quick: bool, exact: bool | None = None) -> list[dict]:
    """Real decoding steps (random plans, 1 token; full plan, 4 and 8 tokens) vs the prediction."""
    import random

    from ..api import load
    from ..latency import get_latency_model
    from ..plan import Plan
    llm = load(model, dtype="auto", device=device, threads=threads, exact=exact)
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


def alpha_from_mean_accepted(mean_accepted: float, d: int) -> float:
    """The i.i.d. acceptance rate whose expected tokens per round with ``d`` drafts is
    ``mean_accepted`` (bisection on E(α, d), which increases in α)."""
    from ..strategies.pricing import expected_tokens
    lo, hi = 0.0, 1.0
    target = min(max(mean_accepted, 1.0), d + 1.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        if expected_tokens(mid, d) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def bench_tpt(llm, *, contexts: list[int], n: int, new_tokens: int, plans: int, window: int,
              root=None, progress: bool = True) -> list[dict]:
    """For long-document prompts at each context: the KnapSpec DP's candidate plans (spread over
    the time saved; scored, as the strategy's DP is, on ``window`` positions from the prompt's
    last one on, i.e. predicting generated tokens),
    each decoded with its TPT-optimal draft length as a fixed plan (confidence exit off, so rounds
    draft exactly d as TPT assumes); predicted TPT vs measured tokens/s.
    ``predicted_post`` uses the acceptance measured in the run (isolates the latency model)."""
    from tqdm import tqdm

    from ..datasets import load_dataset
    from ..latency import get_latency_model
    from ..sampling import SamplingParams
    from ..strategies.base import RoundState
    from ..strategies.knapspec import DEFAULT_WINDOWS, KnapSpecStrategy
    from ..strategies.pricing import best_length, tpt, verify_times
    from ..strategies.static import StaticStrategy
    m, eng = llm.model, llm.engine
    lat = get_latency_model(m, quick=True)
    rows: list[dict] = []
    jobs = [(c, p) for c in contexts for p in load_dataset(f"long-docs:{c}", root=root, tokenizer=llm.tokenizer, n=n)]
    bar = tqdm(total=len(jobs) * (plans + 1), disable=not progress, desc="tpt", unit="run")
    for ctx, p in jobs:
        ids = llm.encode_prompt(p.text, chat=p.chat)
        g = eng.generate(ids, max_new_tokens=new_tokens, stop_ids=())
        # the DP scores the positions from the prompt's last one on (its target is the first
        # generated token), `window` of them, as the strategy's DP does (it waits for those tokens
        # with plain steps), on a cache holding the prompt and the tokens before the last position
        seen = ids + g.tokens[:window - 1]
        cache = m.new_cache(len(seen) + 1)
        prefill(m, seen, cache, logits=False)
        strat = KnapSpecStrategy(m, lat, window=window, max_states=4 * plans, min_cosine=0.0,
                                 windows=DEFAULT_WINDOWS)
        strat.collect(RoundState(model=m, cache=cache, tokens=seen + [0], n_prompt=len(ids), round=0,
                                 sampling=SamplingParams(), remaining=new_tokens), len(seen))
        cands, _ = strat.optimise(len(seen))
        if len(cands) > plans:
            idx = np.linspace(0, len(cands) - 1, plans).round().astype(int)
            cands = [cands[i] for i in sorted(set(idx.tolist()))]
        t1 = lat.predict(None, len(ids), 1)
        rows.append(dict(context=ctx, prompt_tokens=len(ids), prompt_id=p.id, plan="full", skipped=0, d=0,
                         alpha=1.0, predicted_tps=1 / t1, predicted_post=1 / t1,
                         tokens_per_s=g.stats.tokens_per_s, mean_accepted=1.0))
        bar.update()
        for plan, alpha, _ in cands:
            tv = verify_times(lat, len(ids), 9)
            td = lat.predict(plan, len(ids), 1)
            d, _ = best_length(alpha, td, tv, 8)
            g = eng.generate(ids, StaticStrategy(plan, max_draft=d, threshold=0.0), max_new_tokens=new_tokens,
                             stop_ids=())
            a_meas = alpha_from_mean_accepted(g.stats.accepted / max(g.stats.draft_rounds, 1) + 1, d)
            rows.append(dict(context=ctx, prompt_tokens=len(ids), prompt_id=p.id, plan=str(plan),
                             skipped=plan.n_skipped, d=d, alpha=alpha, predicted_tps=tpt(alpha, d, td, tv[d]),
                             predicted_post=tpt(a_meas, d, td, tv[d]), tokens_per_s=g.stats.tokens_per_s,
                             mean_accepted=g.stats.mean_accepted))
            bar.update()
    bar.close()
    return rows
