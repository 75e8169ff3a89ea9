"""Shared pieces of the search-based baselines (SWIFT, Draft & Verify, KNN-SSD).

* :class:`PlanScorer` — "matchness" of skip sets on a window of committed tokens: the draft runs
  teacher-forced (every candidate plan a branch of one batched pass, read-only against the cache)
  and its top-1 is compared with the full model's top-1 at the same positions.
* :class:`SkipSearch` — an optuna study over skip sets. A trial is one value in [0, 1] per
  skippable sublayer; with a fixed skip count the k highest are skipped (SWIFT, KNN-SSD), without
  one every value above 0.5 is (Draft & Verify; its random trials first draw a skip share in
  ``random_share``, then a random set of that size). Trials alternate between random search and
  optuna's Bayesian optimisation (TPE) as the method asks.
* Calibration files: JSON written atomically under ``$KNAPSPEC_CACHE/calibration`` (or where the
  user says), checked against the model they were made for when read back.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model import Model
from ..plan import Plan
from ..storage import cache_dir, write_json_atomic

log = logging.getLogger(__name__)


# ---- matchness ----------------------------------------------------------------------------------
class PlanScorer:
    """Top-1 agreement of draft plans with the full model, teacher-forced on ``tokens`` (the
    committed tokens at positions ``start .. start+W-1``; the cache must hold the full model's KV
    for every position before ``start``). Nothing is written to the cache."""

    def __init__(self, model: Model, cache, tokens: list[int], start: int) -> None:
        if not tokens:
            raise ValueError("matchness needs at least one token")
        self.model, self.cache, self.start = model, cache, start
        self.x0 = model.embed_tokens(torch.tensor([tokens], device=model.device))    # [1, W, H]
        self.target = self._top1([Plan.full(model.cfg.n_layers)])[0]                # [W]

    @torch.inference_mode()
    def _top1(self, plans: list[Plan]) -> torch.Tensor:
        model = self.model
        x = self.x0.expand(len(plans), -1, -1).clone()
        for s in range(model.cfg.n_sublayers):
            rows = [i for i, p in enumerate(plans) if p.run[s]]
            if not rows:
                continue
            if len(rows) == len(plans):
                x = model.sublayer(s, x, self.start, self.cache, write=False)
            else:
                idx = torch.tensor(rows, device=x.device)
                x[idx] = model.sublayer(s, x[idx], self.start, self.cache, write=False)
        return model.head(x).argmax(-1)                                              # [P, W]

    def score(self, plans: list[Plan]) -> list[float]:
        """Matchness of each plan in [0, 1]."""
        if not plans:
            return []
        return (self._top1(plans) == self.target[None]).float().mean(-1).tolist()


def prompt_scorer(model: Model, tokens: list[int], window: int) -> PlanScorer:
    """A scorer on the last ``window`` tokens of a calibration text: the full model prefills the
    tokens before them into a fresh cache."""
    k = min(window, len(tokens) - 1)
    if k < 1:
        raise ValueError("a calibration prompt needs at least two tokens")
    start = len(tokens) - k
    cache = model.new_cache(len(tokens) + 1)
    with torch.inference_mode():
        model.forward(torch.tensor([tokens[:start]], device=model.device), 0, cache, logits=False)
    return PlanScorer(model, cache, tokens[start:], start)


# ---- the search ---------------------------------------------------------------------------------
def skippable(n_layers: int) -> list[int]:
    """Sublayers a search may skip: all but layer 0's attention and MLP (every method keeps the
    first layer; skipping it wrecks the draft on every model we tried)."""
    return list(range(2, 2 * n_layers))


def decode_plan(n_layers: int, values: dict[int, float], k: int | None) -> Plan:
    """Skip the ``k`` sublayers with the highest values, or (``k`` None) those above 0.5."""
    if k is None:
        skipped = [s for s, v in values.items() if v > 0.5]
    else:
        skipped = sorted(values, key=lambda s: (-values[s], s))[:k]
    return Plan.from_sublayer_skips(n_layers, skipped)


@dataclass
class Trial:
    handle: Any            # the optuna trial
    plan: Plan
    kind: str              # "random" or "bo"


class SkipSearch:
    """An optuna study over skip sets (see the module docstring). ``bo_every``: every that-many-th
    trial comes from the Bayesian optimiser, the others from random search (0 = random only,
    1 = optimiser only after ``n_random`` random start-up trials)."""

    def __init__(self, n_layers: int, *, skip_count: int | None = None, bo_every: int = 2,
                 n_random: int = 4, seed: int = 0, random_share: tuple[float, float] = (0.1, 0.5)) -> None:
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.n_layers = n_layers
        self.space = skippable(n_layers)
        if not self.space:
            raise ValueError("the model has a single layer: there is nothing to skip")
        if skip_count is not None and not 1 <= skip_count <= len(self.space):
            raise ValueError(f"skip count must be in 1..{len(self.space)}, got {skip_count}")
        self.k, self.bo_every, self.n_random = skip_count, bo_every, n_random
        self.random_share = random_share
        self.rng = random.Random(seed)
        self.study = optuna.create_study(direction="maximize",
                                         sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=0))
        self.n_trials = 0
        self.best_plan: Plan | None = None
        self.best_value = float("-inf")
        self.history: list[tuple[str, float]] = []

    def _is_bo(self) -> bool:
        if self.n_trials < self.n_random or self.bo_every <= 0:
            return False
        return (self.n_trials - self.n_random) % self.bo_every == self.bo_every - 1

    def ask(self) -> Trial:
        bo = self._is_bo()
        if not bo:
            if self.k is not None:           # a uniformly random set of k sublayers
                vals = {s: self.rng.random() for s in self.space}
            else:                            # a random share of the sublayers, then a random set of that size
                share = self.rng.uniform(*self.random_share)
                chosen = set(self.rng.sample(self.space, max(1, round(share * len(self.space)))))
                vals = {s: self.rng.uniform(0.5, 1.0) if s in chosen else self.rng.uniform(0.0, 0.5)
                        for s in self.space}
            self.study.enqueue_trial({f"s{s}": v for s, v in vals.items()})
        t = self.study.ask()
        values = {s: t.suggest_float(f"s{s}", 0.0, 1.0) for s in self.space}
        self.n_trials += 1
        return Trial(t, decode_plan(self.n_layers, values, self.k), "bo" if bo else "random")

    def tell(self, trial: Trial, value: float) -> None:
        self.study.tell(trial.handle, value)
        self.history.append((trial.kind, value))
        if value > self.best_value:
            self.best_value, self.best_plan = value, trial.plan

    def run(self, objective, n_trials: int, *, batch: int = 1, progress: str | None = None) -> Plan:
        """Run ``n_trials`` trials; ``objective(list[Plan]) -> list[float]`` scores a batch."""
        from tqdm.auto import tqdm
        bar = tqdm(total=n_trials, desc=progress, disable=progress is None, leave=False)
        done = 0
        while done < n_trials:
            trials = [self.ask() for _ in range(min(batch, n_trials - done))]
            for t, v in zip(trials, objective([t.plan for t in trials])):
                self.tell(t, float(v))
            done += len(trials)
            bar.update(len(trials))
            bar.set_postfix(best=f"{self.best_value:.3f}")
        bar.close()
        assert self.best_plan is not None
        return self.best_plan


# ---- calibration files ----------------------------------------------------------------------------
def model_signature(model: Model) -> dict[str, Any]:
    cfg = model.cfg
    return {"name": cfg.name, "n_layers": cfg.n_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size}


def default_calibration_path(method: str, model: Model) -> Path:
    sig = model_signature(model)
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{sig['name'] or 'model'}-{sig['n_layers']}L")
    return cache_dir() / "calibration" / f"{method}-{tag}.json"


def save_calibration(path: str | os.PathLike[str], method: str, model: Model, data: dict[str, Any]) -> Path:
    """Write atomically: an interrupted run leaves the previous file (or none)."""
    doc = {"method": method, "model": model_signature(model), **data}
    return write_json_atomic(path, doc)


def load_calibration(path: str | os.PathLike[str] | None, method: str, model: Model) -> tuple[dict[str, Any], Path]:
    p = Path(path) if path else default_calibration_path(method, model)
    if not p.is_file():
        how = f"knapspec calibrate --strategy {method}" + (f" --out {p}" if path else "")
        raise FileNotFoundError(f"no {method} calibration file at {p}: run `{how}` first"
                                + ("" if path else " (or pass --calibration FILE)"))
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {p} is not valid JSON ({e.msg}); re-run knapspec calibrate") from None
    if not isinstance(doc, dict) or doc.get("method") != method:
        found = doc.get("method") if isinstance(doc, dict) else None
        raise ValueError(f"calibration file {p} is for {found!r}, not {method!r}: "
                         f"run `knapspec calibrate --strategy {method}`")
    if doc.get("model") != model_signature(model):
        raise ValueError(f"calibration file {p} was made for another model ({doc.get('model')}); "
                         f"re-run `knapspec calibrate --strategy {method}` with this model")
    return doc, p
