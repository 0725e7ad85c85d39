"""
Network faults injected for real: a controller that vanishes without a FIN or an RST
(kernel blackhole in a network namespace, or a frozen userspace proxy), and a real HAProxy
in front of two gateway processes while controllers reconnect and the instances restart.

Each test prints its figures on a C{FIGURES} line; docs/reliability.md quotes them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from tests.faults import (
    FreezableProxy,
    GatewayProcess,
    HAProxy,
    NetworkNamespace,
    ReconnectingController,
    printFigures,
    requireFaults,
    stopAll,
    waitFor,
)
from tests.gateways import (
    Frame,
    LineController,
    connectController,
    listenerPort,
    sample,
    startGateway,
    waitUntil,
)
from tests.pg import PostgresTestCase

CONTROLLER = "dev-halfopen"


def answerPings(controller: LineController) -> None:
    def frame(f: Frame) -> None:
        if f.get("type") == "ping" and not controller.isClosed:
            controller.send({"type": "pong", "echo": f["ts"]})

    controller.onFrame = frame


class _HalfOpen(PostgresTestCase):
    """
    Shared steps: a live controller on a gateway; a silent fault; the gateway must end the
    session by itself, record why, and put the command it wrote back to pending.
    """

    timeout = 90

    async def startGateway(self, liveness: dict[str, object], interface: str) -> Any:
        return await startGateway(self, self.dsn, self.schema, "gw-net", {
            "listener:main": {"endpoint": f"tcp:0:interface={interface}"},
            "liveness": {"close_grace": "200ms", "keepalive_idle": "60s", **liveness},
            "outbox": {"poll_interval": "200ms"},
        })

    async def sendCommand(self) -> str:
        rows = await self.db.runQuery(
            "send", "SELECT send(%s, %s::jsonb, interval '60 seconds')::text",
            (CONTROLLER, '{"op": "open_valve"}'),
        )
        return str(rows[0][0])

    async def waitReleased(self, gateway: Any, reason: str, started: float, bound: float) -> float:
        """
        Wait until the gateway has dropped the connection for C{reason}; return how long
        after C{started} that was.
        """
        await waitFor(lambda: sample(gateway, "ctrlgw_disconnects_total", {"reason": reason}) >= 1,
                      bound, f"a disconnect for {reason}")
        return float(reactor.seconds() - started)

    async def history(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []

        async def read() -> bool:
            nonlocal rows
            rows = [tuple(r) for r in await self.db.runQuery(  # type: ignore[misc]
                "history", "SELECT kind, reason FROM events WHERE controller_id = %s ORDER BY id",
                (CONTROLLER,))]
            return any(kind == "disconnect" for kind, _ in rows)

        deadline = reactor.seconds() + 10
        while not await read():
            self.assertLess(reactor.seconds(), deadline, f"no disconnect in the history: {rows}")
            await _pause(0.05)  # History is written in batches.
        return rows

    async def assertRequeued(self, commandId: str) -> None:
        """
        The command was written once (attempt counted) and, its session ended, is pending
        again for the next one: nothing stuck in C{sent}.
        """
        async def state() -> tuple[str, int]:
            rows = await self.db.runQuery(
                "state", "SELECT state, attempts FROM commands WHERE id = %s", (commandId,))
            return str(rows[0][0]), int(rows[0][1])

        seen = await state()
        deadline = reactor.seconds() + 5
        while seen[0] != "pending" and reactor.seconds() < deadline:
            await Deferred.fromCoroutine(_pause(0.05))
            seen = await state()
        self.assertEqual(seen, ("pending", 1))

    async def assertOffline(self, reason: str) -> None:
        rows = await self.db.runQuery(
            "session", "SELECT online, disconnect_reason FROM sessions WHERE controller_id = %s",
            (CONTROLLER,))
        self.assertEqual(tuple(rows[0]), (False, reason))


async def _pause(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


class KernelBlackholeTests(_HalfOpen):
    """
    The controller lives in a network namespace of the test's own, the gateway in the root
    namespace; the namespace is then blackholed (every packet dropped both ways).
    """

    def setUp(self) -> Any:
        requireFaults(self, root=True, netns=True)
        return super().setUp()

    async def liveInNamespace(self, liveness: dict[str, object]) -> tuple[Any, NetworkNamespace, LineController]:
        ns = NetworkNamespace(self)
        gateway = await self.startGateway(liveness, ns.hostAddress)
        controller = LineController()
        answerPings(controller)
        ns.connect(ns.hostAddress, listenerPort(gateway), controller)
        self.addCleanup(controller.close)
        await controller.hello(CONTROLLER)
        return gateway, ns, controller

    async def test_idleReleasedWithinIdleTimeout(self) -> None:
        """
        No data in flight: the blackholed controller is released by C{idle_timeout} (the
        kernel has nothing to retransmit), within idle_timeout plus a small bound, and the
        history says C{idle_timeout}.
        """
        idle = 3.0
        gateway, ns, controller = await self.liveInNamespace(
            {"ping_interval": "1s", "idle_timeout": f"{idle}s", "user_timeout": "60s"})
        await controller.waitFor("ping")  # A ping answered: heard from just now.
        started = reactor.seconds()
        tool = ns.blackhole()
        detect = await self.waitReleased(gateway, "idle_timeout", started, idle + 5)
        self.assertLessEqual(detect, idle + 0.5)
        self.assertGreaterEqual(detect, idle - 1.0 - 0.2)  # Heard at most one ping interval ago.
        self.assertIn(("disconnect", "idle_timeout"), await self.history())
        await self.assertOffline("idle_timeout")
        self.assertEqual(sample(gateway, "ctrlgw_disconnects_total", {"reason": "peer_closed"}), 0)
        printFigures("kernel blackhole, idle", tool=tool, idle_timeout_s=idle,
                     time_to_detect_s=round(detect, 3))

    async def test_unackedDataReleasedByUserTimeout(self) -> None:
        """
        A command written into the blackhole stays unacknowledged in the socket:
        C{TCP_USER_TIMEOUT} (1 s) ends the socket long before C{idle_timeout} (15 s), and
        the command goes back to pending for the next session.
        """
        idle, user = 15.0, 1.0
        gateway, ns, controller = await self.liveInNamespace(
            {"ping_interval": "5s", "idle_timeout": f"{idle}s", "user_timeout": f"{user}s"})
        started = reactor.seconds()
        tool = ns.blackhole()
        commandId = await self.sendCommand()
        detect = await self.waitReleased(gateway, "peer_closed", started, idle)
        self.assertLess(detect, idle / 3)
        self.assertGreaterEqual(detect, user)
        self.assertEqual(sample(gateway, "ctrlgw_disconnects_total", {"reason": "idle_timeout"}), 0)
        # The kernel's ETIMEDOUT ends the session as the peer going away.
        self.assertIn(("disconnect", "peer_closed"), await self.history())
        await self.assertOffline("peer_closed")
        await self.assertRequeued(commandId)
        printFigures("kernel blackhole, command in flight", tool=tool, idle_timeout_s=idle,
                     user_timeout_s=user, time_to_detect_s=round(detect, 3),
                     commands_stuck=0)


class FrozenProxyTests(_HalfOpen):
    """
    No root needed: a userspace proxy on loopback stops forwarding but keeps both sockets
    open.  Its kernel acknowledges what the gateway writes, so even with a command in
    flight only the gateway's own C{idle_timeout} can find the controller gone.
    """

    async def test_frozenProxyReleasedByIdleTimeout(self) -> None:
        idle, user = 3.0, 0.5
        gateway = await self.startGateway(
            {"ping_interval": "1s", "idle_timeout": f"{idle}s", "user_timeout": f"{user}s"},
            "127.0.0.1")
        proxy = FreezableProxy(self, listenerPort(gateway))
        controller = await connectController(proxy.port)
        self.addCleanup(controller.close)
        answerPings(controller)
        await controller.hello(CONTROLLER)
        await controller.waitFor("ping")
        started = reactor.seconds()
        proxy.freeze()
        commandId = await self.sendCommand()
        detect = await self.waitReleased(gateway, "idle_timeout", started, idle + 5)
        self.assertLessEqual(detect, idle + 0.5)
        self.assertGreater(detect, user * 3)  # TCP_USER_TIMEOUT could not see it.
        self.assertEqual(sample(gateway, "ctrlgw_disconnects_total", {"reason": "peer_closed"}), 0)
        self.assertIn(("disconnect", "idle_timeout"), await self.history())
        await self.assertOffline("idle_timeout")
        await self.assertRequeued(commandId)
        self.assertEqual(controller.of("cmd"), [])  # Nothing got through the frozen proxy.
        printFigures("frozen proxy, command in flight", idle_timeout_s=idle, user_timeout_s=user,
                     time_to_detect_s=round(detect, 3), commands_stuck=0)


class HAProxyTests(PostgresTestCase):
    """
    A real HAProxy (TCP mode, round robin, health checks on the controller ports) in front
    of two gateway instances, real twistd processes sharing one schema.
    """

    timeout = 240

    def setUp(self) -> Any:
        requireFaults(self, tools=["haproxy"])
        return super().setUp()

    async def cluster(self) -> tuple[GatewayProcess, GatewayProcess, HAProxy]:
        # Short: HAProxy's admin socket path must fit in sun_path.
        workdir = Path(tempfile.mkdtemp(prefix="ctrlgw-hap-"))
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        sections: dict[str, dict[str, object]] = {
            "liveness": {"ping_interval": "2s", "idle_timeout": "6s", "close_grace": "200ms"},
            "outbox": {"poll_interval": "200ms"},
            "shutdown": {"bye_batch": "10", "bye_interval": "50ms"},
        }
        a = GatewayProcess(self, workdir, self.dsn, self.schema, "gw-a", sections)
        b = GatewayProcess(self, workdir, self.dsn, self.schema, "gw-b", sections)
        await gatherResults([Deferred.fromCoroutine(a.start()), Deferred.fromCoroutine(b.start())])
        haproxy = HAProxy(self, workdir, {"a": a.port, "b": b.port})
        await haproxy.waitStates({"a": "UP", "b": "UP"})
        return a, b, haproxy

    async def owner(self, controller: str) -> tuple[str, int]:
        rows = await self.db.runQuery(
            "owner", "SELECT instance_id, epoch FROM sessions WHERE controller_id = %s AND online",
            (controller,))
        self.assertEqual(len(rows), 1, f"{controller} not online")
        return str(rows[0][0]), int(rows[0][1])

    async def send(self, controller: str, n: int) -> str:
        rows = await self.db.runQuery(
            "send", "SELECT send(%s, %s::jsonb, interval '60 seconds')::text",
            (controller, f'{{"n": {n}}}'))
        return str(rows[0][0])

    async def holdMigrationLock(self) -> Any:
        """
        Take the schema's migration lock, as an instance migrating it would, until the
        returned callable is called: an instance starting meanwhile cannot join.
        """
        db = await self.openDatabase()
        locked: Deferred[None] = Deferred()
        done: Deferred[None] = Deferred()

        def interaction(cursor: Any) -> Deferred[None]:
            async def run() -> None:
                await cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                     (f"ctrlgw.migrate.{self.schema}",))
                locked.callback(None)
                await done

            return Deferred.fromCoroutine(run())

        held = db.runInteraction("hold_migrate_lock", interaction)
        await locked
        self.addCleanup(lambda: held)

        def release() -> None:
            if not done.called:
                done.callback(None)

        self.addCleanup(release)
        return release

    async def settled(self, release: Any, starting: Deferred[None]) -> None:
        # A test that failed mid-restart: let the start finish (or fail) before the end.
        release()
        try:
            await starting
        except Exception:
            pass

    async def test_reconnectThroughHAProxyFollowsController(self) -> None:
        """
        Controllers vanish (stop reading, or abort) and reconnect through HAProxy, landing
        on the other instance.  The old instance drops the stale path by takeover; nothing
        from it is stored or acked, no command sent after the new welcome goes to it, and
        commands sent with C{SELECT send()} -- before and after -- are acked on the new
        session.
        """
        a, b, haproxy = await self.cluster()
        ids = [f"hap-{i}" for i in range(5)]  # Odd: round robin puts each one elsewhere next.
        stale: dict[str, LineController] = {}
        before: dict[str, tuple[str, int]] = {}
        for cid in ids:
            stale[cid] = await connectController(haproxy.port)
            self.addCleanup(stale[cid].close)
            await stale[cid].hello(cid)
            before[cid] = await self.owner(cid)
        self.assertEqual({owner for owner, _ in before.values()}, {"gw-a", "gw-b"})

        stopReading = ids[0::2]
        for cid in ids:
            if cid in stopReading:
                stale[cid].transport.pauseProducing()  # type: ignore[union-attr]
            else:
                stale[cid].close()
        first = {cid: await self.send(cid, 1) for cid in ids}  # While the controller is away.

        fresh: dict[str, LineController] = {}
        after: dict[str, tuple[str, int]] = {}
        for cid in ids:
            fresh[cid] = await connectController(haproxy.port, autoAck=True)
            self.addCleanup(fresh[cid].close)
            await fresh[cid].hello(cid)
            after[cid] = await self.owner(cid)
            self.assertNotEqual(after[cid][0], before[cid][0], f"{cid} landed on the same instance")
            self.assertGreater(after[cid][1], before[cid][1])
        for cid in stopReading:
            stale[cid].send({"type": "msg", "id": f"stale-{cid}", "body": 1})
        second = {cid: await self.send(cid, 2) for cid in ids}

        async def states() -> dict[str, tuple[str, int]]:
            rows = await self.db.runQuery(
                "states", "SELECT id::text, state, sent_epoch FROM commands")
            return {str(r[0]): (str(r[1]), int(r[2] or 0)) for r in rows}

        deadline = reactor.seconds() + 30
        seen = await states()
        while any(s[0] != "acked" for s in seen.values()):
            self.assertLess(reactor.seconds(), deadline, f"commands not all acked: {seen}")
            await _pause(0.05)
            seen = await states()
        for cid in ids:
            for command in (first[cid], second[cid]):
                self.assertEqual(seen[command], ("acked", after[cid][1]))
                self.assertIn(command, fresh[cid].commandIds())

        # The stale paths: read what reached them, and see them closed by the old instance.
        for cid in stopReading:
            stale[cid].transport.resumeProducing()  # type: ignore[union-attr]
        await waitUntil(lambda: all(stale[cid].isClosed for cid in stopReading), 15,
                        what="the stale paths to close")
        misdelivered = duplicates = 0
        for cid in stopReading:
            self.assertIn({"bye"}, [{f["type"]} for f in stale[cid].of("bye")])
            self.assertEqual([f["reason"] for f in stale[cid].of("bye")], ["takeover"])
            self.assertNotIn(f"stale-{cid}", stale[cid].ackedIds())
            misdelivered += stale[cid].commandIds().count(second[cid])
            duplicates += stale[cid].commandIds().count(first[cid])
        self.assertEqual(misdelivered, 0)
        stored = await self.db.runQuery(
            "stale", "SELECT count(*) FROM inbox WHERE message_id LIKE 'stale-%%'")
        self.assertEqual(stored[0][0], 0)

        events = await self.db.runQuery(
            "events", "SELECT controller_id, kind, reason, instance_id, epoch, at FROM events"
            " WHERE kind IN ('connect', 'disconnect') ORDER BY id")
        convergence = []
        for cid in ids:
            old = [e for e in events if e[0] == cid and e[1] == "disconnect" and e[4] == before[cid][1]]
            self.assertEqual(len(old), 1, f"{cid}: {events}")
            self.assertEqual(old[0][3], before[cid][0])
            expected = "takeover" if cid in stopReading else "peer_closed"
            self.assertEqual(old[0][2], expected)
            if cid in stopReading:
                new = [e for e in events if e[0] == cid and e[1] == "connect" and e[4] == after[cid][1]]
                convergence.append((old[0][5] - new[0][5]).total_seconds() * 1000)
        printFigures("haproxy reconnect to the other instance", controllers=len(ids),
                     stale_msgs_stored=0, stale_msgs_acked=0, commands_misdelivered=misdelivered,
                     commands_stuck=0, duplicates_on_stale_path=duplicates,
                     takeover_max_ms=round(max(convergence), 1))

    async def test_rollingRestartUnderLiveFleet(self) -> None:
        """
        50 controllers reconnecting with backoff through HAProxy, 20 of them leaving and
        coming back every 0.2-0.8 s so that hellos keep arriving while an instance starts,
        and each instance in turn stopped (SIGTERM) and started again: no hello is ever
        answered with C{unavailable} (a listener opens only once its instance can serve,
        and HAProxy's check sees the port closed until then), and every controller ends
        connected.
        """
        a, b, haproxy = await self.cluster()
        fleet = [ReconnectingController(f"fleet-{i:02d}", haproxy.port, minDelay=0.1, maxDelay=2.0,
                                        churn=(0.2, 0.8) if i < 20 else None)
                 for i in range(50)]
        self.addCleanup(stopAll, fleet)
        for controller in fleet:
            controller.start()

        async def allConnected(what: str, timeout: float = 60.0) -> float:
            started = reactor.seconds()
            await waitFor(lambda: all(c.live for c in fleet), timeout, what)
            deadline = started + timeout
            while True:
                rows = await self.db.runQuery(
                    "online", "SELECT count(*) FROM sessions WHERE online AND controller_id LIKE 'fleet-%%'")
                if rows[0][0] == len(fleet):
                    return float(reactor.seconds() - started)
                self.assertLess(reactor.seconds(), deadline, f"{rows[0][0]} online, {what}")
                await _pause(0.05)

        await waitFor(lambda: all(c.answers for c in fleet), 30, "every controller welcomed once")
        recovery, downWhileJoining = {}, {}
        for gateway, name in ((a, "a"), (b, "b")):
            started = reactor.seconds()
            code = await gateway.stop()
            self.assertIn(code, [(0, None), (None, 15)], gateway.log()[-3000:])
            # The instance comes back while it cannot serve yet for a while (another
            # instance's migration holds the schema's lock): churners keep knocking.
            release = await self.holdMigrationLock()
            starting = Deferred.fromCoroutine(gateway.start())
            self.addCleanup(self.settled, release, starting)
            await _pause(1.5)
            downWhileJoining[name] = (await haproxy.serverStates())[name]
            release()
            await starting
            await haproxy.waitStates({"a": "UP", "b": "UP"})
            await _pause(1.0)  # Churners land on the fresh instance.
            recovery[name] = round(reactor.seconds() - started, 2)
        for controller in fleet:
            controller.settle()
        settled = await allConnected("the whole fleet connected at the end")

        unavailable = [e for c in fleet for e in c.errors("unavailable")]
        errors = [e for c in fleet for e in c.errors()]
        self.assertEqual(unavailable, [])
        self.assertEqual(errors, [])
        # HAProxy's check saw each restarting instance's port closed while it could not serve.
        self.assertEqual({k: v.split()[0] for k, v in downWhileJoining.items()},
                         {"a": "DOWN", "b": "DOWN"})
        self.assertTrue(all(c.live for c in fleet))
        shutdownByes = sum(c.byes.count("shutdown") for c in fleet)
        # Every steady controller was on a stopping instance at least once.
        self.assertGreaterEqual(shutdownByes, 30)
        printFigures(
            "haproxy rolling restart", controllers=len(fleet),
            hellos_unavailable=len(unavailable), hello_errors=len(errors),
            welcomes=sum(len(c.answers) for c in fleet), shutdown_byes=shutdownByes,
            closed_before_answer=sum(c.closedBeforeAnswer for c in fleet),
            connect_failures=sum(c.connectFailures for c in fleet),
            restart_s=recovery, haproxy_state_while_joining=downWhileJoining, settle_s=round(settled, 2), all_connected=True,
        )
