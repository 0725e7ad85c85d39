"""
Tests for L{ctrlgw.protocol.sockopts}: liveness options on real accepted sockets.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ctrlgw.config import GatewayConfig
from ctrlgw.protocol.connection import ControllerProtocol
from ctrlgw.protocol.factory import ControllerFactory
from ctrlgw.protocol.sockopts import applyLiveness, applyToTransport, findSocket

from .helpers import makeClock, makeConfig, makeContext

# Values no kernel or Twisted default would give.
KEEPALIVE_IDLE = 37
KEEPALIVE_INTERVAL = 7
KEEPALIVE_COUNT = 4
USER_TIMEOUT_MS = 12500


class ObservedFactory(ControllerFactory):
    """
    A L{ControllerFactory} that reports its protocols' C{connectionMade} and
    C{connectionLost}.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.made: Deferred[ControllerProtocol] = Deferred()
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> ControllerProtocol:
        protocol = super().buildProtocol(addr)  # type: ignore[arg-type]
        connectionMade, connectionLost = protocol.connectionMade, protocol.connectionLost
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)

        def made() -> None:
            connectionMade()
            self.made.callback(protocol)

        def gone(reason: Failure = None) -> None:  # type: ignore[assignment]
            connectionLost(reason)
            lost.callback(None)

        protocol.connectionMade = made  # type: ignore[method-assign]
        protocol.connectionLost = gone  # type: ignore[method-assign]
        return protocol


class Client(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class SocketOptionsTests(TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("TCP_KEEPIDLE and TCP_USER_TIMEOUT are read back on Linux only")

    @inlineCallbacks
    def accept(self, config: GatewayConfig):  # type: ignore[no-untyped-def]
        """
        Listen on loopback with a L{ControllerFactory}, connect to it, and return the
        server side's socket once its C{connectionMade} has run.  Everything is closed
        again at cleanup.
        """
        (listener,) = config.listeners
        # The protocol's own timers run on a fake clock: nothing is left on the reactor.
        context = makeContext(config, makeClock())
        factory = ObservedFactory(context, listener)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        portNumber: int = port.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber)
        client = yield endpoint.connect(Factory.forProtocol(Client))

        def disconnect() -> Deferred[list[None]]:
            client.transport.loseConnection()
            return gatherResults([client.lost, *factory.lost])

        self.addCleanup(disconnect)
        protocol = yield factory.made
        sock = findSocket(protocol.transport)
        assert isinstance(sock, socket.socket), sock
        self.assertEqual(sock.getsockname()[1], portNumber, "not the accepted server socket")
        return sock

    @inlineCallbacks
    def test_configuredOptions(self):  # type: ignore[no-untyped-def]
        config = makeConfig(
            liveness={
                "keepalive": "yes",
                "keepalive_idle": f"{KEEPALIVE_IDLE}s",
                "keepalive_interval": f"{KEEPALIVE_INTERVAL}s",
                "keepalive_count": str(KEEPALIVE_COUNT),
                "user_timeout": f"{USER_TIMEOUT_MS}ms",
                "nodelay": "yes",
            }
        )
        sock = yield self.accept(config)
        tcp = socket.IPPROTO_TCP
        self.assertEqual(
            {
                "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "TCP_KEEPIDLE": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
                "TCP_KEEPINTVL": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
                "TCP_KEEPCNT": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
                "TCP_USER_TIMEOUT": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
                "TCP_NODELAY": sock.getsockopt(tcp, socket.TCP_NODELAY),
            },
            {
                "SO_KEEPALIVE": 1,
                "TCP_KEEPIDLE": KEEPALIVE_IDLE,
                "TCP_KEEPINTVL": KEEPALIVE_INTERVAL,
                "TCP_KEEPCNT": KEEPALIVE_COUNT,
                "TCP_USER_TIMEOUT": USER_TIMEOUT_MS,
                "TCP_NODELAY": 1,
            },
        )

    @inlineCallbacks
    def test_optionsOff(self):  # type: ignore[no-untyped-def]
        """
        C{keepalive = no} and C{nodelay = no} leave keepalive and Nagle as the kernel has
        them; TCP_USER_TIMEOUT is still set.
        """
        config = makeConfig(liveness={"keepalive": "no", "nodelay": "no", "user_timeout": "3s"})
        sock = yield self.accept(config)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 3000)


class Wrapper:
    """
    A transport wrapping another, as TLS does: its handle is not a socket.
    """

    def __init__(self, transport: object) -> None:
        self.transport = transport

    def getHandle(self) -> object:
        return object()


class Handle:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


class ApplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("TCP_KEEPIDLE and TCP_USER_TIMEOUT are read back on Linux only")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.sock.close)

    def test_findSocketThroughWrappers(self) -> None:
        self.assertIs(findSocket(Handle(self.sock)), self.sock)
        self.assertIs(findSocket(Wrapper(Wrapper(Handle(self.sock)))), self.sock)
        self.assertIsNone(findSocket(StringTransport()))
        self.assertIsNone(findSocket(None))
        self.assertFalse(applyToTransport(StringTransport(), makeConfig().liveness))

    def test_keepaliveBeyondKernelLimit(self) -> None:
        """
        A keepalive idle time the configuration accepts but the kernel does not is
        applied as the kernel's maximum, and the options after it are still set.
        """
        liveness = makeConfig(
            liveness={"keepalive_idle": "24h", "user_timeout": "4s", "nodelay": "yes"}
        ).liveness
        self.assertTrue(applyToTransport(Handle(self.sock), liveness))
        tcp = socket.IPPROTO_TCP
        self.assertEqual(self.sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT), 4000)
        self.assertEqual(self.sock.getsockopt(tcp, socket.TCP_NODELAY), 1)
        idle = self.sock.getsockopt(tcp, socket.TCP_KEEPIDLE)
        self.assertGreater(idle, 7200)
        self.assertLessEqual(idle, 24 * 3600)

    def test_notTcp(self) -> None:
        """
        Sockets other than TCP ones are left alone.
        """
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(unix.close)
        applyLiveness(unix, makeConfig(liveness={"keepalive": "yes"}).liveness)
        self.assertEqual(unix.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
