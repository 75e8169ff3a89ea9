"""The small Python API: load a model by name or path, generate, stream.

    >>> import knapspec
    >>> llm = knapspec.load()                  # embedded SmolLM2-135M-Instruct
    >>> out = llm.generate("Why is the sky blue?", chat=True, max_new_tokens=64)
    >>> out.text, out.stats.summary()
    >>> pieces = list(llm.stream("Once upon a time", max_new_tokens=32))

Text lives here and in the CLI only; the engine sees token ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import exactness, native
from .checkpoint import Checkpoint, GGUFCheckpoint, resolve
from .engine import DEFAULT_THRESHOLD, Engine, GenerationStats
from .model import Model
from .sampling import SamplingParams
from .strategies import REGISTRY, Strategy

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "bfloat16"      # measured: 2x faster than float32 on the 2-core AVX512-BF16 CPU
# a GGUF's quantized weights at --dtype auto: activations, norms and KV cache in this dtype
QUANT_ACTIVATIONS = torch.bfloat16
# measured fastest lossless strategy (docs/benchmarks.md): with the native CPU kernels the hybrid,
# which prices every lookup token, beat plain prompt lookup on all 13 Spec-Bench categories
DEFAULT_STRATEGY = "hybrid"
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                "<end_of_turn>", "<|eom_id|>")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        name = DEFAULT_DTYPE
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
    if device == "cpu" and name == "float16":
        log.warning("float16 on CPU is slow and not recommended; bfloat16 or float32 are better")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}: choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: GenerationStats


class LLM:
    """A loaded model with its tokenizer and engine."""

    def __init__(self, model: Model, tokenizer: Any, checkpoint: Checkpoint | GGUFCheckpoint | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.engine = Engine(model)
        self.stop_ids = self._stop_ids()
        self._kept: dict[tuple[str, str], Strategy] = {}

    def _stop_ids(self) -> tuple[int, ...]:
        ids = set(self.model.cfg.eos_token_ids)
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            if hasattr(tok, "token_to_id"):       # tokenizer.FastTokenizer: no vocabulary dict built
                ids.update(i for i in (tok.token_to_id(m) for m in _END_MARKERS) if i is not None)
            else:
                vocab = tok.get_vocab()
                ids.update(vocab[m] for m in _END_MARKERS if m in vocab)
        return tuple(sorted(ids))

    # ---- text <-> ids ---------------------------------------------------------------------------
    def encode(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
            return self.encode_chat(msgs)
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files: pass token ids instead of text")
        return list(self.tokenizer(prompt)["input_ids"])

    @property
    def can_chat(self) -> bool:
        """Whether the tokenizer has a chat template (a base model's, e.g. Gemma 3 270M's, has none)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, text: str, *, chat: bool) -> list[int]:
        """A dataset's prompt: in the chat template when it is a chat prompt and the model has one,
        else the plain text (a base model completes it)."""
        return self.encode(text, chat=chat and self.can_chat)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (``[{"role": ..., "content": ...}, ...]``) in the model's chat template,
        ready for the assistant's answer."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files: pass token ids instead of text")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: drop --chat")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def make_strategy(self, strategy: str | Strategy | None, **options: Any) -> Strategy:
        """A strategy by name, or by ``NAME:key=value;...`` (its options in the name, as on the
        command line: ``"hybrid:windows=off"``). Strategies that learn across prompts
        (``persists_across_prompts``: SWIFT's search, the hybrid's acceptance estimates) are kept
        per (name, options) and reused by later calls."""
        if isinstance(strategy, Strategy):
            return strategy
        name, options = REGISTRY.resolve(strategy or DEFAULT_STRATEGY, options)
        key = (name, repr(sorted((k, v if isinstance(v, (int, float, str, bool, type(None))) else id(v))
                                 for k, v in options.items())))
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        made = REGISTRY.create(name, self.model, **options)
        if made.persists_across_prompts:
            self._kept[key] = made
        return made

    def prepare(self, strategy: str | Strategy | None = None, *, progress: bool = False,
                **options: Any) -> Strategy:
        """One-time work for a strategy, before generating: this machine's latency profile
        (measured on first use, with a progress bar when ``progress``, and cached), and where the
        strategy learns a verdict across processes (the hybrid: whether layer-skip drafts pay here)
        one short warm-up generation to learn it. Nothing of it lands in a later generation's
        statistics. Returns the strategy (kept for later calls when it learns across prompts)."""
        strat = self.make_strategy(strategy, **options)
        if strat.prepare(progress=progress):
            log.info("warming up %s once on a built-in prompt (its verdict is remembered)", strat.name)
            self.engine.generate(self._warm_up_ids(), strat, max_new_tokens=16, stop_ids=self.stop_ids)
        return strat

    def _warm_up_ids(self) -> list[int]:
        """A real chat prompt (the first Spec-Bench question shipped with the package), or token
        ids for a checkpoint without a tokenizer."""
        if self.tokenizer is None:
            return [(7 * i) % max(self.model.cfg.vocab_size - 3, 1) + 3 for i in range(48)]
        from .datasets import PACKAGED_DATA, spec_bench
        text = spec_bench(PACKAGED_DATA)[0].text
        return self.encode(text, chat=bool(getattr(self.tokenizer, "chat_template", None)))

    # ---- generation -----------------------------------------------------------------------------
    def stream_ids(self, prompt: str | list[int], *, strategy: str | Strategy | None = None,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                   threshold: float = DEFAULT_THRESHOLD, stats: GenerationStats | None = None,
                   reference: str | list[int] | None = None, **strategy_options: Any) -> Iterator[list[int]]:
        """Yield the committed new tokens of each round. ``reference``: a predicted output (text or
        ids), a source of drafts for the strategies that copy (lookup, hybrid); the output is the
        model's own whatever it says."""
        sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        strat = self.make_strategy(strategy, **strategy_options)
        ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat=chat)
        if isinstance(reference, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files: pass the reference as token ids")
            reference = list(self.tokenizer(reference, add_special_tokens=False)["input_ids"])
        return self.engine.stream(ids, strat, max_new_tokens=max_new_tokens, sampling=sp,
                                  stop_ids=self.stop_ids, threshold=threshold, stats=stats,
                                  reference=reference or ())

    def generate(self, prompt: str | list[int], **kw: Any) -> Result:
        stats = GenerationStats()
        tokens: list[int] = []
        for chunk in self.stream_ids(prompt, stats=stats, **kw):
            tokens.extend(chunk)
        text = self.decode(tokens) if self.tokenizer is not None else ""
        return Result(text=text, tokens=tokens, stats=stats)

    def stream(self, prompt: str | list[int], *, stats: GenerationStats | None = None,
               **kw: Any) -> Iterator[str]:
        """Yield text pieces as tokens are committed (held back while a character is incomplete)."""
        tokens: list[int] = []
        emitted = ""
        for chunk in self.stream_ids(prompt, stats=stats, **kw):
            tokens.extend(chunk)
            text = self.decode(tokens)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(emitted):
                yield text[len(emitted):]
            emitted = text


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _available_memory() -> float:
    """Bytes of memory available to new allocations (Linux: MemAvailable, which counts reclaimable
    page cache; elsewhere the free pages; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def load(model: str | os.PathLike[str] | None = None, *, dtype: str = "auto", device: str = "cpu",
         threads: int | None = None, pack: bool | None = None, exact: bool | None = None,
         kernels: str = "auto") -> LLM:
    """Load a model by name (``smollm2-135m``, the embedded default) or path (HF folder, .gguf).

    ``dtype``: ``"auto"`` keeps a GGUF's quantized weights in their block types on CPU (native
    quantized kernels; activations and KV cache in bfloat16), and means bfloat16 elsewhere;
    ``"bfloat16"``/``"float32"`` dequantise a GGUF (a converted copy, cached). On a CPU without
    AVX2 a GGUF at ``"auto"`` is dequantised to bfloat16, with one warning.

    ``pack``: prepack the linear weights on CPU (see ``Model.pack_weights``; a second copy of
    those weights). None (default) = when the copy takes at most a quarter of the available memory.
    ``kernels``: which packed products: ``"auto"`` (knapspec's native AVX-512 kernels where the CPU
    and a C++ compiler allow, else oneDNN's), ``"native"`` or ``"onednn"``.

    ``exact``: compute each token the same way whether it comes alone or in a verification pass
    (``Model.set_row_invariant``), so that every strategy's greedy output is bit-identical to
    autoregressive decoding in any dtype (in bfloat16 the fused default could differ at near-ties).
    None (default) = on for a CPU, where it is measured bit-identical and as fast or faster
    (docs/benchmarks.md, "Exact mode"); off elsewhere, where it has not been measured."""
    device = resolve_device(device)
    tdtype = resolve_dtype(dtype, device)
    set_threads(threads)
    ck = resolve(model)
    tok = None
    if isinstance(ck, GGUFCheckpoint) and dtype == "auto" and device == "cpu":
        # the tokenizer first: what its loading leaves freed goes back to the system before the
        # weights arrive (the peak resident memory is then the steady state's)
        tok = ck.tokenizer() if ck.has_tokenizer() else None
        _release_free_memory()
        why = native.quant_available()
        if why is None:
            m = ck.load_model(dtype=QUANT_ACTIVATIONS)
        else:
            log.warning("the GGUF's quantized weights are dequantised to bfloat16: %s", why)
            m = ck.load_model(dtype=torch.bfloat16, quantized=False)
        _release_free_memory()
    else:
        if isinstance(ck, GGUFCheckpoint):
            ck = ck.converted()
        m = ck.load_model(dtype=tdtype, device=device)
    if pack is None:
        pack = m.weight_bytes() <= _available_memory() / 4
    m.pack_weights(pack, kernels=kernels)
    m.set_row_invariant(device == "cpu" if exact is None else exact)
    exactness.ensure(m)       # the torch path: measured once here, per-token verification if needed
    if tok is None:
        tok = ck.tokenizer() if ck.has_tokenizer() else None
    return LLM(m, tok, ck)


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
