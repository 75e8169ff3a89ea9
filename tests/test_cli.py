"""The CLI's first run: one-time work (latency profile, a strategy's first verdict) happens before
the generation and outside its statistics; options select the strategy they belong to."""

from __future__ import annotations

import json

import pytest

import knapspec
from conftest import save_tiny_with_tokenizer
from knapspec import api, latency
from knapspec.cli import main
from knapspec.engine import Engine
from knapspec.strategies import REGISTRY


@pytest.fixture
def tiny_with_tok(tmp_path):
    return save_tiny_with_tokenizer("llama", tmp_path / "tiny")


def test_one_time_work_runs_before_the_generation_and_is_remembered(tiny_with_tok, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    # a fresh process: nothing in memory, nothing on disk
    monkeypatch.setattr(latency, "_MEMO", {})
    monkeypatch.setattr("knapspec.strategies.memory.default_memory_path",
                        lambda model: tmp_path / "cache" / "planner" / "memory.json")
    events: list[str] = []
    real_profile, real_stream = latency.profile, Engine.stream
    monkeypatch.setattr(latency, "profile", lambda *a, **k: events.append("profile") or real_profile(*a, **k))
    # not about the check against real steps (a tiny model's millisecond steps on a busy machine)
    monkeypatch.setattr(latency, "check", lambda model, lm, **k: {c: 1.0 for c in lm.profile.contexts})

    def stream(self, prompt, *a, **k):
        events.append("generation")
        return real_stream(self, prompt, *a, **k)
    monkeypatch.setattr(Engine, "stream", stream)
    args = ["generate", "--model", str(tiny_with_tok), "--prompt", "the model text token", "--max-new-tokens",
            "12", "--json", "--strategy", "hybrid"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # profile, then the hybrid's warm-up (its planner's verdict), then the user's generation
    assert events == ["profile", "generation", "generation"], events
    assert list((tmp_path / "cache" / "planner").glob("memory*.json"))
    assert out["stats"]["plan_s"] < out["stats"]["total_s"]
    # a second process finds both on disk: no profile, no warm-up
    events.clear()
    monkeypatch.setattr(latency, "_MEMO", {})
    assert main(args) == 0
    assert events == ["generation"], events


def test_an_option_selects_the_strategy_it_belongs_to(tiny_with_tok, monkeypatch, capsys):
    made = []
    real = api.LLM.make_strategy
    monkeypatch.setattr(api.LLM, "make_strategy", lambda self, s, **o: made.append(s) or real(self, s, **o))
    assert main(["generate", "--model", str(tiny_with_tok), "--prompt", "the model", "--max-new-tokens", "4",
                 "--skip", "a1,m2"]) == 0
    assert made and set(made) == {"static"}


def test_a_strategy_takes_its_options_after_a_colon(tiny_with_tok, monkeypatch, capsys):
    """``--strategy NAME:key=value;...``: the named strategy with those options (as the benchmark
    and the library take them), its output the same as autoregressive decoding's; a threshold
    among them goes to the strategy, which fixes it in its drafts (swift's own exit is 0.8), while
    ``--threshold`` goes to the engine."""
    made, engine_thresholds = [], []
    real_create, real_stream = REGISTRY.create, Engine.stream
    monkeypatch.setattr(REGISTRY, "create", lambda name, model, **o: made.append((name, o)) or real_create(
        name, model, **o))
    monkeypatch.setattr(Engine, "stream", lambda self, p, *a, **k: engine_thresholds.append(k.get("threshold"))
                        or real_stream(self, p, *a, **k))
    base = ["generate", "--model", str(tiny_with_tok), "--prompt", "the model text the model", "--max-new-tokens",
            "10", "--json"]
    assert main([*base, "--strategy", "autoregressive"]) == 0
    ref = json.loads(capsys.readouterr().out)["tokens"]
    made.clear()
    assert main([*base, "--strategy", "swift:threshold=0.5;max_draft=3;skip_ratio=0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ref
    assert made and all(m == ("swift", {"threshold": 0.5, "max_draft": 3, "skip_ratio": 0.3}) for m in made), made
    made.clear()
    assert main([*base, "--strategy", "lookup:max_ngram=2", "--threshold", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ref
    assert made and all(m == ("lookup", {"max_ngram": 2}) for m in made) and engine_thresholds[-1] == 0.7
    llm = knapspec.load(str(tiny_with_tok), dtype="float32")
    s = llm.make_strategy("swift:threshold=0.5;skip_ratio=0.3")
    assert (s.name, s.threshold, s.d_max) == ("swift", 0.5, 25)
    assert llm.make_strategy("swift:skip_ratio=0.3;threshold=0.5") is s          # kept: the same options
    assert llm.make_strategy("swift:skip_ratio=0.3") is not s
    with pytest.raises(ValueError, match="given twice"):
        llm.make_strategy("swift:skip_ratio=0.3", skip_ratio=0.2)
