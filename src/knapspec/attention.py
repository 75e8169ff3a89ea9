"""Attention on the torch path: masks, exact mode's row-invariant attention, and the shared-prefix
attention of candidate draft branches. (The native kernels do their own attention, ``native/sublayers.h``.)

* :class:`Masks`: boolean and additive masks for causal / sliding-window attention, built once per
  shape and shared by every layer of a forward.
* Exact mode (``Model.set_row_invariant``): each query row attends over a key span fixed by its
  position and products get at least ``MIN_ROWS`` rows, so a token's row comes out the same whether
  it comes alone or in a verification pass. The two constants were measured on this project's CPU
  with its torch / oneDNN build; :func:`knapspec.exactness.check` re-measures the property on the
  machine that runs.
* :func:`branch_attention`: B candidate branches over one cached prefix, read once (the KnapSpec
  planner's batched dynamic program), in the cache's dtype.
* :func:`window_attention`: a draft's windowed attention (the sink and the last W keys of each
  query; ``plan.SINK``), which reads only those keys.

Shapes: ``q: [B, Hq, T, D]``; grouped queries ``qg: [B, Hkv, G*T, D]``; cache views
``[B, Hkv, S, D]``. This module never writes the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import ModelConfig
from .plan import SINK

# Matrix products with fewer rows than this take a different reduction order in oneDNN / MKL on
# this project's CPU (measured: float32 products with 1-3 rows differ from 4+ rows in the last
# bits; 4..32 rows agree), so exact mode pads them to this many rows.
MIN_ROWS = 4

# Exact mode's attention spans, for the query at position p, the key slots 0 .. S-1 with
# S = p + 1 rounded up to a multiple of SPAN_CHUNK (later slots masked): the same S whether the
# query comes alone or in a pass, whose rows are split where S changes. The fused kernel's result
# for a row depends on S (it groups its sums by the number of keys, and picks other block sizes at
# some key counts, e.g. 192, measured) and, in float32, on the number of rows below MIN_ROWS.
SPAN_CHUNK = 64


_SHARED_ZEROS: dict[tuple, torch.Tensor] = {}


def shared_zeros(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` in ``like``'s dtype and device, made once (exact mode's padding rows;
    only ever read)."""
    key = (shape, like.dtype, like.device)
    z = _SHARED_ZEROS.get(key)
    if z is None:
        if len(_SHARED_ZEROS) >= 256:
            _SHARED_ZEROS.clear()
        z = _SHARED_ZEROS[key] = like.new_zeros(shape)
    return z


def exact_span(pos: int, capacity: int) -> int:
    """Exact mode: the number of key slots the query at position ``pos`` attends over."""
    return min(capacity, (pos // SPAN_CHUNK + 1) * SPAN_CHUNK)


def exact_attention(qg: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                     mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Exact mode's attention (``Model.set_row_invariant``) for rows that share one key span S:
    ``qg: [B, Hkv, R, D]`` (R = grouped query rows), ``keys, vals: [B, Hkv, S, D]``, additive
    ``mask`` with its rows already padded to a multiple of ``MIN_ROWS`` -> ``[B, Hkv, R, D]``. The
    query rows are padded the same way, so each row's result is the same whatever the number of
    rows in the pass (measured bit for bit; docs/benchmarks.md, "Exact mode").

    The fused kernel at every span: two products and a softmax were faster at 4k keys only on a
    contiguous slice of keys, while the cache's slices are strided (capacity > span) and bfloat16
    products copy them first (measured 2-3x slower; the fused kernel reads them in place)."""
    b, h, r, d = qg.shape
    rows = mask.shape[0]
    if rows > r:                          # padded rows: zeros, dropped after
        qg = torch.cat([qg, shared_zeros(qg, (b, h, rows - r, d))], dim=2)
    o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=scale)
    return o if rows == r else o[:, :, :r]


class Masks:
    """Attention masks of one model, cached by shape (a forward needs one; exact mode one per key
    span of the pass)."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self._cache: dict[tuple, torch.Tensor] = {}

    def bool(self, layer: int, start: int, t: int, s: int, always: bool = False) -> torch.Tensor | None:
        """Boolean mask ``[T, S]`` (True = may attend) or None when every key is visible."""
        window = self.cfg.window(layer)
        if t == 1 and (window is None or s <= window) and s == start + 1 and not always:
            return None
        q_pos = torch.arange(start, start + t, device=self.device)[:, None]   # [T, 1]
        k_pos = torch.arange(s, device=self.device)[None, :]                  # [1, S]
        # key slots 0..start-1 hold positions 0..start-1; slots start.. hold the new tokens
        m = k_pos <= q_pos
        if window is not None:
            m = m & (k_pos > q_pos - window)
        return m

    def sdpa(self, layer: int, start: int, t: int, s: int, g: int,
             pad_rows: int = 0) -> torch.Tensor | None:
        """The attention mask as SDPA takes it fastest: additive (0 / -inf) in the model's dtype,
        ``[G*T, S]`` for the grouped query rows; built once and shared by every layer of a forward
        (a boolean mask would be rebuilt and converted by SDPA in each of the 2L calls).
        ``pad_rows`` (exact mode): always a mask, its rows padded to a multiple of ``pad_rows`` by
        copies of the first."""
        window = self.cfg.window(layer)
        if t == 1 and (window is None or s <= window) and s == start + 1 and not pad_rows:
            return None
        c = SPAN_CHUNK
        if pad_rows and t == 1 and s % c == 0 and s - c <= start < s:
            # exact mode's one-token steps: the masks of a span's 64 positions are built at once
            # (a step would otherwise build its own, ~0.2 ms each on the 2-core CPU)
            key = ("steps", window, s, g, pad_rows)
            m = self._cache.get(key)
            if m is None:
                n = g + -g % pad_rows                   # g rows of the token, padded by copies
                allowed = self.bool(layer, s - c, c, s, always=True)            # [64, S]
                m = torch.zeros((c, n, s), dtype=self.dtype, device=self.device)
                m.masked_fill_(~allowed[:, None, :].expand(c, n, s), float("-inf"))
                self._remember(key, m)
            return m[start - (s - c)]
        key = (window, start, t, s, g, pad_rows)
        m = self._cache.get(key)
        if m is None:
            allowed = self.bool(layer, start, t, s, always=bool(pad_rows))
            if g > 1:
                allowed = allowed.repeat(g, 1)
            if pad_rows:
                extra = -allowed.shape[0] % pad_rows
                allowed = torch.cat([allowed, allowed[:1].expand(extra, -1)])
            m = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            m.masked_fill_(~allowed, float("-inf"))
            self._remember(key, m)
        return m

    def _remember(self, key: tuple, m: torch.Tensor) -> None:
        # a forward needs one mask (exact mode: one per key span of the pass)
        if len(self._cache) >= 64 or sum(x.numel() for x in self._cache.values()) > 1 << 24:
            self._cache.clear()
        self._cache[key] = m


def exact_pass_attention(masks: Masks, i: int, q: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
    """Exact mode's attention of ``q: [B, Hq, T, D]`` at positions ``start..`` -> ``[B, Hq, T, D]``:
    each query row over the key span :func:`exact_span` gives its position, the same span as
    in a one-token step, so a pass is split where the span changes (at most once for a pass
    shorter than ``SPAN_CHUNK``)."""
    b, hq, t, d = q.shape
    hkv = masks.cfg.n_kv_heads
    g = hq // hkv
    outs = []
    a = 0
    while a < t:
        span = exact_span(start + a, cache.capacity)
        e = min(t, span - start)                    # the tokens before `span` share it
        qg = q[:, :, a:e].reshape(b, hkv, g * (e - a), d)
        keys, vals = cache.view(i, span)
        mask = masks.sdpa(i, start + a, e - a, span, g, pad_rows=MIN_ROWS)
        outs.append(exact_attention(qg, keys, vals, mask, masks.cfg.attn_scale).reshape(b, hq, e - a, d))
        a = e
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _window_start(start: int, window: int) -> int | None:
    """The first key besides the sink that a query at ``start`` (or later) sees with a draft
    ``window``; None when every key from the sink on is in view (no window, or a short context)."""
    lo = start - window + 1
    return lo if window > 0 and lo > SINK else None


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, model_window: int | None) -> torch.Tensor:
    """``[Tq, Tk]`` True where the query at ``q_pos`` may see the key at ``k_pos``: causal, within
    the model's own sliding window, and with a draft ``window``: the sink or the last ``window``."""
    q, k = q_pos[:, None], k_pos[None, :]
    m = k <= q
    if model_window is not None:
        m = m & (k > q - model_window)
    if window > 0:
        m = m & ((k < SINK) | (k > q - window))
    return m


def window_attention(masks: Masks, i: int, qg: torch.Tensor, start: int, t: int, cache: KVCache,
                     window: int) -> torch.Tensor:
    """A draft's attention windowed to the sink and the last ``window`` keys of each query, over
    the cache (whose positions ``start..start+t-1`` were just written): ``qg: [B, Hkv, G*T, D]`` ->
    ``[B, Hkv, G*T, D]``. Reads only the keys some query may see."""
    end = start + t
    keys, vals = cache.view(i, end)                                  # [B, Hkv, end, D]
    dev = qg.device
    lo = _window_start(start, window)
    if lo is None:
        kpos = torch.arange(end, device=dev)
    else:                                                            # sink + the first query's window on
        kpos = torch.cat([torch.arange(SINK, device=dev), torch.arange(lo, end, device=dev)])
        keys = torch.cat([keys[:, :, :SINK], keys[:, :, lo:end]], dim=2)
        vals = torch.cat([vals[:, :, :SINK], vals[:, :, lo:end]], dim=2)
    g = qg.shape[2] // t
    qpos = torch.arange(start, end, device=dev)
    vis = _visible(qpos, kpos, window, masks.cfg.window(i)).repeat(g, 1)     # [G*T, S']
    mask = torch.zeros(vis.shape, dtype=qg.dtype, device=dev).masked_fill_(~vis, float("-inf"))
    return F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=masks.cfg.attn_scale)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention output and log-sum-exp of the scores in the inputs' dtype (torch's CPU flash
    kernel, float32 accumulation); None where that kernel is not available."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32):
        return None
    try:
        o, lse = op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    except (RuntimeError, TypeError):
        return None
    return o, lse


def branch_attention(masks: Masks, i: int, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     cache: KVCache, window: int = 0) -> torch.Tensor:
    """Attention of B branches that share the cached prefix ``0..start-1`` (read once, never
    copied per branch, in the cache's dtype) and attend causally within their own T tokens;
    ``window`` > 0: each query sees only the sink and its last ``window`` positions.
    ``qg: [B, Hkv, G*T, D]``, ``k, v: [B, Hkv, T, D]`` -> ``[B, Hkv, G*T, D]``.

    The prefix part runs with the branches folded into the query rows (``[1, Hkv, B*G*T, D]``)
    through the fused kernel, which also gives each row's log-sum-exp; the branch's own keys (a
    few) are merged in float32 through the log-sum-exps."""
    b, hkv, gt, d = qg.shape
    t = k.shape[2]
    g = gt // t
    dev = qg.device
    scale = masks.cfg.attn_scale or 1.0 / math.sqrt(d)
    qpos = torch.arange(start, start + t, device=dev)
    mw = masks.cfg.window(i)
    # own tokens: [B, Hkv, G*T, T] in float32
    s_own = (qg.float() * scale) @ k.float().transpose(-1, -2)
    vis_own = _visible(qpos, qpos, window, mw).repeat(g, 1)                     # [G*T, T]
    s_own = s_own.masked_fill(~vis_own, float("-inf"))
    lse_own = torch.logsumexp(s_own, dim=-1)                                    # [B, Hkv, G*T]
    o_own = torch.softmax(s_own, dim=-1) @ v.float()                            # [B, Hkv, G*T, D]
    if start == 0:
        return o_own.to(qg.dtype).contiguous()
    pk, pv = cache.view(i, start)                                                # [1, Hkv, P, D]
    lo = _window_start(start, window)
    if lo is None:
        kpos = torch.arange(start, device=dev)
    else:                                                   # only the keys a query may see
        kpos = torch.cat([torch.arange(SINK, device=dev), torch.arange(lo, start, device=dev)])
        pk = torch.cat([pk[:, :, :SINK], pk[:, :, lo:]], dim=2)
        pv = torch.cat([pv[:, :, :SINK], pv[:, :, lo:]], dim=2)
    vis_pre = _visible(qpos, kpos, window, mw)                                  # [T, P']
    if bool(vis_pre.all()):
        mask = None
    else:
        vis_rows = vis_pre.repeat(g, 1).repeat(b, 1)                            # [B*G*T, P']
        mask = torch.zeros(vis_rows.shape, dtype=qg.dtype, device=dev).masked_fill_(~vis_rows, float("-inf"))
    q_rows = qg.transpose(0, 1).reshape(1, hkv, b * gt, d)                      # branches folded into rows
    res = _flash_lse(q_rows, pk, pv, mask, masks.cfg.attn_scale)
    if res is None:                                                             # float32 products
        s_pre = (q_rows[0].float() * scale) @ pk[0].float().transpose(-1, -2)   # [Hkv, B*G*T, P']
        if mask is not None:
            s_pre = s_pre + mask.float()
        lse_pre = torch.logsumexp(s_pre, dim=-1)[None]
        o_pre = (torch.softmax(s_pre, dim=-1) @ pv[0].float())[None]
    else:
        o_pre, lse_pre = res
    o_pre = o_pre.float().reshape(hkv, b, gt, d).transpose(0, 1)                # [B, Hkv, G*T, D]
    lse_pre = lse_pre.float().reshape(hkv, b, gt).transpose(0, 1)               # [B, Hkv, G*T]
    lse = torch.logaddexp(lse_pre, lse_own)
    o = torch.exp(lse_pre - lse)[..., None] * o_pre + torch.exp(lse_own - lse)[..., None] * o_own
    return o.to(qg.dtype).contiguous()
