"""``knapspec bench ...``: the benchmark commands' arguments, and printing or writing their results."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import DATA_HELP, Parser, add_model_args, check_strategy, float_in, load_model, positive_int

BENCH_STRATEGIES = ("autoregressive", "lookup", "knapspec", "hybrid", "hybrid:min_lookup=8")
BENCH_DATASETS = ("spec-bench", "long-docs:512", "long-docs:2k", "long-docs:4k", "long-docs:8000")
QUICK_DATASETS = ("spec-bench:summarization", "long-docs:512", "long-docs:2k")


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks (commands, not tests)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True, parser_class=Parser)
    ar = bsub.add_parser("ar", help="our autoregressive decoding vs transformers' generate")
    add_model_args(ar)
    ar.add_argument("--contexts", default="128,2048", help="context lengths, comma-separated")
    ar.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=32)
    ar.add_argument("--repeats", type=positive_int("--repeats"), default=3)
    ar.add_argument("--dtypes", default="float32,bfloat16")
    lt = bsub.add_parser("latency", help="latency model vs real decoding steps (MAPE)")
    add_model_args(lt)
    lt.add_argument("--contexts", default="256,1024,4096,8000")
    lt.add_argument("--plans", type=positive_int("--plans"), default=8, help="random plans per context")
    lt.add_argument("--repeats", type=positive_int("--repeats"), default=5)
    lt.add_argument("--quick", action="store_true", help="use (or make) the quick profile")
    vf = bsub.add_parser("verify", help="cost of one verification pass over n tokens vs a 1-token step")
    add_model_args(vf)
    vf.add_argument("--contexts", default="128,4096")
    vf.add_argument("--widths", default="1,4,8,16")
    vf.add_argument("--repeats", type=positive_int("--repeats"), default=15)
    vf.add_argument("--dtypes", default="float32,bfloat16")
    vf.add_argument("--modes", default=None,
                    help="exact and/or fused (--exact / --no-exact; comma-separated, interleaved on the "
                         "same weights; default: the one mode --exact/--no-exact gives)")
    vf.add_argument("--attention", default=None,
                    help="fma, dot and/or amx: the native bfloat16 attention's kernels (comma-separated, "
                         "interleaved; default: as KNAPSPEC_AMX / KNAPSPEC_DOT and this CPU say)")
    pf = bsub.add_parser("prefill", help="prompt prefill time on the native attention's kernels")
    add_model_args(pf)
    pf.add_argument("--contexts", default="512,4096,8000")
    pf.add_argument("--repeats", type=positive_int("--repeats"), default=3)
    pf.add_argument("--attention", default="fma,amx",
                    help="fma, dot and/or amx (comma-separated, interleaved; speedup against the first)")
    tp = bsub.add_parser("tpt", help="predicted TPT vs measured tokens/s across the DP's candidate plans")
    add_model_args(tp)
    tp.add_argument("--contexts", default="512,2048,4096")
    tp.add_argument("--n", type=positive_int("--n"), default=1, help="prompts per context")
    tp.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=64)
    tp.add_argument("--plans", type=positive_int("--plans"), default=6, help="candidate plans per prompt")
    tp.add_argument("--window", type=positive_int("--window"), default=16, help="tokens the DP scores on")
    tp.add_argument("--data", default=None, help="data folder")
    pe = bsub.add_parser("peers", help="llama.cpp's llama-server on the same GGUF file vs knapspec, per category")
    add_model_args(pe)
    pe.add_argument("--llama-cpp", default=None,
                    help="folder holding llama-server (or its build/bin); default: llama-server on PATH")
    pe.add_argument("--strategies", default="autoregressive,hybrid", help="knapspec strategies, comma-separated")
    pe.add_argument("--datasets", default="spec-bench,long-docs:4k,long-docs:8000",
                    help="spec-bench (each category), spec-bench:CATEGORY, long-docs:N, long-text:N, FILE.jsonl")
    pe.add_argument("--n", type=positive_int("--n"), default=2, help="prompts per category or dataset")
    pe.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    pe.add_argument("--repeats", type=positive_int("--repeats"), default=3)
    pe.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a cold start of each (new process to first token) and its peak memory")
    pe.add_argument("--data", default=None, help=DATA_HELP)
    pe.add_argument("--out", default="bench-peers", help="folder for runs.jsonl and table.md")
    from .serve import add_bench_parser
    add_bench_parser(bsub)
    rn = bsub.add_parser("run", help="strategies side by side on real data: JSONL, table, plots")
    add_model_args(rn)
    rn.add_argument("--strategies", default=None,
                    help="comma-separated (autoregressive always runs first); a variant with options is "
                         "NAME:key=value;key=value (e.g. hybrid:draft_vocab=off); default "
                         + ",".join(BENCH_STRATEGIES))
    rn.add_argument("--datasets", default=None,
                    help="comma-separated: spec-bench (every category), spec-bench:CATEGORY, long-docs:N "
                         "(a summary of a document of N = 512, 2k, 4k, 8k ... tokens), long-text:N (the "
                         "document's first N tokens continued as raw text), gsm8k, aime, humaneval, "
                         "FILE.jsonl; default "
                         + ",".join(BENCH_DATASETS))
    rn.add_argument("--n", type=positive_int("--n"), default=None, help="prompts per dataset (default 2)")
    rn.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=None,
                    help="default 128")
    rn.add_argument("--data", default=None, help=DATA_HELP)
    rn.add_argument("--out", default="bench-out", help="folder for runs.jsonl, table.md and plots")
    rn.add_argument("--temperature", type=float_in("--temperature", 0, float("inf"), False,
                    ">= 0 (0 = greedy)"), default=0.0)
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--quick", action="store_true",
                    help="a few minutes: " + ",".join(QUICK_DATASETS) + ", 1 prompt each, 64 tokens")
    rn.add_argument("--skip", default=None, help="static strategy: skipped sublayers, e.g. a3,a7,m12")
    rn.add_argument("--max-draft", type=positive_int("--max-draft"), default=None,
                    help="maximum draft length, for the strategies that take one")
    rn.add_argument("--repeats", type=positive_int("--repeats"), default=1,
                    help="runs per strategy and prompt, round-robin; the run of median time is reported "
                         "(default 1)")
    rn.add_argument("--interleave", default="rounds", choices=["rounds", "runs"],
                    help="rounds (default): a prompt's generations run at the same time, one decoding round "
                         "of each in turn, each timed over its own rounds; runs: one whole generation after "
                         "the other")
    rn.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="leave out the timing of a 1-token step and an 8-token pass at 4,096 tokens of "
                         "context before and after the runs (headline.json: pass_speed), which tells at what "
                         "speed this host ran passes over several tokens during the runs")
    rn.add_argument("--strict", action="store_true",
                    help="fail on any output difference, near-ties from reduced-precision rounding included")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench_run(a: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..bench import category_table, headline, markdown_table, parse_variant, run_side_by_side, summarize
    from ..bench.components import pass_speed
    from ..bench.plots import plot_skip_share, plot_speedup_vs_context, plot_tpt
    from ..datasets import data_dir
    from ..storage import write_text_atomic
    strategies = a.strategies.split(",") if a.strategies else list(BENCH_STRATEGIES)
    for s in strategies:
        parse_variant(s)
    datasets = a.datasets.split(",") if a.datasets else list(QUICK_DATASETS if a.quick else BENCH_DATASETS)
    n = a.n or (1 if a.quick else 2)
    new = a.max_new_tokens or (64 if a.quick else 128)
    root = data_dir(a.data) if any(not d.endswith(".jsonl") for d in datasets) else None
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    llm = load_model(a)
    common: dict[str, Any] = {} if a.max_draft is None else {"max_draft": a.max_draft}
    opts = {s: dict(common) for s in strategies}
    for s in strategies:                           # static and its variants (static:threshold=0.3)
        if parse_variant(s)[0] == "static":
            if not a.skip:
                raise ValueError("the static strategy needs --skip a3,m7,...")
            opts[s]["skip"] = a.skip
    before = pass_speed(llm) if a.calibrate else None
    records = run_side_by_side(llm, strategies=strategies, datasets=datasets, n=n, max_new_tokens=new,
                               root=root, temperature=a.temperature, seed=a.seed, strategy_options=opts,
                               repeats=a.repeats, interleave=a.interleave)
    summary = summarize(records)
    head = headline(records)
    if a.calibrate:
        head["pass_speed"] = {"before": before, "after": pass_speed(llm)}
    head.update(model=llm.model.cfg.name, dtype=str(llm.model.dtype).replace("torch.", ""),
                device=str(llm.model.device), n=n, max_new_tokens=new, datasets=datasets, repeats=a.repeats,
                interleave=a.interleave, exact=llm.model.row_invariant)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        write_text_atomic(out / name, text)
    write("runs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    table_md = markdown_table(summary)
    write("table.md", table_md + "\n")
    write("headline.json", json.dumps(head, indent=1) + "\n")
    cat_md = category_table(records)
    if cat_md:
        text = "Median runs: geometric-mean speedup over autoregressive decoding per category\n\n" + cat_md
        fast_md = category_table(records, "speedup_fastest") if a.repeats > 1 else None
        if fast_md:
            text += "\n\nFastest runs (of each strategy's repeats) per category\n\n" + fast_md
        write("categories.md", text + "\n")
    plot_speedup_vs_context(records, out / "speedup_vs_context.png")
    plot_skip_share(records, out / "skip_share.png")
    plot_tpt(records, out / "tpt.png", head.get("tpt_pearson_r"))
    print(table_md)
    if cat_md:
        print(text)
    print(json.dumps(head))
    reduced = llm.model.dtype in (torch.bfloat16, torch.float16)
    if head["mismatches"] > head["hard_mismatches"] and reduced and not a.strict:
        # without exact mode a verify pass over d+1 tokens and a 1-token step round differently in
        # bf16/fp16, and a greedy choice between nearly equal logits can flip
        sys.stderr.write(f"knapspec: warning: {head['mismatches'] - head['hard_mismatches']} run(s) differ from "
                         f"the autoregressive output at a near-tie in {head['dtype']}; "
                         + ("exact mode was on, so this machine's kernels are not row-invariant the way "
                            "they were measured to be (docs/benchmarks.md, \"Exact mode\"); "
                            if llm.model.row_invariant else "leave out --no-exact for bit-identical output; ")
                         + "--strict fails on any difference\n")
    bad = head["mismatches"] if a.strict else head["hard_mismatches"]
    if bad:
        sys.stderr.write(f"knapspec: error: {bad} run(s) did not reproduce the autoregressive output "
                         f"(see {out / 'runs.jsonl'})\n")
        return 1
    return 0


def _cmd_bench_tpt(a: argparse.Namespace) -> int:
    from ..bench import bench_tpt, ints, pearson, table
    from ..datasets import data_dir
    root = data_dir(a.data)
    llm = load_model(a)
    rows = bench_tpt(llm, contexts=ints(a.contexts), n=a.n, new_tokens=a.new_tokens, plans=a.plans,
                     window=a.window, root=root)
    print(table(rows, ["context", "prompt_tokens", "skipped", "d", "alpha", "predicted_tps", "predicted_post",
                       "tokens_per_s", "mean_accepted"]))
    res = {"bench": "tpt", "pearson_r": pearson([r["predicted_tps"] for r in rows], [r["tokens_per_s"] for r in rows]),
           "pearson_r_post": pearson([r["predicted_post"] for r in rows], [r["tokens_per_s"] for r in rows])}
    per_ctx = {}
    for c in ints(a.contexts):
        rs = [r for r in rows if r["context"] == c]
        per_ctx[c] = pearson([r["predicted_tps"] for r in rs], [r["tokens_per_s"] for r in rs])
    res["pearson_r_within_context"] = per_ctx
    res["rows"] = rows
    print(json.dumps(res))
    return 0


def _cmd_bench_peers(a: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..bench.harness import expand_datasets
    from ..bench.peers import Case, LlamaServer, cold_start, find_llama_server, run_peers, summary_table
    from ..checkpoint import GGUFCheckpoint
    from ..datasets import data_dir, load_dataset
    from ..storage import write_text_atomic
    server_bin = find_llama_server(a.llama_cpp)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    specs = [d for d in a.datasets.split(",") if d]
    strategies = [s for s in a.strategies.split(",") if s]
    for s in strategies:
        check_strategy(s)
    llm = load_model(a)
    if not isinstance(llm.checkpoint, GGUFCheckpoint):
        raise ValueError("bench peers compares llama.cpp on the same GGUF file: give --model FILE.gguf "
                         "(or the embedded default)")
    gguf = llm.checkpoint.path
    threads = torch.get_num_threads()
    root = data_dir(a.data) if any(not d.endswith(".jsonl") for d in specs) else None
    cases = []
    for spec in expand_datasets(specs, root):
        for p in load_dataset(spec, root=root, tokenizer=llm.tokenizer, n=a.n):
            label = f"spec-bench: {p.category}" if p.dataset == "spec-bench" else p.dataset
            cases.append(Case(label, p.id, llm.encode_prompt(p.text, chat=p.chat)))
    if not cases:
        raise ValueError("no prompts: check --datasets and --n")
    longest = max(len(c.ids) for c in cases) + a.max_new_tokens + 16
    if longest > llm.model.cfg.max_position:
        raise ValueError(f"a prompt of {longest - a.max_new_tokens - 16} tokens plus {a.max_new_tokens} new tokens "
                         f"exceeds the model's context of {llm.model.cfg.max_position}")
    with LlamaServer(server_bin, gguf, threads=threads, ctx=max(longest, 512)) as srv:
        records = run_peers(llm, cases, server=srv, strategies=strategies, max_new_tokens=a.max_new_tokens,
                            repeats=a.repeats)
        llama_rss = srv.peak_rss_mb()
    import resource
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table_md = summary_table(records)
    head = {"model": str(gguf), "threads": threads, "max_new_tokens": a.max_new_tokens, "repeats": a.repeats,
            "llama_server": str(server_bin), "peak_rss_mb": {"llama-server": llama_rss,
                                                              "knapspec (benchmark process)": ours_rss}}
    if a.cold:
        head["cold_start"] = cold_start(a.model, threads=threads, server_binary=server_bin, gguf=gguf, ctx=2048,
                                        chat=llm.can_chat)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(out / "table.md", table_md + "\n")
    write_text_atomic(out / "headline.json", json.dumps(head, indent=1) + "\n")
    print(table_md)
    print(json.dumps(head))
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.bench_cmd == "serve":
        from .serve import cmd_bench_serve
        return cmd_bench_serve(a)
    if a.bench_cmd == "peers":
        return _cmd_bench_peers(a)
    if a.bench_cmd == "run":
        return _cmd_bench_run(a)
    if a.bench_cmd == "tpt":
        return _cmd_bench_tpt(a)
    import statistics

    import torch

    from ..api import set_threads
    from ..bench import bench_ar, bench_latency, bench_prefill, bench_verify, ints, table
    set_threads(a.threads)
    dtypes = [d for d in getattr(a, "dtypes", "").split(",") if d]
    if a.bench_cmd == "ar":
        rows = bench_ar(a.model, device=a.device, threads=a.threads, contexts=ints(a.contexts),
                        new_tokens=a.new_tokens, repeats=a.repeats, dtypes=dtypes, exact=a.exact)
        print(table(rows, ["dtype", "context", "ours_tok_s", "hf_tok_s", "ratio", "bandwidth_gb_s",
                            "bytes_per_token_mb", "roofline_tok_s", "roofline_share", "share_of_best_bw"]))
    elif a.bench_cmd == "latency":
        rows = bench_latency(a.model, device=a.device, threads=a.threads, contexts=ints(a.contexts),
                             n_plans=a.plans, repeats=a.repeats, quick=a.quick, exact=a.exact)
        print(table(rows, ["context", "tokens", "skipped", "real_ms", "predicted_ms", "error"]))
        by_ctx = {c: statistics.mean(r["error"] for r in rows if r["context"] == c) for c in ints(a.contexts)}
        print("MAPE by context: " + ", ".join(f"{c}: {100 * e:.1f}%" for c, e in by_ctx.items()))
        print(f"MAPE overall: {100 * statistics.mean(r['error'] for r in rows):.1f}%")
    elif a.bench_cmd == "prefill":
        rows = bench_prefill(a.model, device=a.device, threads=a.threads, contexts=ints(a.contexts),
                             repeats=a.repeats, attentions=a.attention.split(","))
        print(table(rows, ["context", "attention", "s", "tokens_per_s", "speedup"]))
    elif a.bench_cmd == "verify":
        rows = bench_verify(a.model, device=a.device, threads=a.threads, contexts=ints(a.contexts),
                            widths=ints(a.widths), repeats=a.repeats, dtypes=dtypes, exact=a.exact,
                            modes=a.modes.split(",") if a.modes else None,
                            attentions=a.attention.split(",") if a.attention else None)
        print(table(rows, ["dtype", "context", "width", "ms", "ratio"]
                    + (["mode", "vs_fused"] if a.modes and "," in a.modes else [])
                    + (["attention"] if a.attention else [])))
    else:
        raise ValueError(f"unknown benchmark {a.bench_cmd!r}: choose ar, verify or latency")
    print(json.dumps({"bench": a.bench_cmd, "device": str(a.device),
                      "threads": torch.get_num_threads(), "rows": rows}))
    return 0


