"""Latency profiler and fitted latency model, per sublayer and per context length.

The profiler runs the model's own pieces (embedding, each sublayer, final norm + lm_head) in the
order a real forward runs them, so that weights stream through the caches as they do in decoding,
on the current device, dtype and thread count, over a grid of context lengths and query widths
(1 = a draft step, 2..16 = verification passes). Each point is the median of repeated runs after
warm-up; on CUDA every piece is synchronised. The per-forward overhead is the real forward's time
minus the sum of its pieces.

The model fitted from it (:class:`LatencyModel`): attention time of layer i at width w is
``a[i,w] + b[i,w] * context`` (least squares), MLP time of layer i at width w a constant, lm_head
and overhead per width; widths between profiled ones are interpolated. Layers are fitted one by
one, so heterogeneous layers (sliding windows, different sizes) come out right; a sliding-window
layer's context is its window at most (Gemma 3's local layers: their cost stops growing there,
while the global layers' keeps growing), in the fit and in every prediction.
``predict(plan, context, n_tokens)`` is the time of one forward with that plan.

Profiles are cached as JSON under ``$KNAPSPEC_CACHE/latency``, keyed by (model shape fingerprint,
device, dtype, threads, torch version). This module measures and predicts; it decides nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .plan import Plan
from .storage import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

FULL_WIDTHS = (1, 2, 4, 8, 16)
QUICK_WIDTHS = (1, 4, 16)


def default_contexts(max_position: int, *, quick: bool, cap: int = 32768) -> list[int]:
    top = min(max_position, cap) - 32
    grid = [64, 2048, top] if quick else [64, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    return sorted({min(c, top) for c in grid})


def profile_key(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    shape = (cfg.arch.value, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.n_layers,
             cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.qkv_bias, cfg.qk_norm,
             cfg.sliding_window)
    dev = model.device
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    key = {"model": hashlib.sha256(repr(shape).encode()).hexdigest()[:16], "device": f"{dev.type}:{dev_name}",
           "dtype": str(model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "packed": bool(getattr(model, "packed", False))}
    formats = model.weight_formats() if getattr(model, "quantized", False) else ()
    if formats:                                     # a GGUF's block types time differently
        key["weights"] = "+".join(formats)
    if getattr(model, "row_invariant", False):     # exact mode times differently (only when on, so
        key["row_invariant"] = True                 # that profiles made before it stay valid)
    kernels = getattr(model, "kernels", "plain")
    if kernels == "native":                         # another kernel family, another profile,
        from . import native  # and another for every change to them
        key["kernels"] = kernels
        key["native"] = native.version()
    return key


@dataclass
class Profile:
    """Raw medians in seconds. attn/mlp: [layer][width][context]; head/overhead: [width][context]."""

    key: dict[str, Any]
    contexts: list[int]
    widths: list[int]
    attn: list[list[list[float]]]
    mlp: list[list[list[float]]]
    head: list[list[float]]
    overhead: list[list[float]]
    seconds: float = 0.0


class _Timer:
    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()


@torch.inference_mode()
def measure(model: Any, *, contexts: list[int], widths: list[int] | tuple[int, ...], repeats: int,
            warmup: int = 2, clock: Callable[[], float] = time.perf_counter,
            progress: bool = False) -> Profile:
    """Time every piece of the forward at each (context, width); see the module docstring."""
    from tqdm import tqdm
    cfg = model.cfg
    n_sub = 2 * cfg.n_layers
    tick = _Timer(model.device, clock)
    W, C = len(widths), len(contexts)
    attn = [[[0.0] * C for _ in range(W)] for _ in range(cfg.n_layers)]
    mlp = [[[0.0] * C for _ in range(W)] for _ in range(cfg.n_layers)]
    head = [[0.0] * C for _ in range(W)]
    over = [[0.0] * C for _ in range(W)]
    t_start = tick()
    bar = tqdm(total=C * W, desc="profiling", disable=not progress, unit="point")
    gen = torch.Generator().manual_seed(0)
    for ci, ctx in enumerate(contexts):
        cache = model.new_cache(ctx + max(widths) + 1)
        for wi, w in enumerate(widths):
            toks = torch.randint(0, cfg.vocab_size, (1, w), generator=gen).to(model.device)
            parts: list[list[float]] = [[] for _ in range(n_sub + 2)]   # embed, sublayers, head
            totals: list[float] = []
            for r in range(warmup + repeats):
                # the instrumented forward: the same pieces in the same order as Model.forward
                cache.set_length(ctx)
                t0 = tick()
                x = model.embed_tokens(toks)
                t_prev = tick()
                times = [t_prev - t0]
                for s in range(n_sub):
                    x = model.sublayer(s, x, ctx, cache)
                    t = tick()
                    times.append(t - t_prev)
                    t_prev = t
                model.head(x)
                times.append(tick() - t_prev)
                # the real forward, for the overhead
                cache.set_length(ctx)
                t0 = tick()
                model.forward(toks, ctx, cache)
                total = tick() - t0
                if r >= warmup:
                    for j, v in enumerate(times):
                        parts[j].append(v)
                    totals.append(total)
            med = [statistics.median(p) for p in parts]
            for i in range(cfg.n_layers):
                attn[i][wi][ci] = med[1 + 2 * i]
                mlp[i][wi][ci] = med[2 + 2 * i]
            head[wi][ci] = med[-1]
            over[wi][ci] = max(statistics.median(totals) - sum(med[1:]), 0.0)   # embed + loop + rest
            bar.update(1)
        del cache
    bar.close()
    return Profile(key=profile_key(model), contexts=list(contexts), widths=list(widths), attn=attn, mlp=mlp,
                   head=head, overhead=over, seconds=tick() - t_start)


@dataclass
class LatencyModel:
    """Fitted latency model; see the module docstring. All times in seconds."""

    key: dict[str, Any]
    widths: list[int]
    n_layers: int
    attn_a: list[list[float]]        # [layer][width]
    attn_b: list[list[float]]        # [layer][width], seconds per context token
    mlp: list[list[float]]           # [layer][width]
    head: list[float]                # [width]
    over_a: list[float]              # [width]
    over_b: list[float]              # [width]
    fit_error: dict[str, float] = field(default_factory=dict)
    profile: Profile | None = None
    windows: list[int] = field(default_factory=list)   # [layer] sliding window, 0 = none ([] = none slides)

    # ---- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, p: Profile, windows: tuple[int | None, ...] | list[int | None] = ()) -> LatencyModel:
        """``windows``: each layer's sliding window (None or 0: none), ``ModelConfig.sliding_window``."""
        L, W = len(p.attn), len(p.widths)
        wins = [int(x or 0) for x in windows] if any(windows) else []
        c_all = np.asarray(p.contexts, dtype=float)

        def line(y: list[float], c: np.ndarray = c_all) -> tuple[float, float]:
            if len(set(c.tolist())) == 1:         # one context (or all beyond a window): a constant
                return float(np.median(y)), 0.0
            b, a = np.polyfit(c, np.asarray(y), 1)
            return float(a), float(max(b, 0.0))
        attn_a = [[0.0] * W for _ in range(L)]
        attn_b = [[0.0] * W for _ in range(L)]
        errs: list[float] = []
        for i in range(L):
            # a sliding-window layer's keys: the window at most
            c = np.minimum(c_all, wins[i]) if wins and wins[i] else c_all
            for w in range(W):
                a, b = line(p.attn[i][w], c)
                attn_a[i][w], attn_b[i][w] = a, b
                errs += [abs(a + b * cc - y) / y for cc, y in zip(c, p.attn[i][w]) if y > 0]
        mlp = [[float(np.median(p.mlp[i][w])) for w in range(W)] for i in range(L)]
        mlp_err = [abs(mlp[i][w] - y) / y for i in range(L) for w in range(W) for y in p.mlp[i][w] if y > 0]
        head = [float(np.median(p.head[w])) for w in range(W)]
        over = [line(p.overhead[w]) for w in range(W)]
        fe = {"attention_mape": float(np.mean(errs)) if errs else 0.0,
              "mlp_mape": float(np.mean(mlp_err)) if mlp_err else 0.0}
        return cls(key=p.key, widths=list(p.widths), n_layers=L, attn_a=attn_a, attn_b=attn_b, mlp=mlp,
                   head=head, over_a=[o[0] for o in over], over_b=[o[1] for o in over], fit_error=fe,
                   profile=p, windows=wins)

    @classmethod
    def analytic(cls, n_layers: int, *, attn: float, attn_per_token: float, mlp: float, head: float,
                 overhead: float = 0.0, width_factor: float = 0.0,
                 widths: tuple[int, ...] = FULL_WIDTHS) -> LatencyModel:
        """A latency model from given constants (every layer alike), for tests and what-if
        planning: at width w each time is scaled by ``1 + width_factor * (w - 1)``."""
        f = [1.0 + width_factor * (w - 1) for w in widths]
        return cls(key={"analytic": True}, widths=list(widths), n_layers=n_layers,
                   attn_a=[[attn * x for x in f] for _ in range(n_layers)],
                   attn_b=[[attn_per_token * x for x in f] for _ in range(n_layers)],
                   mlp=[[mlp * x for x in f] for _ in range(n_layers)], head=[head * x for x in f],
                   over_a=[overhead] * len(widths), over_b=[0.0] * len(widths))

    # ---- prediction -------------------------------------------------------------------------------
    # Interpolation over the profiled widths is done once per width and memoised (``_at``): the
    # planners ask for the same few widths thousands of times, and a prediction is then a plain
    # loop over the layers (bit-identical to interpolating every row on every call).
    def _interp(self, row: list[float], n: int) -> float:
        return float(np.interp(n, self.widths, row))   # clamps beyond the profiled widths

    def _at(self, n: int) -> tuple[list[float], list[float], list[float], float, float, float]:
        memo = self.__dict__.setdefault("_memo", {})
        cols = memo.get(n)
        if cols is None:
            cols = ([self._interp(r, n) for r in self.attn_a], [self._interp(r, n) for r in self.attn_b],
                    [self._interp(r, n) for r in self.mlp], self._interp(self.head, n),
                    self._interp(self.over_a, n), self._interp(self.over_b, n))
            memo[n] = cols
        return cols

    def context_of(self, layer: int, ctx: int) -> int:
        """The keys layer ``layer`` attends over at context ``ctx`` (its sliding window at most)."""
        w = self.windows[layer] if self.windows else 0
        return min(ctx, w) if w else ctx

    def attn_time(self, layer: int, ctx: int, n: int = 1) -> float:
        a, b = self._at(n)[:2]
        return max(a[layer] + b[layer] * self.context_of(layer, ctx), 0.0)

    def mlp_time(self, layer: int, n: int = 1) -> float:
        return self._at(n)[2][layer]

    def head_time(self, n: int = 1) -> float:
        return self._at(n)[3]

    def overhead(self, ctx: int, n: int = 1) -> float:
        oa, ob = self._at(n)[4:]
        return max(oa + ob * ctx, 0.0)

    def sublayer_times(self, ctx: int, n: int = 1) -> list[float]:
        """Time of each of the 2L sublayers (the knapsack weights) at this context and width."""
        a, b, m = self._at(n)[:3]
        out = []
        for i in range(self.n_layers):
            out += [max(a[i] + b[i] * self.context_of(i, ctx), 0.0), m[i]]
        return out

    def predict(self, plan: Plan | None, ctx: int, n_tokens: int = 1, *, head_scale: float = 1.0) -> float:
        """Time of one forward over ``n_tokens`` at context ``ctx`` with ``plan`` (None = full).
        A draft step is ``n_tokens=1``; verification of d drafts is ``n_tokens=d+1``.
        ``head_scale`` scales the lm_head time (draft-only vocabulary truncation)."""
        a, b, m, head, oa, ob = self._at(n_tokens)
        t = max(oa + ob * ctx, 0.0) + head_scale * head
        run = plan.run if plan is not None else None
        for i in range(self.n_layers):
            if run is None or run[2 * i]:
                t += max(a[i] + b[i] * (min(ctx, self.windows[i]) if self.windows and self.windows[i] else ctx), 0.0)
            if run is None or run[2 * i + 1]:
                t += m[i]
        return t

    # ---- persistence ------------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        d = json.loads(text)
        prof = d.pop("profile", None)
        m = cls(**d)
        m.profile = Profile(**prof) if prof else None
        assert len(m.attn_a) == m.n_layers and len(m.head) == len(m.widths), "inconsistent profile"
        return m


_MEMO: dict[str, LatencyModel] = {}


def profile_path(key: dict[str, Any]) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "latency" / f"{h}.json"


def get_latency_model(model: Any, *, quick: bool = False, force: bool = False, progress: bool = False,
                      repeats: int | None = None, contexts: list[int] | None = None) -> LatencyModel:
    """The cached latency model for this model/device/dtype/threads, profiling if needed."""
    key = profile_key(model)
    path = profile_path(key)
    memo = _MEMO.get(str(path))
    if memo is not None and not force and path.is_file():
        return memo
    if path.is_file() and not force:
        try:
            lm = LatencyModel.from_json(path.read_text())
            if lm.key == key:
                _MEMO[str(path)] = lm
                return lm
            log.warning("latency profile %s is for another set-up; re-profiling", path)
        except (json.JSONDecodeError, TypeError, KeyError, AssertionError, ValueError) as e:
            log.warning("latency profile %s is corrupt (%s); re-profiling", path, type(e).__name__)
    log.warning("no latency profile for this model/device/dtype/threads yet: measuring one (%s, "
                "about 15-60 s on a CPU); cached in %s", "quick" if quick else "full", path.parent)
    ctxs = contexts or default_contexts(model.cfg.max_position, quick=quick)
    prof = measure(model, contexts=ctxs, widths=QUICK_WIDTHS if quick else FULL_WIDTHS,
                   repeats=repeats or (3 if quick else 7), progress=progress)
    lm = LatencyModel.fit(prof, model.cfg.sliding_window)
    write_text_atomic(path, lm.to_json())
    _MEMO[str(path)] = lm
    log.info("latency profile written to %s (%.1fs; fit error %s)", path, prof.seconds, lm.fit_error)
    return lm
