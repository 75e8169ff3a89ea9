"""The decoder as a stack of 2L residual sublayers, and its one forward.

Contract: ``Model.forward(tokens, start, cache, plan=None, capture=False)`` runs the tokens at
positions ``start .. start+T-1`` through the sublayers the plan keeps (all of them by default),
writes their keys and values into ``cache`` at those positions for every attention sublayer that
runs, and returns logits (and, with ``capture``, the residual stream after every sublayer).
Sublayer ``2i`` is layer ``i``'s attention, ``2i + 1`` its MLP; a skipped sublayer is the
identity. ``Model.sublayer`` runs one sublayer on its own, optionally without writing the cache
(used to evaluate many candidate draft paths in one batched call).

The configuration is ``config.py``; rotary tables ``rope.py``; the torch path's attention (masks, exact
mode, shared-prefix branches) ``attention.py``; the native kernels ``native``.

Weights are float tensors, or GGUF block types held as they are (``formats.QuantWeight``, from
``checkpoint.py``): every product with a quantized weight runs the native quantized kernels, the
embedding rows are dequantised on lookup, and the activations, norms and KV cache use the model's
float dtype (:attr:`Model.dtype`). Supported: Llama
2/3/3.1/3.2 (incl. llama3 and linear rope scaling), Mistral (sliding window),
Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2, Gemma 3 (see below); tied or untied
embeddings; grouped-query attention. The model never reads files, samples, times or loops over tokens.

Gemma 3 in the same sublayers: its attention sublayer is ``x + post_norm(o_proj(attn(norm(x))))``
and its MLP ``x + post_norm(down(gelu_tanh(gate) * up))`` (the post-norms inside the sublayer, so
a skipped sublayer stays the identity); scores scaled by ``query_pre_attn_scalar ** -0.5``, the
sliding-window (local) layers with their own rotary base, embeddings times ``sqrt(hidden)``. Its
RMSNorm scales by ``1 + w``: the 1 is added to the weights once, when the model is built, so every
norm runs as Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import native
from .attention import (
    MIN_ROWS,
    SPAN_CHUNK,
    Masks,
    branch_attention,
    exact_pass_attention,
    shared_zeros,
    window_attention,
)
from .cache import KVCache
from .config import Arch, ModelConfig, rope_inv_freq
from .formats import QuantWeight
from .plan import SINK, Plan
from .rope import RotaryTable, apply_rope

__all__ = ["Arch", "ForwardOut", "Model", "ModelConfig", "rms_norm"]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (normalised in float32, cast back, then scaled),
    with torch's fused kernel for the float32 part: one call instead of five."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


@dataclass
class ForwardOut:
    logits: torch.Tensor | None            # [B, T', V] float32 (T' = T, or 1 with last_only)
    hidden: torch.Tensor | None = None     # [2L+1, B, T, H] residual stream after each sublayer
    last_hidden: torch.Tensor | None = None  # [B, T, H] final residual stream (before the norm)


# Passes longer than this take torch's fused attention even with the native kernels, which bounds
# the native attention's per-call buffers (partial results per 256-key chunk and query row). The
# engine prefills in chunks of 512 tokens, so every prefill chunk runs natively: measured on the
# embedded model in bfloat16, a 4k prompt took 5.5-6.9 s against 8.3-8.7 s with torch's attention,
# an 8k prompt 18.3 s against 27.4 s.
_NATIVE_ATTENTION_MAX_TOKENS = 512

# Exact mode's per-token fallback (``exactness``) covers passes up to this many tokens: every
# verification pass; prefill chunks, the same for every strategy, keep their one pass.
PER_TOKEN_MAX = 64


# A product's weight: a float tensor, a quantized one, or (a fused weight whose pieces have
# different block types) a tuple of quantized ones whose rows follow each other.
Weight = torch.Tensor | QuantWeight | tuple[QuantWeight, ...]


def _is_quant(w: Any) -> bool:
    return isinstance(w, (QuantWeight, tuple))


def _cat(parts: list[Weight]) -> Weight:
    """Rows of several weights stacked (the fused qkv and gate/up weights)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if not all(isinstance(p, QuantWeight) for p in parts):
        raise ValueError("a fused weight mixes float and quantized pieces; dequantise them all")
    # runs of one block type become one stream of tiles (pieces of whole 16-row tiles stack)
    runs: list[list[QuantWeight]] = []
    for p in parts:
        if runs and runs[-1][-1].qtype is p.qtype and runs[-1][-1].n % 16 == 0:
            runs[-1].append(p)
        else:
            runs.append([p])
    out = tuple(r[0] if len(r) == 1 else QuantWeight(r[0].btype, sum(p.n for p in r), r[0].k,
                                                     torch.cat([p.tiles for p in r])) for r in runs)
    return out[0] if len(out) == 1 else out


def _nbytes(w: Any) -> int:
    if w is None:
        return 0
    if isinstance(w, tuple):
        return sum(p.nbytes() for p in w)
    if isinstance(w, QuantWeight):
        return w.nbytes()
    return w.numel() * w.element_size()


@dataclass
class _Layer:
    attn_norm: torch.Tensor            # [H]
    wqkv: Weight                       # [(Hq + 2 Hkv) * D, H]
    bqkv: torch.Tensor | None          # [(Hq + 2 Hkv) * D]
    q_norm: torch.Tensor | None        # [D]
    k_norm: torch.Tensor | None        # [D]
    wo: Weight                         # [H, Hq * D]
    mlp_norm: torch.Tensor             # [H]
    w_gate_up: Weight                  # [2 I, H]
    w_down: Weight                     # [H, I]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    post_attn_norm: torch.Tensor | None = None   # [H] (Gemma 3's post-norms; None elsewhere)
    post_mlp_norm: torch.Tensor | None = None    # [H]
    # counts assignments to any layer's fields: a stack table built at the current count needs
    # no re-check of its tensors (Model._native_stack_table)
    assignments: ClassVar[int] = 0

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        type(self).assignments += 1

    def tensors(self) -> dict[str, torch.Tensor | QuantWeight | None]:
        return {k: getattr(self, k) for k in ("attn_norm", "wqkv", "bqkv", "q_norm", "k_norm", "wo",
                                              "mlp_norm", "w_gate_up", "w_down", "post_attn_norm",
                                              "post_mlp_norm")}


class Model:
    """Weights plus the one forward. Build with :meth:`from_hf_tensors` (see ``checkpoint.py``)."""

    def __init__(self, cfg: ModelConfig, layers: list[_Layer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor | None) -> None:
        self.cfg = cfg
        self.layers = layers
        self.embed = embed                  # [V, H] float, or quantized
        self.final_norm = final_norm        # [H]
        # the float dtype of activations, norms and KV cache
        self._dtype = embed.dtype if isinstance(embed, torch.Tensor) else final_norm.dtype
        self._lm_head = lm_head             # [V, H], None when tied
        self._inv_freq = rope_inv_freq(cfg)              # [D/2] float32
        # sliding-window layers with their own rotary base (Gemma 3), else None
        self._inv_freq_local = rope_inv_freq(cfg, local=True) if cfg.local_rope_theta is not None else None
        self._tables()                                   # rotary tables and masks (dtype, device)
        self.packed = False
        self.kernels = "plain"            # pack_weights: "native", "onednn" or "plain"
        self._native_sublayers = False    # whole sublayers in one native call (pack_weights)
        self._run_all = torch.from_numpy(np.ones(2 * cfg.n_layers, dtype=np.uint8))  # native.stack's full plan
        self._pack_gen = 0                # counts pack_weights calls (native.stack's tables)
        self._packs: dict[int, tuple[torch.Tensor, Any]] = {}
        # exact mode (set_row_invariant): each token's row computed the same way whatever the
        # number of tokens in the pass, so speculative output equals autoregressive output bit for bit
        self.row_invariant = False
        # exact mode where the torch path's kernels are not row-invariant (``exactness.ensure``):
        # passes of up to PER_TOKEN_MAX tokens run as one-token forwards
        self.exact_per_token = False

    def _tables(self) -> None:
        """Rotary tables and attention masks for the current dtype and device (rebuilt by ``to``)."""
        self.rope = RotaryTable(self._inv_freq, dtype=self.dtype, device=self.device)
        self.rope_local = (None if self._inv_freq_local is None else
                           RotaryTable(self._inv_freq_local, dtype=self.dtype, device=self.device))
        self.masks = Masks(self.cfg, dtype=self.dtype, device=self.device)

    def rope_of(self, layer: int) -> RotaryTable:
        """The rotary table of ``layer`` (local layers of Gemma 3 have their own)."""
        return self.rope_local if self.rope_local is not None and self.cfg.local_rope(layer) else self.rope

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf_tensors(cls, cfg: ModelConfig, t: dict[str, Any], *, norms_added: bool = False) -> Model:
        """Build from a Hugging Face state dict (names as in ``LlamaForCausalLM``; values float
        tensors or quantized weights). Fused ``self_attn.qkv_proj.weight`` and
        ``mlp.gate_up_proj.weight`` are taken instead of their pieces when present.
        ``norms_added``: Gemma's norm weights hold ``1 + w`` already (as a GGUF file stores them)."""
        def get(name: str) -> torch.Tensor:
            if name not in t:
                raise ValueError(f"checkpoint lacks tensor {name!r}; is it a {cfg.arch.value} model?")
            return t[name]

        def norm(name: str) -> torch.Tensor:
            """A norm's weight as the model multiplies by it: Gemma's ``1 + w``, added in float32
            as transformers does, then in the weight's dtype."""
            w = get(name)
            return (1.0 + w.float()).to(w.dtype) if cfg.norm_offset and not norms_added else w

        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            # the pieces of the fused weights, or the fused weights themselves (a GGUF's, stacked
            # while packing)
            q, k, v = (None, None, None) if p + "self_attn.qkv_proj.weight" in t else (
                get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bqkv = None
            if cfg.qkv_bias:
                bqkv = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            fused_qkv, fused_gu = t.get(p + "self_attn.qkv_proj.weight"), t.get(p + "mlp.gate_up_proj.weight")
            # Gemma 3 names its four norms by place; Llama's "post_attention_layernorm" is the MLP's norm
            mlp_norm = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
            layers.append(_Layer(
                attn_norm=norm(p + "input_layernorm.weight"),
                wqkv=_cat([q, k, v]) if fused_qkv is None else fused_qkv, bqkv=bqkv,
                q_norm=norm(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=norm(p + "self_attn.k_norm.weight") if cfg.qk_norm else None,
                wo=get(p + "self_attn.o_proj.weight"),
                mlp_norm=norm(p + f"{mlp_norm}.weight"),
                w_gate_up=(_cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
                           if fused_gu is None else fused_gu),
                w_down=get(p + "mlp.down_proj.weight"),
                post_attn_norm=norm(p + "post_attention_layernorm.weight") if cfg.post_norms else None,
                post_mlp_norm=norm(p + "post_feedforward_layernorm.weight") if cfg.post_norms else None,
            ))
        embed = get("model.embed_tokens.weight")
        head = None
        if not cfg.tie_embeddings:
            head = t.get("lm_head.weight")
            if head is None:
                raise ValueError("checkpoint lacks 'lm_head.weight' and tie_word_embeddings is false")
        return cls(cfg, layers, embed, norm("model.norm.weight"), head)

    def to(self, *args: Any, **kwargs: Any) -> Model:
        """Move/cast every float weight (keeps tied embeddings tied). Quantized weights stay as they
        are (CPU only); the dtype asked for becomes the activations' and KV cache's."""
        probe = torch.empty(0, dtype=self._dtype).to(*args, **kwargs)
        if probe.device.type != "cpu" and self.quantized:
            raise ValueError("quantized weights run on CPU only: load with --dtype bfloat16 or float32 "
                             "to dequantise them for a GPU")

        def conv(x: Any) -> Any:
            return x if x is None or _is_quant(x) else x.to(*args, **kwargs)
        for layer in self.layers:
            for k, v in layer.tensors().items():
                setattr(layer, k, conv(v))
        self.embed = conv(self.embed)
        self.final_norm = conv(self.final_norm)
        self._lm_head = conv(self._lm_head)
        self._dtype = probe.dtype
        self._tables()
        self.packed, self._packs, self.kernels, self._native_sublayers = False, {}, "plain", False
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of activations, norms and KV cache (and of the weights unless quantized)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def quantized(self) -> bool:
        """Whether some weights are held in GGUF block types."""
        return _is_quant(self.embed) or any(_is_quant(w) for L in self.layers for w in L.tensors().values())

    def weight_formats(self) -> tuple[str, ...]:
        """The GGUF block types of the quantized weights, sorted (() when none)."""
        ws = [self.embed, self._lm_head] + [w for L in self.layers for w in L.tensors().values()]
        parts = [p for w in ws for p in (w if isinstance(w, tuple) else (w,)) if isinstance(p, QuantWeight)]
        return tuple(sorted({p.btype.name for p in parts}))

    @property
    def lm_head(self) -> torch.Tensor | QuantWeight:
        return self.embed if self._lm_head is None else self._lm_head   # [V, H]

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        if self.row_invariant:            # whole key spans (attention.exact_span), whatever was asked for
            capacity = -(-capacity // SPAN_CHUNK) * SPAN_CHUNK
        # a single sequence on the native sublayers: the native attention's layout alone (torch's
        # is made if a torch path ever reads the cache)
        return KVCache(n_layers=self.cfg.n_layers, n_kv_heads=self.cfg.n_kv_heads,
                       head_dim=self.cfg.head_dim, capacity=capacity, dtype=self.dtype,
                       device=self.device, batch=batch, native=self._native_sublayers and batch == 1)

    def weight_bytes(self) -> int:
        n = sum(_nbytes(v) for layer in self.layers for v in layer.tensors().values())
        n += _nbytes(self.embed)           # lm_head reads it (tied) ...
        n += _nbytes(self._lm_head)        # ... or its own matrix
        return n

    def streamed_bytes(self) -> int:
        """Weight bytes a one-token step reads (the input embedding is a row lookup, read only
        when it is also the lm_head)."""
        return self.weight_bytes() - (0 if self._lm_head is None else _nbytes(self.embed))

    # ---- linear layers ----------------------------------------------------------------------------
    def pack_weights(self, enable: bool = True, kernels: str = "auto") -> bool:
        """Prepack the linear weights and the lm_head on CPU for faster matrix products (a second
        copy of those weights). ``kernels``:

        - ``"native"``: knapspec's own AVX-512 kernels (``native/``): the weights stream from
          memory in order, ~1.7-1.9x oneDNN's speed for 1-4 rows on the embedded model, and each
          row's result is the same whatever the number of rows (exact mode needs no padding for
          them). float32, and bfloat16 on a CPU with AVX512_BF16; built on first use.
        - ``"onednn"``: oneDNN's prepacked kernels, reordered once into its blocked layout
          (``F.linear`` re-derives that layout on every call; 1.2-2.7x faster than it).
        - ``"auto"`` (default): native where available, else oneDNN.

        Quantized weights (GGUF block types) always run on the native quantized products
        (``native.QPacked``, the weight's own tiles: no copy), whatever ``enable`` says; the fused
        sublayers take them when the CPU has AVX-512 (VNNI, and BF16 for bfloat16 activations).

        Returns whether packing is on. Off elsewhere (CUDA, other dtypes) and for any weight not
        packed here (e.g. a truncated draft vocabulary or a weight replaced after packing): plain
        ``F.linear``. Sets ``self.kernels`` to ``"native"``, ``"onednn"`` or ``"plain"``."""
        if kernels not in ("auto", "native", "onednn"):
            raise ValueError(f"unknown kernels {kernels!r}; accepted: auto, native, onednn")
        self._packs = {}
        self._pack_gen += 1
        self.packed, self.kernels, self._native_sublayers = False, "plain", False
        pairs = [(w, b) for L in self.layers
                 for w, b in ((L.wqkv, L.bqkv), (L.wo, None), (L.w_gate_up, None), (L.w_down, None))]
        pairs.append((self.lm_head, None))
        quant = [(w, b) for w, b in pairs if _is_quant(w)]
        pairs = [(w, b) for w, b in pairs if not _is_quant(w)]
        if quant:               # quantized weights run on the native quantized products, always
            why = native.quant_available()
            if why is not None:
                raise ValueError(f"quantized weights need the native kernels ({why}); load with --dtype "
                                 "bfloat16 or float32 to dequantise them")
            if kernels == "onednn":
                raise ValueError("quantized weights run on the native kernels only; use kernels 'auto'")
            for w, b in quant:
                self._packs[id(w)] = (w, native.QPacked(w, b))
            self.packed, self.kernels = True, "native"
        if not enable or self.device.type != "cpu":
            return self.packed
        if kernels in ("auto", "native"):
            why = native.available(self.dtype)
            if why is None:
                for w, b in pairs:
                    self._packs[id(w)] = (w, native.Packed(w, b))
                self.packed, self.kernels = True, "native"
                self._native_sublayers = native.supports_sublayers(
                    self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.head_dim) and (
                    not quant or native.isa() == "avx512")
                return True
            if quant:         # the float pieces of a quantized model (a type without a kernel) stay plain
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
        the fused kernel's sums depend on the number of keys; see ``attention.exact_attention``). Products
        with fewer than 4 rows, attention's included, are padded to 4 (oneDNN and MKL take another
        reduction order for 1-3 float32 rows, and the packed down projection for 1 bfloat16 row).
        Measured on this project's CPU, not guaranteed by the kernels' documentation; there it
        costs up to ~8% per pass at short contexts and nothing measurable at 1k-4k tokens
        (docs/benchmarks.md, "Exact mode").
        Caches made by :meth:`new_cache` while it is on have a capacity rounded up to a multiple
        of 64, so that the spans do not depend on the capacity asked for.

        With the native kernels (``pack_weights(kernels="native")``, the CPU default where
        available) every forward of one sequence is row-invariant by construction, on or off:
        their products and attention never depend on the number of rows (``native/``). This
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
        if _is_quant(w):        # row-invariant by construction too
            p = e[1] if e is not None and e[0] is w else native.QPacked(w, b)    # e.g. a row subset
            y = native.quant_linear(x2, p, out_dtype)
            return y.view(*shape[:-1], y.shape[-1])
        rows = x2.shape[0]
        pad = self.row_invariant and rows < MIN_ROWS
        if pad:                                         # see set_row_invariant
            x2 = torch.cat([x2, shared_zeros(x2, (MIN_ROWS - rows, x2.shape[1]))])
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
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.embed_scale
        if isinstance(self.embed, QuantWeight):                          # rows dequantised on lookup
            if scale != 1.0:         # Gemma: scaled in float32 (as llama.cpp does), then rounded
                return (native.dequant_rows(self.embed, tokens) * scale).to(self.dtype)
            return native.dequant_rows(self.embed, tokens, self.dtype)   # [B, T, H]
        x = F.embedding(tokens, self.embed)                              # [B, T, H]
        # Gemma: the scale in the weights' dtype, as transformers multiplies
        return x if scale == 1.0 else x * torch.tensor(scale, dtype=x.dtype)

    def attention(self, i: int, x: torch.Tensor, start: int, cache: KVCache, *,
                  write: bool = True, window: int = 0) -> torch.Tensor:
        """Layer ``i``'s attention sublayer on ``x: [B, T, H]`` at positions ``start..``.

        ``write=True``: keys/values go into the cache at those positions and the tokens attend
        to cache positions ``0 .. start+T-1``. ``write=False``: the cache is only read (prefix
        ``0 .. start-1``, shared by all B rows), each row attending causally to its own tokens.
        ``window`` > 0 (drafts only): each token attends to the sink and its last ``window``
        positions only (``plan.SINK``).
        """
        cfg, L = self.cfg, self.layers[i]
        b, t, _ = x.shape
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        h = rms_norm(x, L.attn_norm, cfg.rms_norm_eps)
        qkv = self.linear(h, L.wqkv, L.bqkv)                                # [B, T, (Hq+2Hkv)*D]
        cos, sin = self.rope_of(i).torch(start, t)                          # [T, D]
        cos, sin = cos[:, None], sin[:, None]                            # [T, 1, D]
        if L.q_norm is None:
            # queries and keys are adjacent in qkv: one rotary pass over both
            qk = apply_rope(qkv[..., :(hq + hkv) * d].view(b, t, hq + hkv, d), cos, sin)
            q, k = qk[:, :, :hq], qk[:, :, hq:]
        else:
            q = rms_norm(qkv[..., :hq * d].view(b, t, hq, d), L.q_norm, cfg.rms_norm_eps)
            k = rms_norm(qkv[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d), L.k_norm,
                         cfg.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.transpose(1, 2)                                            # [B, Hq, T, D]
        k = k.transpose(1, 2)                                            # [B, Hkv, T, D]
        v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        g = hq // hkv
        if write:
            cache.write(i, start, k, v)
        if write and self.row_invariant and not window:
            o = exact_pass_attention(self.masks, i, q, start, cache)            # [B, Hq, T, D]
        else:
            # group the query heads that share a KV head: [B, Hkv, G*T, D]; no copy of K/V
            qg = q.reshape(b, hkv, g * t, d)
            if write and window:                                         # a draft's window: not exact mode
                o = window_attention(self.masks, i, qg, start, t, cache, window)   # (drafts need not be)
            elif write:
                keys, vals = cache.view(i, start + t)                    # [B, Hkv, S, D]
                mask = self.masks.sdpa(i, start, t, keys.shape[2], g)   # [G*T, S] or None
                o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask,
                                                   scale=cfg.attn_scale)           # [B, Hkv, G*T, D]
            else:
                o = branch_attention(self.masks, i, qg, k, v, start, cache, window)
        o = o.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)
        y = self.linear(o, L.wo)
        if L.post_attn_norm is not None:                                  # Gemma 3
            y = rms_norm(y, L.post_attn_norm, cfg.rms_norm_eps)
        return x + y

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cfg, L = self.cfg, self.layers[i]
        h = rms_norm(x, L.mlp_norm, cfg.rms_norm_eps)
        gate, up = self.linear(h, L.w_gate_up).chunk(2, dim=-1)             # [B, T, I] each
        act = F.silu(gate) if cfg.hidden_act == "silu" else F.gelu(gate, approximate="tanh")
        y = self.linear(act * up, L.w_down)
        if L.post_mlp_norm is not None:                                   # Gemma 3
            y = rms_norm(y, L.post_mlp_norm, cfg.rms_norm_eps)
        return x + y

    def sublayer(self, s: int, x: torch.Tensor, start: int, cache: KVCache, *,
                 write: bool = True, window: int = 0) -> torch.Tensor:
        """Run sublayer ``s`` (attention ``s//2`` if ``s`` is even, else its MLP); ``window``: an
        attention sublayer windowed to the sink and the last ``window`` positions (drafts)."""
        if self._native_sublayers:
            packs = self._native_layer(s // 2)
            if packs is not None:
                if s % 2:
                    L = self.layers[s // 2]
                    return native.mlp(x, L.mlp_norm, self.cfg.rms_norm_eps, packs[2], packs[3],
                                      act=self.cfg.hidden_act, post_norm=L.post_mlp_norm)
                if write and x.shape[0] == 1 and x.shape[1] <= _NATIVE_ATTENTION_MAX_TOKENS:
                    return self._native_attention(s // 2, x, start, cache, packs, window)
        if s % 2 == 0:
            return self.attention(s // 2, x, start, cache, write=write, window=window)
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
        held = getattr(cache, "_native_stack", None)
        stamp = (id(self), self._pack_gen, cache.layouts, _Layer.assignments, *map(id, self.layers))
        if held is not None and held[3] == stamp:         # nothing assigned since: the same tensors
            return held[2]
        refs = tuple(t for L in self.layers for t in (L.attn_norm, L.wqkv, L.bqkv, L.q_norm, L.k_norm,
                                                       L.wo, L.mlp_norm, L.w_gate_up, L.w_down,
                                                       L.post_attn_norm, L.post_mlp_norm))
        if (held is not None and held[0] == (id(self), self._pack_gen, cache.layouts) and len(held[1]) == len(refs)
                and all(a is b for a, b in zip(held[1], refs))):
            cache._native_stack = (*held[:3], stamp)
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
            kc, vc = cache.torch_kv(i)
            rows.append([L.attn_norm.data_ptr(), qkv.desc.data_ptr(), ptr(qkv.bias), ptr(L.q_norm),
                         ptr(L.k_norm), o.desc.data_ptr(), L.mlp_norm.data_ptr(), gate_up.desc.data_ptr(),
                         down.desc.data_ptr(), ptr(kc), ptr(vc),
                         cache.kt[i].data_ptr(), 0 if cache.vt is None else cache.vt[i].data_ptr(),
                         self.cfg.window(i) or 0, ptr(L.post_attn_norm), ptr(L.post_mlp_norm),
                         int(self.rope_of(i) is not self.rope)])
        table = torch.tensor(rows, dtype=torch.int64)
        assert table.shape[1] == len(native.STACK_FIELDS)
        # the refs keep the tensors behind the pointers alive; the packs live in self._packs until
        # the next pack_weights, which moves _pack_gen on
        cache._native_stack = ((id(self), self._pack_gen, cache.layouts), refs, table, stamp)
        return table

    def _native_attention(self, i: int, x: torch.Tensor, start: int, cache: KVCache, packs: tuple,
                          draft_window: int = 0) -> torch.Tensor:
        """Layer ``i``'s attention sublayer in one native call (one sequence, cache written); each
        token's row is computed the same way alone or in a pass (see ``native/sublayers.h``);
        ``draft_window``: a draft's window (with the sink)."""
        cfg, L = self.cfg, self.layers[i]
        t = x.shape[1]
        cache.check_room(start, t)
        cos, sin = self.rope_of(i).native(start, t)
        cache.native_layout()
        kc, vc = cache.torch_kv(i)
        return native.attention(x, start, norm_w=L.attn_norm, eps=cfg.rms_norm_eps, qkv=packs[0],
                                q_norm=L.q_norm, k_norm=L.k_norm, cos=cos, sin=sin,
                                k_cache=kc, v_cache=vc, k_blocks=cache.kt[i],
                                v_pairs=None if cache.vt is None else cache.vt[i],
                                capacity=cache.capacity, n_heads=cfg.n_heads,
                                n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                window=cfg.window(i), o=packs[1], draft_window=draft_window,
                                sink=SINK if draft_window else 0, scale=cfg.attn_scale,
                                post_norm=L.post_attn_norm)

    def head(self, x: torch.Tensor, weight: torch.Tensor | QuantWeight | None = None) -> torch.Tensor:
        """Final norm + lm_head: ``[..., H] -> [..., V]`` float32 logits (``weight`` may be a
        row subset of the lm_head for draft-only vocabulary truncation)."""
        # a model whose stack runs natively takes the stack's row norm for every head call, whichever
        # path computed x (a torch-path pass, captured states): one norm per model, and no torch kernel
        if self._native_sublayers and x.dtype == self.final_norm.dtype:
            h = native.rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
        else:
            h = rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
        return self.linear(h, self.lm_head if weight is None else weight, out_dtype=torch.float32)

    def _per_token(self, tokens: torch.Tensor, start: int, cache: KVCache, plan: Plan | None, *,
                   capture: bool, last_only: bool, logits: bool, head_weight: torch.Tensor | None) -> ForwardOut:
        """A pass as one-token forwards, concatenated: each row exactly as in autoregressive decoding."""
        outs = [self.forward(tokens[:, j:j + 1], start + j, cache, plan, capture=capture,
                             logits=logits and (not last_only or j == tokens.shape[1] - 1), head_weight=head_weight)
                for j in range(tokens.shape[1])]
        out = ForwardOut(logits=None, last_hidden=torch.cat([o.last_hidden for o in outs], dim=1))
        if capture:
            out.hidden = torch.cat([o.hidden for o in outs], dim=2)
        if logits:
            out.logits = outs[-1].logits if last_only else torch.cat([o.logits for o in outs], dim=1)
        return out

    # ---- the forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, plan: Plan | None = None, *,
                capture: bool = False, last_only: bool = False, logits: bool = True,
                head_weight: torch.Tensor | QuantWeight | None = None, prompt: bool = False) -> ForwardOut:
        """``tokens: [B, T]`` at positions ``start .. start+T-1``; updates ``cache.length``.
        ``prompt``: a pass over prompt tokens (:func:`knapspec.engine.prefill`), which may take
        the AMX attention (``native.amx_prompts``): every strategy prefills the same way."""
        b, t = tokens.shape
        assert start <= cache.length, f"start {start} beyond cache length {cache.length}"
        if self.exact_per_token and self.row_invariant and 1 < t <= PER_TOKEN_MAX:
            return self._per_token(tokens, start, cache, plan, capture=capture, last_only=last_only,
                                   logits=logits, head_weight=head_weight)
        if plan is not None:
            assert plan.n_layers == self.cfg.n_layers, "plan is for a different number of layers"
        run = None if plan is None or plan.is_full else plan.run
        win = plan.window if plan is not None else ()
        x = self.embed_tokens(tokens)
        states = [x] if capture else None
        table = (self._native_stack_table(cache) if self._native_sublayers and not capture and b == 1
                 and t <= _NATIVE_ATTENTION_MAX_TOKENS else None)
        if table is not None:             # every sublayer in one native call
            cache.check_room(start, t)
            cfg = self.cfg
            cos, sin = self.rope.native(start, t)
            mask = self._run_all if run is None else torch.tensor(run, dtype=torch.uint8)
            dwin = torch.tensor(win[0::2], dtype=torch.int64) if win else None    # drafts' windows
            cos_l, sin_l = (None, None) if self.rope_local is None else self.rope_local.native(start, t)
            x = native.stack(x, start, mask, table, eps=cfg.rms_norm_eps, cos=cos, sin=sin,
                             capacity=cache.capacity, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                             head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
                             draft_windows=dwin, sink=SINK if win else 0,
                             cos_local=cos_l, sin_local=sin_l, act=cfg.hidden_act, scale=cfg.attn_scale,
                             amx=True if prompt and native.amx_prompts() else None)
        else:
            for s in range(2 * self.cfg.n_layers):
                if run is None or run[s]:
                    x = self.sublayer(s, x, start, cache, window=win[s] if win else 0)
                if states is not None:
                    states.append(x)
        cache.set_length(start + t)
        out = ForwardOut(logits=None, last_hidden=x)
        if states is not None:
            out.hidden = torch.stack(states)                             # [2L+1, B, T, H]
        if logits:
            out.logits = self.head(x[:, -1:] if last_only else x, head_weight)
        return out
