"""
Writing to a controller's socket at once instead of at the reactor's next turn.

Twisted queues every C{transport.write} and sends it when the reactor next finds the socket
writable: the write registers the socket for writability (an C{epoll_ctl}), the next poll
reports it, and the send unregisters it again (another C{epoll_ctl}).  A gateway writes one
small frame per connection per event -- an ack, a ping, a command -- so that round costs
more than the C{send} itself: at 15,000 idle controllers it was a fifth of the gateway's
time.  L{writeNow} sends such a frame at once when the connection has nothing queued, and
leaves everything else (a queue to keep in order, TLS, a closing or aborted connection, a
wrapped transport, a socket buffer that is full) to the transport's own C{write}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

# The transports of plain TCP connections, accepted or dialled; subclasses (and wrappers
# such as TLS or the PROXY protocol's) may queue differently, so only these exactly.
_PLAIN_TCP = (tcp.Server, tcp.Client)


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: sent at once when it is a plain TCP connection with
    nothing queued that is neither closing nor aborted, the rest (what the kernel did not
    take) queued behind it as C{transport.write} would.  Otherwise C{transport.write} it:
    an aborted connection drops it, as it drops everything it had queued.
    """
    if (
        type(transport) not in _PLAIN_TCP
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnected
        or transport.dataBuffer
        or transport._tempDataBuffer
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        # A full buffer (EAGAIN), or an error the transport's own write meets again and
        # reports as the connection lost.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])
