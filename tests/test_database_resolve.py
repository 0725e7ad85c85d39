"""
The database's host names are resolved off the reactor thread and handed to libpq as
C{hostaddr}: libpq's own lookup is synchronous, and a slow DNS would freeze the reactor.
"""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

from psycopg2 import OperationalError
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database, hostNamesToResolve, pinHostAddresses
from tests.gateways import sleep, waitUntil
from tests.pg import databaseConfig, sharedDsn

NO_ENV: dict[str, str] = {}


def pinned(dsn: str, addresses: dict[str, list[str]], environ: dict[str, str] = NO_ENV) -> Any:
    return parse_dsn(pinHostAddresses(dsn, addresses, environ))


class PinHostAddressesTests(SynchronousTestCase):
    """
    L{pinHostAddresses} and L{hostNamesToResolve}: which hosts are looked up, and how the
    addresses reach libpq.
    """

    def test_nameGetsHostaddr(self) -> None:
        """
        A host name gets its address as C{hostaddr}; C{host} stays, for TLS and .pgpass.
        """
        dsn = "host=db.example port=5433 dbname=app sslmode=verify-full"
        self.assertEqual(hostNamesToResolve(dsn, NO_ENV), ["db.example"])
        self.assertEqual(
            pinned(dsn, {"db.example": ["10.0.0.7"]}),
            {
                "host": "db.example",
                "hostaddr": "10.0.0.7",
                "port": "5433",
                "dbname": "app",
                "sslmode": "verify-full",
            },
        )

    def test_everyAddressIsTried(self) -> None:
        """
        A name with several addresses is repeated once per address, as libpq would try
        each of them.
        """
        self.assertEqual(
            pinned("host=db.example", {"db.example": ["::1", "127.0.0.1"]}),
            {"host": "db.example,db.example", "hostaddr": "::1,127.0.0.1"},
        )

    def test_multiHost(self) -> None:
        """
        In a host list, only names are looked up; sockets, literal IPs and empty entries
        get an empty C{hostaddr} entry, so that each C{host} entry still has its own.
        """
        dsn = "host=/var/run/postgresql,10.0.0.5,db-a,,fe80::1,db-b,db-a"
        self.assertEqual(hostNamesToResolve(dsn, NO_ENV), ["db-a", "db-b"])
        self.assertEqual(
            pinned(dsn, {"db-a": ["10.1.0.1"], "db-b": ["10.2.0.1"]}),
            {
                "host": "/var/run/postgresql,10.0.0.5,db-a,,fe80::1,db-b,db-a",
                "hostaddr": ",,10.1.0.1,,,10.2.0.1,10.1.0.1",
            },
        )

    def test_portListFollowsHosts(self) -> None:
        """
        With one port per host, a host repeated for several addresses keeps its port; a
        single port is left alone (libpq applies it to every host).
        """
        self.assertEqual(
            pinned("host=a,b port=1,2", {"a": ["10.0.0.1", "10.0.0.2"], "b": ["10.0.0.3"]}),
            {"host": "a,a,b", "hostaddr": "10.0.0.1,10.0.0.2,10.0.0.3", "port": "1,1,2"},
        )
        self.assertEqual(
            pinned("host=a,b port=9", {"a": ["10.0.0.1", "10.0.0.2"], "b": ["10.0.0.3"]}),
            {"host": "a,a,b", "hostaddr": "10.0.0.1,10.0.0.2,10.0.0.3", "port": "9"},
        )

    def test_uri(self) -> None:
        """
        A URI DSN is read the way libpq reads it (brackets, ports, query parameters, an
        escaped password) and comes back as key/value pairs.
        """
        dsn = "postgresql://gw:p%40ss@db.example:6543,[::1]:7000/app?sslmode=verify-full"
        self.assertEqual(hostNamesToResolve(dsn, NO_ENV), ["db.example"])
        self.assertEqual(
            pinned(dsn, {"db.example": ["192.0.2.1"]}),
            {
                "user": "gw",
                "password": "p@ss",
                "dbname": "app",
                "host": "db.example,::1",
                "hostaddr": "192.0.2.1,",
                "port": "6543,7000",
                "sslmode": "verify-full",
            },
        )

    def test_unresolvedNameDropped(self) -> None:
        """
        A name without an address is dropped (libpq would skip it); with none left to try
        the connect fails as libpq's own would.
        """
        self.assertEqual(
            pinned("host=gone,db port=1,2", {"gone": [], "db": ["10.0.0.1"]}),
            {"host": "db", "hostaddr": "10.0.0.1", "port": "2"},
        )
        error = self.assertRaises(
            OperationalError, pinHostAddresses, "host=gone", {"gone": []}, NO_ENV
        )
        self.assertIn('"gone"', str(error))

    def test_untouched(self) -> None:
        """
        Nothing to resolve, or libpq told where to connect already: the DSN is unchanged.
        """
        for dsn in [
            "",
            "dbname=app",
            "host=/tmp dbname=app",
            "host=@abstract",
            "host=127.0.0.1 port=5432",
            "host=::1",
            "host=10.0.0.1,/tmp",
            "host=db.example hostaddr=10.0.0.9",
            "service=prod",
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://[2001:db8::1]:5432/app",
        ]:
            self.assertEqual(hostNamesToResolve(dsn, NO_ENV), [], dsn)
            self.assertEqual(pinHostAddresses(dsn, {}, NO_ENV), dsn, dsn)

    def test_environment(self) -> None:
        """
        A DSN without a host uses C{PGHOST}, as libpq does; C{PGHOSTADDR} means libpq has
        its address already.
        """
        env = {"PGHOST": "db.example", "PGPORT": "6000"}
        self.assertEqual(hostNamesToResolve("dbname=app", env), ["db.example"])
        self.assertEqual(
            pinned("dbname=app", {"db.example": ["10.0.0.1"]}, env),
            {"dbname": "app", "host": "db.example", "hostaddr": "10.0.0.1"},
        )
        withAddr = {"PGHOST": "db.example", "PGHOSTADDR": "10.0.0.2"}
        self.assertEqual(hostNamesToResolve("dbname=app", withAddr), [])
        self.assertEqual(hostNamesToResolve("host=db.example", withAddr), [])


class _Pipe(Protocol):
    def __init__(self, peer: _Pipe | None = None) -> None:
        self.peer = peer
        self.pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Forward(Factory):
    """
    A TCP front for the test server (which listens on a Unix socket): libpq can only
    reach it by the C{hostaddr} the resolver stub gave.
    """

    def __init__(self, backend: IStreamClientEndpoint) -> None:
        self.backend = backend
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> _Pipe:
        self.accepted += 1
        front = _Pipe()
        back = _Pipe(front)
        front.peer = back

        def connected(_: object) -> None:
            assert back.transport is not None
            for data in front.pending:
                back.transport.write(data)
            front.pending.clear()

        def failed(reason: Failure) -> None:
            if front.transport is not None:
                front.transport.loseConnection()

        connectProtocol(self.backend, back).addCallbacks(connected, failed)
        return front


class GatedResolver:
    """
    A getaddrinfo that blocks the calling thread until released, as a slow DNS does.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: object, *args: Any) -> list[tuple[Any, ...]]:
        self.calls.append((host, threading.get_ident()))
        self.entered.set()
        self.release.wait(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.address, 0))]


class ResolveOffTheReactorTests(TestCase):
    timeout = 60

    async def serverByName(self, name: str) -> tuple[str, _Forward]:
        """
        A DSN that reaches the shared test server only through host name C{name}.
        """
        params = parse_dsn(await deferToThread(sharedDsn))
        host = params.get("host", "")
        port = int(params.get("port", "5432"))
        backend: IStreamClientEndpoint
        if host.startswith("/"):
            backend = UNIXClientEndpoint(reactor, f"{host}/.s.PGSQL.{port}")
        else:
            backend = TCP4ClientEndpoint(reactor, host or "127.0.0.1", port)
        forward = _Forward(backend)
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(forward)
        self.addCleanup(listening.stopListening)
        params.update(host=name, port=str(listening.getHost().port))
        return make_dsn(**params), forward

    def database(self, resolver: GatedResolver, **overrides: Any) -> Database:
        self.addCleanup(resolver.release.set)
        config = databaseConfig("public", pool_size=1, **overrides)
        return Database(reactor, config, Metrics(), getaddrinfo=resolver, environ={})

    async def test_slowResolverDoesNotFreezeTheReactor(self) -> None:
        """
        While the resolver is stuck, the reactor keeps running timers; once it answers,
        libpq connects to the address it gave (the name itself resolves nowhere).
        """
        name = f"db-{uuid.uuid4().hex[:8]}.ctrlgw.invalid"
        dsn, forward = await self.serverByName(name)
        resolver = GatedResolver("127.0.0.1")
        db = self.database(resolver)

        ticks: list[float] = []
        loop = LoopingCall(lambda: ticks.append(reactor.seconds()))
        loop.start(0.02)

        def stopLoop() -> None:
            if loop.running:
                loop.stop()

        self.addCleanup(stopLoop)

        up = db.start(dsn)
        self.addCleanup(db.stop)
        await waitUntil(resolver.entered.is_set, 10, what="the resolver being asked")
        before = len(ticks)
        await sleep(0.5)
        self.assertFalse(up.called, "connected before the resolver answered")
        self.assertGreater(len(ticks) - before, 10, "the reactor stalled while resolving")
        resolver.release.set()
        await up
        loop.stop()

        self.assertEqual(await db.runQuery("t", "SELECT 1"), [(1,)])
        self.assertEqual([host for host, _ in resolver.calls], [name])
        self.assertNotIn(threading.get_ident(), [thread for _, thread in resolver.calls])
        self.assertEqual(forward.accepted, 1)
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
        self.assertLess(max(gaps), 0.3, f"the reactor stalled for {max(gaps):.2f}s")

    async def test_resolverThatNeverAnswers(self) -> None:
        """
        A lookup that does not finish is bounded by connect_timeout like the connect.
        """
        dsn, forward = await self.serverByName("db.ctrlgw.invalid")
        resolver = GatedResolver("127.0.0.1")
        db = self.database(resolver, connect_timeout=0.3)
        db.dsn = dsn
        started = reactor.seconds()
        with self.assertRaises(TimeoutError):
            await Deferred.fromCoroutine(db.connect())
        self.assertLess(reactor.seconds() - started, 2)
        self.assertTrue(resolver.entered.is_set())
        self.assertEqual(forward.accepted, 0)
