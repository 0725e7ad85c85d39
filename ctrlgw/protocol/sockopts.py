"""
Kernel-level liveness for accepted sockets.

Keepalive probes find a peer that vanished while the line was idle; TCP_USER_TIMEOUT bounds
how long written data may sit unacknowledged, the one case keepalive never covers (it does
not fire while data is in flight); TCP_NODELAY keeps small frames from waiting on Nagle.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.logger import Logger

from ctrlgw.config import LivenessConfig

log = Logger()

# Linux refuses TCP_KEEPIDLE and TCP_KEEPINTVL above this many seconds (EINVAL).
_MAX_KEEPALIVE_SECONDS = 32767


def _keepaliveSeconds(seconds: float) -> int:
    return min(_MAX_KEEPALIVE_SECONDS, max(1, int(seconds)))


def findSocket(transport: Any) -> socket.socket | None:
    """
    The kernel socket under C{transport}, looking through wrappers such as TLS.
    """
    for _ in range(4):
        if transport is None:
            return None
        getHandle = getattr(transport, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


def applyLiveness(sock: socket.socket, liveness: LivenessConfig) -> None:
    """
    Set keepalive, TCP_USER_TIMEOUT and TCP_NODELAY on a TCP socket as configured.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(liveness.keepalive))
    if liveness.keepalive:
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _keepaliveSeconds(liveness.keepalive_idle)
        )
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _keepaliveSeconds(liveness.keepalive_interval)
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, liveness.keepalive_count)
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(liveness.user_timeout * 1000)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(liveness.nodelay))


def applyToTransport(transport: Any, liveness: LivenessConfig) -> bool:
    """
    Apply L{applyLiveness} to the socket under C{transport}, if it has one.

    @return: whether options were set.
    """
    sock = findSocket(transport)
    if sock is None:
        return False
    try:
        applyLiveness(sock, liveness)
    except OSError as e:
        log.warn("could not set socket options: {error}", error=e)
        return False
    return True
