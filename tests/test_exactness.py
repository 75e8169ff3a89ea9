"""Exact mode's token identity, checked on the machine that runs (``exactness.py``): the verdict
is measured on the model itself and cached; where the torch path's kernels are not row-invariant,
verification runs token by token and stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny
from knapspec import exactness
from knapspec.engine import Engine
from knapspec.model import Model
from knapspec.plan import Plan
from knapspec.strategies.static import StaticStrategy


def _torch_path(kind: str, root, dtype: torch.dtype, kernels: str) -> Model:
    from knapspec.checkpoint import Checkpoint
    folder = root / f"exactness-{kind}"
    if not (folder / "config.json").is_file():
        save_tiny(kind, folder)
    m = Checkpoint(folder, kind).load_model(dtype=dtype)
    m.pack_weights(kernels != "plain", kernels="onednn" if kernels == "onednn" else "auto")
    assert m.kernels == kernels
    m.set_row_invariant(True)
    return m


@pytest.mark.parametrize("kernels", ["onednn", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_mode_gives_token_identity_whatever_the_verdict(dtype, kernels, tmp_path):
    """Whatever this machine's kernels do, exact mode's output equals autoregressive decoding:
    grouped passes where they were measured row-invariant, token by token where not."""
    m = _torch_path("llama", tmp_path, dtype, kernels)
    fast = exactness.ensure(m)
    assert m.exact_per_token == (not fast)
    eng = Engine(m)
    prompt = list(range(3, 70))                    # passes cross the span boundary at 64
    ref = eng.generate(prompt, max_new_tokens=24, stop_ids=()).tokens
    plan = Plan.from_skips(m.cfg.n_layers, attn=[1], mlp=[2])
    got = eng.generate(prompt, StaticStrategy(plan, max_draft=5, threshold=0.0), max_new_tokens=24, stop_ids=())
    assert got.stats.drafted > 0 and got.tokens == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_default_torch_path_is_row_invariant_on_this_cpu(dtype, tmp_path):
    """The README's claim for this CPU: oneDNN's prepacked products (the torch path's default)
    with exact mode's padding and spans are row-invariant here, measured (a failure means the
    claim does not hold on this machine; the fallback above still keeps the output exact)."""
    m = _torch_path("llama", tmp_path, dtype, "onednn")
    assert exactness.measure(m)


def _row_dependent_linear(monkeypatch):
    """A kernel whose result depends on how many rows share the call, as a product on another
    CPU or library could: every output of a product over 2+ real rows is nudged."""
    real = Model.linear

    def linear(self, x, w, b=None, out_dtype=None):
        y = real(self, x, w, b, out_dtype)
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        return y + 1e-3 * y.abs().amax() if rows > 1 else y
    monkeypatch.setattr(Model, "linear", linear)


def test_a_row_dependent_kernel_is_caught_and_verification_goes_token_by_token(tmp_path, monkeypatch):
    m = _torch_path("llama", tmp_path, torch.float32, "plain")
    _row_dependent_linear(monkeypatch)
    assert not exactness.measure(m)
    assert not exactness.ensure(m) and m.exact_per_token
    eng = Engine(m)
    prompt = list(range(3, 40))
    ref = eng.generate(prompt, max_new_tokens=30, stop_ids=()).tokens
    plan = Plan.from_skips(m.cfg.n_layers, attn=[1], mlp=[2])
    got = eng.generate(prompt, StaticStrategy(plan, max_draft=6, threshold=0.0), max_new_tokens=30, stop_ids=())
    assert got.stats.drafted > 0 and got.tokens == ref
    # and without the fallback the same kernel breaks the equality (the test can fail)
    m.exact_per_token = False
    bad = eng.generate(prompt, StaticStrategy(plan, max_draft=6, threshold=0.0), max_new_tokens=30, stop_ids=())
    assert bad.tokens != ref


def test_the_verdict_is_cached_per_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    m = _torch_path("llama", tmp_path, torch.float32, "plain")
    calls = []
    real = exactness.measure
    monkeypatch.setattr(exactness, "measure", lambda model: calls.append(1) or real(model))
    first = exactness.ensure(m)
    assert exactness.ensure(m) == first
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "exactness").glob("*.json"))) == 1
    torch.set_num_threads(1)                       # another set-up: measured again
    try:
        exactness.ensure(m)
    finally:
        torch.set_num_threads(2)
    assert len(calls) == 2


def test_native_kernels_need_no_check(tmp_path):
    from knapspec import native
    if native.available(torch.float32) is not None:
        pytest.skip("native kernels unavailable here")
    m = _torch_path("llama", tmp_path, torch.float32, "plain")
    m.pack_weights(kernels="native")
    assert exactness.ensure(m) and not m.exact_per_token
