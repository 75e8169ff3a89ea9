"""``knapspec bench peers``: llama.cpp on the same GGUF file, side by side with knapspec.

The peer a CPU user would pick instead is llama.cpp's ``llama-server`` on the same file. Both get
the same prompt token ids (our tokenizer and chat template; llama-server's ``/completion`` takes
token ids), greedy decoding, the same threads and the same new-token limit. Per prompt, the
systems run in turn, their order rotated from one repeat to the next, after a warm-up of each;
each prompt's figure is the median over its repeats.

Measured per run:

* decode tokens/s: knapspec's tokens after the first per decode second (``GenerationStats``);
  llama.cpp's own ``timings.predicted_per_second``;
* prefill seconds: knapspec's prefill (first token included); llama.cpp's ``timings.prompt_ms``;
* wall seconds: the whole request (knapspec: the engine's generation call; llama.cpp: the HTTP
  round trip), so that planning, drafting and verification all count;
* peak resident memory: llama-server's ``VmHWM``; knapspec's own process.

Also: a cold start of each (``knapspec generate --max-new-tokens 1`` in a new process, caches
warm; llama-server from launch to its first token) with its peak resident memory.

llama.cpp is found on PATH or in ``--llama-cpp DIR`` (a folder holding ``llama-server``, or its
``build/bin``). Nothing here is part of ``make test``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def find_llama_server(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``llama-server`` from ``explicit`` (the binary, its folder or a build folder) or PATH."""
    if explicit:
        p = Path(explicit).expanduser()
        for cand in (p, p / "llama-server", p / "bin" / "llama-server", p / "build" / "bin" / "llama-server"):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
        raise FileNotFoundError(f"no llama-server in {p} (looked in it, bin/ and build/bin/): build it as "
                                "docs/benchmarks.md shows, or pass --llama-cpp DIR")
    found = shutil.which("llama-server")
    if found is None:
        raise FileNotFoundError("llama-server is not on PATH: build llama.cpp as docs/benchmarks.md shows "
                                "and pass --llama-cpp DIR")
    return Path(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    """A live process's peak resident memory (Linux ``VmHWM``), in MiB (KiB / 1024); 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class LlamaServer:
    """A ``llama-server`` process on one GGUF file, one slot, greedy requests by token ids."""

    def __init__(self, binary: Path, gguf: Path, *, threads: int, ctx: int, extra: list[str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
               "--host", "127.0.0.1", "--port", str(self.port), "-np", "1", *(extra or [])]
        self.started = time.perf_counter()
        self._log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 300.0) -> float:
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.proc.returncode} while loading "
                                   "(a build for another CPU? see docs/benchmarks.md)")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("llama-server did not become ready")

    def complete(self, ids: list[int], n_predict: int) -> dict[str, Any]:
        body = json.dumps({"prompt": ids, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
                           "cache_prompt": False, "return_tokens": True, "stream": False}).encode()
        req = urllib.request.Request(self.url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            doc = json.loads(r.read())
        wall = time.perf_counter() - t
        tm = doc.get("timings", {})
        return {"tokens": list(doc.get("tokens") or []), "wall_s": wall,
                "prefill_s": float(tm.get("prompt_ms", 0.0)) / 1e3,
                "decode_tok_s": float(tm.get("predicted_per_second", 0.0)),
                "new_tokens": int(tm.get("predicted_n", 0))}

    def peak_rss_mb(self) -> float:
        return _peak_rss_mb(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Case:
    category: str          # "chat: writing", "long-docs:4k", ...
    prompt_id: str
    ids: list[int]


def _ours(llm: Any, strategy: str) -> Callable[[list[int], int], dict[str, Any]]:
    from ..engine import GenerationStats

    def run(ids: list[int], n: int) -> dict[str, Any]:
        stats = GenerationStats()
        strat = llm.make_strategy(strategy)
        tokens: list[int] = []
        t = time.perf_counter()
        for chunk in llm.engine.stream(ids, strat, max_new_tokens=n, stop_ids=llm.stop_ids, stats=stats):
            tokens.extend(chunk)
        wall = time.perf_counter() - t
        return {"tokens": tokens, "wall_s": wall, "prefill_s": stats.prefill_s, "decode_tok_s": stats.tokens_per_s,
                "new_tokens": stats.new_tokens, "plan_s": stats.plan_s}
    return run


def _agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two outputs."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_peers(llm: Any, cases: list[Case], *, server: LlamaServer, strategies: list[str], max_new_tokens: int,
              repeats: int, progress: bool = True) -> list[dict[str, Any]]:
    """Every case on llama.cpp and on each knapspec strategy, in turn; one record per (case,
    system) with the medians over ``repeats`` runs."""
    from tqdm import tqdm

    from .timing import frozen_gc
    systems: dict[str, Callable[[list[int], int], dict[str, Any]]] = {"llama.cpp": server.complete}
    for s in strategies:
        systems[f"knapspec {s}"] = _ours(llm, s)
    names = list(systems)
    warm = cases[0].ids[-256:]
    for name in names:                                  # kernels, caches, latency profile, allocator
        systems[name](warm, 16)
    for s in strategies:                                # one-time work (profile, first verdict)
        llm.prepare(s)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases) * len(names) * repeats, disable=not progress, desc="peers", unit="run")
    with frozen_gc():
        for case in cases:
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    bar.set_postfix_str(f"{case.category} {name}")
                    runs[name].append(systems[name](case.ids, max_new_tokens))
                    bar.update()
            ref = runs["llama.cpp"][0]["tokens"]
            for name in names:
                rs = runs[name]
                rec = {"category": case.category, "prompt_id": case.prompt_id, "prompt_tokens": len(case.ids),
                       "system": name, "repeats": len(rs),
                       "decode_tok_s": statistics.median(x["decode_tok_s"] for x in rs),
                       "prefill_s": statistics.median(x["prefill_s"] for x in rs),
                       "wall_s": statistics.median(x["wall_s"] for x in rs),
                       "new_tokens": statistics.median(x["new_tokens"] for x in rs),
                       "agree_with_llama_cpp": _agree(rs[0]["tokens"], ref) if name != "llama.cpp" else None}
                records.append(rec)
    bar.close()
    return records


def cold_start(model_arg: str | None, *, threads: int, server_binary: Path, gguf: Path, ctx: int,
               chat: bool = True) -> list[dict]:
    """A new process to its first token, caches warm: ``knapspec generate --max-new-tokens 1`` and
    llama-server from launch to a 1-token completion; each with its peak resident memory.
    ``chat``: the prompt in the chat template (False for a base model without one)."""
    import resource
    rows = []
    exe = Path(sys.executable).with_name("knapspec")
    cmd = [str(exe), "generate", "--prompt", "Hello", *(["--chat"] if chat else []), "--max-new-tokens", "1",
           "--threads", str(threads)]
    if model_arg:
        cmd += ["--model", model_arg]
    subprocess.run(cmd, capture_output=True, check=True)          # caches warm
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rows.append({"system": "knapspec generate", "wall_s": wall,
                 "peak_rss_mb": peak / 1024 if peak > before else None})
    t = time.perf_counter()
    with LlamaServer(server_binary, gguf, threads=threads, ctx=ctx) as srv:
        srv.complete([1, 2, 3], 1)
        wall = time.perf_counter() - t
        rows.append({"system": "llama-server", "wall_s": wall, "peak_rss_mb": srv.peak_rss_mb()})
    return rows


def summary_table(records: list[dict[str, Any]]) -> str:
    """Category × system: median decode tokens/s (ratio to llama.cpp), prefill and wall seconds."""
    systems = list(dict.fromkeys(r["system"] for r in records))
    cats = list(dict.fromkeys(r["category"] for r in records))
    lines = ["| category | prompts | " + " | ".join(f"{s} tok/s" for s in systems)
             + " | " + " | ".join(f"{s} wall s" for s in systems) + " | "
             + " | ".join(f"{s} prefill s" for s in systems) + " |",
             "|---|---|" + "---|" * (3 * len(systems))]
    for c in cats:
        rs = [r for r in records if r["category"] == c]
        med = {s: {k: statistics.median(r[k] for r in rs if r["system"] == s)
                   for k in ("decode_tok_s", "wall_s", "prefill_s")} for s in systems}
        base = med["llama.cpp"]
        n = len({r["prompt_id"] for r in rs})
        tok = [f"{med[s]['decode_tok_s']:.1f}" + ("" if s == "llama.cpp" else
                                                    f" ({med[s]['decode_tok_s'] / base['decode_tok_s']:.2f}x)")
               for s in systems]
        wall = [f"{med[s]['wall_s']:.2f}" + ("" if s == "llama.cpp" else
                                             f" ({base['wall_s'] / med[s]['wall_s']:.2f}x)") for s in systems]
        pre = [f"{med[s]['prefill_s']:.3f}" for s in systems]
        lines.append(f"| {c} | {n} | " + " | ".join(tok) + " | " + " | ".join(wall) + " | " + " | ".join(pre) + " |")
    return "\n".join(lines)
