"""``knapspec generate | profile | calibrate``: wiring from arguments to the library, and printing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .options import (
    DATA_HELP,
    add_model_args,
    add_strategy_args,
    check_strategy,
    float_in,
    load_model,
    positive_int,
    strategy_options,
)


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text")
    add_model_args(g)
    add_strategy_args(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    g.add_argument("--temperature", type=float_in("--temperature", 0, float("inf"), False,
                                                   ">= 0 (0 = greedy)"), default=0.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float_in("--top-p", 0, 1, True, "in (0, 1]"), default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--stats", action="store_true", help="print generation statistics")
    g.add_argument("--json", action="store_true", help="print one JSON object (text + statistics)")

    g.set_defaults(func=_cmd_generate)

    pr = sub.add_parser("profile", help="measure the latency model of this model on this machine")
    add_model_args(pr)
    pr.add_argument("--quick", action="store_true", help="a coarse grid (about 30 s)")
    pr.add_argument("--force", action="store_true", help="re-profile even if a cached profile exists")
    pr.add_argument("--plot", default=None, help="write a PNG of measured points and fits")

    pr.set_defaults(func=_cmd_profile)

    c = sub.add_parser("calibrate", help="offline searches: draft-verify (one skip set), knn-ssd (one per "
                                         "cluster), vocab (the draft vocabulary's token ranking)")
    add_model_args(c)
    c.add_argument("--strategy", required=True, help="draft-verify, knn-ssd or vocab")
    c.add_argument("--out", default=None, help="calibration file to write (default: the cache folder, "
                                               "where the strategy looks for it)")
    c.add_argument("--datasets", default="spec-bench",
                   help="calibration prompts: spec-bench (every category), spec-bench:CATEGORY, gsm8k, "
                        "humaneval, FILE.jsonl, comma-separated; the LAST --n prompts of each are used, so "
                        "the benchmark's first prompts stay unseen")
    c.add_argument("--n", type=positive_int("--n"), default=None,
                   help="prompts per dataset (default: draft-verify 1, knn-ssd 4, vocab 8)")
    c.add_argument("--trials", type=positive_int("--trials"), default=None,
                   help="search trials (default: draft-verify 30, knn-ssd 48 per cluster)")
    c.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=None,
                   help="tokens generated per prompt (default: draft-verify 24 per trial, vocab 64)")
    c.add_argument("--clusters", type=positive_int("--clusters"), default=4, help="knn-ssd: k-means clusters")
    c.add_argument("--skip-ratio", type=float_in("--skip-ratio", 0, 1, True, "in (0, 1)"), default=0.45,
                   help="knn-ssd: share of sublayers skipped")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data", default=None, help=DATA_HELP)
    c.set_defaults(func=_cmd_calibrate)


def _cmd_generate(a: argparse.Namespace) -> int:
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {a.top_k}")
    opts = strategy_options(a)          # before loading: a misplaced option fails at once
    llm = load_model(a)
    if a.chat and not llm.can_chat:          # before any one-time work (a base model, e.g. Gemma 3 270M)
        raise ValueError("this model's tokenizer has no chat template: drop --chat")
    from ..bench import frozen_gc
    # one-time work (latency profile, a strategy's first verdict) before the timed generation
    llm.prepare(a.strategy, progress=True, **opts)
    with frozen_gc():    # what is loaded lives to the end: no full collection over it mid-decoding
        return _generate(a, llm, opts)


def _generate(a: argparse.Namespace, llm: Any, opts: dict[str, Any]) -> int:
    kw: dict[str, Any] = dict(strategy=a.strategy, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                              chat=a.chat, **opts)
    if a.threshold is not None:
        kw["threshold"] = a.threshold
    if a.stream and not a.json:
        from ..engine import GenerationStats
        stats = GenerationStats()
        for piece in llm.stream(a.prompt, stats=stats, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        res = llm.generate(a.prompt, **kw)
        stats = res.stats
        if a.json:
            print(json.dumps({"text": res.text, "tokens": res.tokens, "stats": stats.as_dict()}))
            return 0
        print(res.text)
    if a.stats:
        print(f"[stats] {stats.summary()}", file=sys.stderr)
    return 0


def _cmd_profile(a: argparse.Namespace) -> int:
    from ..latency import get_latency_model, profile_path
    llm = load_model(a)
    lm = get_latency_model(llm.model, quick=a.quick, force=a.force, progress=True)
    ctx = [c for c in (128, 1024, 4096, 8192) if c < llm.model.cfg.max_position]
    print(f"latency profile: {profile_path(lm.key)}")
    print(f"fit error: attention MAPE {100 * lm.fit_error['attention_mape']:.1f}%, "
          f"MLP MAPE {100 * lm.fit_error['mlp_mape']:.1f}%")
    print("| context | attention ms (mean/layer) | MLP ms (mean/layer) | lm_head ms | full step ms | verify 8 ms |")
    print("|---|---|---|---|---|---|")
    L = lm.n_layers
    for c in ctx:
        att = sum(lm.attn_time(i, c) for i in range(L)) / L
        mlp = sum(lm.mlp_time(i) for i in range(L)) / L
        print(f"| {c} | {1e3 * att:.3f} | {1e3 * mlp:.3f} | {1e3 * lm.head_time(1):.2f} | "
              f"{1e3 * lm.predict(None, c, 1):.1f} | {1e3 * lm.predict(None, c, 8):.1f} |")
    if a.plot:
        from ..bench.plots import plot_latency
        plot_latency(lm, a.plot)
        print(f"plot: {a.plot}")
    return 0


CALIBRATED = ("draft-verify", "knn-ssd", "vocab")


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from ..bench import expand_datasets
    from ..datasets import data_dir, load_dataset
    if a.strategy not in CALIBRATED:
        check_strategy(a.strategy)
        raise ValueError(f"strategy {a.strategy!r} needs no calibration: calibrate {' or '.join(CALIBRATED)}")
    specs = [d for d in a.datasets.split(",") if d]
    root = data_dir(a.data) if any(not d.endswith(".jsonl") for d in specs) else None
    if any(d.startswith(("long-docs", "long-text")) for d in specs):
        raise ValueError("calibrate takes spec-bench, spec-bench:CATEGORY, gsm8k, aime, humaneval or FILE.jsonl")
    n = a.n or {"draft-verify": 1, "knn-ssd": 4, "vocab": 8}[a.strategy]
    prompts = []
    for spec in expand_datasets(specs, root):
        prompts += load_dataset(spec, root=root)[-n:]
    if a.out and Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder: give a file name, e.g. {a.out}/calibration.json")
    llm = load_model(a)
    ids = [llm.encode_prompt(p.text, chat=p.chat) for p in prompts]
    if a.strategy == "draft-verify":
        from ..strategies.draft_verify import calibrate
        rec = calibrate(llm, ids, trials=a.trials or 30, new_tokens=a.new_tokens or 24, seed=a.seed,
                        out=a.out)
        print(f"draft-verify skip set: {rec['skip']}  ({rec['tokens_per_s']:.1f} tokens/s vs autoregressive "
              f"{rec['ar_tokens_per_s']:.1f}; {rec['trials']} trials on {rec['n_prompts']} prompts, "
              f"{rec['seconds']} s)")
    elif a.strategy == "vocab":
        from ..strategies.vocab import calibrate
        rec = calibrate(llm, ids, new_tokens=a.new_tokens or 64, out=a.out)
        print(f"draft vocabulary ranking: {rec['distinct']} distinct tokens from {rec['n_prompts']} prompts and "
              f"{rec['output_tokens']} generated tokens ({rec['seconds']} s)")
    else:
        from ..strategies.knn_ssd import calibrate
        rec = calibrate(llm, [(p.category or p.dataset, x) for p, x in zip(prompts, ids)], clusters=a.clusters,
                        trials=a.trials or 48, skip_ratio=a.skip_ratio, seed=a.seed, out=a.out)
        for i, c in enumerate(rec["clusters"]):
            print(f"cluster {i}: {c['size']} prompts {c['labels']}  matchness {c['matchness']:.3f}  skip {c['skip']}")
    print(f"written: {rec['path']}")
    return 0


