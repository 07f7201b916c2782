"""OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every refusal of the /v1 API is one of these, as the official client parses it
(``openai.BadRequestError``, ``NotFoundError`` ... with ``.status_code`` and ``.body``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INVALID = "invalid_request_error"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = INVALID

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, message, param, "not_found")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, None, "invalid_api_key", "invalid_request_error")


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"{what} is over the limit of {limit:,} bytes (api.max_{'upload' if what == 'upload' else 'body'}"
                         "_bytes in the home's config.yaml)", None, "request_too_large")
