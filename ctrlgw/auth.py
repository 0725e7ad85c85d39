"""
Controller authentication: token hashing and a per-peer failure limiter.

Tokens are random and high-entropy (256 bits), so a plain SHA-256 is a sound verifier (no
slow KDF is needed against guessing); comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


def newToken() -> str:
    return secrets.token_urlsafe(32)


def hashToken(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def tokenMatches(token: str | None, expectedHash: bytes) -> bool:
    # Hash even a missing token so that both paths cost the same.
    return hmac.compare_digest(hashToken(token or ""), expectedHash) and token is not None


class FailureLimiter:
    """
    Counts authentication failures per peer host in a sliding window; a host over the limit
    is refused without a database look-up until its failures age out.  Remembers at most
    C{maxHosts} hosts (oldest forgotten first) so a scan cannot exhaust memory.
    """

    def __init__(
        self, clock: IReactorTime, maxFailures: int, window: float, maxHosts: int = 100_000
    ) -> None:
        self.clock = clock
        self.maxFailures = maxFailures
        self.window = window
        self.maxHosts = maxHosts
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, host: str) -> list[float]:
        cutoff = self.clock.seconds() - self.window
        times = [t for t in self._failures.get(host, ()) if t > cutoff]
        if times:
            self._failures[host] = times
        else:
            self._failures.pop(host, None)
        return times

    def blocked(self, host: str) -> bool:
        return len(self._recent(host)) >= self.maxFailures

    def forgive(self, host: str) -> None:
        """
        Take back the most recent L{record} of C{host} (the attempt it stood for succeeded).
        """
        times = self._failures.get(host)
        if times:
            times.pop()
            if not times:
                del self._failures[host]

    def record(self, host: str) -> None:
        times = self._recent(host)
        times.append(self.clock.seconds())
        self._failures[host] = times[-self.maxFailures :]
        self._failures.move_to_end(host)
        while len(self._failures) > self.maxHosts:
            self._failures.popitem(last=False)
