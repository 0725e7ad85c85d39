"""
The command outbox with real PostgreSQL, real gateways and real sockets: states and their
history, FIFO and in-flight limits, retries with the same id, expiry, delivery across
takeovers and superseded sessions, notifications, the SQL and HTTP APIs, metrics.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

import tests.test_cluster as clusterTests
from ctrlgw.outbox import FINAL_STATES
from ctrlgw.service import Gateway
from ctrlgw.store.postgres import _CLAIM_COMMANDS, Store
from tests.dbwait import backendPid, waitUntilBlocked
from tests.gateways import (
    Frame,
    LineController,
    SkewedReactor,
    connectController,
    httpPort,
    listenerPort,
    mergeSections,
    nowMs,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase


class OutboxTests(PostgresTestCase):
    timeout = 90

    # An instance that stays deaf once its LISTEN connection is stopped: no reconciliation
    # and no heartbeat (which may start listening again) while a test runs.
    DEAF = {"reconcile_interval": "1h", "heartbeat_interval": "10m", "instance_ttl": "20m"}

    # --- helpers ---

    async def gateway(self, instance: str, **sections: dict[str, object]) -> Gateway:
        merged = mergeSections({"outbox": {"poll_interval": "200ms"}}, sections)
        return await startGateway(self, self.dsn, self.schema, instance, merged)

    async def controller(self, target: Gateway | int, autoAck: bool = False) -> LineController:
        port = target if isinstance(target, int) else listenerPort(target)
        client = await connectController(port, autoAck=autoAck)
        self.addCleanup(client.close)
        return client

    async def send(self, controller: str, body: object, ttl: str = "30 seconds") -> str:
        rows = await self.db.runQuery(
            "test", "SELECT send(%s, %s::jsonb, %s::interval)::text",
            (controller, json.dumps(body), ttl),
        )
        return str(rows[0][0])

    async def sendMany(
        self, controllers: Sequence[str], bodies: Sequence[object], ttl: str = "30 seconds"
    ) -> list[str]:
        rows = await self.db.runQuery(
            "test",
            "SELECT id::text FROM send_many(%s::text[], %s::jsonb[], %s::interval) AS id",
            (list(controllers), [json.dumps(b) for b in bodies], ttl),
        )
        return [r[0] for r in rows]

    async def status(self, command: str) -> dict[str, Any] | None:
        rows = await self.db.runQuery("test", "SELECT command_status(%s::uuid)", (command,))
        return rows[0][0]

    async def waitForState(self, command: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        started = reactor.seconds()
        while True:
            current = await self.status(command)
            assert current is not None, f"no command {command}"
            if current["state"] == state:
                return current
            if current["state"] in FINAL_STATES:
                self.fail(f"{command} ended {current['state']} ({current['detail']!r}), not {state}")
            if reactor.seconds() - started > timeout:
                self.fail(f"{command} still {current['state']} after {timeout}s, not {state}")
            await sleep(0.02)

    async def polls(self, gateway: Gateway, count: int) -> None:
        """
        Wait until C{gateway} has polled its outbox C{count} more times: the positive event
        a check that nothing (more) was written waits for.
        """
        name = {"query": "outbox_due"}
        target = sample(gateway, "ctrlgw_db_query_seconds_count", name) + count
        await waitUntil(
            lambda: sample(gateway, "ctrlgw_db_query_seconds_count", name) >= target,
            10, what=f"{count} outbox polls",
        )

    async def marker(self, channel: str, payloads: list[str]) -> None:
        """
        NOTIFY a marker on C{channel} and wait until it is heard in C{payloads}.
        Notifications are delivered in commit order, so once it is heard, every
        notification of a transaction that committed before it was heard too.
        """
        await self.db.runOperation("test", "SELECT pg_notify(%s, 'marker')", (channel,))
        await waitUntil(lambda: "marker" in payloads, 5, what=f"the marker on {channel}")
        payloads.remove("marker")

    def history(self, status: dict[str, Any]) -> list[tuple[str, int, str | None]]:
        return [(e["state"], e["attempt"], e["instance"]) for e in status["history"]]

    async def listen(self, channel: str) -> list[str]:
        """
        LISTEN on C{channel} on a connection of the test's own; returns the list the
        payloads are appended to.
        """
        connection = await self.db.connect()
        self.addCleanup(connection.close)
        payloads: list[str] = []

        def notified(notify: Any) -> None:
            if notify.channel == channel:
                payloads.append(notify.payload)

        connection.addNotifyObserver(notified)
        await connection.runOperation(f'LISTEN "{channel}"')
        return payloads

    async def expiresMs(self, command: str) -> int:
        rows = await self.db.runQuery(
            "test",
            "SELECT (extract(epoch FROM expires_at) * 1000)::bigint FROM commands WHERE id = %s",
            (command,),
        )
        return int(rows[0][0])

    def arrival(self, client: LineController, frame: Frame) -> float:
        return client.receivedAt[next(i for i, f in enumerate(client.frames) if f is frame)]

    async def stickyProxy(self, first: Gateway, second: Gateway) -> tuple[clusterTests.StickyProxy, int]:
        proxy = clusterTests.StickyProxy()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy)
        self.addCleanup(port.stopListening)
        proxy.targets = [listenerPort(first), listenerPort(second)]
        return proxy, port.getHost().port

    # --- 1. states and history ---

    async def _transitions(self) -> None:
        a = await self.gateway("gw-a")
        body = {"op": "set", "values": [1, 2.5, "x", None], "nested": {"ok": True}}
        command = await self.send("c-1", body)
        pending = await self.status(command)
        assert pending is not None
        self.assertEqual((pending["state"], pending["attempts"], pending["sent_at"]),
                         ("pending", 0, None))
        self.assertEqual(self.history(pending), [("pending", 0, None)])

        client = await self.controller(a)
        welcome = await client.hello("c-1")
        cmd = await client.waitFor("cmd", id=command)
        receivedMs = self.arrival(client, cmd) * 1000
        self.assertEqual(cmd["body"], body)
        self.assertEqual(cmd["expires"], await self.expiresMs(command))
        lag = receivedMs - cmd["ts"]
        self.assertGreaterEqual(lag, -1)
        self.assertLess(lag, 50)

        sent = await self.status(command)
        assert sent is not None
        self.assertEqual((sent["state"], sent["attempts"]), ("sent", 1))
        self.assertIsNotNone(sent["sent_at"])
        self.assertEqual(sent["history"][-1]["epoch"], welcome["epoch"])

        client.send({"type": "ack", "ref": command})
        acked = await self.waitForState(command, "acked")
        self.assertEqual(
            self.history(acked),
            [("pending", 0, None), ("sent", 1, "gw-a"), ("acked", 1, "gw-a")],
        )
        self.assertIsNotNone(acked["finished_at"])
        self.assertEqual(acked["detail"], "")

        refused = await self.send("c-1", {"op": "reboot"})
        await client.waitFor("cmd", id=refused)
        client.send({"type": "nack", "ref": refused, "reason": "busy: try later"})
        nacked = await self.waitForState(refused, "nacked")
        self.assertEqual(nacked["detail"], "busy: try later")
        self.assertEqual(
            self.history(nacked),
            [("pending", 0, None), ("sent", 1, "gw-a"), ("nacked", 1, "gw-a")],
        )
        self.assertEqual(nacked["history"][-1]["detail"], "busy: try later")
        self.assertEqual(client.commandIds(), [command, refused])
        print(f"\ncmd.ts was {lag:.1f} ms before the frame was read")

    def test_stateTransitionsAndHistory(self) -> Deferred[None]:
        """
        A command sent while its controller is offline is pending; once the controller is
        welcomed, its cmd frame arrives with the same id, body and expiry, stamped at the
        moment of writing; the state goes sent, then acked on the ack, and
        command_status() lists each transition with its attempt and instance.  A nack
        finishes a command as nacked with the reason as its detail.
        """
        return Deferred.fromCoroutine(self._transitions())

    # --- 2. FIFO and in-flight limits ---

    async def _fifo(self) -> None:
        a = await self.gateway("gw-a")
        client = await self.controller(a)
        await client.hello("c-1")
        ids = await self.sendMany(["c-1"] * 3, [{"n": n} for n in range(3)])
        await client.waitFor("cmd", id=ids[0])
        await self.polls(a, 3)  # nothing more while the first is unacked
        self.assertEqual(client.commandIds(), ids[:1])
        latencies = []
        for k in range(3):
            ackedAt = reactor.seconds()
            client.send({"type": "ack", "ref": ids[k]})
            if k + 1 < len(ids):
                cmd = await client.waitFor("cmd", id=ids[k + 1])
                latencies.append((self.arrival(client, cmd) - ackedAt) * 1000)
                self.assertGreater(self.arrival(client, cmd), ackedAt)
                self.assertEqual(client.commandIds(), ids[: k + 2])
        for command in ids:
            await self.waitForState(command, "acked")
        self.assertEqual([cmd["body"] for cmd in client.of("cmd")], [{"n": n} for n in range(3)])
        print(f"\nack -> next cmd written: {', '.join(f'{ms:.1f}' for ms in latencies)} ms")

    def test_fifoOneInFlight(self) -> Deferred[None]:
        """
        With max_inflight = 1, commands go out in the order they were sent, the next only
        after the previous one is acked.
        """
        return Deferred.fromCoroutine(self._fifo())

    async def _twoInFlight(self) -> None:
        a = await self.gateway("gw-a", outbox={"max_inflight": 2})
        ids = await self.sendMany(["c-1"] * 6, [{"n": n} for n in range(6)])
        client = await self.controller(a)
        await client.hello("c-1")
        await waitUntil(lambda: len(client.of("cmd")) >= 2, 5, what="two commands")
        await self.polls(a, 2)
        self.assertEqual(client.commandIds(), ids[:2])
        client.send({"type": "ack", "ref": ids[0]})
        await client.waitFor("cmd", id=ids[2])
        await self.polls(a, 2)
        self.assertEqual(client.commandIds(), ids[:3])
        # Both slots free at once: the next two are claimed together, still in order.
        client.send({"type": "ack", "ref": ids[1]})
        client.send({"type": "ack", "ref": ids[2]})
        await waitUntil(lambda: len(client.of("cmd")) >= 5, 5, what="five commands")
        await self.polls(a, 2)
        self.assertEqual(client.commandIds(), ids[:5])

    def test_twoInFlight(self) -> Deferred[None]:
        """
        With max_inflight = 2, two commands are written at once (in order), no third
        before one of them is acked, and freed slots are refilled in FIFO order.
        """
        return Deferred.fromCoroutine(self._twoInFlight())

    async def _claimOrder(self) -> None:
        # One connection, so that a session setting applies to the claim below.
        db = await self.openDatabase(pool_size=1)
        store = Store(db, "gw-x")
        await store.registerInstance("h", 1)
        sessions = []
        for i in range(50):
            claim = await store.claimSession(f"c-{i}", "main", "10.0.0.1:1")
            sessions.append((f"c-{i}", claim.epoch))
        for r in range(3):
            await self.sendMany([c for c, _ in sessions], [{"r": r}] * len(sessions))
        # Rows stored newest first, and a plan that reads them in that order (a hash join,
        # as the planner may choose for a large claim).
        await db.runOperation("test", "CREATE INDEX commands_newest_first ON commands (seq DESC)")
        await db.runOperation("test", "CLUSTER commands USING commands_newest_first")
        await db.runOperation("test", "SET enable_nestloop = off")
        self.assertEqual((await db.runQuery("test", "SHOW enable_nestloop"))[0][0], "off")
        claimed = await store.claimCommands(sessions, 3, 5, 10.0, 2.0)
        self.assertEqual(len(claimed), 150)
        byController: dict[str, list[object]] = {}
        for command in claimed:
            byController.setdefault(command.controller, []).append(json.loads(command.body))
        self.assertEqual(set(byController), {c for c, _ in sessions})
        for bodies in byController.values():
            self.assertEqual(bodies, [{"r": 0}, {"r": 1}, {"r": 2}])

    @deferred
    async def test_claimSaysWhetherMoreWait(self) -> None:
        """
        Each claimed command says whether pending commands of its controller wait behind
        it: the last one claimed for a controller with nothing else pending says no.
        """
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        one = await store.claimSession("c-one", "main", "10.0.0.1:1")
        three = await store.claimSession("c-three", "main", "10.0.0.1:1")
        await self.sendMany(["c-one", "c-three", "c-three", "c-three"], [{"n": n} for n in range(4)])
        claimed = await store.claimCommands([("c-one", one.epoch), ("c-three", three.epoch)], 2, 5, 10.0, 2.0)
        self.assertEqual([(c.controller, json.loads(c.body), c.more) for c in claimed],
                         [("c-one", {"n": 0}, False), ("c-three", {"n": 1}, True), ("c-three", {"n": 2}, True)])

    def test_claimReturnsFifoOrderWhateverThePlan(self) -> Deferred[None]:
        """
        A claim of several commands per controller returns them in FIFO order (the order
        they are written in) even when the join plan reads the rows in another order.
        """
        return Deferred.fromCoroutine(self._claimOrder())

    # --- 3. retries ---

    async def _retries(self) -> None:
        a = await self.gateway(
            "gw-a", outbox={"ack_timeout": "300ms", "backoff": 1, "max_attempts": 3}
        )
        client = await self.controller(a)
        welcome = await client.hello("c-1")
        command = await self.send("c-1", {"op": "x"})
        await waitUntil(lambda: len(client.of("cmd")) >= 3, 5, what="three sends")
        failed = await self.waitForState(command, "failed", 5)
        self.assertEqual(client.commandIds(), [command] * 3)
        self.assertEqual(
            self.history(failed),
            [("pending", 0, None), ("sent", 1, "gw-a"), ("sent", 2, "gw-a"),
             ("sent", 3, "gw-a"), ("failed", 3, "gw-a")],
        )
        self.assertEqual(failed["detail"], "no ack after 3 sends")
        self.assertEqual({e["epoch"] for e in failed["history"][1:4]}, {welcome["epoch"]})
        times = [self.arrival(client, cmd) for cmd in client.of("cmd")]
        gaps = [(later - earlier) * 1000 for earlier, later in zip(times, times[1:], strict=False)]
        for gap in gaps:
            self.assertGreaterEqual(gap, 290)
            self.assertLess(gap, 800)
        self.assertEqual(sample(a, "ctrlgw_command_retries_total"), 2)
        await self.polls(a, 2)
        self.assertEqual(len(client.of("cmd")), 3)
        print(f"\nretry gaps: {', '.join(f'{g:.0f}' for g in gaps)} ms")

    def test_retryWithTheSameId(self) -> Deferred[None]:
        """
        Unacked, a command is written again with the same id after each ack timeout; after
        max_attempts sends it is failed (by the sweep) and written no more.
        """
        return Deferred.fromCoroutine(self._retries())

    async def _outOfAttemptsRequeued(self) -> None:
        a = await self.gateway(
            "gw-a", outbox={"ack_timeout": "300ms", "backoff": 1, "max_attempts": 2}
        )
        first = await self.controller(a)
        await first.hello("c-1")
        command = await self.send("c-1", {"op": "x"})
        await waitUntil(lambda: len(first.of("cmd")) >= 2, 5, what="two sends")
        # The session ends within the last attempt's ack timeout: back to pending.
        first.close()
        await first.closed
        after = await self.send("c-1", {"op": "y"})
        second = await self.controller(a, autoAck=True)
        await second.hello("c-1")
        await second.waitFor("cmd", id=after, timeout=5)
        failed = await self.waitForState(command, "failed", 5)
        self.assertEqual(failed["detail"], "no ack after 2 sends")
        self.assertEqual(second.commandIds(), [after])
        await self.waitForState(after, "acked")

    def test_outOfAttemptsAfterSessionEnd(self) -> Deferred[None]:
        """
        A command sent max_attempts times whose session ends before its ack goes back to
        pending, can never be sent again, and must not block the controller's queue until
        its TTL: it is failed and the next command goes out.
        """
        return Deferred.fromCoroutine(self._outOfAttemptsRequeued())

    # --- 4. expiry ---

    async def _expiry(self) -> None:
        a = await self.gateway("gw-a")
        stale = await self.send("c-1", {"op": "late"}, "200 milliseconds")
        # Until its TTL has passed by the database's clock.
        while not (await self.db.runQuery(
            "test", "SELECT expires_at < now() FROM commands WHERE id = %s", (stale,)
        ))[0][0]:
            await sleep(0.02)
        client = await self.controller(a)
        await client.hello("c-1")
        fresh = await self.send("c-1", {"op": "fresh"})
        await client.waitFor("cmd", id=fresh)
        expired = await self.waitForState(stale, "expired", 5)
        self.assertEqual(expired["detail"], "ttl passed before it was written")
        self.assertEqual((expired["attempts"], expired["sent_at"]), (0, None))
        self.assertEqual([e["state"] for e in expired["history"]], ["pending", "expired"])
        client.send({"type": "ack", "ref": fresh})
        await self.waitForState(fresh, "acked")
        self.assertEqual(client.commandIds(), [fresh])
        self.assertEqual(sample(a, "ctrlgw_commands_finished_total", {"state": "expired"}), 1)

    def test_expiredBeforeConnect(self) -> Deferred[None]:
        """
        A command whose TTL passes while its controller is offline is never written: when
        the controller connects it gets only later commands, and the command is expired,
        with a detail saying it was never written.
        """
        return Deferred.fromCoroutine(self._expiry())

    async def _expiredAtWrite(self) -> None:
        # No poll after the first: only the outbox's own wake-ups may move the queue on.
        a = await self.gateway("gw-a", outbox={"poll_interval": "1h"})
        a.context.clock = SkewedReactor(5.0)  # type: ignore[assignment]
        doomed = await self.send("c-1", {"op": "short"}, "2 seconds")
        after = await self.send("c-1", {"op": "long"})
        client = await self.controller(a, autoAck=True)
        await client.hello("c-1")
        await client.waitFor("cmd", id=after, timeout=3)
        expired = await self.waitForState(doomed, "expired", 3)
        self.assertEqual(expired["detail"], "ttl passed before it was written")
        self.assertEqual([e["state"] for e in expired["history"]], ["pending", "sent", "expired"])
        await self.waitForState(after, "acked")
        self.assertEqual(client.commandIds(), [after])
        self.assertEqual(sample(a, "ctrlgw_commands_expired_at_write_total"), 1)
        await waitUntil(
            lambda: sample(a, "ctrlgw_commands_finished_total", {"state": "expired"}) == 1, 2,
            what="the expiry counted",
        )

    def test_expiredAtWriteByTheGatewayClock(self) -> Deferred[None]:
        """
        On a gateway whose clock is ahead, a command still valid by the database clock has
        expired by the time it would be written: it is not written, it is reported back as
        expired at once, and the next command goes out without waiting for a poll.
        """
        return Deferred.fromCoroutine(self._expiredAtWrite())

    # --- 5. offline queue ---

    async def _offlineQueue(self) -> None:
        a = await self.gateway("gw-a", outbox={"poll_interval": "1h"})
        ids = [await self.send("c-1", {"n": n}) for n in range(3)]
        client = await self.controller(a, autoAck=True)
        await client.hello("c-1")
        await waitUntil(lambda: len(client.of("cmd")) >= 3, 5, what="the queue")
        self.assertEqual(client.commandIds(), ids)
        kinds = [f["type"] for f in client.frames if f["type"] in ("welcome", "cmd")]
        self.assertEqual(kinds, ["welcome", "cmd", "cmd", "cmd"])
        welcome = client.of("welcome")[0]
        delay = (self.arrival(client, client.of("cmd")[0]) - self.arrival(client, welcome)) * 1000
        self.assertLess(delay, 500)
        for command in ids:
            await self.waitForState(command, "acked")
        print(f"\nwelcome -> first queued cmd: {delay:.1f} ms")

    def test_offlineQueueDeliveredOnConnect(self) -> Deferred[None]:
        """
        Commands sent while a controller is offline are written, in order, right after its
        welcome (no poll needed: the connect wakes the outbox).
        """
        return Deferred.fromCoroutine(self._offlineQueue())

    # --- 6. takeover ---

    async def _takeover(self) -> None:
        a = await self.gateway("gw-a")
        b = await self.gateway("gw-b")
        onA = await self.controller(a)
        await onA.hello("c-1")
        command = await self.send("c-1", {"op": "x"})
        await onA.waitFor("cmd", id=command)
        onB = await self.controller(b)
        await onB.hello("c-1")
        await waitUntil(lambda: onA.isClosed, 5, what="A dropping the old connection")
        self.assertEqual(onA.of("bye")[-1]["reason"], "takeover")
        await onB.waitFor("cmd", id=command, timeout=5)
        onB.send({"type": "ack", "ref": command})
        acked = await self.waitForState(command, "acked")
        self.assertEqual(
            self.history(acked),
            [("pending", 0, None), ("sent", 1, "gw-a"), ("pending", 1, "gw-b"),
             ("sent", 2, "gw-b"), ("acked", 2, "gw-b")],
        )
        self.assertEqual(acked["history"][2]["detail"], "session ended before the ack")
        self.assertEqual(onA.commandIds(), [command])
        self.assertEqual(onB.commandIds(), [command])

    def test_deliveryFollowsTakeover(self) -> Deferred[None]:
        """
        A command written on A and not acked when the controller reconnects on B is
        written again by B with the same id; the ack on B finishes it, and the history
        shows both instances.
        """
        return Deferred.fromCoroutine(self._takeover())

    # --- 7. superseded connections ---

    async def _superseded(self) -> None:
        a = await self.gateway("gw-a", cluster=self.DEAF)
        b = await self.gateway("gw-b", cluster=self.DEAF)
        a.cluster.listener.stop()  # A hears neither takeovers nor doorbells.
        proxy, port = await self.stickyProxy(a, b)
        old = await self.controller(port)
        oldWelcome = await old.hello("c-1")
        old.close()  # The proxy keeps A's socket open.
        await old.closed
        new = await self.controller(port)
        welcome = await new.hello("c-1")
        stale = proxy.backends[0]
        held = a.registry.lookup("c-1")
        assert held is not None and held.session is not None
        self.assertEqual(held.session.epoch, oldWelcome["epoch"])

        ids = await self.sendMany(["c-1"] * 10, [{"n": n} for n in range(10)])
        polled = sample(a, "ctrlgw_db_query_seconds_count", {"query": "outbox_due"})
        await new.waitFor("cmd", id=ids[0])
        # A polls a few times while the commands are pending, and finds nothing due for
        # its stale session: the database says c-1 is no longer A's.
        await waitUntil(
            lambda: sample(a, "ctrlgw_db_query_seconds_count",
                           {"query": "outbox_due"}) >= polled + 3,
            5, what="three polls on A",
        )
        self.assertEqual(sample(a, "ctrlgw_command_claims_total",
                                {"source": "poll", "result": "found"}), 0)
        new.autoAck = True
        new.send({"type": "ack", "ref": ids[0]})
        for command in ids:
            status = await self.waitForState(command, "acked")
            self.assertEqual({e["instance"] for e in status["history"][1:]}, {"gw-b"})
            self.assertEqual(status["history"][1]["epoch"], welcome["epoch"])
        self.assertEqual(new.commandIds(), ids)
        self.assertEqual([f for f in stale.frames() if f["type"] == "cmd"], [])
        self.assertFalse(stale.lost)
        self.assertIs(a.registry.lookup("c-1"), held)
        self.assertEqual(sample(a, "ctrlgw_frames_out_total", {"type": "cmd"}), 0)

    def test_noCommandOnSupersededConnection(self) -> Deferred[None]:
        """
        A deaf to notifications still holds a controller's old connection (a middlebox
        keeps the socket open) after it reconnected on B: every command is written on B and
        none on A's superseded connection, however often A polls.
        """
        return Deferred.fromCoroutine(self._superseded())

    # --- 8. acks on superseded sessions ---

    async def _staleAckInStore(self) -> None:
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        old = await store.claimSession("c-1", "main", "10.0.0.1:1")
        command = await self.send("c-1", {"op": "x"})
        claimed = await store.claimCommands([("c-1", old.epoch)], 1, 5, 10.0, 2.0)
        self.assertEqual([(c.id, c.epoch, c.attempts) for c in claimed], [(command, old.epoch, 1)])

        new = await store.claimSession("c-1", "main", "10.0.0.1:2")
        self.assertEqual(await store.settleCommands([(command, "c-1", old.epoch, True, "")]), [])
        requeued = await self.status(command)
        assert requeued is not None
        self.assertEqual((requeued["state"], requeued["attempts"]), ("pending", 1))

        # Claims for the old session find nothing; for the new one, the same command.
        self.assertEqual(await store.claimCommands([("c-1", old.epoch)], 1, 5, 10.0, 2.0), [])
        claimed = await store.claimCommands([("c-1", new.epoch)], 1, 5, 10.0, 2.0)
        self.assertEqual([(c.id, c.epoch, c.attempts) for c in claimed], [(command, new.epoch, 2)])
        self.assertEqual(await store.settleCommands([(command, "c-1", old.epoch, False, "no")]), [])
        self.assertEqual(await store.settleCommands([(command, "c-2", new.epoch, True, "")]), [])
        still = await self.status(command)
        assert still is not None
        self.assertEqual((still["state"], still["attempts"]), ("sent", 2))

        settled = await store.settleCommands([(command, "c-1", new.epoch, True, "")])
        self.assertEqual([(i, s) for i, s, _ in settled], [(command, "acked")])
        self.assertEqual(await store.settleCommands([(command, "c-1", new.epoch, False, "")]), [])
        final = await self.status(command)
        assert final is not None
        self.assertEqual(
            [(e["state"], e["attempt"], e["epoch"]) for e in final["history"]],
            [("pending", 0, None), ("sent", 1, old.epoch), ("pending", 1, old.epoch),
             ("sent", 2, new.epoch), ("acked", 2, new.epoch)],
        )

    async def _claimRacesNewSession(self) -> None:
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        old = await store.claimSession("c-1", "main", "10.0.0.1:1")
        command = await self.send("c-1", {"op": "x"})
        other = await self.db.connect()
        self.addCleanup(other.close)
        otherPid = await backendPid(other)
        newSession = (
            "SELECT new_epoch FROM claim_session('c-1', gen_random_uuid(), 'gw-y', 'main',"
            " '10.0.0.1:2', 100, '1 minute', '1 minute', false, '30 seconds')"
        )

        # A claim that waits for a concurrent change of the session row that leaves the
        # session current (here: locked and touched, as reconciliation does) still claims.
        await other.runOperation("BEGIN")
        await other.runOperation(
            "SELECT 1 FROM sessions WHERE controller_id = 'c-1' FOR UPDATE;"
            " UPDATE sessions SET last_seen_at = now() WHERE controller_id = 'c-1'"
        )
        claiming = Deferred.fromCoroutine(store.claimCommands([("c-1", old.epoch)], 1, 5, 10.0, 2.0))
        await waitUntilBlocked(self.db, "EXECUTE ctrlgw_outbox_claim", blockedBy=otherPid)
        self.assertFalse(claiming.called)
        await other.runOperation("COMMIT")
        first = await claiming
        self.assertEqual([(c.id, c.epoch) for c in first], [(command, old.epoch)])
        await store.unsendCommands([(command, old.epoch, first[0].claim, "not_written")])

        # The new session's claim is in flight (row locked, not committed) when the old
        # owner claims: the old owner must not send on the session being superseded.
        await other.runOperation("BEGIN")
        await other.runQuery(newSession)
        claiming = Deferred.fromCoroutine(store.claimCommands([("c-1", old.epoch)], 1, 5, 10.0, 2.0))
        await waitUntilBlocked(self.db, "EXECUTE ctrlgw_outbox_claim", blockedBy=otherPid)
        self.assertFalse(claiming.called)
        await other.runOperation("COMMIT")
        self.assertEqual(await claiming, [])
        status = await self.status(command)
        assert status is not None
        self.assertEqual((status["state"], status["attempts"]), ("pending", 0))

        # The old owner's claim is in flight when the new session is claimed: the new
        # session must find the command back in pending, not 'sent' on the old epoch.
        current = await store.claimSession("c-1", "main", "10.0.0.1:3")
        await other.runOperation("BEGIN")
        rows = await other.runQuery(
            _CLAIM_COMMANDS,
            {"controllers": ["c-1"], "epochs": [current.epoch], "instance": "gw-x",
             "maxInflight": 1, "maxAttempts": 5, "ackTimeout": 10.0, "backoff": 2.0},
        )
        self.assertEqual([r[0] for r in rows], [command])
        superseding = Deferred.fromCoroutine(store.claimSession("c-1", "main", "10.0.0.1:4"))
        await waitUntilBlocked(self.db, "claim_session", blockedBy=otherPid)
        self.assertFalse(superseding.called)
        await other.runOperation("COMMIT")
        new = await superseding
        status = await self.status(command)
        assert status is not None
        self.assertEqual((status["state"], status["attempts"]), ("pending", 1))
        self.assertEqual(status["history"][-1]["detail"], "session ended before the ack")
        claimed = await store.claimCommands([("c-1", new.epoch)], 1, 5, 10.0, 2.0)
        self.assertEqual([(c.id, c.epoch, c.attempts) for c in claimed], [(command, new.epoch, 2)])

    def test_claimRacingANewSession(self) -> Deferred[None]:
        """
        A claim and a new session's claim_session() for the same controller, overlapping
        either way round: nothing is claimed for the superseded session, and a command
        the old session's claim sent is back in pending for the new session at once (not
        left 'sent' on a dead epoch until its ack timeout).
        """
        return Deferred.fromCoroutine(self._claimRacesNewSession())

    def test_staleAckIgnoredByTheStore(self) -> Deferred[None]:
        """
        Settling with the epoch of a superseded session changes nothing, whether the
        command is back to pending or sent again on the new session; only the new
        session's ack settles it, once.
        """
        return Deferred.fromCoroutine(self._staleAckInStore())

    async def _staleAckEndToEnd(self) -> None:
        a = await self.gateway("gw-a", cluster=self.DEAF)
        b = await self.gateway("gw-b", cluster=self.DEAF)
        a.cluster.listener.stop()  # A hears neither takeovers nor doorbells.
        proxy, port = await self.stickyProxy(a, b)
        old = await self.controller(port)
        await old.hello("c-1")
        command = await self.send("c-1", {"op": "x"})
        await old.waitFor("cmd", id=command)
        old.close()
        await old.closed
        new = await self.controller(port)
        await new.hello("c-1")
        await new.waitFor("cmd", id=command)
        stale = proxy.backends[0]
        stale.transport.write(
            json.dumps({"type": "ack", "ref": command, "ts": nowMs()}).encode()
            + b"\n"
        )
        await waitUntil(
            lambda: sample(a, "ctrlgw_db_query_seconds_count", {"query": "outbox_settle"}) >= 1,
            5, what="A settling the stale ack",
        )
        self.assertEqual(sample(a, "ctrlgw_frames_in_total", {"type": "ack"}), 1)
        sent = await self.status(command)
        assert sent is not None
        self.assertEqual((sent["state"], sent["attempts"]), ("sent", 2))
        self.assertEqual(sample(a, "ctrlgw_commands_finished_total", {"state": "acked"}), 0)

        new.send({"type": "ack", "ref": command})
        acked = await self.waitForState(command, "acked")
        self.assertEqual(self.history(acked)[-1], ("acked", 2, "gw-b"))

    def test_staleAckIgnoredEndToEnd(self) -> Deferred[None]:
        """
        An ack arriving on A's superseded connection (A missed the takeover) does not
        settle the command that B has written again; B's ack does.
        """
        return Deferred.fromCoroutine(self._staleAckEndToEnd())

    # --- 9. controllers moving between instances ---

    async def _moving(self) -> None:
        sections: dict[str, dict[str, object]] = {
            "cluster": {"flap_policy": "log"},
            "outbox": {"ack_timeout": "1s", "max_attempts": 10},
        }
        a = await self.gateway("gw-a", **sections)
        b = await self.gateway("gw-b", **sections)
        ports = [listenerPort(a), listenerPort(b)]
        names = [f"m-{i}" for i in range(4)]
        perController, batch = 30, 5
        connections: dict[str, list[LineController]] = {name: [] for name in names}
        firstDelivery: dict[str, list[str]] = {name: [] for name in names}
        finished = False
        started = reactor.seconds()

        def recorder(name: str) -> Any:
            def onFrame(frame: Frame) -> None:
                if frame.get("type") == "cmd" and frame["id"] not in firstDelivery[name]:
                    firstDelivery[name].append(frame["id"])
            return onFrame

        async def move(index: int, name: str) -> None:
            hop, previous = index, None
            while not finished:
                takeover = hop % 2 == 0
                if previous is not None and not takeover:
                    previous.close()
                    await previous.closed
                client = await self.controller(ports[hop % 2], autoAck=True)
                client.onFrame = recorder(name)
                connections[name].append(client)
                await client.hello(name)
                if previous is not None and takeover:
                    await waitUntil(lambda old=previous: old.isClosed, 5, what="the takeover")

                def moveOn(client: LineController = client, seen: int = len(client.of("cmd"))) -> bool:
                    return finished or client.isClosed or len(client.of("cmd")) >= seen + 4

                await waitUntil(moveOn, 25, 0.005, what=f"{name} receiving commands")
                previous, hop = client, hop + 1

        movers = gatherResults(
            [Deferred.fromCoroutine(move(i, name)) for i, name in enumerate(names)],
            consumeErrors=True,
        )
        for round in range(perController // batch):
            await self.sendMany(
                [name for name in names for _ in range(batch)],
                [{"c": name, "k": round * batch + k} for name in names for k in range(batch)],
            )
            await sleep(0.1)
        total = len(names) * perController

        async def countFinal() -> int:
            rows = await self.db.runQuery(
                "test", "SELECT count(*) FROM commands WHERE state <> ALL(%s)", (["pending", "sent"],)
            )
            return int(rows[0][0])

        while await countFinal() < total:
            self.assertLess(reactor.seconds() - started, 25, "not every command finished in time")
            await sleep(0.05)
        elapsed = reactor.seconds() - started
        finished = True
        await movers

        rows = await self.db.runQuery(
            "test",
            "SELECT c.controller_id, c.id::text, c.state,"
            " (SELECT count(*) FROM command_events e WHERE e.command_id = c.id"
            "  AND e.state = ANY(%s)) FROM commands c ORDER BY c.seq",
            (list(FINAL_STATES),),
        )
        self.assertEqual(len(rows), total)
        self.assertEqual({state for _, _, state, _ in rows}, {"acked"})
        self.assertEqual({finals for _, _, _, finals in rows}, {1})
        # Acks are prompt: a command is only sent again after a move put it back in
        # pending, never after waiting out an ack timeout on a dead session.
        retried = await self.db.runQuery(
            "test",
            "SELECT count(*) FROM (SELECT state, lag(state) OVER"
            " (PARTITION BY command_id ORDER BY id) AS previous FROM command_events) e"
            " WHERE state = 'sent' AND previous = 'sent'",
        )
        self.assertEqual(retried[0][0], 0)
        redelivered = 0
        for name in names:
            sentOrder = [command for controller, command, _, _ in rows if controller == name]
            self.assertEqual(firstDelivery[name], sentOrder)
            delivered = 0
            for client in connections[name]:
                ids = client.commandIds()
                self.assertEqual(len(ids), len(set(ids)), f"an id written twice on one session of {name}")
                delivered += len(ids)
            redelivered += delivered - perController
            self.assertGreaterEqual(len(connections[name]), 4, f"{name} hardly moved")
        moves = sum(len(c) for c in connections.values()) - len(names)
        print(f"\n{total} commands to {len(names)} moving controllers: all acked in "
              f"{elapsed:.2f}s, {moves} moves, {redelivered} written again after a move")

    def test_controllersMovingBetweenInstances(self) -> Deferred[None]:
        """
        Four auto-acking controllers hop between two instances (by takeover or by
        reconnecting) while 30 commands each are sent in batches: every command is acked
        exactly once, no id is written twice on one session, each controller gets its
        commands first in the order they were sent, and no command is left waiting for an
        ack timeout on a session that a move ended.
        """
        return Deferred.fromCoroutine(self._moving())

    # --- 10 and 11. notifications ---

    async def _results(self) -> None:
        a = await self.gateway("gw-a")
        results = await self.listen(f"{self.schema}_results")
        client = await self.controller(a)
        await client.hello("c-1")
        command = await self.send("c-1", {"op": "x"})
        await client.waitFor("cmd", id=command)
        channel = f"{self.schema}_results"
        await self.marker(channel, results)
        self.assertEqual(results, [])  # sent is not a result
        client.send({"type": "ack", "ref": command})
        await waitUntil(lambda: results, 5, what="a result notification")
        await self.marker(channel, results)
        self.assertEqual(len(results), 1)
        self.assertEqual(
            json.loads(results[0]),
            {"id": command, "controller": "c-1", "state": "acked", "detail": ""},
        )

    def test_resultNotification(self) -> Deferred[None]:
        """
        A LISTEN on <schema>_results hears {"id", "state": "acked", ...} when a command is
        acked, and nothing while it is merely sent.
        """
        return Deferred.fromCoroutine(self._results())

    async def _doorbell(self) -> None:
        doorbell = await self.listen(f"{self.schema}_commands")
        controllers = [f"d-{i}" for i in range(10)]
        ids = await self.sendMany(
            [controllers[n % 10] for n in range(50)], [{"n": n} for n in range(50)]
        )
        self.assertEqual(len(set(ids)), 50)
        await waitUntil(lambda: doorbell, 5, what="the doorbell")
        await self.marker(f"{self.schema}_commands", doorbell)
        self.assertEqual(len(doorbell), 1)
        self.assertEqual(sorted(doorbell[0].split(",")), controllers)
        await self.send("d-3", {"one": 1})
        await waitUntil(lambda: len(doorbell) == 2, 5, what="a second doorbell")
        self.assertEqual(doorbell[1], "d-3")

    def test_oneDoorbellPerStatement(self) -> Deferred[None]:
        """
        send_many() of 50 commands for 10 controllers rings the doorbell on
        <schema>_commands once, naming each controller once.
        """
        return Deferred.fromCoroutine(self._doorbell())

    # --- 12. SQL API edges ---

    async def _sqlEdges(self) -> None:
        async def raises(sql: str, args: tuple[Any, ...]) -> psycopg2.Error:
            try:
                await self.db.runQuery("test", sql, args)
            except psycopg2.Error as e:
                return e
            self.fail(f"{sql} {args} did not raise")

        error = await raises("SELECT send(%s, '{}'::jsonb)", ("not a valid id!",))
        self.assertEqual(error.pgcode, "22023")
        error = await raises("SELECT send(%s, '{}'::jsonb)", ("x" * 129,))
        self.assertEqual(error.pgcode, "22023")
        error = await raises("SELECT send('c-1', '{}'::jsonb, %s::interval)", ("0 seconds",))
        self.assertEqual(error.pgcode, "22023")
        error = await raises(
            "SELECT send_many(%s::text[], %s::jsonb[])", (["c-1", "c-2"], ["{}"])
        )
        self.assertEqual(error.pgcode, "22023")
        error = await raises(
            "SELECT send_many(%s::text[], %s::jsonb[])", (["c-1", "bad id"], ["{}", "{}"])
        )
        self.assertEqual(error.pgcode, "22023")
        rows = await self.db.runQuery("test", "SELECT count(*) FROM commands")
        self.assertEqual(rows[0][0], 0)
        rows = await self.db.runQuery("test", "SELECT command_status(gen_random_uuid()) IS NULL")
        self.assertEqual(rows[0][0], True)
        self.assertIsNone(await self.status("00000000-0000-0000-0000-000000000000"))
        # A null body is stored as JSON null, and is a valid command.
        rows = await self.db.runQuery("test", "SELECT send('c-1', NULL)::text")
        status = await self.status(rows[0][0])
        assert status is not None
        self.assertEqual((status["body"], status["state"]), (None, "pending"))

    def test_sqlApiEdges(self) -> Deferred[None]:
        """
        send() refuses an invalid controller id or a non-positive TTL; send_many() refuses
        arrays of different lengths or an invalid id in the batch (nothing is inserted);
        command_status() of an unknown id is NULL.
        """
        return Deferred.fromCoroutine(self._sqlEdges())

    # --- 13. HTTP API ---

    async def _http(self) -> None:
        a = await self.gateway("gw-a", http={"api_token": "s3cret"})
        client = await self.controller(a)
        await client.hello("c-1")
        agent = Agent(reactor)
        base = b"http://127.0.0.1:%d/v1" % httpPort(a)

        async def call(method: bytes, path: bytes, body: bytes | None = None,
                       token: bytes | None = b"s3cret") -> tuple[int, Any]:
            headers = Headers({b"content-type": [b"application/json"]})
            if token is not None:
                headers.addRawHeader(b"authorization", b"Bearer " + token)
            producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
            response = await agent.request(method, base + path, headers, producer)
            return response.code, json.loads(await readBody(response))

        payload = json.dumps({"body": {"op": "open", "door": 2}, "ttl": "5s"}).encode()
        code, created = await call(b"POST", b"/controllers/c-1/commands", payload)
        self.assertEqual(code, 201)
        command = created["id"]
        self.assertEqual(created, {"id": command, "controller": "c-1", "state": "pending"})
        cmd = await client.waitFor("cmd", id=command)
        self.assertEqual(cmd["body"], {"op": "open", "door": 2})
        self.assertEqual(cmd["expires"], await self.expiresMs(command))
        rows = await self.db.runQuery(
            "test", "SELECT extract(epoch FROM expires_at - created_at) FROM commands WHERE id = %s",
            (command,),
        )
        self.assertLess(abs(float(rows[0][0]) - 5.0), 0.1)

        client.send({"type": "ack", "ref": command})
        await self.waitForState(command, "acked")
        code, got = await call(b"GET", b"/commands/" + command.encode())
        self.assertEqual(code, 200)
        self.assertEqual((got["id"], got["state"], got["controller"]), (command, "acked", "c-1"))
        self.assertEqual([e["state"] for e in got["history"]], ["pending", "sent", "acked"])

        self.assertEqual((await call(b"POST", b"/controllers/c-1/commands", payload, None))[0], 401)
        self.assertEqual((await call(b"GET", b"/commands/" + command.encode(), None, b"nope"))[0], 401)
        self.assertEqual((await call(b"POST", b"/controllers/c-1/commands", b"{not json"))[0], 400)
        self.assertEqual((await call(b"POST", b"/controllers/c-1/commands", b'{"ttl": "5s"}'))[0], 400)
        self.assertEqual((await call(
            b"POST", b"/controllers/c-1/commands", b'{"body": 1, "ttl": "0s"}'))[0], 400)
        self.assertEqual((await call(b"GET", b"/commands/not-a-uuid"))[0], 400)
        self.assertEqual(
            (await call(b"GET", b"/commands/00000000-0000-0000-0000-000000000000"))[0], 404
        )
        rows = await self.db.runQuery("test", "SELECT count(*) FROM commands")
        self.assertEqual(rows[0][0], 1)
        self.assertEqual(client.commandIds(), [command])

    def test_httpApi(self) -> Deferred[None]:
        """
        POST /v1/controllers/{id}/commands with the bearer token returns 201 and an id, and
        the connected controller receives that command with the given TTL; GET
        /v1/commands/{id} returns its status and history.  No token: 401; a body that is
        not JSON or has no "body": 400.
        """
        return Deferred.fromCoroutine(self._http())

    # --- 14. metrics ---

    async def _metrics(self) -> None:
        # One poll at start only: the claims below are woken by the doorbell.
        a = await self.gateway("gw-a", outbox={"poll_interval": "1h"})
        client = await self.controller(a, autoAck=True)
        await client.hello("c-1")
        written = sample(a, "ctrlgw_command_enqueue_to_written_seconds_count")
        found = sample(a, "ctrlgw_command_claims_total", {"source": "notify", "result": "found"})
        for n in range(5):
            command = await self.send("c-1", {"n": n})
            await self.waitForState(command, "acked")
            # The ack was settled, and claimed nothing after it (its claim saw nothing
            # behind): the next command is the doorbell's to find.
            await waitUntil(
                lambda n=n: sample(a, "ctrlgw_command_claims_skipped_total") >= n + 1,
                2, what="the settled ack",
            )
        await waitUntil(
            lambda: sample(a, "ctrlgw_commands_finished_total", {"state": "acked"}) == 5, 2,
            what="five acks counted",
        )
        self.assertEqual(sample(a, "ctrlgw_command_enqueue_to_written_seconds_count"), written + 5)
        self.assertEqual(
            sample(a, "ctrlgw_command_claims_total", {"source": "notify", "result": "found"}),
            found + 5,
        )
        self.assertEqual(sample(a, "ctrlgw_command_enqueue_to_acked_seconds_count"), 5)
        self.assertEqual(sample(a, "ctrlgw_frames_out_total", {"type": "cmd"}), 5)
        self.assertEqual(sample(a, "ctrlgw_frames_in_total", {"type": "ack"}), 5)
        self.assertEqual(sample(a, "ctrlgw_command_retries_total"), 0)
        toWritten = sample(a, "ctrlgw_command_enqueue_to_written_seconds_sum") / 5
        self.assertLess(toWritten, 0.5)
        toAcked = sample(a, "ctrlgw_command_enqueue_to_acked_seconds_sum") / 5
        self.assertLess(toWritten, toAcked)
        print(f"\nenqueue -> written {toWritten * 1000:.1f} ms, enqueue -> acked "
              f"{toAcked * 1000:.1f} ms (mean of 5, doorbell-woken)")

    def test_metrics(self) -> Deferred[None]:
        """
        Each command woken by the doorbell counts a notify/found claim, one
        enqueue-to-written observation, and one acked finish.
        """
        return Deferred.fromCoroutine(self._metrics())
