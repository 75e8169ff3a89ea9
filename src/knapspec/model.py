"""The decoder as a stack of 2L residual sublayers, and its one forward.

Contract: ``Model.forward(tokens, start, cache, plan=None, capture=False)`` runs the tokens at
positions ``start .. start+T-1`` through the sublayers the plan keeps (all of them by default),
writes their keys and values into ``cache`` at those positions for every attention sublayer that
runs, and returns logits (and, with ``capture``, the residual stream after every sublayer).
Sublayer ``2i`` is layer ``i``'s attention, ``2i + 1`` its MLP; a skipped sublayer is the
identity. ``Model.sublayer`` runs one sublayer on its own, optionally without writing the cache
(used to evaluate many candidate draft paths in one batched call).

Supported: Llama 2/3/3.1/3.2 (incl. llama3 and linear rope scaling), Mistral (sliding window),
Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2; tied or untied embeddings; grouped-query
attention. The model never reads files, samples, times or loops over tokens.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .cache import KVCache
from .plan import Plan


class Arch(enum.Enum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"


SUPPORTED_ROPE = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted (key, value) pairs; () = none
    sliding_window: tuple[int | None, ...] = ()     # per layer; () = no layer slides
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, name: str = "") -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        mt = cfg.get("model_type")
        try:
            arch = Arch(mt)
        except ValueError:
            raise ValueError(f"unsupported architecture {mt!r}: supported model_type values are "
                             f"{', '.join(a.value for a in Arch)} (Llama, Mistral, Qwen2/2.5, Qwen3, "
                             "SmolLM2 families)") from None
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(cfg.get(key), int):
                raise ValueError(f"config.json lacks an integer {key!r}; is this a causal LM checkpoint?")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}: only 'silu' is supported")
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        if scaling:
            rope.update(scaling)
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rtype not in SUPPORTED_ROPE:
            raise ValueError(f"unsupported rope scaling {rtype!r}: supported are {', '.join(SUPPORTED_ROPE)}")
        rope_scaling: tuple[tuple[str, Any], ...] = ()
        if rtype != "default":
            rope_scaling = tuple(sorted((k, v) for k, v in rope.items() if k not in ("rope_theta", "type")))
        # sliding windows, per layer
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        windows: list[int | None] = [None] * n_layers
        if window:
            if layer_types:
                windows = [window if t == "sliding_attention" else None for t in layer_types]
            elif arch is Arch.MISTRAL:
                windows = [window] * n_layers
            elif cfg.get("use_sliding_window"):
                mwl = cfg.get("max_window_layers", n_layers)
                windows = [window if i >= mwl else None for i in range(n_layers)]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        qkv_bias = bool(cfg.get("attention_bias", arch is Arch.QWEN2))
        if cfg.get("mlp_bias"):
            raise ValueError("unsupported: MLP biases (mlp_bias=true)")
        return cls(
            arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, qk_norm=arch is Arch.QWEN3, rope_scaling=rope_scaling,
            sliding_window=tuple(windows) if any(w for w in windows) else (),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
        )

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    def window(self, layer: int) -> int | None:
        return self.sliding_window[layer] if self.sliding_window else None

    def n_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * h) + emb + h


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies ``[D/2]`` in float32, with llama3 / linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = dict(cfg.rope_scaling)
    rtype = sc.get("rope_type", "default")
    if rtype == "linear":
        inv = inv / float(sc["factor"])
    elif rtype == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (normalised in float32, cast back, then scaled),
    with torch's fused kernel for the float32 part: one call instead of five."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = [-x2, x1]``, written as ``[x2, x1] * [-sin, sin]`` (the same products and
    roundings, one copy instead of four ops). ``x: [..., D]``; ``cos``, ``sin_signed`` broadcast."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


@dataclass
class ForwardOut:
    logits: torch.Tensor | None            # [B, T', V] float32 (T' = T, or 1 with last_only)
    hidden: torch.Tensor | None = None     # [2L+1, B, T, H] residual stream after each sublayer
    last_hidden: torch.Tensor | None = None  # [B, T, H] final residual stream (before the norm)


# Matrix products with fewer rows than this take a different reduction order in oneDNN / MKL on
# this project's CPU (measured: float32 products with 1-3 rows differ from 4+ rows in the last
# bits; 4..32 rows agree), so exact mode pads them to this many rows.
_MIN_ROWS = 4

# Exact mode's attention spans, for the query at position p, the key slots 0 .. S-1 with
# S = p + 1 rounded up to a multiple of _SPAN_CHUNK (later slots masked): the same S whether the
# query comes alone or in a pass, whose rows are split where S changes. The fused kernel's result
# for a row depends on S (it groups its sums by the number of keys, and picks other block sizes at
# some key counts, e.g. 192, measured) and, in float32, on the number of rows below _MIN_ROWS.
_SPAN_CHUNK = 64


# Passes longer than this take torch's fused attention even with the native kernels, which bounds
# the native attention's per-call buffers (partial results per 256-key chunk and query row). The
# engine prefills in chunks of 512 tokens, so every prefill chunk runs natively: measured on the
# embedded model in bfloat16, a 4k prompt took 5.5-6.9 s against 8.3-8.7 s with torch's attention,
# an 8k prompt 18.3 s against 27.4 s.
_NATIVE_ATTENTION_MAX_TOKENS = 512

_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` in ``like``'s dtype and device, made once (exact mode's padding rows;
    only ever read)."""
    key = (shape, like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        if len(_ZEROS) >= 256:
            _ZEROS.clear()
        z = _ZEROS[key] = like.new_zeros(shape)
    return z


def _exact_span(pos: int, capacity: int) -> int:
    """Exact mode: the number of key slots the query at position ``pos`` attends over."""
    return min(capacity, (pos // _SPAN_CHUNK + 1) * _SPAN_CHUNK)


def _exact_attention(qg: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Exact mode's attention (``Model.set_row_invariant``) for rows that share one key span S:
    ``qg: [B, Hkv, R, D]`` (R = grouped query rows), ``keys, vals: [B, Hkv, S, D]``, additive
    ``mask`` with its rows already padded to a multiple of ``_MIN_ROWS`` -> ``[B, Hkv, R, D]``. The
    query rows are padded the same way, so each row's result is the same whatever the number of
    rows in the pass (measured bit for bit; docs/benchmarks.md, "Exact mode").

    The fused kernel at every span: two products and a softmax were faster at 4k keys only on a
    contiguous slice of keys, while the cache's slices are strided (capacity > span) and bfloat16
    products copy them first (measured 2-3x slower; the fused kernel reads them in place)."""
    b, h, r, d = qg.shape
    rows = mask.shape[0]
    if rows > r:                          # padded rows: zeros, dropped after
        qg = torch.cat([qg, _zeros(qg, (b, h, rows - r, d))], dim=2)
    o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask)
    return o if rows == r else o[:, :, :r]


@dataclass
class _Layer:
    attn_norm: torch.Tensor            # [H]
    wqkv: torch.Tensor                 # [(Hq + 2 Hkv) * D, H]
    bqkv: torch.Tensor | None          # [(Hq + 2 Hkv) * D]
    q_norm: torch.Tensor | None        # [D]
    k_norm: torch.Tensor | None        # [D]
    wo: torch.Tensor                   # [H, Hq * D]
    mlp_norm: torch.Tensor             # [H]
    w_gate_up: torch.Tensor            # [2 I, H]
    w_down: torch.Tensor               # [H, I]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in ("attn_norm", "wqkv", "bqkv", "q_norm", "k_norm", "wo",
                                              "mlp_norm", "w_gate_up", "w_down")}


class Model:
    """Weights plus the one forward. Build with :meth:`from_hf_tensors` (see ``checkpoint.py``)."""

    def __init__(self, cfg: ModelConfig, layers: list[_Layer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor | None) -> None:
        self.cfg = cfg
        self.layers = layers
        self.embed = embed                  # [V, H]
        self.final_norm = final_norm        # [H]
        self._lm_head = lm_head             # [V, H], None when tied
        self._rope_len = 0
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._inv_freq = rope_inv_freq(cfg)
        self._sdpa_masks: dict[tuple, torch.Tensor] = {}
        self.packed = False
        self.kernels = "plain"            # pack_weights: "native", "onednn" or "plain"
        self._native_sublayers = False    # whole sublayers in one native call (pack_weights)
        self._ncos = self._nsin = torch.empty(0)   # float32 rotary tables [positions, D/2] for them
        self._run_all = torch.ones(2 * cfg.n_layers, dtype=torch.uint8)   # native.stack's full plan
        self._pack_gen = 0                # counts pack_weights calls (native.stack's tables)
        self._packs: dict[int, tuple[torch.Tensor, Any]] = {}
        # exact mode (set_row_invariant): each token's row computed the same way whatever the
        # number of tokens in the pass, so speculative output equals autoregressive output bit for bit
        self.row_invariant = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf_tensors(cls, cfg: ModelConfig, t: dict[str, torch.Tensor]) -> Model:
        """Build from a Hugging Face state dict (names as in ``LlamaForCausalLM``)."""
        def get(name: str) -> torch.Tensor:
            if name not in t:
                raise ValueError(f"checkpoint lacks tensor {name!r}; is it a {cfg.arch.value} model?")
            return t[name]

        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bqkv = None
            if cfg.qkv_bias:
                bqkv = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            layers.append(_Layer(
                attn_norm=get(p + "input_layernorm.weight"),
                wqkv=torch.cat([q, k, v]), bqkv=bqkv,
                q_norm=get(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=get(p + "self_attn.k_norm.weight") if cfg.qk_norm else None,
                wo=get(p + "self_attn.o_proj.weight"),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                w_down=get(p + "mlp.down_proj.weight"),
            ))
        embed = get("model.embed_tokens.weight")
        head = None
        if not cfg.tie_embeddings:
            head = t.get("lm_head.weight")
            if head is None:
                raise ValueError("checkpoint lacks 'lm_head.weight' and tie_word_embeddings is false")
        return cls(cfg, layers, embed, get("model.norm.weight"), head)

    def to(self, *args: Any, **kwargs: Any) -> Model:
        """Move/cast every weight (keeps tied embeddings tied)."""
        def conv(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(*args, **kwargs)
        for layer in self.layers:
            for k, v in layer.tensors().items():
                setattr(layer, k, conv(v))
        self.embed = conv(self.embed)
        self.final_norm = conv(self.final_norm)
        self._lm_head = conv(self._lm_head)
        self._rope_len = 0
        self._sdpa_masks = {}
        self.packed, self._packs, self.kernels, self._native_sublayers = False, {}, "plain", False
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed if self._lm_head is None else self._lm_head   # [V, H]

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        if self.row_invariant:            # whole key spans (_exact_span), whatever was asked for
            capacity = -(-capacity // _SPAN_CHUNK) * _SPAN_CHUNK
        return KVCache(n_layers=self.cfg.n_layers, n_kv_heads=self.cfg.n_kv_heads,
                       head_dim=self.cfg.head_dim, capacity=capacity, dtype=self.dtype,
                       device=self.device, batch=batch)

    def weight_bytes(self) -> int:
        n = sum(v.numel() * v.element_size() for layer in self.layers
                for v in layer.tensors().values() if v is not None)
        n += self.embed.numel() * self.embed.element_size()   # lm_head reads it (tied) ...
        if self._lm_head is not None:                          # ... or its own matrix
            n += self._lm_head.numel() * self._lm_head.element_size()
        return n

    # ---- linear layers ----------------------------------------------------------------------------
    def pack_weights(self, enable: bool = True, kernels: str = "auto") -> bool:
        """Prepack the linear weights and the lm_head on CPU for faster matrix products (a second
        copy of those weights). ``kernels``:

        - ``"native"``: knapspec's own AVX-512 kernels (``native.py``): the weights stream from
          memory in order, ~1.7-1.9x oneDNN's speed for 1-4 rows on the embedded model, and each
          row's result is the same whatever the number of rows (exact mode needs no padding for
          them). float32, and bfloat16 on a CPU with AVX512_BF16; built on first use.
        - ``"onednn"``: oneDNN's prepacked kernels, reordered once into its blocked layout
          (``F.linear`` re-derives that layout on every call; 1.2-2.7x faster than it).
        - ``"auto"`` (default): native where available, else oneDNN.

        Returns whether packing is on. Off elsewhere (CUDA, other dtypes) and for any weight not
        packed here (e.g. a truncated draft vocabulary or a weight replaced after packing): plain
        ``F.linear``. Sets ``self.kernels`` to ``"native"``, ``"onednn"`` or ``"plain"``."""
        if kernels not in ("auto", "native", "onednn"):
            raise ValueError(f"unknown kernels {kernels!r}; accepted: auto, native, onednn")
        self._packs = {}
        self._pack_gen += 1
        self.packed, self.kernels, self._native_sublayers = False, "plain", False
        if not enable or self.device.type != "cpu":
            return False
        pairs = [(w, b) for L in self.layers
                 for w, b in ((L.wqkv, L.bqkv), (L.wo, None), (L.w_gate_up, None), (L.w_down, None))]
        pairs.append((self.lm_head, None))
        if kernels in ("auto", "native"):
            why = native.available(self.dtype)
            if why is None:
                for w, b in pairs:
                    self._packs[id(w)] = (w, native.Packed(w, b))
                self.packed, self.kernels = True, "native"
                self._native_sublayers = native.supports_sublayers(
                    self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.head_dim)
                return True
            if kernels == "native":
                raise ValueError(f"native kernels unavailable: {why}; use kernels 'onednn' or 'auto'")
        self.packed = (torch.backends.mkldnn.is_available()
                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                       and (self.dtype == torch.float32
                            or (self.dtype == torch.bfloat16
                                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))))
        if self.packed:
            try:
                for w, _ in pairs:
                    self._packs[id(w)] = (w, torch.ops.mkldnn._reorder_linear_weight(w, None))
                self.kernels = "onednn"
            except RuntimeError:             # a oneDNN build without this kernel: plain products
                self._packs, self.packed = {}, False
        return self.packed

    def set_row_invariant(self, enable: bool = True) -> None:
        """Exact mode: compute every token's row of a forward the same way whatever the number of
        tokens in the pass, so that a verification pass over several tokens gives bit-identical
        results to the one-token steps of autoregressive decoding, in any dtype. The query at
        position p attends over the key slots up to p + 1 rounded up to a multiple of 64, the later
        ones masked, whether it comes alone or in a pass (a pass is split where that span changes;
        the fused kernel's sums depend on the number of keys; see ``_exact_attention``). Products
        with fewer than 4 rows, attention's included, are padded to 4 (oneDNN and MKL take another
        reduction order for 1-3 float32 rows, and the packed down projection for 1 bfloat16 row).
        Measured on this project's CPU, not guaranteed by the kernels' documentation; there it
        costs up to ~8% per pass at short contexts and nothing measurable at 1k-4k tokens
        (docs/benchmarks.md, "Exact mode").
        Caches made by :meth:`new_cache` while it is on have a capacity rounded up to a multiple
        of 64, so that the spans do not depend on the capacity asked for.

        With the native kernels (``pack_weights(kernels="native")``, the CPU default where
        available) every forward of one sequence is row-invariant by construction, on or off:
        their products and attention never depend on the number of rows (``native.cpp``). This
        setting then only governs what still runs on the torch path (weights replaced after
        packing, a truncated draft vocabulary, shared-prefix branch drafts)."""
        self.row_invariant = bool(enable)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ w.T + b`` in ``out_dtype`` (default x's), with the packed kernel when ``w`` was
        packed by :meth:`pack_weights`."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        e = self._packs.get(id(w)) if self.packed else None
        if e is not None and e[0] is w and isinstance(e[1], native.Packed):
            # row-invariant by construction: no padding in exact mode
            y = native.linear(x2, e[1], out_dtype)
            return y.view(*shape[:-1], y.shape[-1])
        rows = x2.shape[0]
        pad = self.row_invariant and rows < _MIN_ROWS
        if pad:                                         # see set_row_invariant
            x2 = torch.cat([x2, _zeros(x2, (_MIN_ROWS - rows, x2.shape[1]))])
        if e is None or e[0] is not w:
            y = F.linear(x2, w, b)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, e[1], b, "none", [], "")
        if pad:
            y = y[:rows]
        if out_dtype is not None:
            y = y.to(out_dtype)
        return y.view(*shape[:-1], y.shape[-1])

    # ---- pieces ----------------------------------------------------------------------------------
    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + t
        if end > self._rope_len:
            n = max(end, 2 * self._rope_len, 256)
            pos = torch.arange(n, dtype=torch.float32)
            freqs = torch.outer(pos, self._inv_freq)                     # [n, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)                      # [n, D]
            self._cos = emb.cos().to(device=self.device, dtype=self.dtype)
            sin = emb.sin()
            sin[:, :sin.shape[1] // 2].neg_()                           # signed for _apply_rope
            self._sin = sin.to(device=self.device, dtype=self.dtype)
            self._rope_len = n
        return self._cos[start:end], self._sin[start:end]                # [T, D]

    def _mask(self, layer: int, start: int, t: int, s: int, always: bool = False) -> torch.Tensor | None:
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

    def _sdpa_mask(self, layer: int, start: int, t: int, s: int, g: int,
                   pad_rows: int = 0) -> torch.Tensor | None:
        """The attention mask as SDPA takes it fastest: additive (0 / -inf) in the model's dtype,
        ``[G*T, S]`` for the grouped query rows; built once and shared by every layer of a forward
        (a boolean mask would be rebuilt and converted by SDPA in each of the 2L calls).
        ``pad_rows`` (exact mode): always a mask, its rows padded to a multiple of ``pad_rows`` by
        copies of the first."""
        window = self.cfg.window(layer)
        if t == 1 and (window is None or s <= window) and s == start + 1 and not pad_rows:
            return None
        c = _SPAN_CHUNK
        if pad_rows and t == 1 and s % c == 0 and s - c <= start < s:
            # exact mode's one-token steps: the masks of a span's 64 positions are built at once
            # (a step would otherwise build its own, ~0.2 ms each on the 2-core CPU)
            key = ("steps", window, s, g, pad_rows)
            m = self._sdpa_masks.get(key)
            if m is None:
                n = g + -g % pad_rows                   # g rows of the token, padded by copies
                allowed = self._mask(layer, s - c, c, s, always=True)            # [64, S]
                m = torch.zeros((c, n, s), dtype=self.dtype, device=self.device)
                m.masked_fill_(~allowed[:, None, :].expand(c, n, s), float("-inf"))
                self._remember_mask(key, m)
            return m[start - (s - c)]
        key = (window, start, t, s, g, pad_rows)
        m = self._sdpa_masks.get(key)
        if m is None:
            allowed = self._mask(layer, start, t, s, always=bool(pad_rows))
            if g > 1:
                allowed = allowed.repeat(g, 1)
            if pad_rows:
                extra = -allowed.shape[0] % pad_rows
                allowed = torch.cat([allowed, allowed[:1].expand(extra, -1)])
            m = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            m.masked_fill_(~allowed, float("-inf"))
            self._remember_mask(key, m)
        return m

    def _remember_mask(self, key: tuple, m: torch.Tensor) -> None:
        # a forward needs one mask (exact mode: one per key span of the pass)
        if len(self._sdpa_masks) >= 64 or sum(x.numel() for x in self._sdpa_masks.values()) > 1 << 24:
            self._sdpa_masks.clear()
        self._sdpa_masks[key] = m

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed)                           # [B, T, H]

    def attention(self, i: int, x: torch.Tensor, start: int, cache: KVCache, *,
                  write: bool = True) -> torch.Tensor:
        """Layer ``i``'s attention sublayer on ``x: [B, T, H]`` at positions ``start..``.

        ``write=True``: keys/values go into the cache at those positions and the tokens attend
        to cache positions ``0 .. start+T-1``. ``write=False``: the cache is only read (prefix
        ``0 .. start-1``, shared by all B rows), each row attending causally to its own tokens.
        """
        cfg, L = self.cfg, self.layers[i]
        b, t, _ = x.shape
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        h = rms_norm(x, L.attn_norm, cfg.rms_norm_eps)
        qkv = self.linear(h, L.wqkv, L.bqkv)                                # [B, T, (Hq+2Hkv)*D]
        cos, sin = self._rope(start, t)                                  # [T, D]
        cos, sin = cos[:, None], sin[:, None]                            # [T, 1, D]
        if L.q_norm is None:
            # queries and keys are adjacent in qkv: one rotary pass over both
            qk = _apply_rope(qkv[..., :(hq + hkv) * d].view(b, t, hq + hkv, d), cos, sin)
            q, k = qk[:, :, :hq], qk[:, :, hq:]
        else:
            q = rms_norm(qkv[..., :hq * d].view(b, t, hq, d), L.q_norm, cfg.rms_norm_eps)
            k = rms_norm(qkv[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d), L.k_norm,
                         cfg.rms_norm_eps)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q = q.transpose(1, 2)                                            # [B, Hq, T, D]
        k = k.transpose(1, 2)                                            # [B, Hkv, T, D]
        v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        g = hq // hkv
        if write:
            cache.write(i, start, k, v)
        if write and self.row_invariant:
            o = self._exact_pass_attention(i, q, start, cache)              # [B, Hq, T, D]
        else:
            # group the query heads that share a KV head: [B, Hkv, G*T, D]; no copy of K/V
            qg = q.reshape(b, hkv, g * t, d)
            if write:
                keys, vals = cache.view(i, start + t)                    # [B, Hkv, S, D]
                mask = self._sdpa_mask(i, start, t, keys.shape[2], g)   # [G*T, S] or None
                o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask)   # [B, Hkv, G*T, D]
            else:
                o = self._branch_attention(i, qg, k, v, start, cache)
        o = o.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)
        return x + self.linear(o, L.wo)

    def _exact_pass_attention(self, i: int, q: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """Exact mode's attention of ``q: [B, Hq, T, D]`` at positions ``start..`` -> ``[B, Hq, T, D]``:
        each query row over the key span :func:`_exact_span` gives its position, the same span as
        in a one-token step, so a pass is split where the span changes (at most once for a pass
        shorter than ``_SPAN_CHUNK``)."""
        b, hq, t, d = q.shape
        hkv = self.cfg.n_kv_heads
        g = hq // hkv
        outs = []
        a = 0
        while a < t:
            span = _exact_span(start + a, cache.capacity)
            e = min(t, span - start)                    # the tokens before `span` share it
            qg = q[:, :, a:e].reshape(b, hkv, g * (e - a), d)
            keys, vals = cache.view(i, span)
            mask = self._sdpa_mask(i, start + a, e - a, span, g, pad_rows=_MIN_ROWS)
            outs.append(_exact_attention(qg, keys, vals, mask).reshape(b, hq, e - a, d))
            a = e
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _branch_attention(self, i: int, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                          cache: KVCache) -> torch.Tensor:
        """Attention of B branches that share the cached prefix ``0..start-1`` (read once, never
        copied per branch) and attend causally within their own T tokens.
        ``qg: [B, Hkv, G*T, D]``, ``k, v: [B, Hkv, T, D]`` -> ``[B, Hkv, G*T, D]``."""
        b, hkv, gt, d = qg.shape
        t = k.shape[2]
        g = gt // t
        pk, pv = cache.view(i, start)                                    # [1, Hkv, P, D]
        qf = qg.float() * (1.0 / math.sqrt(d))
        # prefix scores with the branches folded into the rows: [Hkv, B*G*T, P] (K read once)
        q_rows = qf.transpose(0, 1).reshape(hkv, b * gt, d)
        s_pre = (q_rows @ pk[0].float().transpose(-1, -2)).reshape(hkv, b, gt, start).transpose(0, 1)
        s_own = qf @ k.float().transpose(-1, -2)                         # [B, Hkv, G*T, T]
        m = self._mask(i, start, t, start + t)
        if m is not None:
            m = m.repeat(g, 1)                                           # [G*T, P+T]
            if not bool(m[:, :start].all()):                             # sliding window
                s_pre = s_pre.masked_fill(~m[:, :start], float("-inf"))
            s_own = s_own.masked_fill(~m[:, start:], float("-inf"))
        p = torch.softmax(torch.cat([s_pre, s_own], dim=-1), dim=-1)
        p_pre = p[..., :start].transpose(0, 1).reshape(hkv, b * gt, start)
        o_pre = (p_pre @ pv[0].float()).reshape(hkv, b, gt, d).transpose(0, 1)
        o = o_pre + p[..., start:] @ v.float()
        return o.to(qg.dtype).contiguous()

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cfg, L = self.cfg, self.layers[i]
        h = rms_norm(x, L.mlp_norm, cfg.rms_norm_eps)
        gate, up = self.linear(h, L.w_gate_up).chunk(2, dim=-1)             # [B, T, I] each
        return x + self.linear(F.silu(gate) * up, L.w_down)

    def sublayer(self, s: int, x: torch.Tensor, start: int, cache: KVCache, *,
                 write: bool = True) -> torch.Tensor:
        """Run sublayer ``s`` (attention ``s//2`` if ``s`` is even, else its MLP)."""
        if self._native_sublayers:
            packs = self._native_layer(s // 2)
            if packs is not None:
                if s % 2:
                    L = self.layers[s // 2]
                    return native.mlp(x, L.mlp_norm, self.cfg.rms_norm_eps, packs[2], packs[3])
                if write and x.shape[0] == 1 and x.shape[1] <= _NATIVE_ATTENTION_MAX_TOKENS:
                    return self._native_attention(s // 2, x, start, cache, packs)
        if s % 2 == 0:
            return self.attention(s // 2, x, start, cache, write=write)
        return self.mlp(s // 2, x)

    def _native_layer(self, i: int) -> tuple | None:
        """The native packs of layer ``i``'s four weights, or None when one was replaced after
        packing (then the layer runs the torch path)."""
        L = self.layers[i]
        out = []
        for w in (L.wqkv, L.wo, L.w_gate_up, L.w_down):
            e = self._packs.get(id(w))
            if e is None or e[0] is not w:
                return None
            out.append(e[1])
        return tuple(out)

    def _native_stack_table(self, cache: KVCache) -> torch.Tensor | None:
        """The table of pointers :func:`native.stack` reads (weights, norms, packs, this cache's
        tensors, windows), built once per (weights, cache) and rebuilt when a layer's tensor was
        replaced; None when a layer does not run natively (then the sublayers go one by one)."""
        refs = tuple(t for L in self.layers for t in (L.attn_norm, L.wqkv, L.bqkv, L.q_norm, L.k_norm,
                                                       L.wo, L.mlp_norm, L.w_gate_up, L.w_down))
        held = getattr(cache, "_native_stack", None)
        if (held is not None and held[0] == (id(self), self._pack_gen) and len(held[1]) == len(refs)
                and all(a is b for a, b in zip(held[1], refs))):
            return held[2]
        def ptr(v: torch.Tensor | None) -> int:
            return 0 if v is None else v.data_ptr()
        rows = []
        cache.native_layout()
        for i, L in enumerate(self.layers):
            packs = self._native_layer(i)
            if packs is None:
                return None
            qkv, o, gate_up, down = packs
            rows.append([L.attn_norm.data_ptr(), qkv.tiles.data_ptr(), ptr(qkv.bias), ptr(L.q_norm),
                         ptr(L.k_norm), o.tiles.data_ptr(), L.mlp_norm.data_ptr(), gate_up.tiles.data_ptr(),
                         down.tiles.data_ptr(), cache.k[i].data_ptr(), cache.v[i].data_ptr(),
                         cache.kt[i].data_ptr(), 0 if cache.vt is None else cache.vt[i].data_ptr(),
                         self.cfg.window(i) or 0])
        table = torch.tensor(rows, dtype=torch.int64)
        assert table.shape[1] == len(native.STACK_FIELDS)
        # the refs keep the tensors behind the pointers alive; the packs live in self._packs until
        # the next pack_weights, which moves _pack_gen on
        cache._native_stack = ((id(self), self._pack_gen), refs, table)
        return table

    def _native_rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + t
        if end > self._ncos.shape[0]:
            n = max(end, 2 * self._ncos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self._inv_freq.float())   # [n, D/2]
            self._ncos, self._nsin = freqs.cos().contiguous(), freqs.sin().contiguous()
        return self._ncos[start:end], self._nsin[start:end]

    def _native_attention(self, i: int, x: torch.Tensor, start: int, cache: KVCache, packs: tuple) -> torch.Tensor:
        """Layer ``i``'s attention sublayer in one native call (one sequence, cache written); each
        token's row is computed the same way alone or in a pass (see ``native.cpp``)."""
        cfg, L = self.cfg, self.layers[i]
        t = x.shape[1]
        cache.check_room(start, t)
        cos, sin = self._native_rope(start, t)
        cache.native_layout()
        return native.attention(x, start, norm_w=L.attn_norm, eps=cfg.rms_norm_eps, qkv=packs[0],
                                q_norm=L.q_norm, k_norm=L.k_norm, cos=cos, sin=sin,
                                k_cache=cache.k[i], v_cache=cache.v[i], k_blocks=cache.kt[i],
                                v_pairs=None if cache.vt is None else cache.vt[i], n_heads=cfg.n_heads,
                                n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                window=cfg.window(i), o=packs[1])

    def head(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + lm_head: ``[..., H] -> [..., V]`` float32 logits (``weight`` may be a
        row subset of the lm_head for draft-only vocabulary truncation)."""
        h = rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
        return self.linear(h, self.lm_head if weight is None else weight, out_dtype=torch.float32)

    # ---- the forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, plan: Plan | None = None, *,
                capture: bool = False, last_only: bool = False, logits: bool = True,
                head_weight: torch.Tensor | None = None) -> ForwardOut:
        """``tokens: [B, T]`` at positions ``start .. start+T-1``; updates ``cache.length``."""
        b, t = tokens.shape
        assert start <= cache.length, f"start {start} beyond cache length {cache.length}"
        if plan is not None:
            assert plan.n_layers == self.cfg.n_layers, "plan is for a different number of layers"
        run = None if plan is None or plan.is_full else plan.run
        x = self.embed_tokens(tokens)
        states = [x] if capture else None
        table = (self._native_stack_table(cache) if self._native_sublayers and not capture and b == 1
                 and t <= _NATIVE_ATTENTION_MAX_TOKENS else None)
        if table is not None:             # every sublayer in one native call
            cache.check_room(start, t)
            cfg = self.cfg
            cos, sin = self._native_rope(start, t)
            mask = self._run_all if run is None else torch.tensor(run, dtype=torch.uint8)
            x = native.stack(x, start, mask, table, eps=cfg.rms_norm_eps, cos=cos, sin=sin,
                             capacity=cache.capacity, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                             head_dim=cfg.head_dim, intermediate=cfg.intermediate_size)
        else:
            for s in range(2 * self.cfg.n_layers):
                if run is None or run[s]:
                    x = self.sublayer(s, x, start, cache)
                if states is not None:
                    states.append(x)
        cache.set_length(start + t)
        out = ForwardOut(logits=None, last_hidden=x)
        if states is not None:
            out.hidden = torch.stack(states)                             # [2L+1, B, T, H]
        if logits:
            out.logits = self.head(x[:, -1:] if last_only else x, head_weight)
        return out
