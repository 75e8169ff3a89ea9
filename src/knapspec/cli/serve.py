"""``knapspec serve`` (an OpenAI-compatible HTTP server, ``knapspec.server``) and ``knapspec bench
serve`` (concurrent streaming clients against it and llama.cpp's llama-server): their arguments and
wiring."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .options import (
    DATA_HELP,
    add_model_args,
    add_strategy_args,
    check_strategy,
    load_model,
    positive_int,
    strategy_options,
)

log = logging.getLogger("knapspec")


def add_parsers(sub: Any) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: chat and text completions, "
                                      "streamed or not; /metrics for Prometheus")
    add_model_args(sv)
    add_strategy_args(sv)
    _add_serve_args(sv)
    sv.set_defaults(func=_cmd_serve)


def add_bench_parser(bsub: Any) -> None:
    bs = bsub.add_parser("serve", help="concurrent streaming clients against knapspec serve (one server per "
                                       "strategy) and llama.cpp's llama-server, measured as vllm bench serve")
    add_model_args(bs)
    bs.add_argument("--strategies", default="hybrid,autoregressive",
                    help="a knapspec server per strategy, comma-separated (default hybrid,autoregressive)")
    bs.add_argument("--clients", default="1,4,32", help="concurrent streaming clients, comma-separated")
    bs.add_argument("--num-prompts", type=positive_int("--num-prompts"), default=32,
                    help="requests per concurrency level: Spec-Bench questions, each category in turn")
    bs.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=64, help="max_tokens per request")
    bs.add_argument("--dataset", default="spec-bench", help="spec-bench, spec-bench:CATEGORY, gsm8k, ..., FILE.jsonl")
    bs.add_argument("--data", default=None, help=DATA_HELP)
    bs.add_argument("--llama-cpp", default=None,
                    help="llama-server binary or a folder holding it (default: llama-server on PATH; skipped "
                         "when none is found)")
    bs.add_argument("--no-llama-cpp", action="store_true", help="do not run llama-server")
    bs.add_argument("--base-url", default=None,
                    help="measure this running OpenAI-compatible server only (e.g. http://127.0.0.1:8000)")
    bs.add_argument("--api-key", default=None, help="for --base-url")
    bs.add_argument("--out", default=None, help="write every measurement (and the texts) to this JSON file")


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


def _cmd_serve(a: argparse.Namespace) -> int:
    import os

    from ..bench import frozen_gc
    from ..server.app import bind, create_app, run
    opts = strategy_options(a)                   # a misplaced option fails before anything starts
    sock = bind(a.host, a.port)                  # a port in use fails before the model loads
    llm = load_model(a)
    app = create_app(llm, model_name=a.served_model_name, api_key=a.api_key or os.environ.get("KNAPSPEC_API_KEY"),
                     max_queue=a.max_queue, strategy=a.strategy, strategy_options=opts,
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


def cmd_bench_serve(a: argparse.Namespace) -> int:
    import os
    import tempfile

    from ..bench import ints
    from ..datasets import data_dir, load_dataset
    from ..server import bench as sb
    from ..storage import write_json_atomic
    clients = ints(a.clients)
    if not clients or min(clients) < 1:
        raise ValueError(f"--clients must be integers >= 1, got {a.clients!r}")
    strategies = [s for s in a.strategies.split(",") if s]
    for s in strategies:
        check_strategy(s)
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
        write_json_atomic(a.out, {"prompts": len(prompts), "max_tokens": a.max_tokens, "rows": rows})
    return 0
