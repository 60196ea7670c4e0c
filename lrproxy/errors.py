"""One error tree: each error knows its HTTP status and its OpenAI error code (SPEC §1).

Handlers raise these; the edge (app.edged) renders them in the OpenAI error shape, so the
OpenAI SDK raises the matching exception (AuthenticationError for 401, and so on).
"""

from __future__ import annotations

import math
from typing import ClassVar, Final

import orjson

RETRY_AFTER_S: Final = 1


class ProxyError(Exception):
    """An error answered to the client in the OpenAI shape."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    # False where a client's retry cannot help: `x-should-retry: false`, which the
    # OpenAI SDKs obey before their own rule (they retry every 5xx)
    retryable: ClassVar[bool] = True

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        if not self.retryable:
            return {"x-should-retry": "false"}
        if self.retry_after is None:
            return {}
        # whole seconds, rounded up: a client that waits as long as told must not be
        # refused again (an upstream's 2.5 is 3, not round()'s 2)
        # (at most a day: an upstream's is capped so, and a key's rate at one a day)
        return {"Retry-After": str(max(1, math.ceil(min(self.retry_after, 86400.0))))}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    try:
        return orjson.dumps(
            {"error": {"message": message, "type": type_, "param": param, "code": code}})
    except TypeError:  # a lone surrogate that no quoting site escaped: never a plain 500
        return orjson.dumps({"error": {
            "message": printable(message), "type": type_,
            "param": None if param is None else printable(param), "code": code}})


def printable(text: str) -> str:
    """Client text to quote in a message: the bytes of a header value that are not
    UTF-8 (aiohttp keeps them as lone surrogates, which JSON cannot hold) as `\\udcff`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class InvalidApiKey(ProxyError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class InvalidRequest(ProxyError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class NotFound(ProxyError):
    """A path the API does not have."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class ModelNotFound(ProxyError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class UnknownRegion(ProxyError):
    status = 400
    code = "unknown_region"
    type = "invalid_request_error"


class ModelNotInRegion(ProxyError):
    status = 400
    code = "model_not_in_region"
    type = "invalid_request_error"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    type = "invalid_request_error"


class RequestTooLarge(ProxyError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class ExpectationFailed(ProxyError):
    """An `Expect:` header other than 100-continue."""

    status = 417
    code = "expectation_failed"
    type = "invalid_request_error"


class UriTooLong(ProxyError):
    status = 414
    code = "uri_too_long"
    type = "invalid_request_error"


class HeadersTooLarge(ProxyError):
    status = 431
    code = "headers_too_large"
    type = "invalid_request_error"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"
    type = "invalid_request_error"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limited"
    type = "rate_limit_error"


class NoUpstreamAvailable(ProxyError):
    status = 503
    code = "no_upstream_available"
    type = "server_error"


class UpstreamFailed(ProxyError):
    """Base of the failures of one upstream attempt; they may lead to a failover."""

    status = 502
    code = "upstream_error"
    type = "upstream_error"
    upstream_status: int | None = None  # the status the upstream answered, if it did


class UpstreamError(UpstreamFailed):
    pass


class UpstreamConnectionLost(UpstreamError):
    """The upstream's connection broke while its answer was being read."""


class UpstreamBadResponse(UpstreamError):
    """The upstream answered, but not with a usable answer (not JSON, a malformed event)."""


class UpstreamTooLarge(UpstreamBadResponse):
    """An answer over the proxy's cap: the request's own, not its upstream's failure; any
    other upstream's answer to it would be as large, and so would a retry's."""

    retryable = False


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"


class UpstreamAuthFailed(UpstreamFailed):
    code = "upstream_auth_failed"
    retryable = False  # the proxy's own key, refused: until its operator changes it


class ShuttingDown(ProxyError):
    status = 503
    code = "shutting_down"
    type = "server_error"
