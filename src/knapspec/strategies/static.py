"""Fixed-plan strategies: autoregressive (no drafts) and ``static`` (one plan for every round)."""

from __future__ import annotations

from typing import Any

from ..model import Model
from ..plan import Plan
from .base import REGISTRY, Draft, RoundState, Strategy


@REGISTRY.register("autoregressive", common=())
def _autoregressive(model: Model, **_: Any) -> Strategy:
    return Strategy()


class StaticStrategy(Strategy):
    """Drafts every round with the same plan and maximum draft length."""

    name = "static"

    def __init__(self, plan: Plan, *, max_draft: int = 6, threshold: float | None = None) -> None:
        if plan.is_full:
            raise ValueError("a static plan must skip at least one sublayer (e.g. --skip a3,m7); "
                             "drafting with the full model cannot be faster than decoding")
        if plan.last_layer_run() < 0:
            raise ValueError("a static plan must keep at least one sublayer")
        if max_draft < 1:
            raise ValueError(f"max draft length must be >= 1, got {max_draft}")
        self.draft = Draft(plan=plan, max_len=max_draft, threshold=threshold, source="skip")

    def propose(self, state: RoundState) -> Draft:
        return self.draft

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "plan": str(self.draft.plan), "max_draft": self.draft.max_len}


@REGISTRY.register("static", options=("skip", "plan_file"))
def _static(model: Model, *, skip: str | None = None, plan_file: str | None = None, max_draft: int = 6,
            threshold: float | None = None, **_: Any) -> Strategy:
    n = model.cfg.n_layers
    if plan_file:
        plan = Plan.load(plan_file, n)
    elif skip:
        plan = Plan.parse(skip, n)
    else:
        raise ValueError("the static strategy needs --skip a3,m7,... or --plan-file FILE")
    return StaticStrategy(plan, max_draft=max_draft, threshold=threshold)
