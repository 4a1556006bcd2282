"""Errors in each API's own shape: OpenAI's `{"error": {...}}` or Anthropic's
`{"type": "error", "error": {...}}`, picked by the route, so SDKs raise their
usual exception types (BadRequestError, AuthenticationError, ...)."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    501: "api_error",
    503: "overloaded_error",
}
OPENAI_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 501: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request that cannot be served, with its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, e: APIError) -> dict:
    if is_anthropic(path):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(e.status, "api_error"), "message": e.message}}
    return {"error": {"message": e.message, "type": OPENAI_TYPES.get(e.status, "invalid_request_error"), "param": e.param, "code": e.code}}


def error_response(path: str, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, e), status_code=e.status, headers=e.headers)


def public(e: BaseException) -> str:
    """An error's message without directories: a client learns a file's name, never where the cache lives."""
    return re.sub(r"(?<![\w.])(?:/[^/\s'\"]+)+/(?=[^/\s'\"]+)", "", str(e))
