"""Each named test must fail on a deliberately broken implementation.

Runs the named tests once per mutant, with the mutant patched into the library before the tests
import it, and reports which tests caught it (a test that passes on a mutant tested nothing).

    .venv/bin/python scripts/mutants.py              # every mutant
    .venv/bin/python scripts/mutants.py never-drafts-lookup native-row-noise

Each mutant runs in its own process (the patch never outlives it), with the derandomised
hypothesis profile that CI uses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _never_drafting(module: str, cls: str) -> Callable[[], None]:
    def apply() -> None:
        import importlib

        from knapspec.strategies.base import AUTOREGRESSIVE
        c = getattr(importlib.import_module(module), cls)
        c.propose = lambda self, state: AUTOREGRESSIVE
    return apply


def _engine_never_drafts() -> None:
    from knapspec.engine import Engine
    Engine._draft = lambda self, *a, **k: ([], [])


def _native_row_noise() -> None:
    """The native products' result depends on the number of rows in the call (the property the
    kernels promise not to break)."""
    from knapspec import native
    real = native.linear

    def linear(x, p, out_dtype=None):
        y = real(x, p, out_dtype)
        return y * (1 + 2 ** -6) if x.shape[0] > 1 else y
    native.linear = linear
    mod = native._module()
    if mod is not None:                      # the fused stack: passes over 2+ tokens drift
        real_stack = native.stack

        def stack(x, *a, **k):
            y = real_stack(x, *a, **k)
            return y * (1 + 2 ** -6) if x.shape[1] > 1 else y
        native.stack = stack


def _accept_every_draft() -> None:
    """Speculative sampling that keeps every draft (not exact)."""
    import knapspec.engine as engine
    from knapspec.sampling import Acceptance

    def accept(drafts, q, p, gen):
        import torch
        tok = int(torch.multinomial(p[len(drafts)], 1, generator=gen))
        return Acceptance(n_accepted=len(drafts), token=tok, bonus=True)
    engine.accept = accept


def _lookup_offset() -> None:
    """Lookup drafts one token off (the tokens after the match's successor)."""
    from knapspec.strategies import lookup
    real = lookup.NgramIndex.find

    def find(self, **k):
        n, cont = real(self, **k)
        return n, cont[1:]
    lookup.NgramIndex.find = find


@dataclass(frozen=True)
class Mutant:
    name: str
    apply: Callable[[], None]
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("never-drafts-lookup", _never_drafting("knapspec.strategies.lookup", "PromptLookupStrategy"),
           ("tests/test_lookup.py::test_greedy_lookup_equals_autoregressive",)),
    Mutant("never-drafts-hybrid", _never_drafting("knapspec.strategies.hybrid", "HybridStrategy"),
           ("tests/test_hybrid.py::test_greedy_hybrid_equals_autoregressive",)),
    Mutant("never-drafts-knapspec", _never_drafting("knapspec.strategies.knapspec", "KnapSpecStrategy"),
           ("tests/test_knapspec.py::test_greedy_output_through_the_planner_equals_autoregressive",)),
    Mutant("never-drafts-swift", _never_drafting("knapspec.strategies.swift", "SWIFTStrategy"),
           ("tests/test_searched.py::test_greedy_searched_baselines_equal_autoregressive",)),
    Mutant("engine-never-drafts", _engine_never_drafts,
           ("tests/test_engine.py::test_greedy_speculative_equals_autoregressive",)),
    Mutant("native-row-noise", _native_row_noise,
           ("tests/test_engine.py::test_greedy_speculative_equals_autoregressive",)),
    Mutant("accept-every-draft", _accept_every_draft,
           ("tests/test_engine.py::test_speculative_sampling_is_exact_with_lookup_and_hybrid_drafts",)),
    Mutant("lookup-offset", _lookup_offset,
           ("tests/test_lookup.py::test_ngram_index_answers_like_the_scan",)),
)


class _Plugin:
    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant

    def pytest_configure(self, config) -> None:
        self.mutant.apply()


def _run_one(name: str) -> int:
    import pytest
    m = next(m for m in MUTANTS if m.name == name)
    return int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *m.tests], plugins=[_Plugin(m)]))


def main(names: list[str]) -> int:
    import subprocess
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {', '.join(sorted(unknown))}; choose from {', '.join(m.name for m in MUTANTS)}")
        return 2
    chosen = [m for m in MUTANTS if not names or m.name in names]
    env = dict(os.environ, KNAPSPEC_HYPOTHESIS_PROFILE="ci")
    results = []
    for m in chosen:
        rc = subprocess.run([sys.executable, __file__, "--run", m.name], cwd=ROOT, env=env).returncode
        results.append(rc)
    print("\n| mutant | tests | caught |\n|---|---|---|")
    for rc, m in zip(results, chosen):
        caught = "yes" if rc == 1 else f"NO (exit {rc})"
        print(f"| {m.name} | {', '.join(t.split('::')[1] for t in m.tests)} | {caught} |")
    return 0 if all(rc == 1 for rc in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        raise SystemExit(_run_one(sys.argv[2]))
    raise SystemExit(main(sys.argv[1:]))
