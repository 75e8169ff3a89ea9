"""The strategy protocol: what a strategy is asked before a round and told after it.

Before each round the engine calls ``strategy.propose(state)`` and gets a :class:`Draft`: the plan
to draft with and the maximum draft length (0 = autoregressive step), optionally tokens proposed
without running the model (prompt lookup), which model drafting then continues. After
verification it calls ``strategy.observe(outcome)``. A strategy may also copy drafts from a
``RoundState.reference`` (a predicted output), saying how many in ``Draft.n_reference``. A
strategy never runs the decoding loop and never copies the forward; it may run the model's
sublayers for planning (KnapSpec's DP) through ``state.model`` and read, never write,
``state.cache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..plan import Plan

if TYPE_CHECKING:
    from ..cache import KVCache
    from ..model import Model
    from ..sampling import SamplingParams


# Draft confidence exit: drafting stops after a token whose draft probability is below this.
# Chosen by a measured sweep (docs/benchmarks.md, "Draft confidence threshold"): on the embedded
# model on CPU, 0.9 was the fastest of 0, 0.3, 0.45, 0.6, 0.75 and 0.9 for a fixed layer-skip plan.
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class Draft:
    plan: Plan | None               # plan the model drafts with; None = no model drafting
    max_len: int                    # most drafts this round (lookup tokens included); 0 = AR step
    tokens: tuple[int, ...] = ()    # drafts proposed without the model (q is one-hot)
    threshold: float | None = None  # confidence threshold override for this round
    head: torch.Tensor | None = None       # lm_head rows for draft-only vocabulary truncation
    head_ids: torch.Tensor | None = None   # vocabulary ids of those rows [V']
    source: str = ""                # label for statistics ("lookup", "skip", ...)
    n_reference: int = 0            # how many of ``tokens`` (a prefix) were copied from RoundState.reference


AUTOREGRESSIVE = Draft(plan=None, max_len=0)


@dataclass
class RoundState:
    """What a strategy sees before a round. ``tokens`` is prompt + output so far (committed)."""

    model: Model
    cache: KVCache
    tokens: list[int]
    n_prompt: int
    round: int
    sampling: SamplingParams
    remaining: int                  # new tokens still allowed
    prompt_embedding: torch.Tensor | None = None   # mean final-norm hidden state over the prompt [H]
                                                   # (only for strategies with wants_prompt_embedding)
    reference: tuple[int, ...] = ()  # a predicted output (e.g. OpenAI's Predicted Outputs): more
                                     # text to copy lookup drafts from; read at ``start``
    threshold: float = DEFAULT_THRESHOLD   # the generation's confidence exit (a Draft may override it)

    @property
    def context_length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Outcome:
    draft: Draft
    drafted: int                    # drafts actually verified
    accepted: int                   # of which accepted (a prefix)
    context_length: int             # committed length before this round
    n_lookup: int = 0               # how many of the drafts came from draft.tokens
    hidden: torch.Tensor | None = None   # [2L+1, n+1, H] verifier's residual stream, accepted tokens
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_tokens: tuple[int, ...] = ()
    target_tokens: tuple[int, ...] = ()  # verifier's greedy choice at each verified position (with hidden)
    # the model's drafts' own probabilities (greedy: the top one; sampling: the drafted token's),
    # one per model-drafted token (after the ``n_lookup`` lookup tokens)
    draft_confidence: tuple[float, ...] = ()


class Strategy:
    """Base class: autoregressive decoding (draft length 0). Subclasses override ``propose``."""

    name: ClassVar[str] = "autoregressive"
    wants_hidden: ClassVar[bool] = False
    wants_prompt_embedding: ClassVar[bool] = False
    persists_across_prompts: ClassVar[bool] = False   # learns across generations (the benchmark keeps it)
    # a fresh instance drafts the same tokens for the same committed tokens: no measured times, no
    # state from files that change. Then a seeded sampled generation repeats exactly (the random
    # draws of speculative sampling depend on what was drafted)
    reproducible: ClassVar[bool] = True
    # options for the benchmark's warm-up instance, so that it runs the code paths (and pays the
    # one-off first-call costs) that later prompts may take
    warm_up_options: ClassVar[dict[str, Any]] = {}

    def prepare(self, *, progress: bool = False) -> bool:
        """One-time work before any generation (e.g. measuring this machine's latency profile,
        cached for later processes), so that it never lands inside a generation's timing. Returns
        whether the strategy still has something to learn from one short warm-up generation
        (see ``LLM.prepare``)."""
        return False

    def start(self, state: RoundState) -> None:
        """A new generation begins (the prompt is prefilled)."""

    def propose(self, state: RoundState) -> Draft:
        return AUTOREGRESSIVE

    def observe(self, outcome: Outcome) -> None:
        """Told what the round did."""

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name}


# the options of a strategy whose drafts the model makes: their longest draft and the confidence
# below which a draft stops (given to the strategy's factory, which may fix it in its drafts)
COMMON_OPTIONS = ("max_draft", "threshold")


def _check_common(key: str, value: Any, spec: str) -> None:
    """The values the command line's flags would accept for the common options."""
    if key == "max_draft" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"max_draft must be an integer >= 1, got {value!r} (in {spec!r})")
    if key == "threshold" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and 0.0 <= value <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {value!r} (in {spec!r})")


@dataclass
class Registry:
    factories: dict[str, Any] = field(default_factory=dict)
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def register(self, name: str, options: tuple[str, ...] = (), common: tuple[str, ...] = COMMON_OPTIONS):
        """A strategy's factory, and the options a spec may set for it (``parse``): ``common``
        (those of :data:`COMMON_OPTIONS` it takes), then its own."""
        def deco(factory):
            self.factories[name] = factory
            self.options[name] = tuple(common) + tuple(options)
            return factory
        return deco

    def names(self) -> list[str]:
        return sorted(self.factories)

    def accepted(self, name: str) -> tuple[str, ...]:
        """The options a spec may set for strategy ``name``."""
        return self.options.get(name, ())

    def parse(self, spec: str) -> tuple[str, dict[str, Any]]:
        """``NAME`` or ``NAME:key=value;key=value`` (e.g. ``hybrid:windows=off;min_lookup=8``): the
        strategy's name and options, values read as int, float, true/false or else text. An unknown
        name or an option the strategy does not take is a one-line ValueError naming what would be
        accepted (a misspelt option is never silently ignored)."""
        name, _, rest = spec.partition(":")
        if name not in self.factories:
            raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(self.names())}")
        out: dict[str, Any] = {}
        for item in filter(None, rest.split(";")):
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or not k:
                raise ValueError(f"bad strategy option {item!r} in {spec!r}: expected NAME:key=value;key=value")
            if k not in self.accepted(name):
                ok = ", ".join(self.accepted(name)) or "none"
                raise ValueError(f"the {name} strategy has no option {k!r} (in {spec!r}): its options are {ok}")
            v = v.strip()
            for conv in (int, float):
                try:
                    out[k] = conv(v)
                    break
                except ValueError:
                    pass
            else:
                out[k] = {"true": True, "false": False}.get(v.lower(), v)
            _check_common(k, out[k], spec)
        return name, out

    def resolve(self, strategy: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A name or spec (:meth:`parse`) and options given beside it: the name and all the
        options; an option given in both is a ValueError."""
        name, spec = self.parse(strategy)
        both = sorted(set(spec) & set(options))
        if both:
            raise ValueError(f"strategy option(s) {', '.join(both)} given twice: in {strategy!r} and as arguments")
        return name, {**spec, **options}

    def create(self, name: str, model: Model, **options: Any) -> Strategy:
        if name not in self.factories:
            raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(self.names())}")
        return self.factories[name](model, **options)


REGISTRY = Registry()
