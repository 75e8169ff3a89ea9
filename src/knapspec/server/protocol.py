"""OpenAI's request and response shapes: parse and check a request, build the answers.

Requests are checked with pydantic (strict types: ``"5"`` is not a number, ``true`` is not 1) and
every problem becomes :class:`APIError`, which the app turns into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``. Fields of OpenAI's API that the server does not
implement are refused by name when set to anything but their neutral value (``n: 2``, ``tools``,
``logprobs: true`` ...); fields it does not know are ignored, as vLLM does.

The extension field ``metrics`` of a response (and of the usage chunk of a stream) carries the
strategy that decoded the request and its round statistics, shaped like vLLM's per-request
``speculative_decoding`` metrics.

This module knows nothing about models, tokens or threads.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests -------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class TextPart(_Model):
    type: str
    text: str | None = None


class Message(_Model):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool | None = None


class Prediction(_Model):
    type: Literal["content"]
    content: str | list[TextPart]


_SEED_RANGE = dict(ge=-(2 ** 63), lt=2 ** 64)


class _Common(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)             # vLLM's extension: -1 or 0 = off
    seed: int | None = Field(None, **_SEED_RANGE)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    prediction: Prediction | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = None


# (field, is it set to something not supported?) in the order they are checked
_UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("n", lambda v: v not in (None, 1)),
    ("best_of", lambda v: v not in (None, 1)),
    ("echo", lambda v: bool(v)),
    ("suffix", lambda v: v not in (None, "")),
    ("logprobs", lambda v: v not in (None, False)),
    ("top_logprobs", lambda v: v not in (None, 0)),
    ("tools", lambda v: bool(v)),
    ("tool_choice", lambda v: v not in (None, "none")),
    ("functions", lambda v: bool(v)),
    ("function_call", lambda v: v not in (None, "none")),
    ("response_format", lambda v: v is not None and v.get("type") != "text"),
    ("audio", lambda v: v is not None),
    ("modalities", lambda v: v is not None and list(v) != ["text"]),
    ("logit_bias", lambda v: bool(v)),
    ("presence_penalty", lambda v: v not in (None, 0)),
    ("frequency_penalty", lambda v: v not in (None, 0)),
)


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content")`` -> ``messages[0].content``; pydantic's union-member tags
    (``str``, ``list[int]``, class names) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.islower() and part.replace("_", "").isalnum() and part not in (
                "str", "int", "float", "bool", "list", "dict", "none"):
            out += f".{part}" if out else part
    return out or None


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:      # malformed JSON, bad UTF-8, digits beyond limits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:                                            # JSON's \ud800 escapes decode to lone surrogates
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                       "not valid Unicode text") from None
    return body


def validate(cls: type[_Model], body: dict[str, Any]) -> Any:
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        param = _param(errs[0]["loc"]) if errs else None
        msgs = list(dict.fromkeys(er["msg"] for er in errs if _param(er["loc"]) == param))
        raise APIError(400, f"invalid value for '{param}': {'; '.join(msgs)}" if param else
                       "; ".join(msgs), param=param) from None
    for name, bad in _UNSUPPORTED:
        if name in type(req).model_fields and bad(getattr(req, name)):
            raise APIError(400, f"'{name}' is not supported by this server "
                           f"(got {json.dumps(getattr(req, name), default=str)[:80]})", param=name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if isinstance(req.stop, list):
        if len(req.stop) > 16:
            raise APIError(400, f"at most 16 stop strings, got {len(req.stop)}", param="stop")
    if any(not s for s in stops(req)):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return req


def stops(req: _Common) -> tuple[str, ...]:
    return () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: text only, ``developer`` read as ``system``."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            hint = " (tools are not supported)" if m.role in ("tool", "function") else ""
            raise APIError(400, f"unknown role {m.role!r}: choose one of {', '.join(_ROLES)}{hint}",
                           param=f"messages[{i}].role")
        if (m.model_extra or {}).get("tool_calls"):
            raise APIError(400, "tool calls are not supported", param=f"messages[{i}].tool_calls")
        out.append({"role": _ROLES[m.role], "content": _text(m.content, f"messages[{i}].content",
                                                              allow_none=m.role == "assistant")})
    return out


def prediction_text(req: ChatRequest) -> str | None:
    if req.prediction is None:
        return None
    return _text(req.prediction.content, "prediction.content")


def _text(content: str | list[TextPart] | None, param: str, *, allow_none: bool = False) -> str:
    if content is None:
        if allow_none:
            return ""
        raise APIError(400, f"'{param}' is required", param=param)
    if isinstance(content, str):
        return content
    parts = []
    for j, p in enumerate(content):
        if p.type != "text" or p.text is None:
            raise APIError(400, f"only text content is supported, got a part of type {p.type!r}",
                           param=f"{param}[{j}]")
        parts.append(p.text)
    return "".join(parts)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """One prompt: text or token ids (a list of one is unwrapped)."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(p)}", param="prompt")
        p = p[0]
    if not p:
        raise APIError(400, "the prompt is empty", param="prompt")
    return p


def context_error(n_prompt: int, max_tokens: int | None, context: int, what: str) -> APIError:
    if max_tokens is None:
        msg = (f"This model's maximum context length is {context} tokens. However, your {what} resulted in "
               f"{n_prompt} tokens, which leaves no room for the completion. Please reduce the length of the "
               f"{what}.")
    else:
        msg = (f"This model's maximum context length is {context} tokens. However, you requested "
               f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion). "
               f"Please reduce the length of the {what} or completion.")
    return APIError(400, msg, param="messages" if what == "messages" else "prompt", code="context_length_exceeded")


# ---- responses ------------------------------------------------------------------------------------
@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens_details": {"accepted_prediction_tokens": self.accepted_prediction_tokens,
                                              "rejected_prediction_tokens": self.rejected_prediction_tokens}}


def spec_metrics(strategy: str, drafts: int, draft_tokens: int, accepted: int) -> dict[str, Any]:
    """The extension field: vLLM's definitions (mean acceptance length = 1 + accepted per draft,
    counting the token every round adds); ``null`` where no round drafted."""
    return {"strategy": strategy, "speculative_decoding": {
        "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "draft_acceptance_rate": accepted / draft_tokens if draft_tokens else None}}


class Shapes:
    """The JSON objects of one request's answer, chat or text completion."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish: str, usage: Usage, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage.as_dict(), "metrics": metrics}

    def chunk(self, text: str | None, finish: str | None = None, *, role: bool = False,
              with_usage: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage.as_dict(), "metrics": metrics}
