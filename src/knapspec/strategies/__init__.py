"""Strategies: each decides, per round, how to draft. Select one by name from ``REGISTRY``."""

from . import baselines, hybrid, knapspec, lookup, static  # noqa: F401  (registers the strategies)
from .base import AUTOREGRESSIVE, REGISTRY, Draft, Outcome, RoundState, Strategy

__all__ = ["AUTOREGRESSIVE", "REGISTRY", "Draft", "Outcome", "RoundState", "Strategy"]
