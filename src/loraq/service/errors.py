"""OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every refusal of the /v1 API is one of these, as the official client parses it
(``openai.BadRequestError``, ``NotFoundError`` ... with ``.status_code`` and ``.body``).
"""

from __future__ import annotations

from ..errors import ApiError

__all__ = ["ApiError", "bad_request", "not_found", "too_large", "unauthorized"]

INVALID = "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, message, param, "not_found")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, None, "invalid_api_key", "invalid_request_error")


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"{what} is over the limit of {limit:,} bytes (api.max_{'upload' if what == 'upload' else 'body'}"
                         "_bytes in the home's config.yaml)", None, "request_too_large")
