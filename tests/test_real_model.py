"""The embedded SmolLM2-135M-Instruct, float32: equal to transformers, and lossless under plans."""

from __future__ import annotations

import pytest
import torch

from conftest import spec_bench
from knapspec.plan import Plan
from knapspec.strategies.static import StaticStrategy

pytestmark = pytest.mark.slow


def _prompt_ids(llm, row) -> list[int]:
    return llm.encode(row["turns"][0], chat=True)


@pytest.fixture(scope="module")
def ar_refs(embedded):
    """Autoregressive greedy output, 128 tokens (no stop token: every round counts), 10 prompts."""
    rows = spec_bench(10)
    ids = [_prompt_ids(embedded, r) for r in rows]
    return rows, ids, [embedded.engine.generate(i, max_new_tokens=128).tokens for i in ids]


def test_greedy_equals_transformers_generate(embedded, ar_refs):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(embedded.checkpoint.folder), dtype=torch.float32).eval()
    rows, all_ids, refs = ar_refs
    for row, ids, full in list(zip(rows, all_ids, refs))[:5]:
        ours = full[:64]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              num_beams=1, pad_token_id=embedded.tokenizer.eos_token_id)
        assert ours == ref[0, len(ids):].tolist(), f"question {row['question_id']}"


PLANS = [                  # mild plans: high acceptance keeps this float32 test within minutes
    "a20,a22,a24",                      # late attention
    "m25,a26,a27",                      # late MLP + attention
    "a5,a9,a13,a17,a21,m27",            # spread out
]


def test_fixed_plans_are_lossless_on_spec_bench(embedded, ar_refs):
    rows, all_ids, refs = ar_refs
    n = embedded.model.cfg.n_layers
    for k, text in enumerate(PLANS):                # each plan on 5 of the 10 prompts, in turn
        strat = StaticStrategy(Plan.parse(text, n), max_draft=4, threshold=0.5)
        drafted = accepted = 0
        for r, ids, ref in list(zip(rows, all_ids, refs))[k % 2::2]:
            g = embedded.engine.generate(ids, strat, max_new_tokens=128)
            assert g.tokens == ref, f"plan {text}, question {r['question_id']}"
            drafted += g.stats.drafted
            accepted += g.stats.accepted
        assert drafted > accepted > 0           # rounds with acceptances and with rejections


def test_knapspec_planner_is_lossless_on_spec_bench(embedded, ar_refs):
    """The planner's plans (from the real residual stream) keep the output identical. The latency
    model is analytic here, with layer 20's attention (which this model tolerates skipping best)
    priced far above the rest, so that the planner drafts whatever this machine does."""
    from conftest import one_slow_attention
    from knapspec.strategies.knapspec import KnapSpecStrategy
    rows, all_ids, refs = ar_refs
    lat = one_slow_attention(embedded.model.cfg.n_layers, 20)
    drafted = accepted = 0
    for r, ids, ref in list(zip(rows, all_ids, refs))[:3]:
        strat = KnapSpecStrategy(embedded.model, lat, every=16)
        g = embedded.engine.generate(ids, strat, max_new_tokens=128)
        assert g.tokens == ref, f"question {r['question_id']}"
        drafted += g.stats.drafted
        accepted += g.stats.accepted
        assert all(c.plan is None or c.plan.run[0] or c.plan.run[1] for c in strat.history)
    assert drafted > accepted > 0


def test_stream_yields_the_generated_text(embedded):
    pieces = list(embedded.stream("The capital of France is", max_new_tokens=12))
    full = embedded.generate("The capital of France is", max_new_tokens=12)
    assert "".join(pieces) == full.text and len(pieces) > 1


# ---- every strategy end to end from the command line ------------------------------------------------
CLI_PROMPT = "Summarize: the meeting agreed to move the release to Friday and to fix the cache bug first."


def _cli_json(args, capsys) -> dict:
    import json

    from knapspec.cli import main
    capsys.readouterr()
    rc = main(["generate", "--dtype", "float32", "--json", "--chat", "--max-new-tokens", "24",
               "--prompt", CLI_PROMPT, *args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    """Small offline searches through the CLI (the real ones take minutes: docs/benchmarks.md)."""
    from knapspec.cli import main
    d = tmp_path_factory.mktemp("calibration")
    assert main(["calibrate", "--strategy", "draft-verify", "--dtype", "float32", "--datasets",
                 "spec-bench:summarization,spec-bench:coding", "--n", "1", "--trials", "2", "--new-tokens", "8",
                 "--out", str(d / "dv.json")]) == 0
    assert main(["calibrate", "--strategy", "knn-ssd", "--dtype", "float32", "--datasets",
                 "spec-bench:summarization,spec-bench:translation", "--n", "3", "--clusters", "2",
                 "--trials", "8", "--out", str(d / "knn.json")]) == 0
    return d


_AR: dict = {}


def _all_strategies() -> list[str]:
    from knapspec.strategies import REGISTRY
    return [n for n in REGISTRY.names() if n != "autoregressive"]


@pytest.mark.parametrize("name", _all_strategies())
def test_every_strategy_runs_from_the_cli_and_is_lossless(name, calibrations, capsys):
    if "ref" not in _AR:
        _AR["ref"] = _cli_json(["--strategy", "autoregressive"], capsys)
    ref = _AR["ref"]
    extra = {"static": ["--skip", "a10,m12,a20"], "draft-verify": ["--calibration", str(calibrations / "dv.json")],
             "knn-ssd": ["--calibration", str(calibrations / "knn.json")]}.get(name, [])
    got = _cli_json(["--strategy", name, *extra], capsys)
    assert got["tokens"] == ref["tokens"]
    assert got["stats"]["new_tokens"] == len(ref["tokens"])
