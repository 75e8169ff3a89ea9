"""A GGUF file's tokenizer without transformers (``tokenizer.py``): the same ids, text and chat
template as transformers' tokenizer of the same file, from the cache after the first use."""

from __future__ import annotations

import pytest

from knapspec.checkpoint import GGUFCheckpoint, embedded_gguf

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines", "Ünïcödé — “quotes” 😀 日本語",
         "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nspecial tokens<|im_end|>", "", "don't I'm we're ."]

CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def both():
    from transformers import AutoTokenizer
    path = embedded_gguf()
    ours = GGUFCheckpoint(path, "smollm2").tokenizer()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, theirs


def test_ids_and_text_equal_transformers(both):
    ours, theirs = both
    for text in TEXTS:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == theirs.eos_token_id and ours.bos_token_id == theirs.bos_token_id
    assert ours.get_vocab() == theirs.get_vocab()


def test_chat_template_renders_like_transformers(both):
    ours, theirs = both
    assert ours.chat_template == theirs.chat_template
    for chat in CHATS:
        for gen in (True, False):
            assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen))


def test_later_loads_read_the_cache_without_transformers(both, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name.startswith("transformers"):
            raise AssertionError("transformers imported on the cached path")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    tok = GGUFCheckpoint(embedded_gguf(), "smollm2").tokenizer()
    assert tok("Hello")["input_ids"] == both[0]("Hello")["input_ids"]


def _pairs(text: str) -> str:
    """The same tokenizer JSON with its merges as ["a", "b"] pairs (the earlier cache format)."""
    import json
    data = json.loads(text)
    data["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    return json.dumps(data, ensure_ascii=False)


def test_cached_merges_are_compact_strings_read_into_the_same_model(both):
    import json

    from tokenizers import Tokenizer

    from knapspec.storage import cache_dir
    from knapspec.tokenizer import compact_merges
    [cached] = (cache_dir() / "tokenizers").glob(embedded_gguf().stem + "-*/tokenizer.json")
    merges = json.loads(cached.read_text(encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    pairs = _pairs(both[0]._tok.to_str())
    compact = compact_merges(pairs)
    assert compact != pairs and json.loads(compact)["model"]["merges"] == merges
    a, b = Tokenizer.from_str(compact), Tokenizer.from_str(pairs)
    for t in TEXTS:
        assert a.encode(t).ids == b.encode(t).ids, t
    assert a.get_vocab() == b.get_vocab()


def test_merges_with_a_space_in_a_piece_stay_pairs():
    import json

    from knapspec.tokenizer import compact_merges
    text = json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b c": 1, "ab c": 2},
                                 "merges": [["a", "b c"]]}})
    assert compact_merges(text) == text
    plain = json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}})
    assert json.loads(compact_merges(plain))["model"]["merges"] == ["a b"]


def test_a_cache_folder_of_the_earlier_format_is_compacted_in_place(both, tmp_path, monkeypatch):
    """A folder written before merges were compacted: loading rewrites it (no transformers) and
    reads the same ids; the next load reads the compact file as it is."""
    import builtins
    import json

    from knapspec import tokenizer as tk
    ours = both[0]
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    folder = tmp_path / "tokenizers" / "model-0123"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(_pairs(ours._tok.to_str()), encoding="utf-8")
    meta = {k: getattr(ours, k) for k in tk._SPECIAL}
    meta["chat_template"] = ours.chat_template
    (folder / "meta.json").write_text(json.dumps(meta))
    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name.startswith("transformers"):
            raise AssertionError("transformers imported to compact a cached tokenizer")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    tok = tk.gguf_tokenizer(tmp_path / "model.gguf", "0123")
    assert json.loads((folder / "meta.json").read_text())["format"] == tk._FORMAT
    assert all(isinstance(m, str) for m in json.loads((folder / "tokenizer.json").read_text())["model"]["merges"])
    for t in TEXTS:
        assert tok(t)["input_ids"] == ours(t)["input_ids"], t
    assert not list(folder.glob(".*.tmp"))
    compact = (folder / "tokenizer.json").read_bytes()
    assert tk.gguf_tokenizer(tmp_path / "model.gguf", "0123")("Hi")["input_ids"] == ours("Hi")["input_ids"]
    assert (folder / "tokenizer.json").read_bytes() == compact            # the next load reads it as it is


def test_a_cache_folder_that_cannot_be_written_or_is_newer_is_read_as_it_is(both, tmp_path, monkeypatch):
    import json

    from knapspec import tokenizer as tk
    ours = both[0]
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    meta = {k: getattr(ours, k) for k in tk._SPECIAL}
    pairs = _pairs(ours._tok.to_str())
    for name, fmt in (("old-0", None), ("newer-0", tk._FORMAT + 1)):
        folder = tmp_path / "tokenizers" / name
        folder.mkdir(parents=True)
        (folder / "tokenizer.json").write_text(pairs, encoding="utf-8")
        (folder / "meta.json").write_text(json.dumps(meta if fmt is None else dict(meta, format=fmt)))

    def refuse(*a, **k):
        raise PermissionError("read-only")
    monkeypatch.setattr(tk, "write_text_atomic", refuse)
    for name in ("old", "newer"):
        tok = tk.gguf_tokenizer(tmp_path / f"{name}.gguf", "0")
        for t in TEXTS:
            assert tok(t)["input_ids"] == ours(t)["input_ids"], (name, t)
        assert (tmp_path / "tokenizers" / f"{name}-0" / "tokenizer.json").read_text(encoding="utf-8") == pairs
    monkeypatch.undo()
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    tk.gguf_tokenizer(tmp_path / "newer.gguf", "0")                     # writable, but newer: untouched
    assert (tmp_path / "tokenizers" / "newer-0" / "tokenizer.json").read_text(encoding="utf-8") == pairs


def test_added_tokens_outside_the_vocabulary_keep_their_ids(tmp_path):
    from tokenizers import Tokenizer, models

    from knapspec.tokenizer import read_tokenizer
    t = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "c": 3}, [("a", "b")]))
    t.add_special_tokens(["<x>"])                                    # id 4, beyond the BPE vocabulary
    (tmp_path / "t.json").write_text(t.to_str())
    got = read_tokenizer(tmp_path / "t.json")
    assert got.encode("ab<x>c").ids == t.encode("ab<x>c").ids == [2, 4, 3]


def test_reading_the_bpe_model_apart_gives_the_library_s_own_tokenizer(both, tmp_path):
    """``read_tokenizer`` hands a BPE model's vocabulary and merges to ``models.BPE`` and the rest
    to the library's reader: the same ids, text, vocabulary and added tokens as the library reading
    the whole file; a model of another kind is read whole."""
    import json

    from tokenizers import Tokenizer, models

    from knapspec.storage import cache_dir
    from knapspec.tokenizer import read_tokenizer
    [path] = (cache_dir() / "tokenizers").glob(embedded_gguf().stem + "-*/tokenizer.json")
    ours, whole = read_tokenizer(path), Tokenizer.from_file(str(path))
    for t in TEXTS + [json.dumps(CHATS)]:
        assert ours.encode(t).ids == whole.encode(t).ids, t
        assert ours.decode(whole.encode(t).ids, skip_special_tokens=False) == whole.decode(
            whole.encode(t).ids, skip_special_tokens=False)
    assert ours.get_vocab(with_added_tokens=True) == whole.get_vocab(with_added_tokens=True)
    assert ours.get_added_tokens_decoder() == whole.get_added_tokens_decoder()
    assert json.loads(ours.to_str())["model"] == json.loads(whole.to_str())["model"]
    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    (tmp_path / "w.json").write_text(word.to_str())
    assert read_tokenizer(tmp_path / "w.json").encode("a").ids == [0]
