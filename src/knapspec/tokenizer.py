"""A GGUF file's tokenizer without transformers on the hot path.

The first time a GGUF file is used, transformers' GGUF converter derives its tokenizer (a
``tokenizers`` JSON) and the special tokens; knapspec stores both under the cache folder
(``tokenizers/<file>-<fingerprint>/``, atomic writes). Every later load reads them with the
``tokenizers`` library alone (tens of milliseconds, against seconds to import transformers) and
renders the file's chat template with jinja2 the way transformers does (a sandboxed environment
with ``trim_blocks`` and ``lstrip_blocks``, the special tokens as variables, ``raise_exception``,
``strftime_now`` and transformers' ``tojson``). ``tests/test_tokenizer.py`` checks both against
transformers' tokenizer.

:class:`FastTokenizer` offers what knapspec calls on a tokenizer: ``tok(text)["input_ids"]``,
``decode``, ``get_vocab``, ``eos_token_id``, ``chat_template`` and ``apply_chat_template``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .storage import cache_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: spaces before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=8)
def _template(source: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks it)."""
        tags = {"generation"}  # noqa: RUF012

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its model."""

    def __init__(self, tokenizer: Any, meta: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.chat_template: str | None = meta.get("chat_template")
        self.special_tokens_map = {k: meta[k] for k in _SPECIAL if meta.get(k) is not None}
        self.clean_up_tokenization_spaces = bool(meta.get("clean_up_tokenization_spaces", False))
        for k in _SPECIAL:
            tok = meta.get(k)
            setattr(self, k, tok)
            setattr(self, k + "_id", None if tok is None else tokenizer.token_to_id(tok))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = _template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens_map, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _derive(path: Path, folder: Path) -> None:
    """transformers' GGUF converter, once: tokenizer.json and the special tokens into ``folder``."""
    from transformers import AutoTokenizer
    # said like the native build and the latency profile: one-time work a user waits for (Gemma 3's
    # 262,144-token vocabulary took 16 s on a 2-core host, SmolLM2's 4 s)
    log.warning("deriving the tokenizer of %s (once for this file); cached in %s", path.name, folder)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = {k: getattr(tok, k, None) for k in _SPECIAL}
    meta = {k: (str(v) if v is not None else None) for k, v in meta.items()}
    meta["chat_template"] = tok.chat_template if isinstance(tok.chat_template, str) else None
    meta["clean_up_tokenization_spaces"] = bool(getattr(tok, "clean_up_tokenization_spaces", False))
    meta["format"] = _FORMAT
    write_text_atomic(folder / "tokenizer.json", compact_merges(tok.backend_tokenizer.to_str()))
    write_json_atomic(folder / "meta.json", meta)       # written last: its presence marks a complete folder
    log.warning("tokenizer derived in %.0f s (cached)", time.perf_counter() - t0)


# meta.json's "format": 2 = tokenizer.json's BPE merges written as "a b" strings (compact_merges)
_FORMAT = 2


def compact_merges(text: str) -> str:
    """A tokenizer JSON with its BPE merges as ``"a b"`` strings rather than ``["a", "b"]`` pairs,
    where no merged piece holds a space (else unchanged). The ``tokenizers`` library reads both
    into the same model, but parsing the pairs leaves ~2.4 MiB more of the heap resident for
    SmolLM2's 49k merges (~4.8 MiB for Gemma 3's 515k)."""
    data = json.loads(text)
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return text
    if any(" " in a or " " in b for a, b in merges):
        return text
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False)


def gguf_tokenizer(path: Path, fingerprint: str) -> FastTokenizer:
    """The tokenizer of a GGUF file, from the cache (derived on first use; a folder written by an
    earlier version gets its merges compacted in place, without transformers)."""
    folder = cache_dir() / "tokenizers" / f"{path.stem}-{fingerprint}"
    if not (folder / "meta.json").is_file():
        _derive(path, folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format", 1) < _FORMAT:         # an earlier version's folder: compacted once, if writable
        tj = folder / "tokenizer.json"
        try:
            write_text_atomic(tj, compact_merges(tj.read_text(encoding="utf-8")))
            write_json_atomic(folder / "meta.json", dict(meta, format=_FORMAT))
        except OSError as e:                    # read as it is: both forms of merges give the same tokenizer
            log.info("could not compact the cached tokenizer in %s (%s)", folder, e)
    return FastTokenizer(read_tokenizer(folder / "tokenizer.json"), meta)


# what models.BPE takes besides the vocabulary and merges (it ignores others with a message on stdout)
_BPE_OPTIONS = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                "byte_fallback", "ignore_merges")


def read_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON file. A BPE model's vocabulary and merges go to
    ``models.BPE`` as Python objects, the rest (added tokens, pre-tokenizer, decoder, ...) through
    the library's own JSON reader: the same tokenizer (tested: the same ids and text), and less of
    the heap left resident than reading the whole JSON in the library (SmolLM2: 0.6 MiB less,
    Gemma 3's 262k vocabulary: 15 MiB less), whose parse of the vocabulary leaves its heap
    fragmented. Read whole: any other model, a BPE option ``models.BPE`` does not take, and added
    tokens that are not in the model's vocabulary at their ids (the library numbers those after
    the vocabulary it reads them with)."""
    from tokenizers import Tokenizer, models
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    model = data.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or []}
    if (model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list)
            or set(model) - {"type", "vocab", "merges", *_BPE_OPTIONS}
            or any(vocab.get(c) != i for c, i in added.items())):
        return Tokenizer.from_str(text)
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if not all(len(p) == 2 for p in pairs):
        return Tokenizer.from_str(text)
    del text, merges
    model["vocab"], model["merges"] = added, []        # the added tokens at their vocabulary ids
    opts = {k: model[k] for k in _BPE_OPTIONS if model.get(k) is not None}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.model = models.BPE(vocab, pairs, **opts)
    if any(tok.token_to_id(c) != i for c, i in added.items()):       # not expected; never guess
        log.info("%s: added tokens moved when read in two parts; reading it whole", path)
        return Tokenizer.from_file(str(path))
    return tok
