"""knapspec: lossless self-speculative decoding with knapsack-chosen layer skipping."""

from .api import LLM, Result, load
from .engine import Engine, GenerationStats
from .plan import Plan
from .sampling import SamplingParams
from .strategies import REGISTRY, Strategy

__version__ = "0.1.0"
__all__ = ["LLM", "REGISTRY", "Engine", "GenerationStats", "Plan", "Result", "SamplingParams",
           "Strategy", "load"]
