"""Model configuration: a frozen dataclass read from its source of truth (a Hugging Face
``config.json`` dict), and the rotary frequencies it implies.

Supported: Llama 2/3/3.1/3.2 (incl. llama3 and linear rope scaling), Mistral (sliding window),
Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2; tied or untied embeddings; grouped-query
attention. This module knows no weights and no layer math.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch


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

