"""
Tests for L{ctrlgw.inbox.Inbox} against a real PostgreSQL, and the durability of acks
through a whole L{ctrlgw.service.Gateway} while its database goes away and comes back.

The small real-network helpers here (L{LineClient}, L{startGateway}, L{waitFor}) are shared
with the other gateway tests.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from ctrlgw.config import GatewayConfig, InboxConfig, sectionKeys
from ctrlgw.inbox import Inbox
from ctrlgw.interfaces import Fenced, Rejected, Session, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.service import Gateway
from ctrlgw.store.database import Database
from ctrlgw.store.postgres import ClaimPolicy, InboxRow, Store
from tests.helpers import makeConfig
from tests.pg import PostgresTestCase, PrivatePostgres, databaseConfig

# --- helpers shared by the gateway tests ---


def deferred(method: Callable[..., Any]) -> Callable[..., Any]:
    """
    Run an async test method as a Deferred-returning trial test.
    """

    def test(self: Any) -> Any:
        return Deferred.fromCoroutine(method(self))

    test.__name__ = method.__name__
    test.__doc__ = method.__doc__
    return test


def nowMillis() -> int:
    return int(reactor.seconds() * 1000)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def waitFor(
    predicate: Callable[[], object],
    what: str | Callable[[], str],
    timeout: float = 30.0,
    interval: float = 0.05,
) -> None:
    """
    Poll C{predicate} on the real reactor until it is true; fail after C{timeout} seconds,
    saying C{what} was awaited (a callable is asked only then, for the state at that time).
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {description}")
        await sleep(interval)


class LineClient(Protocol):
    """
    A controller speaking protocol v1 over the C{lines} framing: JSON lines out, every
    frame it receives kept in C{frames}.
    """

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self._buffer = b""
        self.connected = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.frames.append(json.loads(line))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.lost.callback(None)

    def send(self, **fields: Any) -> None:
        fields.setdefault("ts", nowMillis())
        self.transport.write(json.dumps(fields).encode("utf-8") + b"\n")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    @property
    def acked(self) -> list[str]:
        return [f["ref"] for f in self.of("ack")]

    async def hello(self, controller: str, token: str | None = None, timeout: float = 20) -> dict[str, Any]:
        """
        Say hello; return the welcome or the error that answered it.
        """
        seen = len(self.frames)
        fields: dict[str, Any] = {"type": "hello", "controller": controller}
        if token is not None:
            fields["token"] = token
        self.send(**fields)
        await waitFor(
            lambda: any(f["type"] in ("welcome", "error") for f in self.frames[seen:]),
            f"an answer to the hello of {controller}",
            timeout,
        )
        return next(f for f in self.frames[seen:] if f["type"] in ("welcome", "error"))

    def close(self) -> Deferred[None]:
        if self.connected:
            self.transport.loseConnection()
        return self.lost


async def connectClient(test: Any, endpoint: Any) -> LineClient:
    """
    Connect a L{LineClient}; closed (and waited for) when the test ends.
    """
    client = await connectProtocol(endpoint, LineClient())
    test.addCleanup(client.close)
    return client


def gatewayConfig(dsn: str, schema: str, **sections: dict[str, object]) -> GatewayConfig:
    """
    A gateway configuration for tests: listeners and HTTP on ephemeral loopback ports,
    short database reconnects, quick flushes; C{sections} override or add keys.
    """
    values: dict[str, dict[str, object]] = {
        "gateway": {"instance_id": "gw-" + uuid.uuid4().hex[:8]},
        "http": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "database": {
            "dsn": dsn,
            "schema": schema,
            "pool_size": 2,
            "connect_timeout": "1s",
            "statement_timeout": "3s",
            "reconnect_max_delay": "0.5s",
        },
        "inbox": {"flush_interval": "5ms", "batch_size": 100},
    }
    if "cluster" in sectionKeys():
        values["cluster"] = {
            "heartbeat_interval": "0.5s",
            "instance_ttl": "5s",
            "reconcile_interval": "1s",
        }
    listener = sections.pop("listener", {"endpoint": "tcp:0:interface=127.0.0.1"})
    for name, items in sections.items():
        values.setdefault(name, {}).update(items)
    return makeConfig(listener=listener, **values)


async def startGateway(
    test: Any, config: GatewayConfig, gatewayReactor: Any = None, ready: bool = True
) -> Gateway:
    """
    Start a L{Gateway} on the real reactor (or C{gatewayReactor}); stopped when the test
    ends.  With C{ready}, wait until its readiness checks all pass.
    """
    gateway = Gateway(config, gatewayReactor if gatewayReactor is not None else reactor)

    async def stop() -> None:
        # Stopped means stopped: no timer or socket may outlive this (trial checks).
        if gateway.service.running:
            await gateway.service.stopService()

    # After the stop: a failure some Deferred of the gateway left unhandled is reported
    # when the Deferred is collected -- so collect now, in this test, not in a later one.
    test.addCleanup(gc.collect)
    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    gateway.service.startService()
    if ready:
        await waitFor(
            gateway.readiness.ready,
            lambda: f"the gateway to be ready: {gateway.readiness.evaluate()}",
        )
    return gateway


def listenerPort(gateway: Gateway, name: str = "main") -> int:
    port = gateway.service.getServiceNamed(f"listener:{name}").port
    assert port is not None, "listener not listening"
    return port.getHost().port


def httpPort(gateway: Gateway) -> int:
    port = gateway.service.getServiceNamed("http").port
    assert port is not None, "http not listening"
    return port.getHost().port


def tcpEndpoint(port: int) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)


class RestartablePostgres(PrivatePostgres):
    """
    L{PrivatePostgres} started again in the directory it was created with.
    """

    def __init__(self) -> None:
        super().__init__()
        # The server's socket directory (postmaster.pid), not the socket file in it.
        socketDir = self.server.get_postmaster_info().socket_dir
        if socketDir is not None:
            self.socketDir = str(socketDir)


def metric(gateway: Gateway, name: str, labels: dict[str, str] | None = None) -> float | None:
    return gateway.metrics.registry.get_sample_value(name, labels or {})


# --- Inbox over Store ---


class RecordingStore(Store):
    """
    A store that remembers which messages a finished C{writeInbox} has committed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed: set[str] = set()
        self.statements = 0

    async def writeInbox(self, rows: Sequence[InboxRow]) -> list[object]:
        self.statements += 1
        results = await super().writeInbox(rows)
        self.committed.update(
            r.messageId for r, res in zip(rows, results, strict=True) if not isinstance(res, Exception)
        )
        return results


class InboxTests(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        # The inbox writes through a pool of its own; the checks read through self.db.
        self.store = RecordingStore(
            await self.openDatabase(), "gw-1", ClaimPolicy(flapThreshold=1000, refuseFlapping=False)
        )
        self.inboxMetrics = Metrics()

    def makeInbox(self, **config: Any) -> Inbox:
        values: dict[str, Any] = dict(batch_size=200, flush_interval=0.005, max_buffered=10_000)
        values.update(config)
        return Inbox(reactor, self.store, InboxConfig(**values), self.inboxMetrics)

    async def session(self, controller: str) -> Session:
        claim = await self.store.claimSession(controller, "main", "192.0.2.1:1")
        return Session(controller, claim.session, claim.epoch, "gw-1", "main", "192.0.2.1:1")

    async def stored(self, ids: Sequence[str]) -> set[str]:
        rows = await self.db.runQuery(
            "t", "SELECT message_id FROM inbox WHERE message_id = ANY(%s)", (list(ids),)
        )
        return {m for (m,) in rows}

    def sample(self, name: str) -> float:
        return self.inboxMetrics.registry.get_sample_value(name) or 0.0

    @deferred
    async def test_fewStatements(self) -> None:
        """
        A thousand messages submitted at once are written in a handful of statements, and
        all of them are stored.
        """
        inbox = self.makeInbox()
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMillis(), {"i": i}) for i in range(1000)]
        results = await gatherResults(ds, consumeErrors=True)
        self.assertEqual(results, [None] * 1000)
        flushes = self.sample("ctrlgw_inbox_batch_size_count")
        self.assertEqual(self.sample("ctrlgw_inbox_batch_size_sum"), 1000)
        self.assertLessEqual(flushes, 10)
        self.assertEqual(self.store.statements, flushes)
        self.assertEqual(self.sample("ctrlgw_inbox_rows_written_total"), 1000)
        count = await self.db.runQuery("t", "SELECT count(*), count(DISTINCT message_id) FROM inbox")
        self.assertEqual(count, [(1000, 1000)])
        self.assertEqual(self.sample("ctrlgw_inbox_buffered_unacked"), 0)

    @deferred
    async def test_poisonMessageIsolated(self) -> None:
        """
        A message the database refuses (here a NUL in its body, which the protocol decoder
        would have stopped) fails alone with Rejected; the rest of its batch is stored and
        confirmed, and nothing is retried for ever.
        """
        inbox = self.makeInbox(batch_size=64)
        session = await self.session("c1")
        ids = [f"m{i}" for i in range(40)]
        ds = [
            inbox.submit(session, m, nowMillis(), {"text": "bad\x00" if m == "m17" else "ok"})
            for m in ids
        ]
        outcomes = await gatherResults(
            [d.addCallbacks(lambda _: "ok", lambda f: f.value) for d in ds]
        )
        self.assertIsInstance(outcomes[17], Rejected)
        self.assertEqual([o for i, o in enumerate(outcomes) if i != 17], ["ok"] * 39)
        self.assertEqual(await self.stored(ids), set(ids) - {"m17"})
        self.assertEqual(len(inbox.writer), 0)

    @deferred
    async def test_firesOnlyAfterCommit(self) -> None:
        """
        Each message's Deferred fires only once its row is committed: at that moment a
        finished write holds it, and a query started from the callback, on another
        connection, finds the row.
        """
        inbox = self.makeInbox(batch_size=50)
        session = await self.session("c1")
        early: list[str] = []
        checks: list[Deferred[object]] = []

        def confirmed(result: object, messageId: str) -> object:
            if messageId not in self.store.committed:
                early.append(messageId)
            checks.append(
                self.db.runQuery(
                    "check", "SELECT count(*) FROM inbox WHERE message_id = %s", (messageId,)
                ).addCallback(lambda rows, m=messageId: (m, rows[0][0]))
            )
            return result

        ds = []
        for i in range(300):
            d = inbox.submit(session, f"m{i}", nowMillis(), {"i": i})
            ds.append(d.addCallback(confirmed, f"m{i}"))
            if i % 70 == 0:
                # Some arrive while a flush is in flight, some after an interval.
                await sleep(0.01)
        await gatherResults(ds, consumeErrors=True)
        self.assertEqual(early, [])
        found = await gatherResults(checks, consumeErrors=True)
        self.assertEqual(len(found), 300)
        self.assertEqual([m for m, n in found if n != 1], [])

    @deferred
    async def test_duplicatesFire(self) -> None:
        """
        A retransmission -- in a later batch or in the same one -- fires too (the
        controller is acked again) and is stored once.
        """
        inbox = self.makeInbox()
        session = await self.session("c1")
        await inbox.submit(session, "m1", nowMillis(), {"v": 1})
        again = await gatherResults(
            [
                inbox.submit(session, "m1", nowMillis(), {"v": 2}),
                inbox.submit(session, "m2", nowMillis(), {"v": 1}),
                inbox.submit(session, "m2", nowMillis(), {"v": 2}),
            ]
        )
        self.assertEqual(again, [None, None, None])
        rows = await self.db.runQuery("t", "SELECT message_id, body FROM inbox ORDER BY message_id")
        self.assertEqual([m for m, _ in rows], ["m1", "m2"])
        # The first stored copy stays; of two copies in one batch, either may be it.
        self.assertEqual(rows[0], ("m1", {"v": 1}))
        self.assertGreaterEqual(self.sample("ctrlgw_inbox_duplicates_total"), 1)

    @deferred
    async def test_fencedFails(self) -> None:
        """
        A message of a superseded session fails with L{Fenced}, is not stored, and does
        not hold up the others of its batch.
        """
        inbox = self.makeInbox()
        old = await self.session("c1")
        new = await self.session("c1")
        stale = inbox.submit(old, "stale", nowMillis(), None)
        fresh = inbox.submit(new, "fresh", nowMillis(), None)
        self.assertIsNone(await fresh)
        with self.assertRaises(Fenced):
            await stale
        self.assertEqual(await self.stored(["stale", "fresh"]), {"fresh"})

    @deferred
    async def test_fullRefusesAtOnce(self) -> None:
        """
        Past C{max_buffered} unconfirmed messages, C{submit} fails at once with
        L{Unavailable} and counts the refusal.
        """
        inbox = self.makeInbox(max_buffered=5, batch_size=100, flush_interval=0.5)
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMillis(), None) for i in range(5)]
        refused = inbox.submit(session, "m5", nowMillis(), None)
        self.assertTrue(refused.called)
        with self.assertRaises(Unavailable):
            await refused
        self.assertEqual(self.sample("ctrlgw_inbox_refused_total"), 1)
        self.assertEqual(self.sample("ctrlgw_inbox_buffered_unacked"), 5)
        await inbox.drain()
        self.assertEqual([d.called for d in ds], [True] * 5)
        self.assertEqual(await self.stored([f"m{i}" for i in range(6)]), {f"m{i}" for i in range(5)})

    @deferred
    async def test_databaseAway(self) -> None:
        """
        While the inbox's pool has no healthy connection nothing is confirmed; the
        messages wait (unacked) and are written once the database is back.
        """
        db = Database(reactor, databaseConfig(self.schema), Metrics())
        self.addCleanup(db.stop)
        store = RecordingStore(db, "gw-1")
        inbox = Inbox(reactor, store, InboxConfig(100, 0.005, 1000), self.inboxMetrics)
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMillis(), None) for i in range(10)]
        await sleep(0.3)
        self.assertEqual([d.called for d in ds], [False] * 10)
        self.assertEqual(await self.stored([f"m{i}" for i in range(10)]), set())
        await db.start(self.dsn)
        await gatherResults(ds)
        self.assertEqual(len(await self.stored([f"m{i}" for i in range(10)])), 10)


# --- the whole gateway while its database goes away ---


class DurabilityTests(PostgresTestCase):
    """
    Acks are sent only for committed messages, through a database outage.
    """

    timeout = 180

    @deferred
    async def test_databaseOutage(self) -> None:
        server = await deferToThread(RestartablePostgres)
        self.addCleanup(deferToThread, server.destroy)
        config = gatewayConfig(server.dsn, "ctrlgw")
        gateway = await startGateway(self, config)
        self.assertEqual(metric(gateway, "ctrlgw_db_up"), 1)
        port = listenerPort(gateway)

        client = await connectClient(self, tcpEndpoint(port))
        welcome = await client.hello("plant-1")
        self.assertEqual(welcome["type"], "welcome", welcome)
        sent: list[str] = []

        def send(messageId: str) -> None:
            sent.append(messageId)
            client.send(type="msg", id=messageId, body={"seq": len(sent)})

        before = [f"before-{i}" for i in range(20)]
        for messageId in before:
            send(messageId)
        await waitFor(lambda: set(before) <= set(client.acked), "acks before the outage")

        # The database goes away under the gateway.
        await deferToThread(server.stop)
        during = [f"during-{i}" for i in range(10)]
        for messageId in during:
            send(messageId)
        # Nothing is acked while nothing can be committed; the gateway notices the outage.
        await waitFor(lambda: not gateway.db.up, "the gateway to notice the outage", 20)
        self.assertEqual(metric(gateway, "ctrlgw_db_up"), 0)
        await sleep(1.5)
        self.assertEqual([m for m in client.acked if m in during], [])
        self.assertEqual(client.of("error"), [])
        self.assertTrue(client.connected)
        self.assertGreaterEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked") or 0, 10)

        # A new controller cannot be admitted meanwhile: refused, to retry later.
        newcomer = await connectClient(self, tcpEndpoint(port))
        answer = await newcomer.hello("plant-2")
        self.assertEqual(answer["type"], "error", answer)
        self.assertEqual(answer["code"], "unavailable", answer)
        await waitFor(lambda: not newcomer.connected, "the refused connection to close", 10)
        self.assertEqual(newcomer.of("welcome"), [])

        # The database comes back: the gateway reconnects by itself and acks the backlog.
        await deferToThread(server.start)
        await waitFor(lambda: metric(gateway, "ctrlgw_db_up") == 1, "db_up back to 1", 30)
        await waitFor(lambda: set(during) <= set(client.acked), "acks of the buffered messages", 30)
        after = [f"after-{i}" for i in range(5)]
        for messageId in after:
            send(messageId)
        await waitFor(lambda: set(after) <= set(client.acked), "acks after the outage", 30)
        await waitFor(gateway.readiness.ready, "readiness after the outage", 30)

        # Every acked message is committed, exactly once; nothing sent went unacked.
        db = Database(reactor, databaseConfig("ctrlgw"), Metrics())
        await db.start(server.dsn)
        self.addCleanup(db.stop)
        rows = await db.runQuery(
            "t", "SELECT message_id, count(*) FROM inbox WHERE controller_id = 'plant-1' GROUP BY 1"
        )
        counts = dict(rows)
        acked = set(client.acked)
        self.assertEqual(acked, set(sent))
        self.assertEqual(sorted(m for m in acked if m not in counts), [])
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {})
        self.assertEqual(set(counts), set(sent))
        self.assertEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked"), 0)

        # Orderly end: the client leaves, the gateway stops.
        await client.close()
        await gateway.service.stopService()
        self.assertFalse(gateway.db.up)

    @deferred
    async def test_stopDuringOutage(self) -> None:
        """
        Stopped while its database is away, the gateway says bye, waits (bounded) for the
        backlog, then gives it up unacked -- and nothing of it keeps running afterwards.
        """
        server = await deferToThread(RestartablePostgres)
        self.addCleanup(deferToThread, server.destroy)
        gateway = await startGateway(self, gatewayConfig(server.dsn, "ctrlgw"))
        client = await connectClient(self, tcpEndpoint(listenerPort(gateway)))
        self.assertEqual((await client.hello("plant-1"))["type"], "welcome")
        client.send(type="msg", id="kept", body=None)
        await waitFor(lambda: client.acked == ["kept"], "the first ack")

        await deferToThread(server.stop)
        for i in range(3):
            client.send(type="msg", id=f"lost-{i}", body=None)
        await waitFor(lambda: not gateway.db.up, "the gateway to notice the outage", 20)
        await waitFor(
            lambda: (metric(gateway, "ctrlgw_inbox_buffered_unacked") or 0) >= 3,
            "the messages to be buffered",
        )
        started = reactor.seconds()
        await gateway.service.stopService()
        self.assertLess(reactor.seconds() - started, 30)
        await waitFor(lambda: not client.connected, "the client to be disconnected", 10)
        self.assertEqual(client.acked, ["kept"])
        self.assertEqual([f.get("reason") for f in client.of("bye")], ["shutdown"])
        self.assertEqual(len(gateway.inbox.writer), 0)
        self.assertEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked"), 0)
