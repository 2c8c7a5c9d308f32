"""Short-lived signed session tokens: HMAC-SHA256 over a subject and an expiry time.

An operator's backend mints a token for a signed-in user and hands it to the page; the page sends
it with its offer (`Authorization: Bearer <token>` or `?token=<token>`). The secret stays on the
backend and on this server, never in the page.

Format (url-safe, no padding): `<payload>.<signature>` where `payload` is base64url of the JSON
`{"sub": subject, "exp": unix_seconds}` and `signature` is base64url of
HMAC-SHA256(secret, "voice-agent-token.v1." + payload).

    python -m signaling.tokens mint --secret "$SECRET" --subject alice --ttl 300
    python -m signaling.tokens verify --secret "$SECRET" TOKEN
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

DOMAIN = b"voice-agent-token.v1."
MIN_SECRET_BYTES = 16
MAX_SUBJECT_CHARS = 128
MAX_TOKEN_CHARS = 512
MAX_TTL_S = 24 * 3600


class TokenError(ValueError):
    """A token that must not be accepted; the text says why (safe to log, vague to clients)."""


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token says: who it was minted for and until when (unix seconds)."""

    subject: str
    expires_at: int


def mint_token(
    secret: str | bytes,
    subject: str,
    ttl_s: float = 300.0,
    now: Callable[[], float] = time.time,
) -> str:
    """A token for `subject` valid for `ttl_s` seconds (at most a day)."""
    key = _key(secret)
    _check_subject(subject)
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be in (0, {MAX_TTL_S}] seconds")
    claims = {"sub": subject, "exp": int(now() + ttl_s)}
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    return f"{payload}.{_b64encode(_sign(key, payload))}"


def verify_token(
    secret: str | bytes,
    token: str,
    now: Callable[[], float] = time.time,
    leeway_s: float = 5.0,
) -> TokenClaims:
    """The claims of a genuine, unexpired token; raises TokenError otherwise."""
    key = _key(secret)
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise TokenError("malformed token")
    payload, signature = token.split(".")
    if not hmac.compare_digest(_b64decode(signature), _sign(key, payload)):
        raise TokenError("bad signature")
    claims = _parse_claims(_b64decode(payload))
    if claims.expires_at + leeway_s < now():
        raise TokenError("token expired")
    return claims


def _parse_claims(raw: bytes) -> TokenClaims:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise TokenError("malformed token payload") from exc
    if not isinstance(obj, dict):
        raise TokenError("malformed token payload")
    subject, expires = obj.get("sub"), obj.get("exp")
    if not isinstance(subject, str) or not isinstance(expires, int) or isinstance(expires, bool):
        raise TokenError("malformed token claims")
    return TokenClaims(subject, expires)


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
    return key


def _check_subject(subject: str) -> None:
    if not subject or len(subject) > MAX_SUBJECT_CHARS:
        raise ValueError(f"the subject must be 1 to {MAX_SUBJECT_CHARS} characters")


def _sign(key: bytes, payload: str) -> bytes:
    return hmac.new(key, DOMAIN + payload.encode("ascii", "replace"), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed token encoding") from exc


# -- command line ------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m signaling.tokens", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    mint = sub.add_parser("mint", help="print a token for a subject")
    mint.add_argument("--secret", required=True, help="the server's --token-secret")
    mint.add_argument("--subject", required=True, help="who the token is for (e.g. a user id)")
    mint.add_argument("--ttl", type=float, default=300.0, help="seconds until it expires")
    check = sub.add_parser("verify", help="check a token and print its claims")
    check.add_argument("--secret", required=True)
    check.add_argument("token")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`mint` prints a token; `verify` prints its claims as JSON (exit 1 when invalid)."""
    args = _parse_args(argv)
    try:
        if args.command == "mint":
            print(mint_token(args.secret, args.subject, args.ttl))
            return 0
        claims = verify_token(args.secret, args.token)
    except ValueError as exc:  # TokenError included
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"subject": claims.subject, "expires_at": claims.expires_at}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TokenClaims", "TokenError", "main", "mint_token", "verify_token"]
