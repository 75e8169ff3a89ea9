"""Benchmark commands (not tests): measure side by side in one process, interleaved, after
warm-up; report medians and ratios.

* ``knapspec bench ar``      our autoregressive decoding vs transformers' ``generate``, and ours as a
  fraction of the memory-bandwidth roofline measured on the spot.
* ``knapspec bench verify``  time of one verification pass over n tokens relative to a 1-token step.
* ``knapspec bench latency`` the latency model's predictions vs real decoding steps (MAPE).

No decoding logic lives here.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
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


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5,
                      buffer: torch.Tensor | None = None) -> float:
    """Read bandwidth in bytes/s: the best of several full reductions over a large buffer
    (``buffer``: one made earlier, to measure again without allocating)."""
    x = buffer if buffer is not None else torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(repeats))
    return x.numel() * x.element_size() / best


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


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s of decoding alone from the times each token was ready: ``(N - 1) / (t_N - t_1)``.
    The first token comes out of the prefill, so neither the prefill nor the set-up before it is
    counted (a difference of two whole generations, ``t(N) - t(1)``, carries two prefills' noise)."""
    if len(stamps) < 2:
        raise ValueError("need at least 2 generated tokens to measure a decode rate")
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def bench_ar(model: str | None, *, device: str, threads: int | None, contexts: list[int],
             new_tokens: int, repeats: int, dtypes: list[str], exact: bool | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from .api import load, resolve_dtype
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
                    _sync(dev)
                    stamps.append(time.perf_counter())
                return decode_rate(stamps)

            def theirs(n: int, inp=inp) -> float:
                stamps: list[float] = []

                def stamp(input_ids, scores):   # called once per step, after that step's forward
                    _sync(dev)
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


def bench_verify(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                 widths: list[int], repeats: int, dtypes: list[str], exact: bool | None = None,
                 modes: list[str] | None = None) -> list[dict]:
    """One full-model pass over n tokens vs a 1-token step. ``modes``: "exact" and/or "fused"
    (``Model.set_row_invariant`` on / off), timed interleaved on the same weights and cache;
    None = the mode ``exact`` gives (None: the device's default)."""
    from .api import load
    for mode in modes or []:
        if mode not in ("exact", "fused"):
            raise ValueError(f"unknown mode {mode!r}: choose exact or fused")
    rows = []
    for dt in dtypes:
        llm = load(model, dtype=dt, device=device, threads=threads, exact=exact)
        m = llm.model
        if not modes:
            modes = ["exact" if m.row_invariant else "fused"]
        dev = m.device
        for ctx in contexts:
            ids = context_ids(llm.tokenizer, ctx)
            cache = m.new_cache(ctx + max(widths) + 1)
            m.set_row_invariant(False)
            for s in range(0, ctx, 512):
                m.forward(torch.tensor([ids[s:s + 512]], device=dev), s, cache, logits=False)
            cases = [(mode, w) for mode in modes for w in widths]
            times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
            toks = {w: torch.tensor([ids[:w]], device=dev) for w in widths}

            def step(mode: str, w: int) -> None:
                m.set_row_invariant(mode == "exact")
                cache.rollback(ctx)
                m.forward(toks[w], ctx, cache)
            for c in cases:
                step(*c)
                step(*c)
            for _ in range(repeats):          # interleave modes and widths
                for c in cases:
                    times[c].append(timed(lambda c=c: step(*c), dev))
            m.set_row_invariant(False)
            med = {c: statistics.median(v) for c, v in times.items()}
            for mode, w in cases:
                row = dict(dtype=dt, context=ctx, width=w, ms=1e3 * med[mode, w],
                           ratio=med[mode, w] / med[mode, widths[0]])
                if len(modes) > 1:
                    row = dict(row, mode=mode, vs_fused=med[mode, w] / med["fused", w]
                               if "fused" in modes else None)
                rows.append(row)

    return rows


def bench_latency(model: str | None, *, device: str, threads: int | None, contexts: list[int],
                  n_plans: int, repeats: int, quick: bool, exact: bool | None = None) -> list[dict]:
    """Real decoding steps (random plans, 1 token; full plan, 4 and 8 tokens) vs the prediction."""
    import random

    from .api import load
    from .latency import get_latency_model
    from .plan import Plan
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


# ---- the side-by-side harness (``knapspec bench run``) ---------------------------------------------
def near_tie_tolerance(dtype: torch.dtype) -> float:
    """Relative logit margin under which a greedy choice can flip from rounding alone: a verify
    pass over d+1 tokens and a 1-token step use different kernels, whose results differ in the last
    bits. float32: 1e-5; bfloat16 logits carry 8 bits of mantissa (2^-6 = 4 of their ulps)."""
    return {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2.0 ** -6,
            torch.float16: 2.0 ** -9}.get(dtype, 2.0 ** -6)


def classify_mismatch(model, prompt: list[int], ref: list[int], got: list[int]) -> dict | None:
    """Where ``got`` departs from the reference ``ref``, and whether the full model's logits there
    are a near-tie between the two tokens (``None`` if the outputs are equal)."""
    i = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if i is None:
        if len(ref) == len(got):
            return None
        i = min(len(ref), len(got))
        return {"index": i, "ref_token": None, "got_token": None, "margin": None, "near_tie": False}
    cache = model.new_cache(len(prompt) + i + 1)
    ids = prompt + ref[:i]
    out = None
    for s in range(0, len(ids), 512):
        out = model.forward(torch.tensor([ids[s:s + 512]], device=model.device), s, cache, last_only=True)
    logits = out.logits[0, -1].float()
    margin = float(logits[ref[i]] - logits[got[i]])
    tol = near_tie_tolerance(model.dtype) * max(1.0, float(logits.abs().max()))
    # margin < 0: the full model, recomputed in one pass, itself prefers the speculative output's
    # token — the reference run's own rounding decided it (reduced precision only)
    reduced = model.dtype in (torch.bfloat16, torch.float16)
    return {"index": i, "ref_token": ref[i], "got_token": got[i], "margin": margin,
            "near_tie": abs(margin) <= tol or (reduced and margin < 0)}


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else 0.0


def run_record(*, prompt, n_prompt: int, strategy: str, stats, describe: dict, ref_tps: float | None,
               match: bool | None, mismatch: dict | None) -> dict:
    """One JSONL row: the generation's statistics plus the comparison with autoregressive."""
    tps = stats.tokens_per_s
    return {
        "dataset": prompt.dataset, "category": prompt.category, "prompt_id": prompt.id,
        "context": prompt.target_tokens or n_prompt, "prompt_tokens": n_prompt, "strategy": strategy,
        "new_tokens": stats.new_tokens, "decode_s": stats.decode_s, "tokens_per_s": tps,
        "speedup": tps / ref_tps if ref_tps else None, "mean_accepted": stats.mean_accepted,
        "acceptance_rate": stats.acceptance_rate, "drafted": stats.drafted, "accepted": stats.accepted,
        "rounds": stats.rounds, "draft_s": stats.draft_s, "verify_s": stats.verify_s, "plan_s": stats.plan_s,
        "plan_share": stats.plan_s / stats.decode_s if stats.decode_s > 0 else 0.0,
        "predicted_tps": describe.get("predicted_tps"), "attn_skip_share": describe.get("attn_skip_share"),
        "mlp_skip_share": describe.get("mlp_skip_share"), "match": match, "mismatch": mismatch,
        "strategy_state": describe,
    }


def summarize(records: list[dict]) -> list[dict]:
    """Per (strategy, dataset): runs, geometric-mean speedup, mean accepted tokens per round, mean
    tokens/s, planning share, mismatches."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["strategy"], r["dataset"]), []).append(r)
    out = []
    for (s, d), rs in groups.items():
        out.append({"strategy": s, "dataset": d, "runs": len(rs),
                    "speedup": geomean([r["speedup"] for r in rs if r["speedup"]]),
                    "mean_accepted": float(np.mean([r["mean_accepted"] for r in rs])),
                    "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rs])),
                    "plan_share": float(np.mean([r["plan_share"] for r in rs])),
                    "mismatches": sum(r["match"] is False for r in rs),
                    "hard_mismatches": sum(r["match"] is False and not (r["mismatch"] or {}).get("near_tie")
                                           for r in rs)})
    return out


def markdown_table(summary: list[dict]) -> str:
    """Strategy × dataset: geometric-mean speedup over autoregressive (mean accepted tokens/round)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in summary))
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    cell = {(r["strategy"], r["dataset"]): r for r in summary}
    lines = ["| strategy | " + " | ".join(datasets) + " | all |", "|---|" + "---|" * (len(datasets) + 1)]
    for s in strategies:
        row = []
        for d in datasets:
            c = cell.get((s, d))
            row.append("" if c is None else f"{c['speedup']:.2f}x ({c['mean_accepted']:.2f})"
                       + (" MISMATCH" if c["hard_mismatches"] else ""))
        allx = geomean([cell[(s, d)]["speedup"] for d in datasets if (s, d) in cell])
        lines.append(f"| {s} | " + " | ".join(row) + f" | {allx:.2f}x |")
    return "\n".join(lines)


def category_table(records: list[dict], key: str = "speedup") -> str | None:
    """Category × strategy: geometric-mean ``key`` (``speedup`` of the median runs, or
    ``speedup_fastest`` of the fastest runs with repeats) over autoregressive decoding, for the
    datasets with categories (Spec-Bench); the last column compares the last strategy with the
    best of the other non-reference strategies in each category. None without categories."""
    rows = [r for r in records if r.get("category") and r.get(key)]
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "autoregressive"]
    cats = list(dict.fromkeys(r["category"] for r in rows))
    if not cats or not strategies:
        return None
    last, others = strategies[-1], strategies[:-1]
    head = "| category | " + " | ".join(strategies) + (f" | {last} / best of the others |" if others else " |")
    lines = [head, "|---|" + "---|" * (len(strategies) + bool(others))]
    for c in cats + [None]:
        g = {s: geomean([r[key] for r in rows if r["strategy"] == s and (c is None or r["category"] == c)])
             for s in strategies}
        # one document cut to several lengths is several prompts: count (dataset, prompt id)
        n = len({(r.get("dataset"), r["prompt_id"]) for r in rows if c is None or r["category"] == c})
        label = c if c is not None else f"all {n} prompts"
        cells = [f"{g[s]:.2f}x" for s in strategies]
        if others:
            best = max(g[s] for s in others)
            cells.append(f"{g[last] / best:.3f}" if best > 0 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import pearsonr
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return None
    return float(pearsonr(xs, ys).statistic)


def headline(records: list[dict]) -> dict:
    summary = summarize(records)
    out: dict = {"runs": len(records), "mismatches": sum(r["match"] is False for r in records),
                 "hard_mismatches": sum(s["hard_mismatches"] for s in summary), "speedup": {}}
    for s in dict.fromkeys(r["strategy"] for r in records):
        out["speedup"][s] = geomean([r["speedup"] for r in records if r["strategy"] == s and r["speedup"]])
    pts = [(r["predicted_tps"], r["tokens_per_s"]) for r in records if r.get("predicted_tps")]
    if pts:
        out["tpt_pearson_r"] = pearson([p for p, _ in pts], [m for _, m in pts])
    shares = [r["plan_share"] for r in records if r["strategy"] not in ("autoregressive",)]
    out["max_plan_share"] = max(shares) if shares else 0.0
    return out


def expand_datasets(specs: list[str], root) -> list[str]:
    """``spec-bench`` (no category) stands for every category, one dataset each."""
    from .datasets import data_dir, spec_bench_categories
    out = []
    for s in specs:
        if s == "spec-bench":
            out += [f"spec-bench:{c}" for c in spec_bench_categories(root or data_dir())]
        else:
            out.append(s)
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value,...`` (a strategy with options, e.g. ``hybrid:draft_vocab=off``):
    the benchmark runs variants of one strategy side by side under their full spec."""
    from .strategies import REGISTRY
    name, _, rest = spec.partition(":")
    if name not in REGISTRY.names():
        raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(REGISTRY.names())}")
    extra: dict = {}
    for item in filter(None, rest.split(";")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"bad strategy option {item!r} in {spec!r}: expected NAME:key=value;key=value")
        for conv in (int, float):
            try:
                extra[k] = conv(v)
                break
            except ValueError:
                pass
        else:
            extra[k] = {"true": True, "false": False}.get(v.lower(), v)
    return name, extra


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


INTERLEAVE = ("rounds", "runs")


def run_side_by_side(llm, *, strategies: list[str], datasets: list[str], n: int, max_new_tokens: int,
                     root=None, temperature: float = 0.0, seed: int | None = 0, warmup: bool = True,
                     progress: bool = True, strategy_options: dict | None = None,
                     on_record: Callable[[dict], None] | None = None, repeats: int = 1,
                     interleave: str = "rounds") -> list[dict]:
    """Every strategy on the same prompts, interleaved per prompt, autoregressive first (the
    reference output and the speedup's denominator). Greedy unless ``temperature > 0``.

    ``interleave="rounds"`` (the default): the strategies' generations of a prompt run at the same
    time, one decoding round of each in turn (:func:`lockstep`), and each one's decode time is the
    time spent in its own rounds. ``"runs"``: one whole generation after the other.

    ``repeats`` > 1: every prompt's strategies run that many times, autoregressive first and the
    others in the orders of :func:`balanced_orders` from one repeat to the next (so that over a
    full cycle each strategy runs right after each other one equally often); each strategy's
    record is its run of median decode time (all its decode times are kept in ``decode_s_runs``);
    every repeat's output is checked against the reference."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if interleave not in INTERLEAVE:
        raise ValueError(f"interleave must be one of {', '.join(INTERLEAVE)}, got {interleave!r}")
    from .datasets import load_dataset
    from .sampling import SamplingParams
    from .strategies import REGISTRY
    order = ["autoregressive"] + [s for s in strategies if s != "autoregressive"]
    variants = {s: parse_variant(s) for s in order}
    opts = strategy_options or {}
    prompts = []
    for spec in expand_datasets(datasets, root):
        prompts += load_dataset(spec, root=root, tokenizer=llm.tokenizer, n=n)
    if not prompts:
        raise ValueError("no prompts: check --datasets and --n")
    encoded = [llm.encode(p.text, chat=p.chat) for p in prompts]
    limit = llm.model.cfg.max_position
    for p, ids in zip(prompts, encoded):          # fail before any run, not in the middle
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"{p.dataset} prompt {p.id} has {len(ids)} tokens: with {max_new_tokens} new tokens "
                             f"it exceeds the model's context of {limit}; use a shorter length (e.g. long-docs:8000)")
    sp = SamplingParams(temperature=temperature, seed=seed)
    eng, stops = llm.engine, llm.stop_ids

    def make(s: str, **more):
        name, extra = variants[s]
        return REGISTRY.create(name, llm.model, **{**opts.get(name, {}), **opts.get(s, {}), **extra, **more})
    if warmup:                                    # kernels, allocator, latency profile, caches
        ids = llm.encode(prompts[0].text, chat=prompts[0].chat)[-256:]
        for s in order:
            w = make(s)
            if w.warm_up_options:
                w = make(s, **w.warm_up_options)
            eng.generate(ids, w, max_new_tokens=16, sampling=sp, stop_ids=stops)
    from tqdm import tqdm

    from .engine import Generation
    with frozen_gc():
        records: list[dict] = []
        kept: dict = {}                                # strategies that learn across prompts (SWIFT)
        bar = tqdm(total=len(prompts) * len(order) * repeats, disable=not progress, desc="bench", unit="run")
        dev = llm.model.device
        turns = turn_orders(len(order), seed=0)        # the order of each turn of rounds (lockstep)
        for p, ids in zip(prompts, encoded):
            runs: dict[str, list] = {s: [] for s in order}
            rest = order[1:]
            cycle = balanced_orders(len(rest))
            for rep in range(repeats):
                names = order[:1] + [rest[j] for j in cycle[rep % len(cycle)]]
                strats = []
                for s in names:
                    strat = kept.get(s) or make(s)
                    if strat.persists_across_prompts:
                        kept[s] = strat
                    strats.append(strat)
                if interleave == "runs":
                    for s, strat in zip(names, strats):
                        bar.set_postfix_str(f"{p.dataset} {s}")
                        g = eng.generate(ids, strat, max_new_tokens=max_new_tokens, sampling=sp, stop_ids=stops)
                        runs[s].append((g, strat.describe()))
                        bar.update()
                    continue
                bar.set_postfix_str(f"{p.dataset} {len(names)} in lockstep")
                gens = [Generation(tokens=[]) for _ in names]
                streams = [_collect(eng.stream(ids, strat, max_new_tokens=max_new_tokens, sampling=sp,
                                               stop_ids=stops, stats=g.stats), g.tokens)
                           for strat, g in zip(strats, gens)]
                steps = lockstep(streams, turns, lambda: _sync(dev))
                for s, strat, g, st in zip(names, strats, gens, steps):
                    # the first step is the set-up and prefill; the rest are this generation's rounds
                    g.stats.total_s = g.stats.prefill_s + sum(st[1:])
                    runs[s].append((g, strat.describe()))
                bar.update(len(names))
            ref_tokens, ref_tps, ref_fast = None, None, None
            for s in order:
                g, desc = sorted(runs[s], key=lambda r: r[0].stats.decode_s)[(len(runs[s]) - 1) // 2]
                match, mm = None, None
                if s == "autoregressive":
                    ref_tokens, ref_tps = runs[s][0][0].tokens, g.stats.tokens_per_s
                if sp.greedy and (s != "autoregressive" or repeats > 1):
                    bad = next((r for r, _ in runs[s] if r.tokens != ref_tokens), None)
                    match = bad is None
                    if bad is not None:
                        mm = classify_mismatch(llm.model, ids, ref_tokens, bad.tokens)
                        log.error("OUTPUT MISMATCH: %s on %s/%s at token %s (logit margin %s, %s)", s, p.dataset,
                                  p.id, mm["index"], mm["margin"], "near-tie" if mm["near_tie"] else "NOT a near-tie")
                rec = run_record(prompt=p, n_prompt=len(ids), strategy=s, stats=g.stats, describe=desc,
                                 ref_tps=ref_tps, match=match, mismatch=mm)
                if repeats > 1:
                    rec["decode_s_runs"] = [r.stats.decode_s for r, _ in runs[s]]
                    # the fastest run (interference on a shared machine only ever adds time): the
                    # speedup of the fastest runs of both, next to the median runs' ``speedup``
                    fast = max(r.stats.tokens_per_s for r, _ in runs[s])
                    if s == "autoregressive":
                        ref_fast = fast
                    rec["tokens_per_s_fastest"] = fast
                    rec["speedup_fastest"] = fast / ref_fast if ref_fast else None
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
        bar.close()
    return records


def _collect(stream: Iterator[list[int]], tokens: list[int]) -> Iterator[None]:
    """A generation's stream that appends its tokens to ``tokens``."""
    for chunk in stream:
        tokens.extend(chunk)
        yield None


# ---- predicted TPT vs measured speed across plans (``knapspec bench tpt``) ---------------------------
def alpha_from_mean_accepted(mean_accepted: float, d: int) -> float:
    """The i.i.d. acceptance rate whose expected tokens per round with ``d`` drafts is
    ``mean_accepted`` (bisection on E(α, d), which increases in α)."""
    from .strategies.knapspec import expected_tokens
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
    the time saved), each decoded with its TPT-optimal draft length as a fixed plan (confidence
    exit off, so rounds draft exactly d as TPT assumes); predicted TPT vs measured tokens/s.
    ``predicted_post`` uses the acceptance measured in the run (isolates the latency model)."""
    from tqdm import tqdm

    from .datasets import load_dataset
    from .latency import get_latency_model
    from .sampling import SamplingParams
    from .strategies.base import RoundState
    from .strategies.knapspec import KnapSpecStrategy, tpt
    from .strategies.static import StaticStrategy
    m, eng = llm.model, llm.engine
    lat = get_latency_model(m, quick=True)
    rows: list[dict] = []
    jobs = [(c, p) for c in contexts for p in load_dataset(f"long-docs:{c}", root=root, tokenizer=llm.tokenizer, n=n)]
    bar = tqdm(total=len(jobs) * (plans + 1), disable=not progress, desc="tpt", unit="run")
    for ctx, p in jobs:
        ids = llm.encode(p.text, chat=p.chat)
        cache = m.new_cache(len(ids) + 1)
        for s in range(0, len(ids), 512):
            m.forward(torch.tensor([ids[s:s + 512]], device=m.device), s, cache, logits=False)
        strat = KnapSpecStrategy(m, lat, window=window, max_states=4 * plans, min_cosine=0.0)
        strat.start(RoundState(model=m, cache=cache, tokens=ids + [0], n_prompt=len(ids), round=0,
                               sampling=SamplingParams(), remaining=new_tokens))
        cands, _ = strat.optimise(len(ids))
        if len(cands) > plans:
            idx = np.linspace(0, len(cands) - 1, plans).round().astype(int)
            cands = [cands[i] for i in sorted(set(idx.tolist()))]
        g = eng.generate(ids, max_new_tokens=new_tokens, stop_ids=())
        t1 = lat.predict(None, len(ids), 1)
        rows.append(dict(context=ctx, prompt_tokens=len(ids), prompt_id=p.id, plan="full", skipped=0, d=0,
                         alpha=1.0, predicted_tps=1 / t1, predicted_post=1 / t1,
                         tokens_per_s=g.stats.tokens_per_s, mean_accepted=1.0))
        bar.update()
        for plan, alpha, _ in cands:
            tv = [lat.predict(None, len(ids), d + 1) for d in range(9)]
            td = lat.predict(plan, len(ids), 1)
            d = max(range(1, 9), key=lambda d: tpt(alpha, d, td, tv[d]))
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
