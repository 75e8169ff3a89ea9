"""``knapspec bench serve``: concurrent streaming clients against OpenAI-compatible servers,
measured as ``vllm bench serve`` measures.

Each client sends a chat completion (greedy, ``stream: true``, ``stream_options.include_usage``) and
times its chunks. With N clients, the requests of the prompt list are sent at once and at most N
run at a time (vLLM's ``--max-concurrency`` with an infinite request rate). Per request:

* TTFT: from sending the request to the first chunk that carries text;
* ITL: the time between successive chunks that carry text (a speculative decoder sends several
  tokens in one chunk, as vLLM's does);
* TPOT: ``(latency - TTFT) / (output tokens - 1)``, over the requests with more than one token;
* E2EL: from sending the request to the end of the stream;
* output tokens: ``usage.completion_tokens`` of the usage chunk (chunks with text are counted
  only when a server sends no usage, and the report says so).

Throughputs are over the benchmark's duration, from the first request sent to the last answer:
requests/s, output tokens/s and (prompt + output) tokens/s. Latencies are reported in ms as mean,
median and 99th percentile (numpy's linear interpolation, as vLLM).

Servers are started here one at a time (``knapspec serve`` per strategy, then llama.cpp's
``llama-server`` on the same GGUF file when one is found) or given by URL. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    usage_reported: bool = True
    error: str = ""


async def _one(client: httpx.AsyncClient, url: str, prompt: str, *, max_tokens: int, model: str | None,
               api_key: str | None) -> RequestResult:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RequestResult(ok=False)
    st = time.perf_counter()
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                now = time.perf_counter()
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    return res
                if obj.get("choices"):
                    content = (obj["choices"][0].get("delta") or {}).get("content")
                    if content:
                        if last is None:
                            res.ttft = now - st
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        res.text += content
                if obj.get("usage"):
                    usage = obj["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - st
    if usage:
        res.prompt_tokens, res.output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    else:
        res.output_tokens, res.usage_reported = chunks, False
    res.ok = True
    return res


async def _load(url: str, prompts: list[str], *, concurrency: int, max_tokens: int, model: str | None,
                api_key: str | None) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def guarded(p: str) -> RequestResult:
            async with sem:
                return await _one(client, url, p, max_tokens=max_tokens, model=model, api_key=api_key)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def run_load(url: str, prompts: list[str], *, concurrency: int, max_tokens: int, model: str | None = None,
             api_key: str | None = None) -> tuple[list[RequestResult], float]:
    return asyncio.run(_load(url, prompts, concurrency=concurrency, max_tokens=max_tokens, model=model,
                             api_key=api_key))


def _stats(name: str, xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float) * 1000.0 if xs else np.zeros(1)
    return {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
            f"p99_{name}_ms": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    """vLLM's ``calculate_metrics`` on the finished requests."""
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out: dict[str, Any] = {
        "max_concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "usage_reported": all(r.usage_reported for r in ok)}
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", tpot))
    out.update(_stats("itl", [x for r in ok for x in r.itl]))
    out.update(_stats("e2el", [r.latency for r in ok]))
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["first_error"] = errors[0]
    return out


# ---- servers ------------------------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(b: Backend, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if b.proc is not None and b.proc.poll() is not None:
            raise ValueError(f"{b.name} exited with status {b.proc.returncode} before serving: see {b.log_path}")
        try:
            if httpx.get(b.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ValueError(f"{b.name} did not become healthy within {timeout:.0f} s: see {b.log_path}")


def start_knapspec(strategy: str, serve_args: list[str], log_dir: Path, *, max_queue: int,
                   timeout: float = 900) -> Backend:
    port = _free_port()
    # (a spec's options may hold "/", e.g. windows=64/256 or a calibration file's path)
    log_path = log_dir / f"knapspec-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', strategy)}.log"
    cmd = [sys.executable, "-m", "knapspec.cli", "serve", *serve_args, "--strategy", strategy,
           "--port", str(port), "--max-queue", str(max_queue)]
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    b = Backend(f"knapspec {strategy}", f"http://127.0.0.1:{port}", proc, log_path)
    _wait_healthy(b, timeout)
    return b


def find_llama_server(hint: str | None) -> Path | None:
    """``llama-server`` in ``hint`` (the binary, or a folder holding it, its bin/ or build/bin/),
    else on PATH; None when no hint was given and none is on PATH."""
    from ..bench.peers import find_llama_server as find
    try:
        return find(hint)
    except FileNotFoundError:
        if hint:
            raise
        return None


def start_llama_server(binary: Path, gguf: Path, log_dir: Path, *, threads: int, timeout: float = 300) -> Backend:
    port = _free_port()
    log_path = log_dir / "llama-server.log"
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "--jinja"]
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    b = Backend("llama.cpp llama-server", f"http://127.0.0.1:{port}", proc, log_path)
    _wait_healthy(b, timeout)
    return b


def stop(b: Backend) -> None:
    if b.proc is None or b.proc.poll() is not None:
        return
    b.proc.send_signal(signal.SIGTERM)
    try:
        b.proc.wait(120)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait()


# ---- the benchmark ---------------------------------------------------------------------------------------
def bench_backend(b: Backend, prompts: list[str], *, clients: list[int], max_tokens: int,
                  model: str | None = None, api_key: str | None = None,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One warm-up request, then the prompts at each concurrency (``on_row``: told each result)."""
    warm, _ = run_load(b.url, prompts[:1], concurrency=1, max_tokens=8, model=model, api_key=api_key)
    if not warm[0].ok:
        raise ValueError(f"{b.name}: the warm-up request failed: {warm[0].error}")
    rows = []
    for n in clients:
        results, dur = run_load(b.url, prompts, concurrency=n, max_tokens=max_tokens, model=model, api_key=api_key)
        row = {"backend": b.name, **summarize(results, dur, n), "texts": [r.text for r in results]}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def trio(r: dict[str, Any], k: str) -> str:
        return f"{r[f'mean_{k}_ms']:.1f} / {r[f'median_{k}_ms']:.1f} / {r[f'p99_{k}_ms']:.1f}"
    head = ("| server | clients | requests | duration s | req/s | output tok/s | total tok/s | "
            "TTFT ms | TPOT ms | ITL ms | E2EL ms |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        note = "" if r["usage_reported"] else " (tokens = text chunks)"
        fail = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['backend']}{note} | {r['max_concurrency']} | {r['completed']}{fail} | "
                     f"{r['duration_s']:.1f} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
                     f"{r['total_token_throughput']:.1f} | {trio(r, 'ttft')} | {trio(r, 'tpot')} | "
                     f"{trio(r, 'itl')} | {trio(r, 'e2el')} |")
    return "\n".join(lines) + "\n\nlatencies: mean / median / p99"


def same_texts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Per backend and concurrency: how many outputs equal the first row's (greedy decoding: a
    lossless strategy gives the same text as autoregressive decoding)."""
    ref = rows[0]["texts"]
    return {f"{r['backend']} x{r['max_concurrency']}": sum(a == b for a, b in zip(ref, r["texts"])) for r in rows}


def pick_prompts(prompts: list[Any], n: int) -> list[Any]:
    """``n`` prompts taking each category in turn (``.category``), in file order within each."""
    by_cat: dict[str, list[Any]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Any] = []
    while len(out) < n and any(by_cat.values()):
        for cat in list(by_cat):
            if by_cat[cat] and len(out) < n:
                out.append(by_cat[cat].pop(0))
    return out


def gguf_of(model: str | None) -> Path | None:
    """The GGUF file a llama.cpp server would read for ``--model``: the embedded model's for its
    name (or none given), the file itself for a .gguf path, None for a Hugging Face folder."""
    from ..checkpoint import embedded_gguf
    if model is None or (not model.endswith(".gguf") and not Path(model).expanduser().exists()):
        return embedded_gguf()
    return Path(model).expanduser() if model.endswith(".gguf") else None
