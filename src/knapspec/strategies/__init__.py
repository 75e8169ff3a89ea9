"""Strategies: each decides, per round, how to draft. Select one by name from ``REGISTRY``."""

from . import baselines, draft_verify, hybrid, knapspec, knn_ssd, lookup, static, swift  # noqa: F401  (registers)
from .base import AUTOREGRESSIVE, REGISTRY, Draft, Outcome, RoundState, Strategy

__all__ = ["AUTOREGRESSIVE", "REGISTRY", "Draft", "Outcome", "RoundState", "Strategy"]
