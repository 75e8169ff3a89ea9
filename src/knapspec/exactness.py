"""Checking, on the machine that runs, that exact mode's token identity holds, and falling back to
a mechanism that holds by construction when it does not.

Token identity (speculative greedy output == autoregressive greedy output, bit for bit) needs each
token's row of a verification pass to be computed exactly as in a one-token step:

* knapspec's native CPU kernels give it by construction (``native``: every output summed in one
  lane in a fixed order; attention over blocks aligned to absolute positions). Nothing to check.
* On the torch path (oneDNN / MKL / cuBLAS / SDPA kernels) exact mode pads products to
  ``attention.MIN_ROWS`` rows and attends over key spans fixed by position (``SPAN_CHUNK``). Those
  two constants were measured on one CPU with one torch build; another CPU (AVX2 only, AMX),
  another torch, or a GPU may pick other kernels by shape. :func:`ensure` therefore measures the
  property once per model shape, machine, torch, dtype, kernels and threads (a pass of 2, 3, 5
  and 8 tokens across a span boundary against the same tokens' one-token steps, on the model
  itself) and caches the verdict. When it fails, the model verifies token by token
  (``Model.exact_per_token``): each token of a short pass runs as a one-token forward, identical to
  autoregressive decoding by construction, at the cost of the speculative gain on that path.

Without exact mode (``--no-exact``) the torch path gives the model's output up to near-ties:
a greedy choice between two logits closer than the kernels' rounding can flip.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from typing import Any

import torch

from .storage import cache_dir, write_json_atomic

log = logging.getLogger(__name__)

_WIDTHS = (2, 3, 5, 8)
_START = 60            # the passes start here and cross exact mode's span boundary at 64


@lru_cache(maxsize=1)
def _cpu() -> str:
    """The CPU's model name and instruction-set flags (kernels are chosen by them)."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return f"{name or platform.processor() or platform.machine()}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def check_key(model: Any) -> dict[str, Any]:
    """What the verdict depends on: the latency profile's key (model shape, device, dtype, threads,
    torch, packing, kernels) plus the CPU's model and flags."""
    from .latency import profile_key
    key = dict(profile_key(model))
    key["cpu"] = _cpu()
    key["kernels"] = getattr(model, "kernels", "plain")
    if model.device.type == "cuda":
        key["cuda"] = torch.version.cuda
    return key


@torch.inference_mode()
def measure(model: Any) -> bool:
    """Whether passes of several tokens give exactly the logits of the same tokens' one-token
    steps, on ``model`` as it is set up now (exact mode on, per-token fallback off)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    n = _START + max(_WIDTHS)
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g).to(model.device)
    cache = model.new_cache(n + 1)
    model.forward(ids[:, :_START], 0, cache, logits=False)
    steps = []
    for p in range(_START, n):
        steps.append(model.forward(ids[:, p:p + 1], p, cache).logits[0, 0])
    for w in _WIDTHS:
        cache.rollback(_START)
        out = model.forward(ids[:, _START:_START + w], _START, cache).logits[0]
        if not all(torch.equal(out[i], steps[i]) for i in range(w)):
            log.debug("a pass of %d tokens differs from one-token steps", w)
            return False
    return True


def ensure(model: Any, *, refresh: bool = False) -> bool:
    """Make exact mode hold on ``model``: nothing to do for the native kernels or with exact mode
    off; else the cached verdict for this set-up (measured on first use). Sets
    ``model.exact_per_token`` when the torch path is not row-invariant here. Returns whether the
    fast (grouped) exact mode holds."""
    model.exact_per_token = False
    if not model.row_invariant or getattr(model, "kernels", "plain") == "native":
        return True
    key = check_key(model)
    path = cache_dir() / "exactness" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
                                        + ".json")
    verdict = None
    if path.is_file() and not refresh:
        try:
            doc = json.loads(path.read_text())
            if doc.get("key") == key:
                verdict = bool(doc["row_invariant"])
        except (OSError, ValueError, KeyError, TypeError):
            verdict = None
    if verdict is None:
        verdict = measure(model)
        try:
            write_json_atomic(path, {"key": key, "row_invariant": verdict})
        except OSError as e:               # a read-only cache: measure again next time
            log.debug("could not write %s: %s", path, e)
    if not verdict:
        model.exact_per_token = True
        log.warning("exact mode: this machine's %s kernels round a pass of several tokens differently from "
                    "one-token steps, so verification runs token by token (bit-identical, without the "
                    "speedup); the native kernels (--kernels native) or --no-exact avoid that",
                    key["kernels"])
    return verdict
