"""knapspec serve: live servers on free loopback ports, driven by the openai client (and raw HTTP
where a client would refuse to send the request).

Most tests run a tiny random model with a word-level tokenizer and a chat template (built here);
one runs the embedded SmolLM2 against ``knapspec generate --chat``. Every cache write goes to a
temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import knapspec
from conftest import WORDS, save_tiny
from knapspec.server.app import Server, bind, config, create_app
from knapspec.server.text import StopText
from knapspec.strategies import AUTOREGRESSIVE, Strategy

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}the model :{% endif %}")


# ---- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder of this module's own, whose converted checkpoints are the session's (they are
    named by the file's fingerprint; converting the embedded file again costs ~13 s)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("serve-cache")
        models = Path(os.environ["KNAPSPEC_CACHE"]) / "models"
        models.mkdir(parents=True, exist_ok=True)
        (root / "models").symlink_to(models, target_is_directory=True)
        mp.setenv("KNAPSPEC_CACHE", str(root))
        yield root


def save_tiny_chat(folder: Path) -> Path:
    """A tiny llama whose word-level tokenizer covers all 128 ids (so every token has text) and
    has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    save_tiny("llama", folder, seed=3, max_position_embeddings=256)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + list("abcdefghijklmnopqrstuvwxyz.,:;!?0123456789"):
        vocab.setdefault(w, len(vocab))
    while len(vocab) < 128:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_chat(tmp_path_factory.mktemp("tiny-chat") / "tiny")


@pytest.fixture(scope="module")
def tiny(cache, tiny_folder):
    return knapspec.load(str(tiny_folder), dtype="float32", pack=False)


class Live:
    """A server on a free loopback port, run by uvicorn in a thread."""

    def __init__(self, llm, **options) -> None:
        self.app = create_app(llm, **options)
        self.state = self.app.state.server
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(config(self.app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 20, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not stop"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=120, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                assert s.labels.get("model_name") == self.state.name, s
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
        return out


@pytest.fixture(scope="module")
def server(tiny):
    """The tiny model behind the default strategy (the hybrid)."""
    with Live(tiny) as srv:
        yield srv


def test_the_server_learns_the_strategys_verdict_before_serving(tiny_folder, tmp_path, monkeypatch):
    """Like ``knapspec generate``, the server's warm-up runs the strategy's one-off preparation
    (``LLM.prepare``): with nothing remembered on this machine, the hybrid learns its verdict on
    layer-skip drafts before the first request instead of in it."""
    monkeypatch.setenv("KNAPSPEC_CACHE", str(tmp_path))
    llm = knapspec.load(str(tiny_folder), dtype="float32", pack=False)
    state = create_app(llm).state.server
    strat = state.worker.make_strategy()
    assert strat.name == "hybrid" and not strat.memory.buckets()
    state.warm_up()
    assert state.worker.make_strategy() is strat and strat.memory.buckets()    # a verdict (bound or DP)


class SlowAR(Strategy):
    """Autoregressive decoding whose rounds take ``delay`` seconds more: time to act mid-stream."""

    name = "slow-ar"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def propose(self, state):
        time.sleep(self.delay)
        return AUTOREGRESSIVE


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _extra(obj) -> dict:
    return obj.model_extra or {}


def _stream_chat(client, **kw) -> tuple[str, list, object]:
    """(text, finish reasons, the usage chunk) of a streamed chat completion."""
    text, finishes, usage_chunk = "", [], None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.choices:
            assert ch.usage is None
            text += ch.choices[0].delta.content or ""
            if ch.choices[0].finish_reason:
                finishes.append(ch.choices[0].finish_reason)
        else:
            assert usage_chunk is None, "one usage chunk"
            usage_chunk = ch
    assert usage_chunk is not None, "include_usage: a usage chunk before [DONE]"
    return text, finishes, usage_chunk


def _expected(llm, messages, n, **kw):
    res = llm.generate(llm.encode_chat(messages), max_new_tokens=n, **kw)
    return res


# ---- the text that is sent: stop strings ------------------------------------------------------------------
def _bytes_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab é€😀", max_size=30),
       stops=st.lists(st.text(alphabet="ab é€😀", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(1, 5), max_size=40))
def test_stop_text_cuts_at_the_first_completed_stop_string(text, stops, cuts):
    """Tokens are bytes here, so characters span tokens; the released text is the text up to the
    stop string completed first (never any of it), whatever the rounds' sizes."""
    data = list(text.encode())
    m = next((k for k in range(1, len(data) + 1) if any(s in _bytes_decode(data[:k]) for s in stops)), None)
    if m is None:
        want = text
    else:
        done = _bytes_decode(data[:m])
        want = done[:min(done.find(s) for s in stops if s in done)]
    s = StopText(_bytes_decode, tuple(stops))
    out, pos, used = "", 0, 0
    for c in cuts + [len(data)]:
        piece, n = s.feed(data[pos:pos + c])
        assert want.startswith(out + piece), "released text is final"
        out, used, pos = out + piece, used + n, pos + c
        if pos >= len(data):
            break
    out += s.finish()
    assert out == want
    assert s.stopped == (m is not None)
    assert used == (m if m is not None else len(data))


def test_stop_text_rejects_an_empty_stop_string():
    with pytest.raises(ValueError, match="empty"):
        StopText(_bytes_decode, ("",))


# ---- the embedded model: the same text as knapspec generate --chat -----------------------------------------
@pytest.mark.slow
def test_chat_equals_knapspec_generate_chat(cache, capsys):
    """Greedy chat completions, streamed and not, return exactly `knapspec generate --chat` (same
    prompt, same strategy: prompt lookup, which needs no latency profile), with right usage; a
    prediction equal to that output gives the same text and is mostly accepted."""
    from knapspec.cli import main
    prompt, n = "Name three primary colours and say why they are called primary.", 40
    opts = ["--dtype", "float32", "--kernels", "onednn", "--strategy", "lookup"]
    capsys.readouterr()
    assert main(["generate", "--chat", "--json", "--max-new-tokens", str(n), "--prompt", prompt, *opts]) == 0
    cli = json.loads(capsys.readouterr().out)
    llm = knapspec.load(dtype="float32", kernels="onednn")
    n_prompt = len(llm.encode(prompt, chat=True))
    with Live(llm, strategy="lookup") as srv:
        c = srv.client()
        r = c.chat.completions.create(model="smollm2-135m", messages=_chat(prompt), max_tokens=n, temperature=0)
        assert r.choices[0].message.content == cli["text"]
        assert r.choices[0].finish_reason == ("length" if len(cli["tokens"]) == n else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(cli["tokens"]))
        assert r.usage.total_tokens == n_prompt + len(cli["tokens"])
        sd = _extra(r)["metrics"]["speculative_decoding"]
        assert _extra(r)["metrics"]["strategy"] == "lookup"
        assert sd["num_draft_tokens"] == cli["stats"]["drafted"]
        assert sd["num_accepted_tokens"] == cli["stats"]["accepted"]

        text, finishes, u = _stream_chat(c, model="smollm2-135m", messages=_chat(prompt), max_tokens=n,
                                         temperature=0)
        assert text == cli["text"] and finishes == [r.choices[0].finish_reason]
        assert (u.usage.prompt_tokens, u.usage.completion_tokens) == (n_prompt, len(cli["tokens"]))

        p = c.chat.completions.create(model="smollm2-135m", messages=_chat(prompt), max_tokens=n, temperature=0,
                                      prediction={"type": "content", "content": cli["text"]})
        assert p.choices[0].message.content == cli["text"]
        det = p.usage.completion_tokens_details
        assert det.accepted_prediction_tokens >= 0.8 * len(cli["tokens"]), det
        assert det.rejected_prediction_tokens <= 0.1 * len(cli["tokens"]), det
        assert _extra(p)["metrics"]["speculative_decoding"]["num_drafts"] <= len(cli["tokens"]) // 3


# ---- the tiny model: shapes, stop strings, seeds ------------------------------------------------------------
def test_chat_and_text_completions_match_the_engine(tiny, server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    for text in ["the model of a draft", "report on the cache layer"]:
        msgs = _chat(text)
        want = _expected(tiny, msgs, 30)
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == ("length" if want.stats.stopped == "length" else "stop")
        assert r.usage.completion_tokens == len(want.tokens)
        assert r.usage.prompt_tokens == len(tiny.encode_chat(msgs))
        assert _extra(r)["metrics"]["strategy"] == "hybrid"
        text_s, finishes, _ = _stream_chat(c, model="tiny", messages=msgs, max_tokens=30, temperature=0)
        assert text_s == want.text and finishes == [r.choices[0].finish_reason]
        # multi-turn: the template renders the whole conversation
        conv = [{"role": "system", "content": "a report"}, *msgs, {"role": "assistant", "content": "the"},
                {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "text", "text": " the"}]}]
        r2 = c.chat.completions.create(model="tiny", messages=conv, max_tokens=8, temperature=0)
        assert r2.choices[0].message.content == _expected(tiny, [*conv[:3], {"role": "user", "content": "and the"}],
                                                          8).text
    ids = tiny.encode("the model of a draft")
    want = tiny.generate(ids, max_new_tokens=20)
    t = c.completions.create(model="tiny", prompt="the model of a draft", max_tokens=20, temperature=0)
    assert t.object == "text_completion" and t.choices[0].text == want.text
    assert (t.usage.prompt_tokens, t.usage.completion_tokens) == (len(ids), len(want.tokens))
    t2 = c.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)     # token ids
    assert t2.choices[0].text == want.text
    t3 = c.completions.create(model="tiny", prompt="the model of a draft", temperature=0)
    assert t3.usage.completion_tokens <= 16                                                # OpenAI's default
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="the model of a draft",
                                                                max_tokens=20, temperature=0, stream=True)]
    assert "".join(pieces) == want.text


def _stop_case(tiny, msgs, n):
    """Expected output, and a stop string across a token boundary in its middle."""
    want = _expected(tiny, msgs, n)
    words = want.text.split(" ")
    assert len(words) >= 12, want.text
    k = len(words) // 2
    stop = words[k][-1] + " " + words[k + 1][:2]                 # the end of one token, the start of the next
    cut = want.text.index(stop)
    used = next(m for m in range(1, len(want.tokens) + 1) if stop in tiny.decode(want.tokens[:m]))
    return want, stop, cut, used


def test_stop_strings_cut_the_text_across_token_boundaries(tiny, server):
    c = server.client()
    msgs = _chat("a cache of the draft plan")
    want, stop, cut, used = _stop_case(tiny, msgs, 40)
    for stops in (stop, [stop], ["zzz", stop]):
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, stop=stops)
        assert r.choices[0].message.content == want.text[:cut]
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == used
        text, finishes, u = _stream_chat(c, model="tiny", messages=msgs, max_tokens=40, temperature=0, stop=stops)
        assert text == want.text[:cut] and finishes == ["stop"] and u.usage.completion_tokens == used
    # the earliest of two: a stop string completed first wins
    first = want.text[cut - 3:cut - 1]
    if first not in want.text[:cut - 3]:
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, stop=[stop, first])
        assert r.choices[0].message.content == want.text[:cut - 3]
    t = c.completions.create(model="tiny", prompt="a cache of the draft plan", max_tokens=40, temperature=0,
                             stop="zzz")
    assert t.choices[0].finish_reason in ("length", "stop") and "zzz" not in t.choices[0].text


def test_seeded_sampling_repeats(tiny, server):
    """A sampled request with a seed gives the same text every time. The hybrid's drafts follow
    measured times, so such a request is drafted by prompt lookup, whose drafts follow the tokens:
    the text is then the engine's own output for that seed."""
    c = server.client()
    msgs = _chat("the token of the layer")
    kw = dict(model="tiny", messages=msgs, max_tokens=30, temperature=0.9, top_p=0.95)
    a = c.chat.completions.create(seed=7, **kw)
    b = c.chat.completions.create(seed=7, **kw)
    text_s, _, u = _stream_chat(c, seed=7, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content == text_s
    assert _extra(a)["metrics"]["strategy"] == "lookup"
    want = tiny.generate(tiny.encode_chat(msgs), strategy="lookup", max_new_tokens=30, temperature=0.9,
                         top_p=0.95, seed=7)
    assert a.choices[0].message.content == want.text
    others = {c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (8, 9, 10)}
    assert len(others | {want.text}) > 1, "different seeds, different samples"


def test_prediction_is_a_draft_source(tiny, server):
    c = server.client()
    msgs = _chat("the plan of the model")
    want = _expected(tiny, msgs, 40)
    kw = dict(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    good = c.chat.completions.create(prediction={"type": "content", "content": want.text}, **kw)
    assert good.choices[0].message.content == want.text
    d = good.usage.completion_tokens_details
    assert d.accepted_prediction_tokens >= 0.7 * len(want.tokens) and d.rejected_prediction_tokens <= 3, d
    bad_text = " ".join(reversed(want.text.split(" ")))
    text, _, u = _stream_chat(c, prediction={"type": "content", "content": [{"type": "text", "text": bad_text}]}, **kw)
    assert text == want.text                                      # a wrong prediction changes no token
    none = c.chat.completions.create(**kw).usage.completion_tokens_details
    assert none.accepted_prediction_tokens == none.rejected_prediction_tokens == 0


# ---- errors ----------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "the model"}]
BAD_REQUESTS = [   # (path, body, status, param, code)
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 2.5}, 400, "temperature", None),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 1.5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": True}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p", None),
    ("/v1/chat/completions", {"messages": MSG, "seed": 2 ** 70}, 400, "seed", None),
    ("/v1/chat/completions", {"messages": MSG, "stop": 5}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": MSG, "stop": [""]}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": MSG, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0]", None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ("/v1/chat/completions", {"messages": MSG, "n": 2}, 400, "n", None),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", None),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {"messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ("/v1/chat/completions", {"messages": MSG, "prediction": {"type": "file", "content": "x"}}, 400,
     "prediction.type", None),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 10 ** 30}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the " * 300}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": MSG, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "the", "echo": True}, 400, "echo", None),
    ("/v1/completions", {"prompt": "the", "best_of": 3}, 400, "best_of", None),
    ("/v1/completions", {"prompt": "the", "suffix": "end"}, 400, "suffix", None),
    ("/v1/completions", {"prompt": "the", "logprobs": 2}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": ["the", "a"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [5, 999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "the", "max_tokens": 300}, 400, "prompt", "context_length_exceeded"),
    ("/v1/nothing", {}, 404, None, None),
]


def _error_body(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_every_bad_request_gets_its_status_and_openai_error_body(server):
    ok = {"model": "tiny", "messages": MSG, "max_tokens": 3, "temperature": 0}
    for path, body, status, param, code in BAD_REQUESTS:
        r = server.post(path, body)
        assert r.status_code == status, (path, body, r.text)
        err = _error_body(r)
        assert err["param"] == param and err["code"] == code, (body, err)
        assert err["type"] == "invalid_request_error"
        assert server.post("/v1/chat/completions", ok).status_code == 200      # and the server keeps serving
    r = server.post("/v1/chat/completions", {"messages": MSG, "max_tokens": 10 ** 30})
    n_prompt = len(server.state.llm.encode_chat(MSG))
    assert "256" in r.json()["error"]["message"] and str(n_prompt + 10 ** 30) in r.json()["error"]["message"]
    r = httpx.delete(server.url + "/v1/models")
    assert r.status_code == 405 and _error_body(r)
    # the client raises its own exception types for these statuses
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=MSG, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=MSG)


def test_api_key(tiny):
    with Live(tiny, api_key="s3cret", strategy="autoregressive") as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            srv.client(api_key="wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = srv.post("/v1/chat/completions", {"messages": MSG})            # no Authorization header
        assert r.status_code == 401 and _error_body(r)["type"] == "invalid_request_error"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert srv.client(api_key="s3cret").chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices
        assert httpx.get(srv.url + "/health").status_code == 200          # health and metrics stay open
        assert httpx.get(srv.url + "/metrics").status_code == 200


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.sampled_from([0, 1, -1, 10 ** 300, 2 ** 64])
    | st.floats(allow_nan=False) | st.text(max_size=12) | st.sampled_from(["", "\u202e\u0000", "😀" * 3, "ｔｈｅ"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "n", "prediction", "logprobs", "tools", "echo", "user"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | JSONISH,
                                 "content": st.text(max_size=20) | JSONISH})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=6),
       messages=st.none() | st.lists(MESSAGE, max_size=3),
       raw=st.none() | st.binary(max_size=40) | st.sampled_from([b"{", b'{"messages": [', b"[" * 5000 + b"]" * 5000,
                                                               b'{"max_tokens": 1' + b"0" * 5000 + b"}", b"NaN",
                                                               b'{"temperature": NaN, "messages": []}']))
def test_fuzz_malformed_requests_get_400_and_the_server_keeps_serving(server, path, body, messages, raw):
    if messages is not None:
        body["messages"] = messages
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and 0 < body[k] < 10 ** 6:
            body[k] = min(body[k], 8)                            # a valid request stays short
    r = server.post(path, raw if raw is not None else json.dumps(body))
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        _error_body(r)
    ok = server.post("/v1/completions", {"prompt": "the", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


# ---- concurrency, cancellation, the queue, metrics -------------------------------------------------------
def test_concurrent_streams_get_their_sequential_outputs_and_metrics_add_up(tiny):
    prompts = [f"{w} of the {v} model" for w, v in zip(WORDS[:8], WORDS[8:16])]
    want = [_expected(tiny, _chat(p), 24).text for p in prompts]
    results: list = [None] * len(prompts)
    with Live(tiny) as srv:
        c = srv.client()
        barrier = threading.Barrier(len(prompts))

        def one(i):
            barrier.wait()
            results[i] = _stream_chat(c, model="tiny", messages=_chat(prompts[i]), max_tokens=24, temperature=0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r[0] for r in results] == want              # nothing lost, duplicated or interleaved
        m = srv.metrics()
        usage = [r[2].usage for r in results]
        spec = [_extra(r[2])["metrics"]["speculative_decoding"] for r in results]
        assert m[("knapspec:generation_tokens_total", ())] == sum(u.completion_tokens for u in usage)
        assert m[("knapspec:prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usage)
        done = sum(m[("knapspec:request_success_total", (("finished_reason", f),))] for f in ("stop", "length"))
        assert done == len(prompts)
        assert m[("knapspec:request_success_total", (("finished_reason", "abort"),))] == 0
        for name, key in (("drafts", "num_drafts"), ("draft_tokens", "num_draft_tokens"),
                          ("accepted_tokens", "num_accepted_tokens")):
            assert m[(f"knapspec:spec_decode_num_{name}_total", ())] == sum(s[key] for s in spec)
        per_pos = sum(v for (n, _), v in m.items() if n == "knapspec:spec_decode_num_accepted_tokens_per_pos_total")
        assert per_pos == sum(s["num_accepted_tokens"] for s in spec)
        for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
            assert m[(f"knapspec:{h}_count", ())] == len(prompts)
        assert m[("knapspec:num_requests_running", ())] == m[("knapspec:num_requests_waiting", ())] == 0
        assert m[("knapspec:request_queue_time_seconds_sum", ())] > 0     # they did wait for each other


def _read_sse(lines, n: int) -> list[dict]:
    """The next ``n`` events of a stream (``lines``: its ``iter_lines()``, kept open: abandoning
    that iterator closes the connection)."""
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
            if len(out) >= n:
                break
    return out


def test_a_client_gone_mid_stream_frees_the_engine(tiny):
    delay = 0.05                                               # 240 rounds: 12 s if nobody stopped it
    with Live(tiny, strategy=SlowAR(delay)) as srv:
        body = {"prompt": "the model", "max_tokens": 240, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            got = _read_sse(resp.iter_lines(), 3)
        assert len(got) == 3
        t0 = time.monotonic()
        r = srv.client().completions.create(model="tiny", prompt="the model", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert time.monotonic() - t0 < 4.0, "the next request waited for the abandoned one"
        m = srv.metrics()
        assert m[("knapspec:request_success_total", (("finished_reason", "abort"),))] == 1
        # the abandoned generation stopped within a round or two of the client going away
        assert m[("knapspec:generation_tokens_total", ())] <= 3 + 3 + 4


def test_queue_full_is_429_and_gauges_count_running_and_waiting(tiny):
    with Live(tiny, strategy=SlowAR(0.03), max_queue=1) as srv:
        c = srv.client()
        out: dict = {}

        def run(i):
            out[i] = c.completions.create(model="tiny", prompt="the model", max_tokens=30, temperature=0)

        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        while srv.state.worker.counts != (1, 1):
            assert time.monotonic() - t0 < 10, srv.state.worker.counts
            time.sleep(0.01)
        m = srv.metrics()
        assert (m[("knapspec:num_requests_running", ())], m[("knapspec:num_requests_waiting", ())]) == (1, 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="the model", max_tokens=30, temperature=0)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        for t in ts:
            t.join(60)
        assert all(out[i].usage.completion_tokens == 30 for i in range(2))
        assert c.completions.create(model="tiny", prompt="the model", max_tokens=2, temperature=0).choices


def test_shutdown_finishes_the_running_stream_and_refuses_the_queued(tiny):
    srv = Live(tiny, strategy=SlowAR(0.02), max_queue=4).__enter__()
    try:
        body = {"prompt": "the model", "max_tokens": 60, "temperature": 0, "stream": True}
        queued: dict = {}

        def second():
            queued["r"] = srv.post("/v1/completions", {"prompt": "the", "max_tokens": 5})

        with httpx.Client(timeout=60) as h, h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = _read_sse(lines, 1)
            t = threading.Thread(target=second)
            t.start()
            t0 = time.monotonic()
            while srv.state.worker.counts != (1, 1):
                assert time.monotonic() - t0 < 10
                time.sleep(0.01)
            srv.server.handle_exit(signal.SIGTERM, None)          # what SIGTERM does
            rest = [ln for ln in lines if ln.startswith("data: ")]
        t.join(30)
        assert rest[-1] == "data: [DONE]"
        chunks = first + [json.loads(ln[6:]) for ln in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert queued["r"].status_code == 503 and _error_body(queued["r"])["code"] == "service_unavailable"
        srv.thread.join(30)
        assert not srv.thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.server.should_exit = True
        srv.thread.join(30)


# ---- the command -------------------------------------------------------------------------------------
def test_knapspec_serve_command_and_sigterm(tiny_folder, cache, tmp_path):
    """`knapspec serve` in its own process: the stream running at SIGTERM ends cleanly, then the
    process exits 0; bad options are one line and exit 2."""
    cmd = [sys.executable, "-m", "knapspec.cli", "serve", "--model", str(tiny_folder), "--kernels", "plain",
           "--dtype", "float32", "--strategy", "autoregressive", "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1] and len(lines) < 50, lines
        line = lines[-1]
        assert "serving tiny at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split("/v1")[0]
        body = {"prompt": "the model", "max_tokens": 240, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = _read_sse(lines, 1)
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert first and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    busy = bind("127.0.0.1", 0)
    port = busy.getsockname()[1]
    for args, msg in ((["--port", str(port)], "cannot listen"), (["--strategy", "nope"], "unknown strategy"),
                      (["--port", "70000"], "--port")):
        r = subprocess.run([*cmd[:-2], *args], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    busy.close()


# ---- the load generator -----------------------------------------------------------------------------
def test_bench_serve_measures_streams_as_vllm_does(tiny):
    from knapspec.server import bench as sb
    prompts = ["the model of a draft", "a cache layer", "the report"]
    want = [_expected(tiny, _chat(p), 6) for p in prompts]
    with Live(tiny, strategy=SlowAR(0.01)) as srv:
        results, dur = sb.run_load(srv.url, prompts, concurrency=2, max_tokens=6)
        bad, _ = sb.run_load(srv.url, prompts[:1], concurrency=1, max_tokens=6, model="other")
    assert [r.text for r in results] == [w.text for w in want]
    assert [r.output_tokens for r in results] == [len(w.tokens) for w in want]
    assert all(r.usage_reported and 0 < r.ttft < r.latency for r in results)
    row = sb.summarize(results, dur, 2)
    assert (row["completed"], row["failed"], row["max_concurrency"]) == (3, 0, 2)
    assert row["total_output_tokens"] == sum(len(w.tokens) for w in want)
    assert row["output_throughput"] == pytest.approx(row["total_output_tokens"] / dur)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    assert row["mean_tpot_ms"] == pytest.approx(1000 * sum(tpot) / len(tpot))
    assert row["median_itl_ms"] >= 10                        # rounds take at least the strategy's 10 ms
    assert row["p99_e2el_ms"] >= row["median_e2el_ms"] >= row["median_ttft_ms"]
    assert not bad[0].ok and "404" in bad[0].error
    assert "| knapspec x | 2 | 3 |" in sb.markdown([{**row, "backend": "knapspec x"}])

    class P:
        def __init__(self, c, i):
            self.category, self.i = c, i
    picked = sb.pick_prompts([P("a", 0), P("a", 1), P("b", 2), P("c", 3), P("b", 4)], 4)
    assert [p.i for p in picked] == [0, 2, 3, 1]
