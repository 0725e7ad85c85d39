"""
Cluster-wide ownership with several real gateway instances on one PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ctrlgw.service import Gateway
from ctrlgw.store.postgres import Store
from tests.gateways import (
    LineController,
    connectController,
    httpPort,
    listenerPort,
    nowMs,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.pg import PostgresTestCase

# Heartbeats far apart: a LISTEN connection a test stops stays stopped (the heartbeat
# starts it again), while reconciliation keeps its 1s interval.
DEAF = {"heartbeat_interval": "10m", "instance_ttl": "30m"}


class _Backend(Protocol):
    """
    The proxy's connection to a gateway.  It outlives the client: the proxy never forwards
    a close, so the gateway sees a socket that stays open and accepts writes.
    """

    def __init__(self, front: _Front) -> None:
        self.front = front
        self.received = b""
        self.lost = False
        self.lostAt: float | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.front.transport is not None and not self.front.gone:
            self.front.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.lostAt = reactor.seconds()

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.received.split(b"\n") if line.strip()]


class _Front(Protocol):
    def __init__(self, proxy: StickyProxy) -> None:
        self.proxy = proxy
        self.gone = False
        self.pending = b""
        self.backend: _Backend | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        port = self.proxy.targets.pop(0)
        backend = _Backend(self)
        self.proxy.backends.append(backend)
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), backend)
        d.addCallback(self._connected)

    def _connected(self, backend: _Backend) -> None:
        self.backend = backend
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.backend is not None
        self.backend.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The middlebox of the field failure: the client is gone, the backend socket stays.
        self.gone = True


class StickyProxy(Factory):
    """
    A TCP proxy that sends each new client to the next port in C{targets} and never closes
    a backend connection when its client goes away.
    """

    def __init__(self) -> None:
        self.targets: list[int] = []
        self.backends: list[_Backend] = []

    def buildProtocol(self, addr: Any) -> _Front:
        return _Front(self)


class ClusterTests(PostgresTestCase):
    timeout = 120

    async def gateways(self, *names: str, **sections: dict[str, object]) -> list[Gateway]:
        return [await startGateway(self, self.dsn, self.schema, name, sections) for name in names]

    async def controller(self, gateway: Gateway) -> LineController:
        client = await connectController(listenerPort(gateway))
        self.addCleanup(client.close)
        return client

    async def inboxIds(self, controller: str) -> list[str]:
        rows = await self.db.runQuery(
            "test", "SELECT message_id FROM inbox WHERE controller_id = %s ORDER BY id", (controller,)
        )
        return [r[0] for r in rows]

    async def sessionRow(self, controller: str) -> tuple[Any, ...]:
        rows = await self.db.runQuery(
            "test",
            "SELECT epoch, instance_id, online FROM sessions WHERE controller_id = %s",
            (controller,),
        )
        return rows[0]

    # --- takeover across instances ---

    async def _takeover(self) -> None:
        a, b = await self.gateways("gw-a", "gw-b")
        first = await self.controller(a)
        welcomeA = await first.hello("c-1")
        second = await self.controller(b)
        welcomeB = await second.hello("c-1")
        welcomedAt = reactor.seconds()
        self.assertGreater(welcomeB["epoch"], welcomeA["epoch"])

        await waitUntil(lambda: first.isClosed, 5, what="the old connection dropped")
        convergence = reactor.seconds() - welcomedAt
        self.assertEqual(first.of("bye")[-1]["reason"], "takeover")
        self.assertLess(convergence, 2.0)
        self.assertIsNone(a.registry.lookup("c-1"))
        self.assertIs(b.registry.lookup("c-1").session.epoch, welcomeB["epoch"])  # type: ignore[union-attr]
        self.assertEqual(sample(a, "ctrlgw_takeovers_total", {"scope": "remote"}), 1)
        self.assertEqual(sample(a, "ctrlgw_takeover_convergence_seconds_count"), 1)

        second.send({"type": "msg", "id": "on-b", "body": 1})
        await second.waitFor("ack", ref="on-b")
        self.assertEqual(await self.inboxIds("c-1"), ["on-b"])
        epoch, instance, online = await self.sessionRow("c-1")
        self.assertEqual((epoch, instance, online), (welcomeB["epoch"], "gw-b", True))

    def test_takeoverAcrossInstances(self) -> Deferred[None]:
        """
        A hello on B for a controller connected to A: A says bye (takeover) and drops its
        socket within a bound; only B's session stores messages.
        """
        return Deferred.fromCoroutine(self._takeover())

    # --- the field failure: a middlebox that keeps the old socket open ---

    async def _stickyProxy(self, notifications: bool) -> None:
        # A long heartbeat: the heartbeat would start a stopped LISTEN connection again.
        a, b = await self.gateways("gw-a", "gw-b", cluster=DEAF)
        if not notifications:
            a.cluster.listener.stop()
        proxy = StickyProxy()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy)
        self.addCleanup(port.stopListening)
        proxy.targets = [listenerPort(a), listenerPort(b)]

        old = await connectController(port.getHost().port)
        await old.hello("c-1")
        old.send({"type": "msg", "id": "before", "body": 1})
        await old.waitFor("ack", ref="before")
        old.close()  # The controller reconnects; the proxy keeps A's socket open.
        await old.closed

        new = await connectController(port.getHost().port)
        self.addCleanup(new.close)
        welcome = await new.hello("c-1")
        reconnectedAt = reactor.seconds()
        stale = proxy.backends[0]

        injected = [f"stale-{i}" for i in range(20)]
        if not notifications:
            # Reads from the dead socket: frames arriving on A's stale socket after the
            # takeover (A has missed the notification).
            for messageId in injected:
                stale.transport.write(
                    json.dumps({"type": "msg", "id": messageId, "ts": nowMs(), "body": 0}).encode()
                    + b"\n"
                )
        await waitUntil(lambda: stale.lost, 5, what="A dropping the stale socket")
        dropDelay = (stale.lostAt or 0) - reconnectedAt

        new.send({"type": "msg", "id": "after", "body": 2})
        await new.waitFor("ack", ref="after")

        staleAcks = [f for f in stale.frames() if f["type"] == "ack" and f["ref"] in injected]
        stored = await self.inboxIds("c-1")
        self.assertEqual(staleAcks, [])
        self.assertEqual(stored, ["before", "after"])
        self.assertEqual(stale.frames()[-1], {**stale.frames()[-1], "type": "bye", "reason": "takeover"})
        self.assertLess(dropDelay, 2.0)
        epoch, instance, online = await self.sessionRow("c-1")
        self.assertEqual((epoch, instance, online), (welcome["epoch"], "gw-b", True))
        print(f"\nsticky proxy, notifications={notifications}: stale socket dropped "
              f"{dropDelay * 1000:.1f} ms after the new welcome; "
              f"{len(staleAcks)}/{len(injected)} stale frames acked, "
              f"{len([m for m in stored if m.startswith('stale')])} stored")

    def test_stickyMiddleboxWithNotification(self) -> Deferred[None]:
        """
        The field failure: a proxy keeps the old client-side socket open after the
        controller reconnects through it to another instance.  The old instance drops that
        socket as soon as the takeover is announced.
        """
        return Deferred.fromCoroutine(self._stickyProxy(notifications=True))

    def test_stickyMiddleboxNotificationLost(self) -> Deferred[None]:
        """
        The same with A deaf to notifications: messages arriving on the stale socket are
        neither stored nor acked (epoch fencing in the insert), and A drops the socket.
        """
        return Deferred.fromCoroutine(self._stickyProxy(notifications=False))

    # --- races ---

    async def _race(self) -> None:
        gateways = await self.gateways(
            "gw-a", "gw-b", "gw-c", cluster={"flap_policy": "log"}
        )
        clients = [await self.controller(g) for g in gateways for _ in range(8)]
        for client in clients:
            client.send({"type": "hello", "controller": "c-race"})

        def settled() -> bool:
            return all(c.of("welcome") or c.isClosed for c in clients) and sum(
                not c.isClosed for c in clients
            ) == 1

        await waitUntil(settled, 15, what="one survivor")
        # Two more reconciliation rounds on every instance: the survivor must stay the
        # survivor.

        def rounds(g: Gateway) -> float:
            return sum(sample(g, "ctrlgw_reconcile_rounds_total", {"kind": kind})
                       for kind in ("full", "changed"))

        targets = [rounds(g) + 2 for g in gateways]
        await waitUntil(lambda: all(rounds(g) >= t for g, t in zip(gateways, targets, strict=True)),
                        15, what="two more reconciliation rounds on every instance")
        alive = [c for c in clients if not c.isClosed]
        self.assertEqual(len(alive), 1)
        epoch, instance, online = await self.sessionRow("c-race")
        self.assertTrue(online)
        self.assertEqual(alive[0].of("welcome")[-1]["epoch"], epoch)
        holders = [g for g in gateways if g.registry.lookup("c-race") is not None]
        self.assertEqual([g.cluster.instance for g in holders], [instance])
        rows = await self.db.runQuery("test", "SELECT count(*) FROM sessions WHERE controller_id = 'c-race'")
        self.assertEqual(rows[0][0], 1)

    def test_concurrentHellosLeaveOneConnection(self) -> Deferred[None]:
        """
        24 simultaneous hellos for one id on three instances end with exactly one live
        connection, the one holding the epoch in the (single) session row.
        """
        return Deferred.fromCoroutine(self._race())

    # --- notification loss ---

    async def _notifyLoss(self) -> None:
        a, b = await self.gateways("gw-a", "gw-b", cluster=DEAF)
        first = await self.controller(a)
        await first.hello("c-1")
        a.cluster.listener.stop()  # A hears no more takeovers.
        second = await self.controller(b)
        await second.hello("c-1")
        took = await waitUntil(lambda: first.isClosed, 5, what="reconciliation on A")
        self.assertFalse(a.notifications.listening)
        self.assertLess(took, 1.0 + 1.0)  # reconcile_interval is 1s
        self.assertEqual(sample(a, "ctrlgw_takeovers_total", {"scope": "remote"}), 0)
        self.assertGreaterEqual(sample(a, "ctrlgw_reconcile_aborts_total"), 1)
        print(f"\nnotification lost: reconciliation dropped the old connection after {took * 1000:.0f} ms")

    def test_reconciliationWithoutNotifications(self) -> Deferred[None]:
        """
        With its LISTEN connection gone, A still drops a connection B took over, within
        reconcile_interval.
        """
        return Deferred.fromCoroutine(self._notifyLoss())

    async def _listenReconnects(self) -> None:
        a, b = await self.gateways("gw-a", "gw-b")
        listen = a.cluster.listener.connection
        await self.db.runOperation(
            "test", "SELECT pg_terminate_backend(%s)", (listen.get_backend_pid(),)
        )
        await waitUntil(
            lambda: a.cluster.listener.connection not in (None, listen), 10,
            what="A listening on a new connection",
        )
        first = await self.controller(a)
        await first.hello("c-1")
        second = await self.controller(b)
        await second.hello("c-1")
        await waitUntil(lambda: first.isClosed, 5)
        self.assertEqual(sample(a, "ctrlgw_takeovers_total", {"scope": "remote"}), 1)

    def test_listenConnectionComesBack(self) -> Deferred[None]:
        """
        When the LISTEN connection is killed, the instance notices, listens again, and
        takeovers are announced to it as before.
        """
        return Deferred.fromCoroutine(self._listenReconnects())

    # --- restart, dead instances, flapping, presence ---

    async def _restart(self) -> None:
        store = Store(self.db, "gw-crashed")
        await store.registerInstance("h", 1)
        await store.claimSession("c-left", "main", "10.0.0.1:1")
        self.assertTrue((await self.sessionRow("c-left"))[2])
        await self.gateways("gw-crashed")
        rows = await self.db.runQuery(
            "test", "SELECT online, disconnect_reason FROM sessions WHERE controller_id = 'c-left'"
        )
        self.assertEqual(rows[0], (False, "instance_restart"))

    def test_restartCleansOwnRows(self) -> Deferred[None]:
        """
        An instance restarting under the same id marks its previous run's sessions offline.
        """
        return Deferred.fromCoroutine(self._restart())

    async def _flapping(self) -> None:
        a, b = await self.gateways(
            "gw-a", "gw-b",
            cluster={"flap_threshold": 3, "flap_window": "60s", "flap_cooldown": "60s"},
        )
        clients = []
        # Hellos 2, 3 and 4 take over; the third takeover trips the threshold (and is
        # still admitted).
        for i in range(4):
            client = await self.controller(a if i % 2 == 0 else b)
            await client.hello("twin")
            clients.append(client)
        # The next hello is refused...
        refused = await self.controller(b)
        refused.send({"type": "hello", "controller": "twin"})
        await waitUntil(lambda: refused.isClosed, 5)
        self.assertEqual(refused.of("error")[0]["code"], "unavailable")
        self.assertIn("flapping", refused.of("error")[0]["detail"])
        # ... and the connected device keeps its session.
        self.assertFalse(clients[-1].isClosed)
        self.assertGreaterEqual(sample(a, "ctrlgw_flapping_detections_total") +
                                sample(b, "ctrlgw_flapping_detections_total"), 2)

    def test_flappingIdIsRefusedForCooldown(self) -> Deferred[None]:
        """
        Two devices with one id taking each other over: past flap_threshold takeovers in
        flap_window, further hellos are refused and the connected one stays.
        """
        return Deferred.fromCoroutine(self._flapping())

    async def _presence(self) -> None:
        (a,) = await self.gateways("gw-a", http={"api_token": "s3cret"})
        client = await self.controller(a)
        welcome = await client.hello("c-p")
        agent = Agent(reactor)
        url = b"http://127.0.0.1:%d/v1/controllers/c-p" % httpPort(a)

        response = await agent.request(b"GET", url)
        await readBody(response)
        self.assertEqual(response.code, 401)

        auth = Headers({b"authorization": [b"Bearer s3cret"]})
        response = await agent.request(b"GET", url, auth)
        body = json.loads(await readBody(response))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            (body["online"], body["instance"], body["epoch"], body["session"]),
            (True, "gw-a", welcome["epoch"], welcome["session"]),
        )
        client.close()
        await client.closed
        for _ in range(100):
            response = await agent.request(b"GET", url, auth)
            body = json.loads(await readBody(response))
            if not body["online"]:
                break
            await sleep(0.05)
        self.assertFalse(body["online"])
        self.assertEqual(body["disconnect_reason"], "peer_closed")

    def test_presenceApi(self) -> Deferred[None]:
        """
        GET /v1/controllers/{id} says whether a controller is online, where, with which
        epoch and session; it needs the bearer token.
        """
        return Deferred.fromCoroutine(self._presence())

