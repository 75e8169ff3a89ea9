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
