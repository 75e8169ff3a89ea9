"""The side-by-side harness (``knapspec bench run``): every strategy on the same real prompts,
autoregressive first (the reference output and the speedup's denominator), decoding rounds in
lockstep, each output checked against the reference; mismatches classified as near-ties or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from ..engine import prefill
from .timing import balanced_orders, frozen_gc, lockstep, sync, turn_orders

log = logging.getLogger(__name__)


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
    out = prefill(model, ids, cache)
    logits = out.logits[0, -1].float()
    margin = float(logits[ref[i]] - logits[got[i]])
    tol = near_tie_tolerance(model.dtype) * max(1.0, float(logits.abs().max()))
    # margin < 0: the full model, recomputed in one pass, itself prefers the speculative output's
    # token — the reference run's own rounding decided it (reduced precision only)
    reduced = model.dtype in (torch.bfloat16, torch.float16)
    return {"index": i, "ref_token": ref[i], "got_token": got[i], "margin": margin,
            "near_tie": abs(margin) <= tol or (reduced and margin < 0)}


# the n-gram length at which :func:`repeat_share` counts a generation as repeating itself
REPEAT_NGRAM = 8


def repeat_share(tokens: Sequence[int], n: int = REPEAT_NGRAM) -> float:
    """The share of a generation's tokens that repeat the generation itself: those inside a
    stretch of at least ``n`` tokens that already occurred, in that order, earlier in the same
    output (its prompt not counted; a line said three times: two thirds). A small model often
    falls into a loop of one line or sentence; every strategy that drafts from what was said
    (lookup, the hybrid) or with a cheap copy of the model (a windowed draft) is then accepted
    almost always, so speedups on such outputs say little about text that does not repeat."""
    seen: set[tuple[int, ...]] = set()
    count, covered = 0, 0                       # covered: tokens before this index are counted
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        if gram in seen:                        # the n tokens ending at i, minus those counted
            count += i + 1 - max(covered, i - n + 1)
            covered = i + 1
        seen.add(gram)
    return count / len(tokens) if tokens else 0.0


def run_record(*, prompt, n_prompt: int, strategy: str, stats, describe: dict, ref_tps: float | None,
               match: bool | None, mismatch: dict | None, tokens: Sequence[int] | None = None) -> dict:
    """One JSONL row: the generation's statistics plus the comparison with autoregressive
    (``tokens``: the generated ones, for :func:`repeat_share`)."""
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
        "mlp_skip_share": describe.get("mlp_skip_share"), "attn_window_share": describe.get("attn_window_share"),
        "match": match, "mismatch": mismatch,
        "repeat_share": None if tokens is None else repeat_share(tokens),
        "strategy_state": describe,
    }


def expand_datasets(specs: list[str], root) -> list[str]:
    """``spec-bench`` (no category) stands for every category, one dataset each."""
    from ..datasets import data_dir, spec_bench_categories
    out = []
    for s in specs:
        if s == "spec-bench":
            out += [f"spec-bench:{c}" for c in spec_bench_categories(root or data_dir())]
        else:
            out.append(s)
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value;...`` (a strategy with options, e.g. ``hybrid:draft_vocab=off``):
    the benchmark runs variants of one strategy side by side under their full spec
    (:meth:`~knapspec.strategies.base.Registry.parse`: an option the strategy does not take fails)."""
    from ..strategies import REGISTRY
    return REGISTRY.parse(spec)


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
    every repeat's output is checked against the reference.

    ``warmup``: first each strategy's one-time work as ``generate`` and ``serve`` do it
    (``LLM.prepare``; its seconds are each record's ``prepare_s``), then one short generation of
    each on the first prompt's tail (kernels, allocator, caches)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if interleave not in INTERLEAVE:
        raise ValueError(f"interleave must be one of {', '.join(INTERLEAVE)}, got {interleave!r}")
    from ..datasets import load_dataset
    from ..sampling import SamplingParams
    from ..strategies import REGISTRY
    order = ["autoregressive"] + [s for s in strategies if s != "autoregressive"]
    variants = {s: parse_variant(s) for s in order}
    opts = strategy_options or {}
    prompts = []
    for spec in expand_datasets(datasets, root):
        prompts += load_dataset(spec, root=root, tokenizer=llm.tokenizer, n=n)
    if not prompts:
        raise ValueError("no prompts: check --datasets and --n")
    encoded = [llm.encode_prompt(p.text, chat=p.chat) for p in prompts]
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
    prepare_s: dict[str, float] = {}
    if warmup:                                    # kernels, allocator, latency profile, caches
        ids = llm.encode_prompt(prompts[0].text, chat=prompts[0].chat)[-256:]
        for s in order:
            # the one-time work `generate` and `serve` do before their first generation
            # (LLM.prepare: the latency profile; the hybrid's first verdict where the machine has
            # none): timed apart, as a set-up cost, never inside a generation's decode time
            t0 = time.perf_counter()
            llm.prepare(make(s))
            prepare_s[s] = time.perf_counter() - t0
            w = make(s)
            if w.warm_up_options:
                w = make(s, **w.warm_up_options)
            eng.generate(ids, w, max_new_tokens=16, sampling=sp, stop_ids=stops)
    from tqdm import tqdm

    from ..engine import Generation
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
                steps = lockstep(streams, turns, lambda: sync(dev))
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
                                 ref_tps=ref_tps, match=match, mismatch=mm, tokens=g.tokens)
                if s in prepare_s:
                    rec["prepare_s"] = prepare_s[s]
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
