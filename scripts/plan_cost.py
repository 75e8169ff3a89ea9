"""What one KnapSpec plan costs on the embedded model at a long context: the read-only collection of
the residual stream over the last 8 tokens and the DP, with the DP's branch attention as it was
(float32 over a converted copy of the prefix, git revision dfced86) and as it is (the cache's dtype,
torch's fused CPU attention), and the DP with windowed options. Interleaved, medians:

    python scripts/plan_cost.py [--threads N] [--size 4k] [--repeats 5]

Timing does not depend on the latency model's constants, so the DP is priced by a fixed analytic
one (its plans are not the point here, its cost is).
"""

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

import knapspec
import knapspec.model as model_module
from knapspec import attention
from knapspec.datasets import load_dataset
from knapspec.engine import prefill
from knapspec.latency import LatencyModel
from knapspec.sampling import SamplingParams
from knapspec.strategies.base import RoundState
from knapspec.strategies.knapspec import DEFAULT_WINDOWS, KnapSpecStrategy

OLD = "dfced86"


def old_branch_attention():
    """The float32 branch attention of revision OLD, loaded from git."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{OLD}:src/knapspec/attention.py"],
                         capture_output=True, text=True, check=True).stdout
    src = src.replace("from .cache import KVCache", "").replace("from .config import ModelConfig",
                                                               "KVCache = ModelConfig = object")
    ns: dict = {}
    exec(compile(src, "old_attention", "exec"), ns)
    fn = ns["branch_attention"]
    return lambda *a: fn(*a[:7])          # it takes no window


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", default="4k")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    llm = knapspec.load(threads=args.threads)
    m = llm.model
    p = load_dataset(f"long-docs:{args.size}", root=None, tokenizer=llm.tokenizer, n=1)[0]
    ids = llm.encode(p.text, chat=p.chat)
    cache = m.new_cache(len(ids) + 8)
    prefill(m, ids, cache, logits=False)
    lat = LatencyModel.analytic(m.cfg.n_layers, attn=2e-4, attn_per_token=5e-8, mlp=2e-4, head=1e-3,
                                width_factor=0.02)
    state = RoundState(model=m, cache=cache, tokens=ids + [0], n_prompt=len(ids), round=0,
                       sampling=SamplingParams(), remaining=8)
    old, new = old_branch_attention(), attention.branch_attention
    kinds = ("collect_old", "collect_new", "dp_old", "dp_new", "dp_new_windows")

    def run(kind: str) -> float:
        model_module.branch_attention = old if kind.endswith("old") else new
        s = KnapSpecStrategy(m, lat, windows=DEFAULT_WINDOWS if kind.endswith("windows") else ())
        t0 = time.perf_counter()
        s.collect_prompt(state)
        t1 = time.perf_counter()
        if kind.startswith("collect"):
            return t1 - t0
        s.optimise(len(ids))
        return time.perf_counter() - t1
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:                       # warm-up
        run(k)
    for _ in range(args.repeats):
        for k in kinds:
            times[k].append(run(k))
    model_module.branch_attention = new
    print(f"context {len(ids)} tokens, threads {torch.get_num_threads()}; medians of {args.repeats} (s):")
    for k in kinds:
        print(f"  {k:16s} {statistics.median(times[k]):.3f}")


if __name__ == "__main__":
    main()
