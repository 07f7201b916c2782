"""What ``/v1/chat/completions`` and ``/v1/completions`` accept, checked before anything is queued.

OpenAI's parameters that loraq honours (``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``, ``stream_options``); those
it accepts only at their neutral value (``n`` 1, penalties 0, no ``logprobs``); any
other key is an error.
"""

from __future__ import annotations

from typing import Any

from ..escape import excerpt
from .errors import ApiError, bad_request

DEFAULT_MAX_TOKENS = 256
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
             "stream_options", "n", "seed", "user", "frequency_penalty", "presence_penalty", "logprobs", "store",
             "metadata"}
COMPLETION_KEYS = (CHAT_KEYS - {"messages", "max_completion_tokens", "store", "metadata"}) | {"prompt", "echo", "suffix"}
ROLES = ("system", "developer", "user", "assistant")


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"{key} must be a number from {low:g} to {high:g} (got {excerpt(value)})", key,
                          "invalid_value")
    return float(value)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request(f"{where} must be a string or a list of text parts", where, "invalid_type")


def options(body: dict[str, Any], chat: bool, most_tokens: int) -> dict[str, Any]:
    options: dict[str, Any] = {"messages": None, "prompt": None}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list", "messages", "invalid_type")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise bad_request(f"messages[{i}] must be an object with a role ({', '.join(ROLES)}) and content",
                                  f"messages[{i}].role", "invalid_value")
            role = "system" if message["role"] == "developer" else message["role"]
            clean.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content")})
        options["messages"] = clean
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (one prompt per request)", "prompt", "invalid_type")
        if body.get("echo") not in (None, False) or body.get("suffix") is not None:
            raise bad_request("echo and suffix are not offered", "echo", "unsupported")
        options["prompt"] = prompt
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is None:
        tokens = min(DEFAULT_MAX_TOKENS, most_tokens)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= most_tokens:
        raise bad_request(f"max_tokens must be an integer from 1 to {most_tokens}", "max_tokens", "invalid_value")
    options["max_tokens"] = tokens
    options["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
    options["top_p"] = _number(body, "top_p", 1.0, 0.0, 1.0)
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(f"{key} is not offered (only 0)", key, "unsupported")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: one choice per request", "n", "unsupported")
    if body.get("logprobs") not in (None, False):
        raise bad_request("logprobs are not offered", "logprobs", "unsupported")
    if body.get("stream") not in (None, True, False):
        raise bad_request("stream must be true or false", "stream", "invalid_type")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("stop must be a string or a list of at most 4 strings", "stop", "invalid_value")
    options["stop"] = stops
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("seed must be an integer", "seed", "invalid_type")
    options["seed"] = seed
    return options


def error_of(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(str(exc)[:300], None, "invalid_request")
    return ApiError(500, f"generation failed: {type(exc).__name__}: {excerpt(str(exc), 200)}", None, "server_error",
                    "server_error")
