"""
The database fails for real under a loaded gateway: PostgreSQL is crashed (immediate
shutdown) during inbox flushes and command delivery, the network to it stalls (a frozen
proxy), and the primary dies and a synchronous replica is promoted.  Each test prints
what it measured (C{FIGURES ...} lines).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.dbfaults import (
    Device,
    FreezableProxy,
    ReadinessWatch,
    TcpPostgres,
    TickMonitor,
    TwistdGateway,
    deliveryFigures,
    httpGet,
    inboxCounts,
    query,
)
from tests.gateways import (
    connectController,
    httpPort,
    listenerPort,
    metric,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PrivatePostgres

T = TypeVar("T")
FINAL = ("acked", "nacked", "expired", "failed")


def figures(name: str, values: dict[str, Any]) -> None:
    print(f"\nFIGURES {name}: {json.dumps(values, sort_keys=True)}")


async def stopAll(devices: list[Device]) -> None:
    for device in devices:
        await device.stop()


async def drained(devices: list[Device], timeout: float = 60.0) -> None:
    """
    Stop sending; wait until every message sent has been acked (resent as needed).
    """
    for device in devices:
        device.pauseSending()
    await waitUntil(
        lambda: all(not d.unacked for d in devices), timeout,
        what=lambda: "acks of " + ", ".join(f"{d.controller}: {len(d.unacked)}" for d in devices),
    )


async def pollUntil(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str
) -> T:
    """
    Call C{read} every 0.1 s until C{done} accepts what it returned; that value.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await read()
        if done(value):
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {value}")
        await sleep(0.1)


def failedCalls(gateway: Any) -> float:
    """
    Database calls that failed after they were sent, whatever their name.
    """
    total = 0.0
    for family in gateway.metrics.registry.collect():
        if family.name == "ctrlgw_db_query_errors":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def commandStates(dsn: str, schema: str) -> dict[str, Any]:
    rows = query(
        dsn,
        f'SELECT state, count(*), count(*) FILTER (WHERE expires_at < now()) FROM "{schema}".commands'
        " GROUP BY 1",
    )
    states = {str(s): int(n) for s, n, _ in rows}
    stuck = sum(int(late) for s, _, late in rows if s in ("pending", "sent"))
    return {"states": states, "stuck_past_ttl": stuck,
            "final": sum(n for s, n in states.items() if s in FINAL),
            "unfinished": sum(n for s, n in states.items() if s not in FINAL)}


class PostgresCrashTests(TestCase):
    """
    C{pg_ctl stop -m immediate} while messages are flushed and commands delivered, then
    a restart: nothing acked is lost or stored twice, every command ends in one final
    state.
    """

    timeout = 240

    @deferred
    async def test_immediateShutdownDuringFlushesAndDelivery(self) -> None:
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(deferToThread, server.destroy)
        gateway = await startGateway(
            self, server.dsn, "ctrlgw", "gw-crash",
            {
                "database": {"connect_timeout": "1s", "statement_timeout": "3s"},
                "outbox": {"ack_timeout": "1s", "backoff": 1, "max_attempts": 20,
                           "max_inflight": 4, "poll_interval": "200ms"},
            },
        )
        port = listenerPort(gateway)
        devices = [Device(f"crash-{i}", [port], rate=100, padding=500) for i in range(4)]
        for device in devices:
            device.start()
        self.addCleanup(stopAll, devices)
        await waitUntil(lambda: all(len(d.acked) >= 20 for d in devices), 30,
                        what="steady traffic")

        # At least 3 crashes, and more (up to 12) until one has hit an inbox flush in flight.
        rounds = 0
        perRound = 40  # commands per controller per round
        outages: list[float] = []

        def flushesHit() -> float:
            return sample(gateway, "ctrlgw_db_query_errors_total", {"query": "inbox_write"})

        while rounds < 3 or (not flushesHit() and rounds < 12):
            rounds += 1
            delivered = sum(len(d.commands) for d in devices)
            controllers = [d.controller for d in devices for _ in range(perRound)]
            await deferToThread(
                query, server.dsn,
                "SELECT count(*) FROM ctrlgw.send_many(%s, %s::jsonb[], interval '30 seconds')",
                (controllers, [json.dumps({"op": "set", "n": n}) for n in range(len(controllers))]),
            )
            # Crash once delivery is under way (some written and acked, most not yet).
            await waitUntil(
                lambda delivered=delivered: sum(len(d.commands) for d in devices)
                >= delivered + perRound, 30,
                what="command delivery under way",
            )
            # Aimed at an inbox statement in flight: the signal goes in the reactor turn
            # that sees one (a flush takes a few ms; pg_ctl alone takes longer to start).
            await waitUntil(lambda: any(w.inFlight for w in gateway.inbox.writers), 10,
                            interval=0.001, what="an inbox flush in flight")
            crashed = reactor.seconds()
            postmaster = server.crash()  # immediate mode, as pg_ctl stop -m immediate
            await deferToThread(server.waitStopped, postmaster)
            sentAtCrash = sum(d.sent for d in devices)
            await waitUntil(lambda: not gateway.db.up, 20, what="the gateway to notice")
            # The outage lasts until another 100 messages were sent into it.
            await waitUntil(lambda sent=sentAtCrash: sum(d.sent for d in devices) >= sent + 100, 20,
                            what="traffic during the outage")
            await deferToThread(server.start)
            await waitUntil(lambda: gateway.db.up, 30, what="the gateway to reconnect")
            outages.append(reactor.seconds() - crashed)

        total = rounds * perRound * len(devices)
        try:
            # The TTL is 30 s: by then every command must have reached a final state.
            states = await pollUntil(
                lambda: deferToThread(commandStates, server.dsn, "ctrlgw"),
                lambda s: s["final"] == total, 35, "every command final",
            )
        except AssertionError:
            states = await deferToThread(commandStates, server.dsn, "ctrlgw")  # reported below
        await drained(devices)
        await waitUntil(gateway.readiness.ready, 30, what="readiness after the outages")
        counts = await deferToThread(inboxCounts, server.dsn, "ctrlgw")
        delivery = deliveryFigures(devices, counts)
        received = [c for d in devices for c in d.commandIds()]
        result = {
            "crashes": rounds,
            "outage_s": [round(o, 2) for o in outages],
            "inbox_write_errors": sample(gateway, "ctrlgw_db_query_errors_total",
                                         {"query": "inbox_write"}),
            "calls_failed_in_flight": failedCalls(gateway),
            **delivery,
            "commands": total,
            "commands_final": states["final"],
            "commands_stuck": states["stuck_past_ttl"] + states["unfinished"],
            "command_states": states["states"],
            "cmd_frames_received": len(received),
            "cmd_redeliveries": len(received) - len(set(received)),
        }
        figures("pg-immediate-shutdown", result)
        # The crashes hit inbox flushes in flight for real.
        self.assertGreater(result["inbox_write_errors"], 0, result)
        self.assertEqual(delivery["lost"], 0, result)
        self.assertEqual(delivery["duplicates"], 0, result)
        self.assertEqual(delivery["stored_unacked"], 0, result)
        self.assertEqual(delivery["acked"], delivery["sent"], result)
        self.assertEqual(states["unfinished"], 0, result)
        # Every controller acks every command it gets, with TTL and attempts to spare.
        self.assertEqual(states["states"], {"acked": total}, result)
        await stopAll(devices)


class NetworkStallTests(TestCase):
    """
    The network to the database stalls (a proxy stops forwarding, sockets stay open):
    calls hit their deadline, the reactor keeps turning, and the gateway recovers by
    itself once the network does.
    """

    timeout = 180

    @deferred
    async def test_frozenProxy(self) -> None:
        server = await deferToThread(TcpPostgres.fresh)
        self.addCleanup(deferToThread, server.destroy)
        proxy = FreezableProxy(server.port)
        proxyPort = await proxy.start()
        self.addCleanup(proxy.stop)
        dsn = f"host=127.0.0.1 port={proxyPort} dbname=postgres user=postgres"
        gateway = await startGateway(
            self, dsn, "ctrlgw", "gw-stall",
            {"database": {"connect_timeout": "1s", "statement_timeout": "1s"}},
        )
        port, http = listenerPort(gateway), httpPort(gateway)
        devices = [Device(f"stall-{i}", [port], rate=20) for i in range(3)]
        for device in devices:
            device.start()
        self.addCleanup(stopAll, devices)
        await waitUntil(lambda: all(len(d.acked) >= 10 for d in devices), 30,
                        what="steady traffic")
        ticks = TickMonitor()
        ticks.start()
        self.addCleanup(ticks.stop)

        frozen = reactor.seconds()
        proxy.freeze()
        await waitUntil(lambda: not gateway.db.up, 20, what="the gateway to notice the stall")
        detected = reactor.seconds() - frozen
        await waitUntil(lambda: not gateway.readiness.ready(), 10, what="unready")
        unready = reactor.seconds() - frozen
        # During the stall: liveness answers at once, readiness says no.
        asked = reactor.seconds()
        code, body = await httpGet(http, "/healthz")
        healthzSeconds = reactor.seconds() - asked
        self.assertEqual((code, body), (200, {"status": "ok"}))
        readyCode, readyBody = await httpGet(http, "/readyz")
        self.assertEqual(readyCode, 503, readyBody)
        # A new controller is told to come back later; the connected ones stay, unacked.
        newcomer = await connectController(port)
        self.addCleanup(newcomer.leave)
        answer = await newcomer.helloAnswer("stall-new", timeout=10)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "unavailable"), answer)
        ackedThen = sum(len(d.acked) for d in devices)
        sentThen = sum(d.sent for d in devices)
        await waitUntil(lambda: sum(d.sent for d in devices) >= sentThen + 40, 10,
                        what="traffic during the stall")
        self.assertEqual(sum(len(d.acked) for d in devices), ackedThen)
        self.assertTrue(all(d.online for d in devices))
        stalled = reactor.seconds() - frozen

        thawed = reactor.seconds()
        proxy.unfreeze()
        await waitUntil(lambda: gateway.db.up, 30, what="the pool to reconnect")
        dbBack = reactor.seconds() - thawed
        await waitUntil(gateway.readiness.ready, 30,
                        what=lambda: f"ready again: {gateway.readiness.evaluate()}")
        readyBack = reactor.seconds() - thawed
        await drained(devices)
        backlog = reactor.seconds() - thawed
        ticks.stop()
        later = await connectController(port)
        self.addCleanup(later.leave)
        self.assertEqual((await later.helloAnswer("stall-new"))["type"], "welcome")

        counts = await deferToThread(inboxCounts, server.dsn, "ctrlgw")
        delivery = deliveryFigures(devices, counts)
        result = {
            "call_limit_s": gateway.db.callLimit,
            "detect_s": round(detected, 2),
            "unready_s": round(unready, 2),
            "stall_s": round(stalled, 2),
            "healthz_during_stall_ms": round(healthzSeconds * 1000, 1),
            "max_timer_late_ms": round(ticks.maxLate * 1000, 1),
            "db_up_after_unfreeze_s": round(dbBack, 2),
            "ready_after_unfreeze_s": round(readyBack, 2),
            "backlog_acked_after_unfreeze_s": round(backlog, 2),
            **delivery,
        }
        figures("db-network-stall", result)
        self.assertLess(detected, gateway.db.callLimit + 1.5, result)
        self.assertLess(ticks.maxLate, 0.25, result)
        self.assertLess(healthzSeconds, 0.5, result)
        self.assertEqual(delivery["lost"], 0, result)
        self.assertEqual(delivery["duplicates"], 0, result)
        self.assertEqual(delivery["acked"], delivery["sent"], result)
        self.assertEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked"), 0)
        await stopAll(devices)


class FailoverTests(TestCase):
    """
    A primary with a synchronous streaming replica; twistd gateways on a multi-host DSN.
    The primary is killed and the replica promoted: the gateways follow by themselves,
    nothing acked is lost, and /readyz shows the gap.
    """

    timeout = 300

    @deferred
    async def test_promoteReplica(self) -> None:
        primary = await deferToThread(
            TcpPostgres.fresh, {"synchronous_standby_names": "'*'", "wal_level": "replica"}
        )
        self.addCleanup(deferToThread, primary.destroy)
        replica = await deferToThread(primary.replica)
        self.addCleanup(deferToThread, replica.destroy)

        def syncState() -> Any:
            return deferToThread(primary.query, "SELECT sync_state FROM pg_stat_replication")

        await pollUntil(syncState, lambda s: s == [("sync",)], 30, "a synchronous replica")
        dsn = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{replica.port}"
               " dbname=postgres user=postgres target_session_attrs=read-write")
        sections: dict[str, dict[str, object]] = {
            "database": {"connect_timeout": "1s", "statement_timeout": "2s"},
        }
        gateways = [
            await TwistdGateway.start(self, dsn, "ctrlgw", name, sections)
            for name in ("gw-a", "gw-b")
        ]
        ports = [g.port for g in gateways]
        devices = [Device(f"fo-{i}", ports[i % 2:] + ports[:i % 2], rate=20) for i in range(4)]
        for device in devices:
            device.start()
        self.addCleanup(stopAll, devices)
        await waitUntil(lambda: all(len(d.acked) >= 20 for d in devices), 30,
                        what="steady traffic")
        watch = ReadinessWatch([g.http for g in gateways], interval=0.05)
        watch.start()
        self.addCleanup(watch.stop)

        killed = reactor.seconds()
        await deferToThread(primary.crash)
        ackedAtKill = sum(len(d.acked) for d in devices)
        await waitUntil(lambda: all(watch.last(g.http) == 503 for g in gateways), 30,
                        what="both gateways unready")
        unready = reactor.seconds() - killed
        # The failover manager's decision: promote the synchronous replica.
        await deferToThread(replica.promote)
        promoted = reactor.seconds()
        await waitUntil(lambda: all(watch.last(g.http) == 200 for g in gateways), 60,
                        what="both gateways ready on the new primary")
        ready = reactor.seconds()
        await watch.stop()
        await drained(devices)
        counts = await deferToThread(inboxCounts, replica.dsn, "ctrlgw")
        delivery = deliveryFigures(devices, counts)
        gaps = {}
        for g in gateways:
            down = watch.firstSince(g.http, killed, ready=False)
            assert down is not None
            # From the first unready answer: a gateway may be ready on the promoted replica
            # before pg_ctl promote, which waits for the promotion, has returned.
            up = watch.firstSince(g.http, down, ready=True)
            assert up is not None
            gaps[g.instance] = round(up - down, 2)
        result = {
            "unready_after_kill_s": round(unready, 2),
            "promote_s": round(promoted - killed - unready, 2),
            "ready_after_promote_s": round(ready - promoted, 2),
            "kill_to_all_ready_s": round(ready - killed, 2),
            "readyz_gap_s": gaps,
            "acked_before_kill": ackedAtKill,
            **delivery,
        }
        figures("failover-promote", result)
        self.assertEqual(delivery["lost"], 0, result)
        self.assertEqual(delivery["duplicates"], 0, result)
        self.assertEqual(delivery["acked"], delivery["sent"], result)
        await stopAll(devices)
        for g in gateways:
            await g.stop()
