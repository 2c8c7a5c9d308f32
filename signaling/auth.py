"""Who may call the server: a static bearer token and/or signed session tokens.

With auth configured, only the demo page's files (`/`, `/static/...`) and `/healthz` are open.
`/offer` and `/config` need a token, sent as `Authorization: Bearer <token>` or, for pages that
cannot set headers, as `?token=<token>`. `/metrics` takes its own token when one is configured
(so a scraper never holds a caller's credential), else the caller tokens.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from agent import metrics

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/healthz")
OPEN_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"
OFFER_PATH = "/offer"
# The subject recorded for callers that used the static bearer token.
STATIC_SUBJECT = "static-token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AuthConfig:
    """Credentials the server accepts; all None means no auth at all."""

    # One shared secret the operator hands to trusted pages (`Authorization: Bearer ...`).
    bearer_token: str | None = None
    # Key for signed session tokens minted by a backend (`signaling.tokens.mint_token`).
    token_secret: str | None = None
    # A separate bearer token for `/metrics`; None means the caller tokens above.
    metrics_token: str | None = None

    @property
    def protects_calls(self) -> bool:
        """True when `/offer` and `/config` need a caller token."""
        return bool(self.bearer_token or self.token_secret)

    @property
    def protects_metrics(self) -> bool:
        return bool(self.metrics_token) or self.protects_calls

    def authenticate(self, token: str) -> str | None:
        """The subject `token` proves, or None when it proves nothing."""
        if self.bearer_token and _same_secret(token, self.bearer_token):
            return STATIC_SUBJECT
        if self.token_secret:
            # imported here so that `python -m signaling.tokens` does not import itself twice
            from signaling.tokens import TokenError, verify_token

            try:
                return verify_token(self.token_secret, token).subject
            except TokenError as exc:
                log.info("rejected a session token: %s", exc)
        return None

    def authenticate_metrics(self, token: str) -> bool:
        if self.metrics_token:
            return _same_secret(token, self.metrics_token)
        return self.authenticate(token) is not None


def _same_secret(given: str, secret: str) -> bool:
    """Constant-time comparison; `given` may hold any bytes a header carried (non-UTF-8 ones
    arrive as surrogate escapes)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape")
    )


SUBJECT_KEY = web.RequestKey("auth_subject", str | None)


def request_token(request: web.Request) -> str | None:
    """The bearer token of `request`: the Authorization header, else a `token` query field."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token") or None


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def auth_middleware(config: AuthConfig) -> Callable[[web.Request, Handler], Awaitable]:
    """Middleware refusing protected routes without a valid token (401, JSON error).

    The caller's subject is stored on the request under SUBJECT_KEY (None without auth).
    CORS preflights pass: browsers never attach credentials to them.
    """

    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[SUBJECT_KEY] = None
        if request.method == "OPTIONS" or is_open_path(request.path):
            return await handler(request)
        token = request_token(request)
        if request.path == METRICS_PATH:
            if not config.protects_metrics:
                return await handler(request)
            if token is not None and config.authenticate_metrics(token):
                return await handler(request)
            return _unauthorized("a valid metrics token is required")
        if not config.protects_calls:
            return await handler(request)
        subject = config.authenticate(token) if token is not None else None
        if subject is None:
            if request.path == OFFER_PATH:
                metrics.OFFERS_TOTAL.labels(result="unauthorized").inc()
            return _unauthorized("a valid token is required to start a call")
        request[SUBJECT_KEY] = subject
        return await handler(request)

    return _auth


def _unauthorized(message: str) -> web.Response:
    response = web.json_response({"error": message}, status=401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="voice-agent"'
    return response


__all__ = [
    "STATIC_SUBJECT",
    "SUBJECT_KEY",
    "AuthConfig",
    "auth_middleware",
    "is_open_path",
    "request_token",
]
