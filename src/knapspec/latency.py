"""Latency profiler and fitted latency model, per sublayer and per context length.

The profiler runs the model's own pieces (embedding, each sublayer, final norm + lm_head) in the
order a real forward runs them, so that weights stream through the caches as they do in decoding,
on the current device, dtype and thread count, over a grid of context lengths and query widths
(1 = a draft step, 2..16 = verification passes). Each point is the median of repeated runs after
warm-up; on CUDA every piece is synchronised. The per-forward overhead is the real forward's time
minus the sum of its pieces.

Windowed attention (a draft's attention over the first ``plan.SINK`` positions and its last W
keys) is timed too, for each window of ``windows`` at width 1 and the contexts beyond the window.

The model fitted from it (:class:`LatencyModel`): attention time of layer i at width w is
``a[i,w] + b[i,w] * context`` (least squares, both non-negative: when a clamp applies, the other
coefficient is refitted, so the line stays a least-squares line), MLP time of layer i at width w a
constant, lm_head and overhead per width, windowed attention of layer i a constant per window;
widths between profiled ones are interpolated. Layers are fitted one by one, so heterogeneous
layers (sliding windows, different sizes) come out right; a sliding-window layer's context is its
window at most (Gemma 3's local layers: their cost stops growing there, while the global layers'
keeps growing), in the fit and in every prediction.
``predict(plan, context, n_tokens)`` is the time of one forward with that plan.

A transient (another process taking the cores for a moment) must not poison the profile, which is
cached for good. Every point is a median of repeats; a point whose MLP times (which do not depend
on the context) stand out from the other contexts' is measured again; a sublayer whose time
stands out from the other layers' at the same point, and a point that leaves its line by far, are
left out of the fits; and before a profile is cached, the prediction of a full forward is checked
against real forwards at each profiled context (points off by more than ``CHECK_TOLERANCE``
measured again; a profile that still disagrees by more than 2x somewhere, and not by the same
factor at every context, is used but not cached).

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

from .clock import sync
from .plan import SINK, Plan
from .storage import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

FULL_WIDTHS = (1, 2, 4, 8, 16)
QUICK_WIDTHS = (1, 4, 16)
# windowed attention's windows, timed at width 1 (the planner's default set: strategies/knapspec.py)
WINDOWS = (64, 256, 1024)
# a profile whose full-forward prediction is off by more than this (relative) at a profiled
# context is measured again there before it is cached
CHECK_TOLERANCE = 0.25
# a profile whose full steps still disagree with real ones by more than this factor (either way)
# after the retries is not cached (below it, decoding's measured corrections absorb the error)
POISONED = 2.0
# a disagreement with real steps that is the same at every context within this factor is the
# machine's load moving between profiling and checking, not a distorted profile
UNIFORM = 1.3
# a point's MLP time, summed over the layers, more than this factor above the median over the
# contexts (MLP time does not depend on the context) is measured again
DISTURBED = 1.25


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
        if model.dtype == torch.bfloat16 and native.dot():     # the attention's other kernel
            key["native"] += "+dot"
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
    # windowed attention at width 1: window -> [layer][context] (None where the context is not
    # beyond the window)
    win_attn: dict[str, list[list[float | None]]] = field(default_factory=dict)
    remeasured: int = 0                  # points measured again (see the module docstring)


class _Timer:
    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.device = device
        self.clock = clock

    def __call__(self) -> float:
        sync(self.device)
        return self.clock()


def _measure_point(model: Any, cache: Any, ctx: int, toks: torch.Tensor, *, repeats: int, warmup: int,
                   tick: _Timer) -> tuple[list[float], float]:
    """Medians of each piece (embedding, 2L sublayers, head) and of the real forward, over
    ``repeats`` runs after ``warmup``, of one (context, width) point."""
    n_sub = 2 * model.cfg.n_layers
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
    return [statistics.median(p) for p in parts], statistics.median(totals)


def _measure_windows(model: Any, cache: Any, ctx: int, tok: torch.Tensor, windows: tuple[int, ...], *,
                     repeats: int, warmup: int, tick: _Timer) -> dict[int, list[float]]:
    """Width-1 windowed attention time of every layer for each window (medians)."""
    L = model.cfg.n_layers
    out: dict[int, list[float]] = {}
    x0 = model.embed_tokens(tok)
    for w in windows:
        runs: list[list[float]] = [[] for _ in range(L)]
        for r in range(warmup + repeats):
            cache.set_length(ctx)
            x = x0
            for i in range(L):
                t0 = tick()
                x = model.sublayer(2 * i, x, ctx, cache, window=w)
                t1 = tick()
                if r >= warmup:
                    runs[i].append(t1 - t0)
        out[w] = [statistics.median(v) for v in runs]
    return out


@torch.inference_mode()
def measure(model: Any, *, contexts: list[int], widths: list[int] | tuple[int, ...], repeats: int,
            warmup: int = 2, clock: Callable[[], float] | None = None,
            progress: bool = False, windows: tuple[int, ...] | list[int] = (), retries: int = 2) -> Profile:
    """Time every piece of the forward at each (context, width), and windowed attention at each
    window below the context; points disturbed by a transient are measured again (up to
    ``retries`` times; see the module docstring)."""
    from tqdm import tqdm
    cfg = model.cfg
    tick = _Timer(model.device, clock or time.perf_counter)
    W, C = len(widths), len(contexts)
    L = cfg.n_layers
    attn = [[[0.0] * C for _ in range(W)] for _ in range(L)]
    mlp = [[[0.0] * C for _ in range(W)] for _ in range(L)]
    head = [[0.0] * C for _ in range(W)]
    over = [[0.0] * C for _ in range(W)]
    win_attn: dict[str, list[list[float | None]]] = {str(w): [[None] * C for _ in range(L)] for w in windows}
    t_start = tick()
    bar = tqdm(total=C * W, desc="profiling", disable=not progress, unit="point")
    gen = torch.Generator().manual_seed(0)
    toks = {w: torch.randint(0, cfg.vocab_size, (1, w), generator=gen).to(model.device) for w in widths}
    caches: dict[int, Any] = {}

    def cache_for(ctx: int) -> Any:
        if ctx not in caches:
            caches.clear()
            caches[ctx] = model.new_cache(ctx + max(widths) + 1)
        return caches[ctx]

    def store(ci: int, wi: int, med: list[float], total: float) -> None:
        for i in range(L):
            attn[i][wi][ci] = med[1 + 2 * i]
            mlp[i][wi][ci] = med[2 + 2 * i]
        head[wi][ci] = med[-1]
        over[wi][ci] = max(total - sum(med[1:]), 0.0)   # embed + loop + rest

    for ci, ctx in enumerate(contexts):
        cache = cache_for(ctx)
        for wi, w in enumerate(widths):
            store(ci, wi, *_measure_point(model, cache, ctx, toks[w], repeats=repeats, warmup=warmup, tick=tick))
            bar.update(1)
        ws = tuple(x for x in windows if ctx > x + SINK)
        if ws and 1 in widths:
            for x, times in _measure_windows(model, cache, ctx, toks[1], ws, repeats=repeats, warmup=warmup,
                                             tick=tick).items():
                for i in range(L):
                    win_attn[str(x)][i][ci] = times[i]
    # points whose MLP times stand out from the other contexts' were disturbed: measure again
    remeasured = 0
    for _ in range(retries if C >= 2 else 0):
        bad = []
        for wi in range(W):
            tot = [sum(mlp[i][wi][ci] for i in range(L)) for ci in range(C)]
            med = statistics.median(tot)
            bad += [(ci, wi) for ci in range(C) if tot[ci] > DISTURBED * med]
        if not bad:
            break
        for ci, wi in bad:
            ctx = contexts[ci]
            store(ci, wi, *_measure_point(model, cache_for(ctx), ctx, toks[widths[wi]], repeats=repeats,
                                          warmup=warmup, tick=tick))
            remeasured += 1
    caches.clear()
    bar.close()
    return Profile(key=profile_key(model), contexts=list(contexts), widths=list(widths), attn=attn, mlp=mlp,
                   head=head, overhead=over, seconds=tick() - t_start, win_attn=win_attn, remeasured=remeasured)


def fit_line(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``y ~ a + b c`` by least squares with ``a, b >= 0`` (when a clamp applies, the other
    coefficient is the least-squares fit of the constrained model: a constant, or a line through
    the origin)."""
    if len(c) == 1 or np.ptp(c) == 0:
        return float(max(np.mean(y), 0.0)), 0.0
    b, a = np.polyfit(c, y, 1)
    if b < 0:
        return float(max(np.mean(y), 0.0)), 0.0
    if a < 0:
        return 0.0, float(max(np.dot(c, y) / np.dot(c, c), 0.0))
    return float(a), float(b)


def robust_line(c: np.ndarray, y: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, float]:
    """:func:`fit_line` on the points ``keep`` marks (all by default), then, with at least 4 of
    them, without the point furthest from the line when it is off by more than 50% (at most one
    point in four dropped)."""
    keep = np.ones(len(c), dtype=bool) if keep is None else keep.copy()
    if keep.sum() == 0:
        keep[:] = True
    drops = int(keep.sum()) // 4
    a, b = fit_line(c[keep], y[keep])
    for _ in range(drops):
        pred = a + b * c
        err = np.where(keep, np.abs(y - pred) / np.maximum(np.abs(pred), 1e-12), -1.0)
        j = int(np.argmax(err))
        if err[j] <= 0.5 or keep.sum() <= 2:
            break
        keep[j] = False
        a, b = fit_line(c[keep], y[keep])
    return a, b


def _layer_outliers(rows: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """``rows [layer, context]`` of one width: True where a layer's time is more than ``factor``
    times its expected time at that context, the expected time being the median over the layers
    at that context scaled by the layer's own median ratio to it over the contexts (a transient
    hits a few sublayers of one point; layers that differ from the others everywhere, e.g. with
    a sliding window, keep their ratio)."""
    med = np.median(rows, axis=0)                                         # [context]
    ratio = np.median(rows / np.maximum(med[None], 1e-12), axis=1)        # [layer]
    expected = ratio[:, None] * med[None]
    return rows > factor * np.maximum(expected, 1e-12)


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
    win_attn: dict[str, list[float]] = field(default_factory=dict)   # window -> [layer], width 1
    windows: list[int] = field(default_factory=list)   # [layer] sliding window, 0 = none ([] = none slides)

    # ---- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, p: Profile, windows: tuple[int | None, ...] | list[int | None] = ()) -> LatencyModel:
        """``windows``: each layer's sliding window (None or 0: none), ``ModelConfig.sliding_window``."""
        L, W = len(p.attn), len(p.widths)
        wins = [int(x or 0) for x in windows] if any(windows) else []
        c_all = np.asarray(p.contexts, dtype=float)
        A = np.asarray(p.attn, dtype=float)                       # [layer, width, context]
        M = np.asarray(p.mlp, dtype=float)
        attn_a = [[0.0] * W for _ in range(L)]
        attn_b = [[0.0] * W for _ in range(L)]
        errs: list[float] = []
        mlp = [[0.0] * W for _ in range(L)]
        # transients are looked for among layers alike: the same sliding window (a model's global
        # layers grow with the context, its local layers do not)
        groups: dict[int, list[int]] = {}
        for i in range(L):
            groups.setdefault(wins[i] if wins else 0, []).append(i)

        def outliers(rows: np.ndarray) -> np.ndarray:
            out = np.zeros_like(rows, dtype=bool)
            for members in groups.values():
                if len(members) >= 3:
                    out[members] = _layer_outliers(rows[members])
            return out
        for w in range(W):
            out_a, out_m = outliers(A[:, w]), outliers(M[:, w])
            for i in range(L):
                # a sliding-window layer's keys: the window at most
                c = np.minimum(c_all, wins[i]) if wins and wins[i] else c_all
                a, b = robust_line(c, A[i, w], ~out_a[i])
                attn_a[i][w], attn_b[i][w] = a, b
                errs += [abs(a + b * cc - y) / y for cc, y in zip(c, A[i, w]) if y > 0]
                keep = ~out_m[i] if (~out_m[i]).any() else np.ones(len(c), dtype=bool)
                mlp[i][w] = float(np.median(M[i, w][keep]))
        mlp_err = [abs(mlp[i][w] - y) / y for i in range(L) for w in range(W) for y in p.mlp[i][w] if y > 0]
        head = [float(np.median(p.head[w])) for w in range(W)]
        over = [robust_line(c_all, np.asarray(p.overhead[w], dtype=float)) for w in range(W)]
        win: dict[str, list[float]] = {}
        for key, rows in (p.win_attn or {}).items():
            per_layer = [[v for v in r if v is not None] for r in rows]
            if all(per_layer):
                med = [float(np.median(v)) for v in per_layer]
                # a layer far above the other layers' median (a transient): the median of the others
                m_all = float(np.median(med))
                win[key] = [v if v <= 2.0 * m_all else m_all for v in med]
        fe = {"attention_mape": float(np.mean(errs)) if errs else 0.0,
              "mlp_mape": float(np.mean(mlp_err)) if mlp_err else 0.0}
        return cls(key=p.key, widths=list(p.widths), n_layers=L, attn_a=attn_a, attn_b=attn_b, mlp=mlp,
                   head=head, over_a=[o[0] for o in over], over_b=[o[1] for o in over], fit_error=fe,
                   profile=p, win_attn=win, windows=wins)

    @property
    def given(self) -> bool:
        """Constants given by the caller (:meth:`analytic`: what-if planning, unit costs, tests), not
        measured on this machine: strategies take them as they are and never correct them by
        measured times."""
        return bool(self.key.get("analytic"))

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

    def window_time(self, layer: int, window: int, ctx: int, n: int = 1) -> float:
        """Time of layer ``layer``'s attention windowed to the sink and the last ``window`` keys:
        the profiled time of that window where there is one (width 1; other widths scaled like
        full attention at that span), else full attention's line at the window's span; never
        more than full attention at ``ctx``."""
        full = self.attn_time(layer, ctx, n)
        span = window + SINK
        t = self.win_attn.get(str(window)) if self.win_attn else None
        if t is not None:
            t1 = t[layer]
            if n != 1:
                base = self.attn_time(layer, span, 1)
                t1 *= self.attn_time(layer, span, n) / base if base > 0 else 1.0
        else:
            t1 = self.attn_time(layer, span, n)
        return min(full, t1)

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
        # the sublayers' sum, remembered per (plan, context, width): a planner prices one plan at
        # one context several times a round (per draft-vocabulary subset, the length, the exit),
        # ~30 us each for a windowed plan of 30 layers
        memo = self.__dict__.setdefault("_sums", {})
        key = (plan, ctx, n_tokens)
        body = memo.get(key)
        if body is None:
            body = 0.0
            run = plan.run if plan is not None else None
            win = plan.window if plan is not None else ()
            for i in range(self.n_layers):
                if run is None or run[2 * i]:
                    if win and win[2 * i]:
                        body += self.window_time(i, win[2 * i], ctx, n_tokens)
                    else:
                        body += max(a[i] + b[i] * self.context_of(i, ctx), 0.0)
                if run is None or run[2 * i + 1]:
                    body += m[i]
            if len(memo) >= 4096:
                memo.clear()
            memo[key] = body
        return max(oa + ob * ctx, 0.0) + head_scale * head + body

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
        m.__dict__.pop("_memo", None)
        assert len(m.attn_a) == m.n_layers and len(m.head) == len(m.widths), "inconsistent profile"
        return m


_MEMO: dict[str, LatencyModel] = {}


def profile_path(key: dict[str, Any]) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "latency" / f"{h}.json"


def _sliding(model: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (``()`` when none slides, or for a stand-in without a config)."""
    return tuple(getattr(getattr(model, "cfg", None), "sliding_window", ()) or ())


def check(model: Any, lm: LatencyModel, *, repeats: int = 5, warmup: int = 1,
          clock: Callable[[], float] | None = None) -> dict[int, float]:
    """Real one-token forwards at each profiled context against the model's prediction: context ->
    measured / predicted (medians)."""
    prof = lm.profile
    assert prof is not None, "check() needs the profile the model was fitted from"
    tick = _Timer(model.device, clock or time.perf_counter)
    tok = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    out = {}
    with torch.inference_mode():
        for ctx in prof.contexts:
            cache = model.new_cache(ctx + 2)
            ts = []
            for r in range(warmup + repeats):
                cache.set_length(ctx)
                t0 = tick()
                model.forward(tok, ctx, cache)
                if r >= warmup:
                    ts.append(tick() - t0)
            out[ctx] = statistics.median(ts) / max(lm.predict(None, ctx, 1), 1e-12)
            del cache
    return out


def profile(model: Any, *, contexts: list[int], widths: tuple[int, ...] | list[int], repeats: int,
            windows: tuple[int, ...] | list[int] = WINDOWS, progress: bool = False, retries: int = 2,
            clock: Callable[[], float] | None = None) -> tuple[LatencyModel, bool]:
    """Measure, fit and check (see the module docstring): ``(model, checked)``; ``checked`` is
    False when real forwards still disagreed with the prediction after ``retries`` rounds of
    measuring the disagreeing contexts again."""
    prof = measure(model, contexts=contexts, widths=widths, repeats=repeats, progress=progress,
                   windows=tuple(windows), clock=clock)
    lm = LatencyModel.fit(prof, _sliding(model))
    for attempt in range(retries + 1):
        ratios = check(model, lm, clock=clock)
        off = [ctx for ctx, r in ratios.items() if abs(r - 1.0) > CHECK_TOLERANCE]
        if not off:
            return lm, True
        if attempt == retries:
            vals = list(ratios.values())
            uniform = max(vals) / min(vals) <= UNIFORM
            near = all(1.0 / POISONED < v < POISONED for v in vals)
            log.warning("the latency profile's full-step predictions disagree with real steps at context(s) %s "
                        "(measured/predicted %s): %s", off, ", ".join(f"{ratios[c]:.2f}" for c in off),
                        "alike at every context (the machine's load changed; that scales every time alike and "
                        "changes no decision): cached" if uniform else
                        "within the noise that decoding corrects for (VerifyTimes): cached" if near else
                        "used, but not cached")
            return lm, uniform or near
        again = measure(model, contexts=off, widths=widths, repeats=repeats, windows=tuple(windows), clock=clock)
        for j, ctx in enumerate(off):                      # the new points replace the old ones
            ci = prof.contexts.index(ctx)
            for i in range(len(prof.attn)):
                for w in range(len(prof.widths)):
                    prof.attn[i][w][ci] = again.attn[i][w][j]
                    prof.mlp[i][w][ci] = again.mlp[i][w][j]
                for key in prof.win_attn:
                    prof.win_attn[key][i][ci] = again.win_attn.get(key, [[None]] * len(prof.attn))[i][j]
            for w in range(len(prof.widths)):
                prof.head[w][ci] = again.head[w][j]
                prof.overhead[w][ci] = again.overhead[w][j]
        prof.remeasured += len(off)
        lm = LatencyModel.fit(prof, _sliding(model))
    return lm, False


def drop_cached(lm: LatencyModel) -> bool:
    """Remove ``lm``'s profile from the cache folder (the next process measures it again);
    whether there was one."""
    path = profile_path(lm.key)
    _MEMO.pop(str(path), None)
    try:
        path.unlink()
        return True
    except OSError:
        return False


def get_latency_model(model: Any, *, quick: bool = False, force: bool = False, progress: bool = False,
                      repeats: int | None = None, contexts: list[int] | None = None,
                      windows: tuple[int, ...] | list[int] = WINDOWS) -> LatencyModel:
    """The cached latency model for this model/device/dtype/threads, profiling if needed."""
    key = profile_key(model)
    path = profile_path(key)
    memo = _MEMO.get(str(path))
    if memo is not None and not force and (path.is_file() or memo.key.get("unchecked")):
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
    lm, ok = profile(model, contexts=ctxs, widths=QUICK_WIDTHS if quick else FULL_WIDTHS,
                     repeats=repeats or (3 if quick else 7), progress=progress, windows=windows)
    if ok:
        write_text_atomic(path, lm.to_json())
        log.info("latency profile written to %s (%.1fs; fit error %s)", path, lm.profile.seconds, lm.fit_error)
    else:
        lm.key = dict(lm.key, unchecked=True)           # this process only
    _MEMO[str(path)] = lm
    return lm
