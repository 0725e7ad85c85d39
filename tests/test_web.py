"""
The HTTP listener's guard against large bodies, on a real loopback socket.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ctrlgw import web
from tests.gateways import waitUntil
from tests.helpers import deferred


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: web.Request) -> bytes:
        assert request.content is not None
        return b"got %d" % len(request.content.read())


class SmallRequest(web.BoundedRequest):
    maxBody = 1000


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True


class BoundedRequestTests(TestCase):
    async def post(self, head: bytes, body: bytes) -> Client:
        site = Site(Echo(), requestFactory=SmallRequest)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        client = Client()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
        )
        self.addCleanup(lambda: client.closed or client.transport.abortConnection())
        client.transport.write(head + body)
        await waitUntil(lambda: client.closed or b"got" in client.received, 10)
        return client

    @deferred
    async def test_declaredLengthTooLarge(self) -> None:
        """
        A Content-Length over the bound is refused with 413 before the body is read, and
        the connection is closed.
        """
        client = await self.post(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n", b"x" * 2000
        )
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413"), client.received)
        await waitUntil(lambda: client.closed, 10)

    @deferred
    async def test_chunkedBodyTooLarge(self) -> None:
        """
        A chunked body that grows past the bound is refused with 413 as it arrives.
        """
        chunk = b"%x\r\n%s\r\n" % (600, b"y" * 600)
        client = await self.post(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", chunk * 3
        )
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413"), client.received)

    @deferred
    async def test_smallBodyServed(self) -> None:
        """
        A body within the bound reaches the resource whole.
        """
        client = await self.post(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\nConnection: close\r\n\r\n",
            b"z" * 900,
        )
        self.assertIn(b"200 OK", client.received)
        self.assertIn(b"got 900", client.received)
