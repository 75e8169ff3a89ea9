"""Model configuration: a frozen dataclass read from its source of truth (a Hugging Face
``config.json`` dict), and the rotary frequencies it implies.

Supported: Llama 2/3/3.1/3.2 (incl. llama3 and linear rope scaling), Mistral (sliding window),
Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2, Gemma 3 text models (local and global
attention layers with their own rotary bases, GeGLU, post-norms, scaled embeddings); tied or untied
embeddings; grouped-query attention. This module knows no weights and no layer math.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class Arch(enum.Enum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    GEMMA3 = "gemma3_text"


SUPPORTED_ROPE = ("default", "llama3", "linear")
SUPPORTED_ACT = ("silu", "gelu_pytorch_tanh")


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
    # --- the Gemma 3 family (defaults: the Llama family's behaviour)
    hidden_act: str = "silu"                 # the MLP's gate activation: silu (SwiGLU) or gelu tanh (GeGLU)
    attn_scale: float | None = None          # the scores' scale; None = 1 / sqrt(head_dim)
    local_rope_theta: float | None = None    # the rotary base of sliding-window layers (no scaling); None = rope_theta
    embed_scale: float = 1.0                 # the embedding rows times this
    post_norms: bool = False                 # RMSNorm on each sublayer's output, before the residual add
    # norm weights stored as w with the scale 1 + w (Gemma's RMSNorm); the model adds the 1 when it loads
    norm_offset: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, name: str = "") -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        mt = cfg.get("model_type")
        try:
            arch = Arch(mt)
        except ValueError:
            raise ValueError(f"unsupported architecture {mt!r}: supported model_type values are "
                             f"{', '.join(a.value for a in Arch)} (Llama, Mistral, Qwen2/2.5, Qwen3, "
                             "SmolLM2, Gemma 3 families)") from None
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(cfg.get(key), int):
                raise ValueError(f"config.json lacks an integer {key!r}; is this a causal LM checkpoint?")
        gemma = arch is Arch.GEMMA3
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh") if gemma else cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACT or (act != "silu") != gemma:
            raise ValueError(f"unsupported hidden activation {act!r} for {mt}: "
                             f"{'gelu_pytorch_tanh' if gemma else 'silu'} is supported")
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        if gemma:
            gemma_fields = _gemma3_fields(cfg, rope)
            rope = gemma_fields.pop("_global_rope")
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
            elif gemma:       # transformers 4.x: every n-th layer global
                every = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
                windows = [window if (i + 1) % every else None for i in range(n_layers)]
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
        extra = gemma_fields if gemma else {}
        return cls(
            arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, qk_norm=arch in (Arch.QWEN3, Arch.GEMMA3), rope_scaling=rope_scaling,
            sliding_window=tuple(windows) if any(w for w in windows) else (),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, name=name, **extra,
        )

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    def window(self, layer: int) -> int | None:
        return self.sliding_window[layer] if self.sliding_window else None

    def local_rope(self, layer: int) -> bool:
        """Whether ``layer`` takes the local rotary base (a sliding-window layer of a model that has one)."""
        return self.local_rope_theta is not None and self.window(layer) is not None


# --- the Gemma 3 family
def _gemma3_fields(cfg: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's fields of :class:`ModelConfig` from its config dict (transformers 5.x: rotary
    parameters per layer type; 4.x: ``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``),
    and under ``_global_rope`` the global layers' rotary parameters in the Llama layout."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key):
            raise ValueError(f"unsupported: {key}={cfg[key]} (Gemma 2's logit soft-capping)")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("unsupported: use_bidirectional_attention=true (not a causal LM)")
    if "full_attention" in rope or "sliding_attention" in rope:         # transformers 5.x
        glob = dict(rope.get("full_attention") or {})
        local = dict(rope.get("sliding_attention") or {})
    else:                                                               # transformers 4.x
        glob = dict(rope)
        glob.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported rope scaling {local['rope_type']!r} on sliding-window layers")
    scalar = cfg.get("query_pre_attn_scalar", 256)
    return {"hidden_act": cfg.get("hidden_activation", "gelu_pytorch_tanh"),
            "attn_scale": float(scalar) ** -0.5, "local_rope_theta": float(local.get("rope_theta", 10_000.0)),
            "embed_scale": float(cfg["hidden_size"]) ** 0.5, "post_norms": True, "norm_offset": True,
            "_global_rope": glob}
# --- end Gemma 3


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Rotary inverse frequencies ``[D/2]`` in float32, with llama3 / linear scaling applied
    (``local``: the sliding-window layers' base, unscaled; see :meth:`ModelConfig.local_rope`).
    ``1 / theta^(2i/D)`` as transformers writes it, the power taken in float64 and rounded (torch's
    float32 power gives the same bits but for a rare last-place difference); numpy, so that no torch
    kernel is touched for it."""
    d = cfg.head_dim
    theta = cfg.local_rope_theta if local and cfg.local_rope_theta is not None else cfg.rope_theta
    exps = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv = np.float32(1.0) / (float(theta) ** exps.astype(np.float64)).astype(np.float32)
    if local:
        return inv
    sc = dict(cfg.rope_scaling)
    rtype = sc.get("rope_type", "default")
    if rtype == "linear":
        inv = inv / np.float32(sc["factor"])
    elif rtype == "llama3":
        factor = np.float32(sc["factor"])
        low, high = np.float32(sc["low_freq_factor"]), np.float32(sc["high_freq_factor"])
        old = np.float32(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)

