"""
Tests for L{ctrlgw.protocol.writethrough}: frames sent at once on real loopback sockets,
and everything that must keep Twisted's own queue going through it.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ctrlgw.protocol.writethrough import writeNow


class Accepted(Protocol):
    def __init__(self, made: Deferred[Accepted]) -> None:
        self._made = made

    def connectionMade(self) -> None:
        self._made.callback(self)


class Collecting(Protocol):
    """
    The peer: gathers what arrives, and fires C{whenReceived} once it has C{expected}
    bytes.
    """

    def __init__(self) -> None:
        self.received = b""
        self.expected = 0
        self.whenReceived: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.expected and len(self.received) >= self.expected and not self.whenReceived.called:
            self.whenReceived.callback(self.received)

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)

    def expect(self, count: int) -> Deferred[bytes]:
        self.expected = count
        if len(self.received) >= count:
            self.whenReceived.callback(self.received)
        return self.whenReceived


class LoopbackTests(TestCase):
    """
    A plain TCP connection accepted by the reactor, as a controller's is.
    """

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        made: Deferred[Accepted] = Deferred()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: Accepted(made))
        )
        self.addCleanup(port.stopListening)
        self.peer = Collecting()
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: self.peer)
        )
        self.addCleanup(self._close, client)
        accepted = yield made
        self.transport = accepted.transport

    def _close(self, client: Protocol) -> Deferred[None]:
        assert client.transport is not None
        client.transport.abortConnection()  # type: ignore[attr-defined]
        self.transport.abortConnection()
        return self.peer.lost

    def writing(self) -> bool:
        return self.transport in reactor.getWriters()

    @inlineCallbacks
    def test_sentBeforeTheReactorTurns(self):  # type: ignore[no-untyped-def]
        """
        On an idle connection the frame is in the kernel when writeNow returns: nothing is
        queued and the socket is not registered for writability (transport.write would
        have done both).
        """
        writeNow(self.transport, b"ack 1\n")
        self.assertFalse(self.writing())
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataBuffer), (b"", []))
        self.transport.write(b"ack 2\n")
        self.assertTrue(self.writing())
        received = yield self.peer.expect(12)
        self.assertEqual(received, b"ack 1\nack 2\n")

    @inlineCallbacks
    def test_behindQueuedDataInOrder(self):  # type: ignore[no-untyped-def]
        """
        With data queued by transport.write, a frame goes behind it, never ahead.
        """
        self.transport.write(b"first\n")
        writeNow(self.transport, b"second\n")
        self.assertEqual(self.transport._tempDataBuffer, [b"first\n", b"second\n"])
        received = yield self.peer.expect(13)
        self.assertEqual(received, b"first\nsecond\n")

    @inlineCallbacks
    def test_whatTheKernelDoesNotTakeIsQueued(self):  # type: ignore[no-untyped-def]
        """
        A frame larger than the socket's buffers is sent in part and the rest queued: it
        arrives whole and in order, and what comes after it waits behind it.
        """
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 40_000  # 10 MB: more than loopback's buffers hold
        writeNow(self.transport, big)
        queued = len(self.transport._tempDataBuffer[0]) if self.transport._tempDataBuffer else 0
        self.assertGreater(queued, 0)
        self.assertLess(queued, len(big))
        writeNow(self.transport, b"after")
        self.assertEqual(len(self.transport._tempDataBuffer), 2)
        received = yield self.peer.expect(len(big) + 5)
        self.assertEqual(received, big + b"after")

    @inlineCallbacks
    def test_closingConnectionQueues(self):  # type: ignore[no-untyped-def]
        """
        After loseConnection the transport's own write decides (it flushes what it holds,
        then closes): the frame arrives before the close.
        """
        self.transport.write(b"bye\n")
        self.transport.loseConnection()
        writeNow(self.transport, b"late\n")
        self.assertIn(b"late\n", self.transport._tempDataBuffer)
        yield self.peer.lost
        self.assertEqual(self.peer.received, b"bye\nlate\n")

    @inlineCallbacks
    def test_abortedConnectionSendsNothingMore(self):  # type: ignore[no-untyped-def]
        """
        After abortConnection nothing more reaches the peer, as with transport.write (the
        abort drops what is queued): a frame written in the same turn is not sent.
        """
        self.transport.abortConnection()
        writeNow(self.transport, b"after the abort\n")
        yield self.peer.lost
        self.assertEqual(self.peer.received, b"")

    @inlineCallbacks
    def test_peerGoneIsReportedAsLost(self):  # type: ignore[no-untyped-def]
        """
        A send that fails (the peer reset the connection) is left to the transport, which
        reports the connection lost instead of raising into the caller.
        """
        lost: Deferred[None] = Deferred()
        self.transport.protocol.connectionLost = lambda reason: lost.callback(None)
        peerSocket = self.peer.transport.socket  # type: ignore[union-attr]
        peerSocket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.peer.transport.abortConnection()  # type: ignore[union-attr]
        yield self.peer.lost
        for _ in range(3):
            writeNow(self.transport, b"into the void\n")
        yield lost


class OtherTransportTests(SynchronousTestCase):
    def test_notPlainTcpWritesAsItWould(self) -> None:
        """
        A transport that is not a plain TCP connection (a test double, TLS, the PROXY
        protocol's wrapper) is written with its own write.
        """
        transport = StringTransport()
        writeNow(transport, b"ping\n")
        self.assertEqual(transport.value(), b"ping\n")
