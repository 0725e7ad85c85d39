"""
A whole gateway on real sockets: several listeners at once, graceful shutdown.
"""

from __future__ import annotations

import json
import socket
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from ctrlgw.protocol.sockopts import findSocket
from tests.gateways import (
    LineController,
    connectController,
    listenerPort,
    metric,
    nowMs,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase


class Int32Controller(Protocol):
    """
    A controller on the int32 framing: 4-byte big-endian length, then JSON.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.frames: list[dict[str, object]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                return
            self.frames.append(json.loads(self.buffer[4 : 4 + length]))
            self.buffer = self.buffer[4 + length :]

    def send(self, frame: dict[str, object]) -> None:
        payload = json.dumps(frame).encode()
        self.transport.write(struct.pack(">I", len(payload)) + payload)


class GatewayTests(PostgresTestCase):
    timeout = 60

    async def _twoListeners(self) -> None:
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-multi",
            {"listener:binary": {"endpoint": "tcp:0:interface=127.0.0.1", "framing": "int32"}},
        )
        lines = await connectController(listenerPort(gateway, "main"))
        self.addCleanup(lines.close)
        binary = Int32Controller()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", listenerPort(gateway, "binary")), binary
        )
        self.addCleanup(binary.transport.abortConnection)

        await lines.hello("on-lines")
        binary.send({"type": "hello", "controller": "on-int32", "ts": nowMs()})
        await waitUntil(lambda: binary.frames, 10, what="welcome over int32")
        self.assertEqual(binary.frames[0]["type"], "welcome")
        binary.send({"type": "msg", "id": "b-1", "ts": nowMs(), "body": [1, 2]})
        await waitUntil(lambda: len(binary.frames) > 1, 10, what="ack over int32")
        self.assertEqual(binary.frames[1], {**binary.frames[1], "type": "ack", "ref": "b-1"})

        self.assertEqual(metric(gateway, "ctrlgw_open_connections", {"listener": "main"}), 1)
        self.assertEqual(metric(gateway, "ctrlgw_open_connections", {"listener": "binary"}), 1)
        rows = await self.db.runQuery(
            "test", "SELECT controller_id, body FROM inbox ORDER BY controller_id"
        )
        self.assertEqual(rows, [("on-int32", [1, 2])])

    def test_listenersWithDifferentFramings(self) -> Deferred[None]:
        """
        Two listeners, lines and int32, serve controllers at the same time.
        """
        return Deferred.fromCoroutine(self._twoListeners())

    async def _shutdown(self) -> None:
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-stop",
            {"shutdown": {"bye_batch": 2, "bye_interval": "300ms"}},
        )
        port = listenerPort(gateway)
        controllers = []
        for i in range(5):
            controller = await connectController(port)
            await controller.hello(f"c-{i}")
            controllers.append(controller)
        closedAt: list[float] = []
        for controller in controllers:
            controller.closed.addCallback(lambda _: closedAt.append(reactor.seconds()))

        await gateway.service.stopService()

        self.assertEqual(len(closedAt), 5)
        for controller in controllers:
            self.assertEqual(controller.of("bye")[-1]["reason"], "shutdown")
        closedAt.sort()
        gaps = [later - earlier for earlier, later in zip(closedAt, closedAt[1:], strict=False)]
        # Three batches (2, 2, 1): two gaps of about bye_interval, the others small.
        self.assertEqual(sum(1 for gap in gaps if gap > 0.2), 2, gaps)
        # Nobody was left behind and the instance left the cluster.
        rows = await self.db.runQuery(
            "test", "SELECT count(*) FROM instances WHERE instance_id = 'gw-stop'"
        )
        self.assertEqual(rows[0][0], 0)
        rows = await self.db.runQuery("test", "SELECT count(*) FROM sessions WHERE online")
        self.assertEqual(rows[0][0], 0)

    def test_shutdownSaysByeInBatches(self) -> Deferred[None]:
        """
        Stopping the gateway says bye (shutdown) to every controller in batches of
        bye_batch, bye_interval apart, then marks their sessions offline and leaves the
        cluster.
        """
        return Deferred.fromCoroutine(self._shutdown())


class ProxyProtocolTests(PostgresTestCase):
    timeout = 60

    @deferred
    async def test_haproxyEndpoint(self) -> None:
        """
        A listener behind HAProxy with the PROXY protocol (endpoint haproxy:tcp:...) sees
        the controller's own address: in its session, its history and the auth limiter.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-proxied",
            {"listener:main": {"endpoint": "haproxy:tcp:0:interface=127.0.0.1"}},
        )
        port = listenerPort(gateway)
        controller = LineController()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), controller)
        self.addCleanup(controller.close)
        controller.transport.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 7000\r\n")
        await controller.hello("behind-proxy")
        rows = await self.db.runQuery(
            "t", "SELECT peer FROM sessions WHERE controller_id = 'behind-proxy'"
        )
        self.assertEqual(rows, [("203.0.113.7:40123",)])
        # The kernel's liveness options reach the socket through the PROXY wrapper too.
        (connection,) = gateway.context.connections
        sock = findSocket(connection.transport)
        assert sock is not None
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertGreater(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 0)
