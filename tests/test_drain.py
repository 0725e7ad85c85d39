"""
Draining an instance (ctrlgw/drain.py, drain_instance() of migration 9): on a fake clock,
the order and pacing of a drain; against real PostgreSQL, the request through the
database and C{ctrlgw drain}; and under a live simulated fleet behind HAProxy, a drained
instance's controllers all reconnect to the others with nothing lost.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw import cli
from ctrlgw.config import ShutdownConfig
from ctrlgw.drain import Drain
from ctrlgw.interfaces import Session, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.postgres import Store
from tests.faults import GatewayProcess, HAProxy, requireFaults
from tests.gateways import connectController, listenerPort, sample, startGateway, waitUntil
from tests.helpers import deferred
from tests.pg import PostgresTestCase
from tests.test_faults_database import pollUntil

EXAMPLE_CONFIG = str(Path(__file__).resolve().parent.parent / "etc" / "ctrlgw.ini")


@dataclass
class FakeConnection:
    session: Session | None
    registry: ConnectionRegistry
    clock: Clock
    closed: list[tuple[str, float]] = field(default_factory=list)

    def close(self, reason: str) -> None:
        self.closed.append((reason, self.clock.seconds()))
        self.registry.unbind(self)


class FakeListener:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.reconnected: list[Any] = []

    def subscribe(self, channel: str, handler: Any, onReconnected: Any = None) -> None:
        self.handlers[channel] = handler
        self.reconnected.append(onReconnected)


class FakeStore:
    """
    The Store calls of a drain: C{requested} is what drainRequested() answers.
    """

    instance = "gw-a"
    db = SimpleNamespace(schema="ctrlgw")

    def __init__(self) -> None:
        self.operations: list[str] = []
        self.requested: bool | None = None
        self.failing = False

    def drainRequested(self) -> Deferred[bool | None]:
        return succeed(self.requested)

    def markDrained(self) -> Deferred[None]:
        self.operations.append("drained")
        return fail(Unavailable("down")) if self.failing else succeed(None)


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = ConnectionRegistry()
        self.store = FakeStore()
        self.listener = FakeListener()
        self.metrics = Metrics()
        self.stoppedAccepting: list[float] = []
        self.exits: list[float] = []
        self.drain = Drain(
            self.clock, self.store, self.registry,  # type: ignore[arg-type]
            self.stopAccepting, ShutdownConfig(bye_batch=2, bye_interval=1.0, drain_timeout=10.0), 0.5,
            self.metrics, self.listener,  # type: ignore[arg-type]
            lambda: self.exits.append(self.clock.seconds()),
        )
        self.connections = []
        for i in range(5):
            connection = FakeConnection(
                Session(f"c{i}", "s", i + 1, "gw-a", "main", ""), self.registry, self.clock
            )
            self.registry.bind(connection)
            self.connections.append(connection)

    def stopAccepting(self) -> Deferred[None]:
        self.stoppedAccepting.append(self.clock.seconds())
        return succeed(None)

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)

    def test_pacedHandOverThenExit(self) -> None:
        """
        A drain stops accepting first, then closes the connections with bye shutdown in
        batches of bye_batch every bye_interval, records drained_at once none is left,
        and exits.  Readiness fails from the request on.
        """
        self.assertEqual(self.drain.check(), (True, "not draining"))
        self.drain.start(exit=True)
        self.assertEqual(self.stoppedAccepting, [0.0])
        self.assertEqual(self.drain.check(), (False, "draining: 3 controllers left"))
        self.assertEqual(self.sample("ctrlgw_draining"), 1)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        times = [c.closed for c in self.connections]
        self.assertEqual(
            times,
            [[("shutdown", 0.0)], [("shutdown", 0.0)], [("shutdown", 1.0)], [("shutdown", 1.0)],
             [("shutdown", 2.0)]],
        )
        self.assertEqual(self.sample("ctrlgw_drain_handed_over_total"), 5)
        self.assertEqual((self.store.operations, self.exits), ([], []))
        self.clock.advance(0.6)  # close_grace + 0.1 for the last sockets
        self.assertEqual(self.store.operations, ["drained"])
        self.assertEqual(self.drain.check(), (False, "drained"))
        self.assertEqual(self.exits, [2.6])

    def test_stay(self) -> None:
        """
        With exit false the drained instance stays up, not ready; a later request to exit
        makes it exit at once.
        """
        self.drain.start(exit=False)
        self.clock.pump([1.0, 1.0, 0.6])
        self.assertEqual(self.drain.check(), (False, "drained"))
        self.assertEqual(self.exits, [])
        self.assertEqual(self.store.operations, ["drained"])
        self.drain.start(exit=False)  # Asked again: drained_at is recorded again.
        self.assertEqual((self.store.operations, self.exits), (["drained"] * 2, []))
        self.drain.start(exit=True)
        self.assertEqual(self.exits, [2.6])
        self.assertEqual(len(self.stoppedAccepting), 1)

    def test_exitsThoughTheDatabaseIsDown(self) -> None:
        """
        A drained instance asked to exit exits even if it cannot record drained_at.
        """
        self.store.failing = True
        self.drain.start(exit=True)
        self.clock.pump([1.0, 1.0, 0.6])
        self.assertEqual((self.store.operations, self.exits), (["drained"], [2.6]))

    def test_shutdownStopsTheDrain(self) -> None:
        """
        A shutdown during a drain stops it: no more batches, no exit of its own.
        """
        self.drain.start(exit=True)
        self.drain.stop()
        self.clock.pump([1.0, 1.0, 0.6, 1.0])
        self.assertEqual(sum(len(c.closed) for c in self.connections), 2)
        self.assertEqual((self.store.operations, self.exits), ([], []))

    def test_latecomers(self) -> None:
        """
        A connection bound while the drain runs (its claim was in flight) is handed over
        too, before the drain counts as done.
        """
        self.drain.start(exit=True)
        late = FakeConnection(Session("late", "s", 99, "gw-a", "main", ""), self.registry, self.clock)
        self.clock.advance(1.0)
        self.registry.bind(late)
        self.clock.pump([1.0, 0.6])
        self.assertEqual(late.closed, [("shutdown", 2.6)])
        self.assertEqual(self.exits, [])
        self.clock.advance(0.6)
        self.assertEqual(self.exits, [3.2])

    def test_notifiedForThisInstanceOnly(self) -> None:
        """
        The notification names an instance: only that one reads its row, and drains if
        the row says a drain was asked of this run.
        """
        notify = self.listener.handlers["ctrlgw_drain"]
        self.store.requested = False
        notify("gw-b")
        self.assertFalse(self.drain.draining)
        notify("gw-a")
        self.assertTrue(self.drain.draining)
        self.assertFalse(self.drain.exitWhenDrained)

    def test_missedNotification(self) -> None:
        """
        When the LISTEN connection comes back, the instance reads its row: a drain asked
        meanwhile starts; none asked, nothing happens.
        """
        [reconnected] = self.listener.reconnected
        reconnected()
        self.assertFalse(self.drain.draining)
        self.store.requested = True
        reconnected()
        self.assertTrue(self.drain.draining)


class DrainRequestTests(PostgresTestCase):
    timeout = 120

    @deferred
    async def test_requestThroughTheDatabase(self) -> None:
        """
        requestDrain() on any connection drains the named instance (it stays up here); it
        reports the drain in its row, fails readiness, refuses connections; an unknown
        instance is refused.  ctrlgw drain --wait returns once it is drained.
        """
        a = await startGateway(self, self.dsn, self.schema, "gw-a", {"shutdown": {"bye_interval": "50ms"}})
        b = await startGateway(self, self.dsn, self.schema, "gw-b")
        controller = await connectController(listenerPort(a))
        await controller.hello("dev-1")
        store = Store(self.db, "cli")
        self.assertFalse(await store.requestDrain("gw-nope", True))
        self.assertEqual(await store.drainState("gw-a"), (False, False))
        out, err = io.StringIO(), io.StringIO()
        common = ["--config", EXAMPLE_CONFIG, "--dsn", self.dsn, "--schema", self.schema]
        code = await cli.run(reactor, ["drain", "gw-a", "--stay", "--wait", *common], out, err)
        self.assertEqual((code, out.getvalue(), err.getvalue()), (0, "instance gw-a drained\n", ""))
        self.assertEqual([f["reason"] for f in controller.of("bye")], ["shutdown"])
        self.assertEqual(await store.drainState("gw-a"), (True, True))
        checks = a.readiness.evaluate()
        self.assertEqual(checks["drain"], {"ok": False, "detail": "drained"})
        self.assertTrue(b.readiness.ready())
        self.assertEqual(sample(a, "ctrlgw_ready"), 0)
        self.assertEqual(sample(a, "ctrlgw_draining"), 1)
        self.assertIsNone(a.service.getServiceNamed("listener:main").port)
        self.assertTrue(a.service.running)  # --stay
        out = io.StringIO()
        code = await cli.run(reactor, ["drain", "gw-a", "--stay", "--wait", *common], out, err)
        self.assertEqual((code, out.getvalue()), (0, "instance gw-a drained\n"))  # asked again
        code = await cli.run(reactor, ["drain", "gw-nope", *common], out, err)
        self.assertEqual(code, 1)
        self.assertIn("no instance 'gw-nope' is registered", err.getvalue())

    @deferred
    async def test_exitsWhenDrained(self) -> None:
        """
        Without --stay the drained instance stops its service tree (twistd: exits), and
        leaves the cluster; ctrlgw drain --wait then says it has exited.
        """
        a = await startGateway(self, self.dsn, self.schema, "gw-a")
        out, err = io.StringIO(), io.StringIO()
        common = ["--config", EXAMPLE_CONFIG, "--dsn", self.dsn, "--schema", self.schema]
        code = await cli.run(reactor, ["drain", "gw-a", "--wait", *common], out, err)
        self.assertEqual((code, out.getvalue()), (0, "instance gw-a has exited\n"))
        await waitUntil(lambda: not a.service.running, 10, what="gw-a to stop")
        self.assertIsNone(await Store(self.db, "cli").drainState("gw-a"))


class DrainUnderFleetTests(PostgresTestCase):
    """
    Three real twistd gateways behind a real HAProxy and a simulated fleet (ctrlgw sim):
    one gateway is drained while the fleet sends messages.
    """

    timeout = 240

    @deferred
    async def test_fleetMovesOverWithNothingLost(self) -> None:
        """
        Every controller of the drained instance reconnects to the others, every message
        the fleet sent is acked and stored exactly once, the hand-over is paced, and the
        drained gateway exits with status 0.
        """
        requireFaults(self, tools=["haproxy"])
        # Short: HAProxy's admin socket path must fit in sun_path.
        workdir = Path(tempfile.mkdtemp(prefix="ctrlgw-drain-"))
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        sections: dict[str, dict[str, object]] = {"shutdown": {"bye_batch": 25, "bye_interval": "200ms"},
                    "liveness": {"close_grace": "200ms"}}
        gateways = [GatewayProcess(self, workdir, self.dsn, self.schema, f"gw-{i}", sections)
                    for i in range(3)]
        for gateway in gateways:
            # As deploy/haproxy: the listener reads the PROXY protocol HAProxy sends.
            text = gateway.configPath.read_text()
            text = text.replace("[listener:main]\nendpoint = tcp:", "[listener:main]\nendpoint = haproxy:tcp:")
            self.assertIn("endpoint = haproxy:tcp:", text)
            gateway.configPath.write_text(text)
            await gateway.start()
        # As deploy/haproxy/haproxy.cfg: PROXY protocol v2, health checks on /readyz.
        haproxy = HAProxy(
            self, workdir, {g.instance: g.port for g in gateways},
            check={g.instance: f"send-proxy-v2 check port {g.httpPort} inter 200ms fall 1 rise 1"
                   for g in gateways},
            backend=["option httpchk", "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host ctrlgw",
                     "http-check expect status 200"],
        )
        await haproxy.waitStates({g.instance: "UP" for g in gateways})

        fleet = 300
        summaryPath = workdir / "sim.json"
        sim = SimProcess(self, [
            f"127.0.0.1:{haproxy.port}", "-n", str(fleet), "--rate", "300", "--duration", "14",
            "--window", "20", "--backoff-min", "0.2", "--backoff-max", "1", "--json", str(summaryPath),
        ])

        async def online() -> dict[str, int]:
            rows = await self.db.runQuery(
                "test", "SELECT instance_id, count(*) FROM sessions WHERE online GROUP BY 1"
            )
            return {instance: int(count) for instance, count in rows}

        await pollUntil(lambda: online(), lambda o: sum(o.values()) == fleet, 30, "the fleet")
        before = await online()
        drained = gateways[0]
        self.assertGreater(before.get(drained.instance, 0), 25)

        out, err = io.StringIO(), io.StringIO()
        common = ["--config", EXAMPLE_CONFIG, "--dsn", self.dsn, "--schema", self.schema]
        started = reactor.seconds()
        drainDone = Deferred.fromCoroutine(
            cli.run(reactor, ["drain", drained.instance, "--wait", *common], out, err)
        )
        # Not ready from the request on: HAProxy takes it out of rotation on /readyz.
        await haproxy.waitStates({drained.instance: "DOWN"}, timeout=10)
        code = await drainDone
        took = reactor.seconds() - started
        self.assertEqual((code, err.getvalue()), (0, ""), out.getvalue())
        assert drained.child is not None
        self.assertEqual(await drained.child.waitForExit(30), (0, None), drained.log())

        after = await pollUntil(
            lambda: online(), lambda o: sum(o.values()) == fleet, 30, "every controller back"
        )
        self.assertNotIn(drained.instance, after)
        self.assertEqual(set(after), {g.instance for g in gateways[1:]})

        summary = json.loads(await sim.finished())
        self.assertEqual(summary["errors"], 0, summary)
        self.assertGreater(summary["msgs"], 2000)
        self.assertEqual(summary["welcomes"], fleet + before[drained.instance])
        # Nothing acked is lost, nothing is stored twice.  A bye closes a connection on
        # purpose: what arrives after it is not acted on, so the messages a controller had
        # in flight then stay unacked, for it to send again (the simulator does not resend):
        # at most its --window each, and only on the drained instance's connections.
        self.assertEqual(summary["acks"] + summary["unanswered"], summary["msgs"])
        self.assertLessEqual(summary["unanswered"], before[drained.instance] * 20)
        rows = await self.db.runQuery(
            "test", "SELECT count(*), count(DISTINCT (controller_id, message_id)) FROM inbox"
        )
        [(stored, distinct)] = rows
        self.assertEqual(stored, distinct)
        self.assertGreaterEqual(stored, summary["acks"])
        self.assertLessEqual(stored, summary["msgs"])

        # Paced: the drained instance's byes went out over several batches' time.
        rows = await self.db.runQuery(
            "test",
            "SELECT count(*), extract(epoch FROM max(at) - min(at)) FROM events"
            " WHERE instance_id = %s AND kind = 'disconnect' AND reason = 'shutdown'",
            (drained.instance,),
        )
        [(byes, spread)] = rows
        self.assertEqual(byes, before[drained.instance])
        batches = -(-byes // 25)
        self.assertGreaterEqual(float(spread), (batches - 1) * 0.2 * 0.9)
        sys.stderr.write(
            f"\ndrain under fleet: {byes} handed over in {took:.2f}s (byes spread"
            f" {float(spread):.2f}s), {summary['unanswered']} in flight at a bye\n"
        )


class SimProcess:
    """
    C{ctrlgw sim ARGS} as a child process; L{finished} fires with its standard output.
    """

    def __init__(self, testCase: Any, args: list[str]) -> None:
        from twisted.internet.utils import getProcessOutputAndValue

        self._result = getProcessOutputAndValue(
            sys.executable, ["-c", "from ctrlgw.cli import main; main()", "sim", *args],
            env=dict(os.environ), reactor=reactor,
        )

    async def finished(self) -> str:
        out, err, code = await self._result
        assert code == 0, err.decode(errors="replace")[-2000:]
        return out.decode()
