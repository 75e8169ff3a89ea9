"""Command line: ``knapspec generate | serve | profile | calibrate | bench {run,ar,verify,latency,tpt,serve}``.

Wiring only: parse arguments, set up logging, call the library, print. User errors
(ValueError, FileNotFoundError) become one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("knapspec")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _positive_int(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {v}")
        return v
    return conv


def _float_in(name: str, lo: float, hi: float, lo_open: bool, accepted: str):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number {accepted}, got {s!r}") from None
        if not ((v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"{name} must be {accepted}, got {s}")
        return v
    return conv


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face folder, .gguf file, or smollm2-135m (embedded default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (auto = bfloat16, measured fastest on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's default, all cores)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="compute each token the same way alone or in a verification pass, so that "
                        "output is bit-identical to autoregressive decoding in any dtype (default: "
                        "on for a CPU, where it was measured to cost up to ~8%% per pass at short "
                        "contexts and nothing at 1k-4k tokens; off on CUDA, not measured there); "
                        "--no-exact: the fused attention kernel over the exact context length, "
                        "whose bfloat16 rounding can flip near-ties")
    p.add_argument("--kernels", default="auto", choices=["auto", "native", "onednn", "plain"],
                   help="CPU matrix products: native (knapspec's AVX-512 kernels, built on first use), "
                        "onednn (oneDNN's prepacked kernels), plain (F.linear, no second copy of the "
                        "weights); auto = native where the CPU and a C++ compiler allow, else onednn")


def _load_model(a: argparse.Namespace):
    """Load the model that the arguments of :func:`_add_model_args` name."""
    from .api import load
    kernels = getattr(a, "kernels", "auto")
    return load(a.model, dtype=a.dtype, device=a.device, threads=a.threads, exact=a.exact,
                pack=False if kernels == "plain" else None, kernels="auto" if kernels == "plain" else kernels)


def _add_strategy_args(p: argparse.ArgumentParser) -> None:
    from .strategies import REGISTRY
    p.add_argument("--strategy", default=None,
                   help=f"decoding strategy: {', '.join(REGISTRY.names())} (default: the library default)")
    p.add_argument("--skip", default=None, help="static strategy: skipped sublayers, e.g. a3,a7,m12")
    p.add_argument("--plan-file", default=None, help="static strategy: a plan file")
    p.add_argument("--max-draft", type=_positive_int("--max-draft"), default=None,
                   help="maximum draft length per round")
    p.add_argument("--threshold", type=_float_in("--threshold", 0, 1, False, "in [0, 1]"), default=None,
                   help="draft confidence threshold: drafting stops below it (default 0.9, measured)")
    p.add_argument("--calibration", default=None,
                   help="calibration file of draft-verify / knn-ssd (default: the one `knapspec calibrate` "
                        "wrote for this model)")
    p.add_argument("--skip-ratio", type=_float_in("--skip-ratio", 0, 1, True, "in (0, 1)"), default=None,
                   help="swift: share of sublayers its skip sets skip (default 0.45)")


def _strategy_options(a: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(a, k) for k in ("skip", "plan_file", "max_draft", "calibration", "skip_ratio")
            if getattr(a, k, None) is not None}
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="knapspec", description="Lossless self-speculative decoding.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text")
    _add_model_args(g)
    _add_strategy_args(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=128)
    g.add_argument("--temperature", type=_float_in("--temperature", 0, float("inf"), False,
                                                   ">= 0 (0 = greedy)"), default=0.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=_float_in("--top-p", 0, 1, True, "in (0, 1]"), default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--stats", action="store_true", help="print generation statistics")
    g.add_argument("--json", action="store_true", help="print one JSON object (text + statistics)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: chat and text completions, "
                                      "streamed or not; /metrics for Prometheus")
    _add_model_args(sv)
    _add_strategy_args(sv)
    _add_serve_args(sv)

    pr = sub.add_parser("profile", help="measure the latency model of this model on this machine")
    _add_model_args(pr)
    pr.add_argument("--quick", action="store_true", help="a coarse grid (about 30 s)")
    pr.add_argument("--force", action="store_true", help="re-profile even if a cached profile exists")
    pr.add_argument("--plot", default=None, help="write a PNG of measured points and fits")

    c = sub.add_parser("calibrate", help="offline searches: draft-verify (one skip set), knn-ssd (one per "
                                         "cluster), vocab (the draft vocabulary's token ranking)")
    _add_model_args(c)
    c.add_argument("--strategy", required=True, help="draft-verify, knn-ssd or vocab")
    c.add_argument("--out", default=None, help="calibration file to write (default: the cache folder, "
                                               "where the strategy looks for it)")
    c.add_argument("--datasets", default="spec-bench",
                   help="calibration prompts: spec-bench (every category), spec-bench:CATEGORY, gsm8k, "
                        "humaneval, FILE.jsonl, comma-separated; the LAST --n prompts of each are used, so "
                        "the benchmark's first prompts stay unseen")
    c.add_argument("--n", type=_positive_int("--n"), default=None,
                   help="prompts per dataset (default: draft-verify 1, knn-ssd 4, vocab 8)")
    c.add_argument("--trials", type=_positive_int("--trials"), default=None,
                   help="search trials (default: draft-verify 30, knn-ssd 48 per cluster)")
    c.add_argument("--new-tokens", type=_positive_int("--new-tokens"), default=None,
                   help="tokens generated per prompt (default: draft-verify 24 per trial, vocab 64)")
    c.add_argument("--clusters", type=_positive_int("--clusters"), default=4, help="knn-ssd: k-means clusters")
    c.add_argument("--skip-ratio", type=_float_in("--skip-ratio", 0, 1, True, "in (0, 1)"), default=0.45,
                   help="knn-ssd: share of sublayers skipped")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data", default=None, help="data folder (default: $KNAPSPEC_DATA or ../shared/data)")

    b = sub.add_parser("bench", help="benchmarks (commands, not tests)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True, parser_class=_Parser)
    ar = bsub.add_parser("ar", help="our autoregressive decoding vs transformers' generate")
    _add_model_args(ar)
    ar.add_argument("--contexts", default="128,2048", help="context lengths, comma-separated")
    ar.add_argument("--new-tokens", type=_positive_int("--new-tokens"), default=32)
    ar.add_argument("--repeats", type=_positive_int("--repeats"), default=3)
    ar.add_argument("--dtypes", default="float32,bfloat16")
    lt = bsub.add_parser("latency", help="latency model vs real decoding steps (MAPE)")
    _add_model_args(lt)
    lt.add_argument("--contexts", default="256,1024,4096,8000")
    lt.add_argument("--plans", type=_positive_int("--plans"), default=8, help="random plans per context")
    lt.add_argument("--repeats", type=_positive_int("--repeats"), default=5)
    lt.add_argument("--quick", action="store_true", help="use (or make) the quick profile")
    vf = bsub.add_parser("verify", help="cost of one verification pass over n tokens vs a 1-token step")
    _add_model_args(vf)
    vf.add_argument("--contexts", default="128,4096")
    vf.add_argument("--widths", default="1,4,8,16")
    vf.add_argument("--repeats", type=_positive_int("--repeats"), default=15)
    vf.add_argument("--dtypes", default="float32,bfloat16")
    vf.add_argument("--modes", default=None,
                    help="exact and/or fused (--exact / --no-exact; comma-separated, interleaved on the "
                         "same weights; default: the one mode --exact/--no-exact gives)")
    tp = bsub.add_parser("tpt", help="predicted TPT vs measured tokens/s across the DP's candidate plans")
    _add_model_args(tp)
    tp.add_argument("--contexts", default="512,2048,4096")
    tp.add_argument("--n", type=_positive_int("--n"), default=1, help="prompts per context")
    tp.add_argument("--new-tokens", type=_positive_int("--new-tokens"), default=64)
    tp.add_argument("--plans", type=_positive_int("--plans"), default=6, help="candidate plans per prompt")
    tp.add_argument("--window", type=_positive_int("--window"), default=16, help="tokens the DP scores on")
    tp.add_argument("--data", default=None, help="data folder")
    bs = bsub.add_parser("serve", help="concurrent streaming clients against knapspec serve (one server per "
                                       "strategy) and llama.cpp's llama-server, measured as vllm bench serve")
    _add_model_args(bs)
    bs.add_argument("--strategies", default="hybrid,autoregressive",
                    help="a knapspec server per strategy, comma-separated (default hybrid,autoregressive)")
    bs.add_argument("--clients", default="1,4,32", help="concurrent streaming clients, comma-separated")
    bs.add_argument("--num-prompts", type=_positive_int("--num-prompts"), default=32,
                    help="requests per concurrency level: Spec-Bench questions, each category in turn")
    bs.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=64, help="max_tokens per request")
    bs.add_argument("--dataset", default="spec-bench", help="spec-bench, spec-bench:CATEGORY, gsm8k, ..., FILE.jsonl")
    bs.add_argument("--data", default=None, help="data folder (default: $KNAPSPEC_DATA or ../shared/data)")
    bs.add_argument("--llama-cpp", default=None,
                    help="llama-server binary or a folder holding it (default: llama-server on PATH; skipped "
                         "when none is found)")
    bs.add_argument("--no-llama-cpp", action="store_true", help="do not run llama-server")
    bs.add_argument("--base-url", default=None,
                    help="measure this running OpenAI-compatible server only (e.g. http://127.0.0.1:8000)")
    bs.add_argument("--api-key", default=None, help="for --base-url")
    bs.add_argument("--out", default=None, help="write every measurement (and the texts) to this JSON file")
    rn = bsub.add_parser("run", help="strategies side by side on real data: JSONL, table, plots")
    _add_model_args(rn)
    rn.add_argument("--strategies", default=None,
                    help="comma-separated (autoregressive always runs first); a variant with options is "
                         "NAME:key=value;key=value (e.g. hybrid:draft_vocab=off); default "
                         + ",".join(BENCH_STRATEGIES))
    rn.add_argument("--datasets", default=None,
                    help="comma-separated: spec-bench (every category), spec-bench:CATEGORY, long-docs:N "
                         "(512, 2k, 4k, 8k), gsm8k, aime, humaneval, FILE.jsonl; default "
                         + ",".join(BENCH_DATASETS))
    rn.add_argument("--n", type=_positive_int("--n"), default=None, help="prompts per dataset (default 2)")
    rn.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=None,
                    help="default 128")
    rn.add_argument("--data", default=None, help="data folder (default: $KNAPSPEC_DATA or ../shared/data)")
    rn.add_argument("--out", default="bench-out", help="folder for runs.jsonl, table.md and plots")
    rn.add_argument("--temperature", type=_float_in("--temperature", 0, float("inf"), False,
                    ">= 0 (0 = greedy)"), default=0.0)
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--quick", action="store_true",
                    help="a few minutes: " + ",".join(QUICK_DATASETS) + ", 1 prompt each, 64 tokens")
    rn.add_argument("--skip", default=None, help="static strategy: skipped sublayers, e.g. a3,a7,m12")
    rn.add_argument("--max-draft", type=_positive_int("--max-draft"), default=None,
                    help="maximum draft length, for the strategies that take one")
    rn.add_argument("--repeats", type=_positive_int("--repeats"), default=1,
                    help="runs per strategy and prompt, round-robin; the run of median time is reported "
                         "(default 1)")
    rn.add_argument("--interleave", default="rounds", choices=["rounds", "runs"],
                    help="rounds (default): a prompt's generations run at the same time, one decoding round "
                         "of each in turn, each timed over its own rounds; runs: one whole generation after "
                         "the other")
    rn.add_argument("--strict", action="store_true",
                    help="fail on any output difference, near-ties from reduced-precision rounding included")
    return p


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    def port(s: str) -> int:
        if not s.isdigit() or int(s) > 65535:
            raise argparse.ArgumentTypeError(f"--port must be an integer in 0..65535 (0 = any free port), got {s!r}")
        return int(s)

    def queue(s: str) -> int:
        if not s.isdigit():
            raise argparse.ArgumentTypeError(f"--max-queue must be an integer >= 0, got {s!r}")
        return int(s)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $KNAPSPEC_API_KEY; none = open)")
    p.add_argument("--max-queue", type=queue, default=64,
                   help="requests that may wait while one generates; beyond that, 429 (default 64)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint's, e.g. smollm2-135m)")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _check_strategy(name: str | None) -> None:
    from .strategies import REGISTRY
    if name is not None and name not in REGISTRY.names():
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(REGISTRY.names())}")


def _cmd_generate(a: argparse.Namespace) -> int:
    _check_strategy(a.strategy)
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {a.top_k}")
    llm = _load_model(a)
    from .bench import frozen_gc
    with frozen_gc():    # what is loaded lives to the end: no full collection over it mid-decoding
        return _generate(a, llm)


def _generate(a: argparse.Namespace, llm: Any) -> int:
    kw: dict[str, Any] = dict(strategy=a.strategy, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                              chat=a.chat, **_strategy_options(a))
    if a.threshold is not None:
        kw["threshold"] = a.threshold
    if a.stream and not a.json:
        from .engine import GenerationStats
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


def _cmd_serve(a: argparse.Namespace) -> int:
    import os

    from .bench import frozen_gc
    from .server.app import bind, create_app, run
    _check_strategy(a.strategy)
    sock = bind(a.host, a.port)                  # a port in use fails before the model loads
    llm = _load_model(a)
    app = create_app(llm, model_name=a.served_model_name, api_key=a.api_key or os.environ.get("KNAPSPEC_API_KEY"),
                     max_queue=a.max_queue, strategy=a.strategy, strategy_options=_strategy_options(a),
                     threshold=a.threshold)
    state = app.state.server
    state.warm_up()                              # also makes the strategy: bad options fail here
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    sys.stderr.write(f"knapspec: serving {state.name} at {url}/v1 (strategy {state.worker.make_strategy().name}, "
                     f"{'API key required' if state.api_key else 'no API key'}); metrics at {url}/metrics; "
                     "SIGTERM or Ctrl-C stops\n")
    sys.stderr.flush()
    with frozen_gc():    # what is loaded lives to the end: no full collection over it mid-decoding
        run(app, sock, verbose=a.verbose)
    return 0


def _cmd_profile(a: argparse.Namespace) -> int:
    from .latency import get_latency_model, profile_path
    llm = _load_model(a)
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
        from .plots import plot_latency
        plot_latency(lm, a.plot)
        print(f"plot: {a.plot}")
    return 0


CALIBRATED = ("draft-verify", "knn-ssd", "vocab")


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from .bench import expand_datasets
    from .datasets import data_dir, load_dataset
    if a.strategy not in CALIBRATED:
        _check_strategy(a.strategy)
        raise ValueError(f"strategy {a.strategy!r} needs no calibration: calibrate {' or '.join(CALIBRATED)}")
    specs = [d for d in a.datasets.split(",") if d]
    root = data_dir(a.data) if any(not d.endswith(".jsonl") for d in specs) else None
    if any(d.startswith("long-docs") for d in specs):
        raise ValueError("calibrate takes spec-bench, spec-bench:CATEGORY, gsm8k, aime, humaneval or FILE.jsonl")
    n = a.n or {"draft-verify": 1, "knn-ssd": 4, "vocab": 8}[a.strategy]
    prompts = []
    for spec in expand_datasets(specs, root):
        prompts += load_dataset(spec, root=root)[-n:]
    if a.out and Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder: give a file name, e.g. {a.out}/calibration.json")
    llm = _load_model(a)
    ids = [llm.encode(p.text, chat=p.chat) for p in prompts]
    if a.strategy == "draft-verify":
        from .strategies.draft_verify import calibrate
        rec = calibrate(llm, ids, trials=a.trials or 30, new_tokens=a.new_tokens or 24, seed=a.seed,
                        out=a.out)
        print(f"draft-verify skip set: {rec['skip']}  ({rec['tokens_per_s']:.1f} tokens/s vs autoregressive "
              f"{rec['ar_tokens_per_s']:.1f}; {rec['trials']} trials on {rec['n_prompts']} prompts, "
              f"{rec['seconds']} s)")
    elif a.strategy == "vocab":
        from .strategies.vocab import calibrate
        rec = calibrate(llm, ids, new_tokens=a.new_tokens or 64, out=a.out)
        print(f"draft vocabulary ranking: {rec['distinct']} distinct tokens from {rec['n_prompts']} prompts and "
              f"{rec['output_tokens']} generated tokens ({rec['seconds']} s)")
    else:
        from .strategies.knn_ssd import calibrate
        rec = calibrate(llm, [(p.category or p.dataset, x) for p, x in zip(prompts, ids)], clusters=a.clusters,
                        trials=a.trials or 48, skip_ratio=a.skip_ratio, seed=a.seed, out=a.out)
        for i, c in enumerate(rec["clusters"]):
            print(f"cluster {i}: {c['size']} prompts {c['labels']}  matchness {c['matchness']:.3f}  skip {c['skip']}")
    print(f"written: {rec['path']}")
    return 0


BENCH_STRATEGIES = ("autoregressive", "lookup", "knapspec", "hybrid", "hybrid:min_lookup=8")
BENCH_DATASETS = ("spec-bench", "long-docs:512", "long-docs:2k", "long-docs:4k", "long-docs:8000")
QUICK_DATASETS = ("spec-bench:summarization", "long-docs:512", "long-docs:2k")


def _cmd_bench_run(a: argparse.Namespace) -> int:
    import os
    import tempfile
    from pathlib import Path

    import torch

    from .bench import category_table, headline, markdown_table, parse_variant, run_side_by_side, summarize
    from .datasets import data_dir
    from .plots import plot_skip_share, plot_speedup_vs_context, plot_tpt
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
    llm = _load_model(a)
    common: dict[str, Any] = {} if a.max_draft is None else {"max_draft": a.max_draft}
    opts = {s: dict(common) for s in strategies}
    for s in strategies:                           # static and its variants (static:threshold=0.3)
        if parse_variant(s)[0] == "static":
            if not a.skip:
                raise ValueError("the static strategy needs --skip a3,m7,...")
            opts[s]["skip"] = a.skip
    records = run_side_by_side(llm, strategies=strategies, datasets=datasets, n=n, max_new_tokens=new,
                               root=root, temperature=a.temperature, seed=a.seed, strategy_options=opts,
                               repeats=a.repeats, interleave=a.interleave)
    summary = summarize(records)
    head = headline(records)
    head.update(model=llm.model.cfg.name, dtype=str(llm.model.dtype).replace("torch.", ""),
                device=str(llm.model.device), n=n, max_new_tokens=new, datasets=datasets, repeats=a.repeats,
                interleave=a.interleave, exact=llm.model.row_invariant)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / name)
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
    from .bench import bench_tpt, ints, pearson, table
    from .datasets import data_dir
    root = data_dir(a.data)
    llm = _load_model(a)
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


def _cmd_bench_serve(a: argparse.Namespace) -> int:
    import os
    import tempfile

    from .bench import ints
    from .datasets import data_dir, load_dataset
    from .server import bench as sb
    clients = ints(a.clients)
    if not clients or min(clients) < 1:
        raise ValueError(f"--clients must be integers >= 1, got {a.clients!r}")
    strategies = [s for s in a.strategies.split(",") if s]
    for s in strategies:
        _check_strategy(s)
    root = None if a.dataset.endswith(".jsonl") else data_dir(a.data)
    prompts = [p.text for p in sb.pick_prompts(load_dataset(a.dataset, root=root), a.num_prompts)]
    if len(prompts) < a.num_prompts:
        log.warning("%s has %d prompts, fewer than --num-prompts %d", a.dataset, len(prompts), a.num_prompts)
    rows: list[dict[str, Any]] = []

    def progress(r: dict[str, Any]) -> None:
        sys.stderr.write(f"{r['backend']}, {r['max_concurrency']} clients: {r['completed']} requests in "
                         f"{r['duration_s']:.1f} s, {r['output_throughput']:.1f} output tok/s\n")
    if a.base_url:
        rows += sb.bench_backend(sb.Backend(a.base_url, a.base_url.rstrip("/")), prompts, clients=clients,
                                 max_tokens=a.max_tokens, api_key=a.api_key, on_row=progress)
    else:
        llama = None if a.no_llama_cpp else sb.find_llama_server(a.llama_cpp)
        gguf = sb.gguf_of(a.model) if llama else None
        if llama is None and not a.no_llama_cpp:
            sys.stderr.write("knapspec: no llama-server found (--llama-cpp DIR or PATH): llama.cpp not measured\n")
        elif llama is not None and gguf is None:
            sys.stderr.write("knapspec: --model is not a GGUF file: llama.cpp not measured\n")
        serve_args = ["--dtype", a.dtype, "--device", a.device, "--kernels", a.kernels]
        serve_args += ["--model", a.model] if a.model else []
        serve_args += ["--threads", str(a.threads)] if a.threads else []
        serve_args += [] if a.exact is None else ["--exact" if a.exact else "--no-exact"]
        with tempfile.TemporaryDirectory(prefix="knapspec-bench-serve-") as logs:
            for s in strategies:
                b = sb.start_knapspec(s, serve_args, Path(logs), max_queue=max(clients) + 1)
                try:
                    rows += sb.bench_backend(b, prompts, clients=clients, max_tokens=a.max_tokens, on_row=progress)
                finally:
                    sb.stop(b)
            if llama is not None and gguf is not None:
                try:
                    b = sb.start_llama_server(llama, gguf, Path(logs), threads=a.threads or os.cpu_count() or 1)
                except ValueError as e:          # a broken build: report it, keep knapspec's figures
                    log_text = Path(logs, "llama-server.log").read_text(errors="replace").strip().splitlines()
                    sys.stderr.write(f"knapspec: llama.cpp not measured: {str(e).split(': see')[0]} "
                                     f"(last log line: {log_text[-1] if log_text else 'none'})\n")
                    b = None
            if llama is not None and gguf is not None and b is not None:
                try:
                    rows += sb.bench_backend(b, prompts, clients=clients, max_tokens=a.max_tokens, on_row=progress)
                finally:
                    sb.stop(b)
    print(sb.markdown(rows))
    print("outputs equal to the first row's: " + ", ".join(f"{k} {v}/{len(prompts)}"
                                                           for k, v in sb.same_texts(rows).items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"prompts": len(prompts), "max_tokens": a.max_tokens, "rows": rows},
                                          indent=1) + "\n")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.bench_cmd == "run":
        return _cmd_bench_run(a)
    if a.bench_cmd == "serve":
        return _cmd_bench_serve(a)
    if a.bench_cmd == "tpt":
        return _cmd_bench_tpt(a)
    import statistics

    import torch

    from .api import set_threads
    from .bench import bench_ar, bench_latency, bench_verify, ints, table
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
    elif a.bench_cmd == "verify":
        rows = bench_verify(a.model, device=a.device, threads=a.threads, contexts=ints(a.contexts),
                            widths=ints(a.widths), repeats=a.repeats, dtypes=dtypes, exact=a.exact,
                            modes=a.modes.split(",") if a.modes else None)
        print(table(rows, ["dtype", "context", "width", "ms", "ratio"]
                    + (["mode", "vs_fused"] if a.modes and "," in a.modes else [])))
    else:
        raise ValueError(f"unknown benchmark {a.bench_cmd!r}: choose ar, verify or latency")
    print(json.dumps({"bench": a.bench_cmd, "device": str(a.device),
                      "threads": torch.get_num_threads(), "rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.verbose)
    try:
        if a.cmd == "generate":
            return _cmd_generate(a)
        if a.cmd == "serve":
            return _cmd_serve(a)
        if a.cmd == "profile":
            return _cmd_profile(a)
        if a.cmd == "calibrate":
            return _cmd_calibrate(a)
        if a.cmd == "bench":
            return _cmd_bench(a)
        parser.error(f"unknown command {a.cmd!r}")
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"knapspec: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("knapspec: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
