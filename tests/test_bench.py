"""The benchmark harness on a tiny model: metrics from known statistics, mismatch detection, and
the files it writes."""

from __future__ import annotations

import json

import pytest

from conftest import WORDS, save_tiny_with_tokenizer
from knapspec import bench
from knapspec.cli import main
from knapspec.datasets import Prompt
from knapspec.engine import GenerationStats


def _stats(new, decode_s, rounds, drafted, accepted, plan_s=0.0):
    return GenerationStats(prompt_tokens=10, new_tokens=new, rounds=rounds, drafted=drafted, accepted=accepted,
                           prefill_s=1.0, plan_s=plan_s, total_s=1.0 + decode_s)


P = Prompt("q1", "long-docs:2048", "gao", "text", target_tokens=2048)


def test_metrics_from_known_statistics():
    ar = _stats(new=101, decode_s=5.0, rounds=100, drafted=0, accepted=0)           # 20 tok/s
    sp = _stats(new=101, decode_s=2.5, rounds=40, drafted=90, accepted=60, plan_s=0.25)  # 40 tok/s
    r_ar = bench.run_record(prompt=P, n_prompt=2040, strategy="autoregressive", stats=ar, describe={},
                            ref_tps=None, match=None, mismatch=None)
    r_sp = bench.run_record(prompt=P, n_prompt=2040, strategy="x", stats=sp, describe={"predicted_tps": 38.0},
                            ref_tps=ar.tokens_per_s, match=True, mismatch=None)
    assert r_ar["tokens_per_s"] == pytest.approx(20.0) and r_ar["speedup"] is None
    assert r_sp["tokens_per_s"] == pytest.approx(40.0) and r_sp["speedup"] == pytest.approx(2.0)
    assert r_sp["mean_accepted"] == pytest.approx(2.5) and r_sp["acceptance_rate"] == pytest.approx(60 / 90)
    assert r_sp["plan_share"] == pytest.approx(0.1) and r_sp["context"] == 2048
    r_sp2 = dict(r_sp, speedup=0.5, prompt_id="q2", tokens_per_s=10.0, predicted_tps=12.0)
    r_sp3 = dict(r_sp, speedup=1.0, prompt_id="q3", tokens_per_s=20.0, predicted_tps=21.0)
    summ = bench.summarize([r_ar, r_sp, r_sp2, r_sp3])
    row = next(s for s in summ if s["strategy"] == "x")
    assert row["speedup"] == pytest.approx(1.0)          # geometric mean of 2, 0.5, 1
    assert row["runs"] == 3 and row["mismatches"] == 0
    table = bench.markdown_table(summ)
    assert "| x | 1.00x (2.50) | 1.00x |" in table
    head = bench.headline([r_ar, r_sp, r_sp2, r_sp3])
    assert head["speedup"]["x"] == pytest.approx(1.0)
    assert head["tpt_pearson_r"] == pytest.approx(bench.pearson([38, 12, 21], [40, 10, 20]))
    assert head["tpt_pearson_r"] > 0.99
    assert bench.geomean([4.0, 1.0]) == pytest.approx(2.0)
    assert bench.pearson([1, 2], [1, 2]) is None           # too few points to say anything


def test_repeat_share_counts_the_tokens_that_repeat_the_output_itself():
    line = list(range(10, 20))                          # a 10-token line, then the same line twice
    assert bench.repeat_share(line) == 0.0
    assert bench.repeat_share(line * 3) == pytest.approx(20 / 30)
    assert bench.repeat_share(line * 3, n=4) == pytest.approx(20 / 30)
    assert bench.repeat_share([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(4 / 6)
    assert bench.repeat_share(list(range(50)) + [1, 2, 3]) == 0.0    # a short echo is not a loop
    assert bench.repeat_share([]) == 0.0
    # in a record, and per dataset in the table: the autoregressive outputs' share
    st = _stats(new=30, decode_s=1.0, rounds=30, drafted=0, accepted=0)
    ar = bench.run_record(prompt=P, n_prompt=2040, strategy="autoregressive", stats=st, describe={},
                          ref_tps=None, match=None, mismatch=None, tokens=line * 3)
    sp = bench.run_record(prompt=P, n_prompt=2040, strategy="x", stats=st, describe={}, ref_tps=st.tokens_per_s,
                          match=True, mismatch=None, tokens=line * 3)
    assert ar["repeat_share"] == pytest.approx(2 / 3)
    table = bench.markdown_table(bench.summarize([ar, sp]))
    assert table.splitlines()[-1] == "| output repeating itself | 67% | 67% |"
    assert "repeating" not in bench.markdown_table(bench.summarize([dict(ar, repeat_share=None)]))


@pytest.fixture
def tiny_folder(tmp_path):
    return save_tiny_with_tokenizer("llama", tmp_path / "tiny")


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": " ".join(WORDS[i:i + 12] * 2), "chat": False} for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_side_by_side_writes_runs_table_and_plots(tiny_folder, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["bench", "run", "--model", str(tiny_folder), "--dtype", "float32", "--strategies",
               "autoregressive,lookup,knapspec", "--datasets", str(prompts_file), "--n", "2",
               "--max-new-tokens", "12", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 6 and [r["strategy"] for r in runs[:3]] == ["autoregressive", "lookup", "knapspec"]
    assert all(r["match"] is True for r in runs if r["strategy"] != "autoregressive")
    assert all(r["speedup"] > 0 for r in runs)
    for f in ("table.md", "headline.json", "speedup_vs_context.png", "skip_share.png", "tpt.png"):
        assert (out / f).stat().st_size > 0, f
    assert "| lookup |" in (out / "table.md").read_text()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["runs"] == 6 and last["hard_mismatches"] == 0
    # the speed of passes over several tokens, before and after the runs
    for when in ("before", "after"):
        ps = last["pass_speed"][when]
        assert ps["width"] == 8 and 0 < ps["context"] < 4096 and ps["step_ms"] > 0 and ps["pass_ms"] > 0
        assert ps["ratio"] == pytest.approx(ps["pass_ms"] / ps["step_ms"])
    assert last["pass_speed"] == json.loads((out / "headline.json").read_text())["pass_speed"]


def test_a_broken_engine_is_caught(tiny_folder, prompts_file, tmp_path, capsys, caplog, monkeypatch):
    """Accepting every draft without checking it (a broken acceptance rule) must be reported as a
    mismatch and make the command fail."""
    from knapspec import engine
    from knapspec.sampling import Acceptance

    def accept_everything(drafts, logits):
        return Acceptance(n_accepted=len(drafts), token=int(logits[len(drafts)].argmax()), bonus=True)
    monkeypatch.setattr(engine, "accept_greedy", accept_everything)
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["bench", "run", "--model", str(tiny_folder), "--dtype", "float32", "--strategies", "static",
               "--skip", "a1,m1,a2,m2", "--max-draft", "4", "--datasets", str(prompts_file), "--n", "3",
               "--max-new-tokens", "16", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "did not reproduce the autoregressive output" in err
    assert "OUTPUT MISMATCH" in caplog.text and "NOT a near-tie" in caplog.text
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    bad = [r for r in runs if r["match"] is False]
    assert bad, "a broken acceptance rule went unnoticed"
    assert all(not r["mismatch"]["near_tie"] and r["mismatch"]["index"] >= 0 for r in bad)
    assert "MISMATCH" in (out / "table.md").read_text()


def test_near_tie_classification(tiny_folder):
    from knapspec.api import load
    llm = load(str(tiny_folder), dtype="float32")
    prompt = [5, 6, 7, 8]
    ref = llm.engine.generate(prompt, max_new_tokens=6).tokens
    assert bench.classify_mismatch(llm.model, prompt, ref, list(ref)) is None
    wrong = list(ref)
    wrong[3] = (ref[3] + 1) % llm.model.cfg.vocab_size
    mm = bench.classify_mismatch(llm.model, prompt, ref, wrong)
    assert mm["index"] == 3 and mm["margin"] > 0 and mm["near_tie"] is False


def test_swift_keeps_its_search_across_prompts(tiny_folder, prompts_file):
    """SWIFT's optimisation phase spans the first inputs: the harness keeps one instance per run."""
    import knapspec
    llm = knapspec.load(str(tiny_folder), dtype="float32")
    recs = bench.run_side_by_side(llm, strategies=["swift"], datasets=[str(prompts_file)], n=3, max_new_tokens=8,
                                  progress=False, strategy_options={"swift": {"max_trials": 40, "batch": 2}})
    trials = [r["strategy_state"]["trials"] for r in recs if r["strategy"] == "swift"]
    assert len(trials) == 3 and trials[0] < trials[1] < trials[2]
    assert all(r["match"] for r in recs if r["strategy"] == "swift")


def test_repeats_report_the_median_run_and_check_every_output(tiny_folder, prompts_file, monkeypatch):
    """--repeats K runs each strategy K times per prompt, round-robin: the record is the run of median
    decode time, and a wrong output in any repeat (here only the second static run) is caught."""
    import knapspec
    from knapspec import engine
    llm = knapspec.load(str(tiny_folder), dtype="float32")
    opts = {"static": {"skip": "a1,m1", "max_draft": 3}}

    def run():
        return bench.run_side_by_side(llm, strategies=["static"], datasets=[str(prompts_file)], n=1,
                                      max_new_tokens=12, progress=False, repeats=3, warmup=False,
                                      strategy_options=opts, interleave="runs")
    recs = run()
    assert [r["strategy"] for r in recs] == ["autoregressive", "static"]
    for r in recs:
        times = sorted(r["decode_s_runs"])
        assert len(times) == 3 and r["decode_s"] == times[1] and r["match"] is True
        assert r["tokens_per_s_fastest"] == pytest.approx((r["new_tokens"] - 1) / times[0])
    assert recs[0]["speedup_fastest"] == 1.0
    assert recs[1]["speedup_fastest"] == pytest.approx(recs[1]["tokens_per_s_fastest"]
                                                       / recs[0]["tokens_per_s_fastest"])

    state = {"generate": 0, "corrupt": False}
    real_generate, real_accept = llm.engine.generate, engine.accept_greedy

    def counting_generate(*args, **kw):
        state["generate"] += 1
        state["corrupt"] = state["generate"] == 4          # order: ar, static, ar, static (2nd repeat)
        return real_generate(*args, **kw)

    def accept_once_wrong(drafts, logits):
        acc = real_accept(drafts, logits)
        if state["corrupt"]:
            state["corrupt"] = False
            return type(acc)(n_accepted=acc.n_accepted, token=(acc.token + 1) % logits.shape[-1], bonus=acc.bonus)
        return acc
    monkeypatch.setattr(llm.engine, "generate", counting_generate)
    monkeypatch.setattr(engine, "accept_greedy", accept_once_wrong)
    recs = run()
    assert state["generate"] == 6
    assert recs[0]["match"] is True and recs[1]["match"] is False


def test_lockstep_times_each_iterator_over_its_own_steps(monkeypatch):
    """Turns follow the given orders, exhausted iterators drop out, and each iterator's durations
    are its own steps only (not the time the others ran in between). A fake clock that only the
    steps advance: the figures are exact, whatever the machine's load."""
    from knapspec.bench import timing
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    calls = []

    def worker(name, n, pause):
        for _ in range(n):
            calls.append(name)
            now[0] += pause
            yield None
    steps = bench.lockstep([worker("a", 2, 0.02), worker("b", 4, 0.005)], [[0, 1], [1, 0]])
    assert calls == ["a", "b", "b", "a", "b", "b"]        # a, b | b, a | (a done) b | b
    assert [len(x) for x in steps] == [3, 5]               # every next, the final StopIteration too
    assert sum(steps[0]) == pytest.approx(0.04) and sum(steps[1]) == pytest.approx(0.02)
    assert steps[0][-1] == 0.0 and steps[1][-1] == 0.0    # the exhausted next costs nothing here


@pytest.mark.parametrize("k", [2, 3, 4])
def test_turn_orders_never_run_a_generation_twice_in_a_row(k):
    from collections import Counter
    from itertools import pairwise
    turns = bench.turn_orders(k, turns=3000)
    assert all(sorted(t) == list(range(k)) for t in turns)
    seq = [i for t in turns for i in t]
    assert all(a != b for a, b in pairwise(seq))
    follows = Counter(pairwise(seq))                         # every ordered pair about equally often
    assert len(follows) == k * (k - 1)
    assert max(follows.values()) / min(follows.values()) < 1.15


def test_rounds_in_lockstep_give_the_same_outputs_and_own_times(tiny_folder, prompts_file, monkeypatch):
    """The default interleaving runs a prompt's generations one round each in turn: the same
    outputs as whole runs, each decode time counts that generation's rounds only, and a wrong round
    in any repeat is still caught."""
    import time

    import knapspec
    from knapspec import engine
    llm = knapspec.load(str(tiny_folder), dtype="float32")

    def run(interleave):
        return bench.run_side_by_side(llm, strategies=["lookup", "static"], datasets=[str(prompts_file)],
                                      n=2, max_new_tokens=12, progress=False, repeats=2, warmup=False,
                                      strategy_options={"static": {"skip": "a1,m1", "max_draft": 3}},
                                      interleave=interleave)
    t0 = time.perf_counter()
    rounds = run("rounds")
    wall = time.perf_counter() - t0
    whole = run("runs")
    key = ["prompt_id", "strategy", "new_tokens", "rounds", "drafted", "accepted", "match"]
    assert [[r[k] for k in key] for r in rounds] == [[r[k] for k in key] for r in whole]
    assert all(r["match"] is True for r in rounds if r["strategy"] != "autoregressive")
    busy = sum(sum(r["decode_s_runs"]) for r in rounds)
    assert 0 < busy < wall                                  # no generation is charged another's rounds
    for r in rounds:
        assert r["decode_s"] in r["decode_s_runs"] and r["decode_s"] > 0
        assert r["decode_s"] >= r["draft_s"] + r["verify_s"] + r["plan_s"]

    real = engine.accept_greedy
    calls = {"n": 0}

    def wrong_once(drafts, logits):                      # one wrong round somewhere in the middle
        calls["n"] += 1
        acc = real(drafts, logits)
        if calls["n"] == 30:
            return type(acc)(n_accepted=acc.n_accepted, token=(acc.token + 1) % logits.shape[-1], bonus=acc.bonus)
        return acc
    monkeypatch.setattr(engine, "accept_greedy", wrong_once)
    assert any(r["match"] is False for r in run("rounds"))
    with pytest.raises(ValueError, match="interleave must be one of"):
        run("tokens")


def test_timed_runs_keep_loaded_objects_out_of_the_collector(tiny_folder, prompts_file, monkeypatch):
    """The harness freezes the objects alive before the timed runs (a full garbage collection over
    them would stall whichever round it lands in) and unfreezes them afterwards."""
    import gc

    import knapspec
    llm = knapspec.load(str(tiny_folder), dtype="float32")
    seen = []
    real = llm.engine.stream

    def stream(*a, **k):
        seen.append(gc.get_freeze_count())
        return real(*a, **k)
    monkeypatch.setattr(llm.engine, "stream", stream)
    before = gc.get_freeze_count()
    bench.run_side_by_side(llm, strategies=["lookup"], datasets=[str(prompts_file)], n=1, max_new_tokens=6,
                           progress=False, warmup=False)
    assert len(seen) == 2 and all(c > before + 1000 for c in seen)
    assert gc.get_freeze_count() == before


def test_strategy_variants_parse_and_reject_bad_options():
    assert bench.parse_variant("hybrid") == ("hybrid", {})
    assert bench.parse_variant("swift:skip_ratio=0.2;max_trials=8;seed=x") == (
        "swift", {"skip_ratio": 0.2, "max_trials": 8, "seed": "x"})
    with pytest.raises(ValueError, match="unknown strategy"):
        bench.parse_variant("nope:x=1")
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        bench.parse_variant("hybrid:draft_vocab")
    with pytest.raises(ValueError, match=r"the swift strategy has no option 'skipratio'.*its options are .*skip_ratio"):
        bench.parse_variant("swift:skipratio=0.2")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_repeat_orders_are_balanced_for_who_runs_before_whom(k):
    from collections import Counter

    from knapspec.bench import balanced_orders
    rows = balanced_orders(k)
    assert all(sorted(r) == list(range(k)) for r in rows)
    positions = Counter((s, i) for r in rows for i, s in enumerate(r))
    assert len(positions) == k * k and len(set(positions.values())) == 1
    if k > 1:
        follows = Counter((r[i], r[i + 1]) for r in rows for i in range(k - 1))
        assert len(follows) == k * (k - 1) and len(set(follows.values())) == 1


def test_decode_rate_excludes_the_prefill():
    from knapspec.bench import decode_rate
    assert decode_rate([10.0, 10.5, 11.0, 11.5]) == pytest.approx(2.0)   # 3 steps in 1.5 s
    with pytest.raises(ValueError, match="at least 2"):
        decode_rate([1.0])


def test_bench_ar_measures_both_sides(tiny_folder):
    from knapspec.bench import bench_ar
    rows = bench_ar(str(tiny_folder), device="cpu", threads=None, contexts=[12], new_tokens=4, repeats=2,
                    dtypes=["float32"])
    (r,) = rows
    assert r["context"] == 12 and r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["hf_tok_s"])
    assert r["roofline_share"] > 0
    # against the highest bandwidth of the run (>= the median the roofline column uses)
    assert 0 < r["share_of_best_bw"] <= r["ours_tok_s"] / r["roofline_tok_s"] * (1 + 1e-9)


def test_category_table_compares_the_last_strategy_with_the_best_other():
    def rec(cat, pid, s, x):
        return {"category": cat, "prompt_id": pid, "strategy": s, "speedup": x, "speedup_fastest": x * 1.1}
    recs = [rec("coding", "1", "autoregressive", 1.0), rec("coding", "1", "lookup", 2.0),
            rec("coding", "1", "knapspec", 0.5), rec("coding", "1", "hybrid", 1.9),
            rec("coding", "2", "autoregressive", 1.0), rec("coding", "2", "lookup", 0.5),
            rec("coding", "2", "knapspec", 1.0), rec("coding", "2", "hybrid", 0.5),
            rec("qa", "3", "autoregressive", 1.0), rec("qa", "3", "lookup", 1.0),
            rec("qa", "3", "knapspec", 1.2), rec("qa", "3", "hybrid", 1.5)]
    lines = bench.category_table(recs).splitlines()
    assert lines[0] == "| category | lookup | knapspec | hybrid | hybrid / best of the others |"
    # coding: lookup gm(2, .5) = 1, knapspec gm(.5, 1) = .707, hybrid gm(1.9, .5) = .975
    assert lines[2] == "| coding | 1.00x | 0.71x | 0.97x | 0.975 |"
    assert lines[3] == "| qa | 1.00x | 1.20x | 1.50x | 1.250 |"
    assert lines[4].startswith("| all 3 prompts |")
    # the same document at two lengths (two datasets) counts as two prompts
    docs = [dict(rec("gao", "d", s, 1.0), dataset=d) for d in ("long-docs:512", "long-docs:2048")
            for s in ("autoregressive", "lookup")]
    assert bench.category_table(docs).splitlines()[-1].startswith("| all 2 prompts |")
    assert bench.category_table(recs, "speedup_fastest").splitlines()[2].startswith("| coding | 1.10x |")
    assert bench.category_table([dict(r, category="") for r in recs]) is None


def test_bench_verify_times_both_modes_on_the_same_weights(tiny_folder):
    from knapspec.bench import bench_verify
    rows = bench_verify(str(tiny_folder), device="cpu", threads=None, contexts=[12], widths=[1, 4],
                        repeats=2, dtypes=["float32"], modes=["fused", "exact"])
    assert [(r["mode"], r["width"]) for r in rows] == [("fused", 1), ("fused", 4), ("exact", 1), ("exact", 4)]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[0]["ratio"] == rows[2]["ratio"] == 1.0
    assert rows[0]["vs_fused"] == rows[1]["vs_fused"] == 1.0
    assert rows[3]["vs_fused"] == pytest.approx(rows[3]["ms"] / rows[1]["ms"])
    (one,) = bench_verify(str(tiny_folder), device="cpu", threads=None, contexts=[12], widths=[1], repeats=1,
                          dtypes=["float32"])
    assert "mode" not in one and one["ratio"] == 1.0
    with pytest.raises(ValueError, match="unknown mode"):
        bench_verify(str(tiny_folder), device="cpu", threads=None, contexts=[12], widths=[1], repeats=1,
                     dtypes=["float32"], modes=["fast"])


def test_peers_runs_every_system_in_turn_and_compares_with_llama_cpp(tiny_folder, tmp_path, monkeypatch):
    """``bench peers`` without llama.cpp: a stand-in server that answers like llama-server; every
    case runs on every system ``repeats`` times in rotated order, the table's ratios are to
    llama.cpp's figures."""
    import knapspec
    from knapspec.bench import peers
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    llm = knapspec.load(str(tiny_folder), dtype="float32", pack=False)
    order: list[str] = []

    class FakeServer:
        def complete(self, ids, n):
            order.append("llama.cpp")
            return {"tokens": [5] * n, "wall_s": 2.0, "prefill_s": 0.5, "decode_tok_s": 50.0, "new_tokens": n}
    real = peers._ours

    def ours(llm, strategy):
        run = real(llm, strategy)
        return lambda ids, n: order.append(strategy) or run(ids, n)
    monkeypatch.setattr(peers, "_ours", ours)
    cases = [peers.Case("spec-bench: writing", "1", llm.encode("the model text")),
             peers.Case("long-docs:4k", "2", llm.encode("a summary report of the document"))]
    recs = peers.run_peers(llm, cases, server=FakeServer(), strategies=["autoregressive", "lookup"],
                           max_new_tokens=6, repeats=3, progress=False)
    assert len(recs) == 6 and {r["system"] for r in recs} == {"llama.cpp", "knapspec autoregressive",
                                                              "knapspec lookup"}
    # after a warm-up of each, repeat r starts with the r-th system
    timed = order[3:]
    assert timed[:3] == ["llama.cpp", "autoregressive", "lookup"] and timed[3:6] == ["autoregressive", "lookup",
                                                                                     "llama.cpp"]
    ar = next(r for r in recs if r["system"] == "knapspec autoregressive" and r["prompt_id"] == "1")
    assert ar["decode_tok_s"] > 0 and ar["repeats"] == 3 and ar["agree_with_llama_cpp"] is not None
    table = peers.summary_table(recs)
    assert "| spec-bench: writing | 1 | 50.0 |" in table
    tok = ar["decode_tok_s"]
    assert f"({tok / 50.0:.2f}x)" in table.splitlines()[2]


def test_peers_finds_llama_server_or_says_how_to_get_it(tmp_path, monkeypatch):
    from knapspec.bench.peers import find_llama_server
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llama-server is not on PATH"):
        find_llama_server(None)
    with pytest.raises(FileNotFoundError, match="no llama-server in"):
        find_llama_server(tmp_path)
    b = tmp_path / "build" / "bin"
    b.mkdir(parents=True)
    (b / "llama-server").write_text("#!/bin/sh\n")
    (b / "llama-server").chmod(0o755)
    assert find_llama_server(tmp_path) == b / "llama-server"


def test_the_benchmark_prepares_each_strategy_as_generate_does(tiny_folder, prompts_file, tmp_path, monkeypatch):
    """The warm-up runs each strategy's one-time work (``LLM.prepare``) before the measured runs,
    timed apart: with nothing remembered on the machine, the hybrid learns its verdict there, and
    its first measured generation takes it from the memory (without the warm-up: from the TPT
    bound here, a DP on the embedded model; either inside its decode time)."""
    import knapspec
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path / "cache"))
    llm = knapspec.load(str(tiny_folder), dtype="float32", pack=False)
    recs = bench.run_side_by_side(llm, strategies=["hybrid"], datasets=[str(prompts_file)], n=1,
                                  max_new_tokens=12, progress=False,
                                  strategy_options={"hybrid": {"plan_after": 0}})
    hy = next(r for r in recs if r["strategy"] == "hybrid")
    assert hy["prepare_s"] > 0 and recs[0]["prepare_s"] >= 0
    assert hy["strategy_state"]["decided_by"][0] == "memory"      # not "dp": learned in the warm-up
    assert hy["match"] is True


def test_long_text_prompts_are_the_documents_beginnings_as_raw_text():
    """``long-text:N``: the same documents as ``long-docs:N``, cut to about N tokens, without the
    chat template or the summary instruction (to be continued as text)."""
    from knapspec.datasets import SUMMARY_INSTRUCTION, data_dir, load_dataset, long_doc_records

    def words(text, add_special_tokens=False):          # a tokenizer that counts words
        return {"input_ids": text.split()}
    docs = {f"{r.get('source', 'doc')}-{r['id']}": r["text"] for r in long_doc_records(data_dir())}
    text = load_dataset("long-text:512", root=None, tokenizer=words, n=3)
    summ = load_dataset("long-docs:512", root=None, tokenizer=words, n=3)
    assert len(text) == 3 and [p.id for p in text] == [p.id for p in summ]
    for p, q in zip(text, summ):
        assert p.dataset == "long-text:512" and p.target_tokens == 512 and p.chat is False
        assert docs[p.id].startswith(p.text) and 400 < len(p.text.split()) <= 512
        assert q.chat is True and q.text.startswith(SUMMARY_INSTRUCTION)
    with pytest.raises(ValueError, match="long-text needs the model's tokenizer"):
        load_dataset("long-text:512", root=None)
