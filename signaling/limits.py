"""Per-client offer rate limiting: one token bucket per peer address, in bounded memory."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Buckets remembered at once; the least recently seen address is forgotten beyond this.
MAX_TRACKED_PEERS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows `burst` offers at once per key, refilled at `per_minute` offers a minute.

    `check(key)` spends one token and returns 0, or returns the seconds to wait before the next
    token (the request is then refused and spends nothing). Memory is bounded by `max_keys`.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        max_keys: int = MAX_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("the rate must be positive and the burst at least 1")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> float:
        """0.0 if `key` may proceed now (one token spent), else the seconds until it may."""
        now = self._clock()
        bucket = self._bucket(key, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._rate

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket


def rate_key(address: str) -> str:
    """The bucket a peer address spends from: an IPv4 address itself, an IPv6 address its /64.

    One IPv6 subscriber holds a whole /64 and can send from any address in it, so keying by the
    full address would give each of its calls a fresh bucket.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip.packed, 64), strict=False))
    return str(ip)


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


__all__ = ["MAX_TRACKED_PEERS", "RateLimiter", "rate_key", "retry_after_header"]
