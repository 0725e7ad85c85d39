"""
ctrlgw sim: the simulated fleet's behaviour on a fake clock, then against a real gateway,
then as the command users run.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.sim import Fleet, SimController, SimOptions, Stats, percentile, runSim
from tests.gateways import listenerPort, startGateway
from tests.pg import PostgresTestCase

EPOCH = 1_800_000_000.0


class AbortableTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class FakeNetwork:
    """
    Connects every dial at once to a StringTransport, and records where it went.
    """

    def __init__(self) -> None:
        self.dials: list[tuple[tuple[str, int], SimController]] = []

    def __call__(self, endpoint: tuple[str, int], protocol: SimController) -> Deferred[Any]:
        self.dials.append((endpoint, protocol))
        protocol.makeConnection(AbortableTransport())
        return succeed(protocol)

    def frames(self, protocol: SimController) -> list[dict[str, Any]]:
        transport = protocol.transport
        assert isinstance(transport, StringTransport)
        return [json.loads(line) for line in transport.value().splitlines() if line]


def welcome(protocol: SimController) -> None:
    protocol.dataReceived(b'{"type":"welcome","ts":1,"session":"s","epoch":1}\n')


class FleetTests(SynchronousTestCase):
    def fleet(self, **options: Any) -> tuple[Clock, FakeNetwork, Fleet]:
        clock = Clock()
        clock.advance(EPOCH)
        network = FakeNetwork()
        opts = SimOptions(endpoints=[("10.0.0.1", 7000), ("10.0.0.2", 7000)], **options)
        fleet = Fleet(clock, opts, random.Random(4), connect=network, freeze=lambda: None)
        fleet.start()
        clock.advance(0)
        return clock, network, fleet

    def test_helloWithSkewedTs(self) -> None:
        """
        Every controller says hello with its id, its clock skewed as asked; controllers
        are spread over the endpoints.
        """
        clock, network, fleet = self.fleet(controllers=4, skew=-90.0)
        hellos = [network.frames(p)[0] for _, p in network.dials]
        self.assertEqual([h["controller"] for h in hellos], ["sim-0", "sim-1", "sim-2", "sim-3"])
        self.assertEqual({h["ts"] for h in hellos}, {int((EPOCH - 90.0) * 1000)})
        self.assertEqual([e for e, _ in network.dials].count(("10.0.0.2", 7000)), 2)

    def test_paceFollowsTheRateNotTheFleet(self) -> None:
        """
        At 100 msgs/s over 10 live controllers, one second sends 100 msgs, 10 each; the
        acks are matched to their msgs.
        """
        clock, network, fleet = self.fleet(controllers=10, rate=100.0)
        for _, protocol in network.dials:
            welcome(protocol)
        clock.advance(0.5)  # one late tick for fifty intervals: the rate holds all the same
        for _ in range(50):
            clock.advance(0.01)
        clock.advance(0.001)  # float time: the hundredth tick is due a hair after 1 s
        perController = [
            [f for f in network.frames(p) if f["type"] == "msg"] for _, p in network.dials
        ]
        self.assertEqual([len(m) for m in perController], [10] * 10)
        first = perController[0][0]
        clock.advance(0.005)
        network.dials[0][1].dataReceived(
            json.dumps({"type": "ack", "ts": 1, "ref": first["id"]}).encode() + b"\n"
        )
        self.assertEqual((fleet.stats.msgs, fleet.stats.acks), (100, 1))
        self.assertGreater(fleet.stats.ackMs[0], 0)

    def test_windowClosesTheLoop(self) -> None:
        """
        With a window of 3, a controller with 3 msgs unacked gets no more until an ack;
        with every controller at its window the offer waits.
        """
        clock, network, fleet = self.fleet(controllers=2, rate=1000.0, window=3)
        for _, protocol in network.dials:
            welcome(protocol)
        clock.advance(0.5)
        msgs = {p.controller: [f for f in network.frames(p) if f["type"] == "msg"] for _, p in network.dials}
        self.assertEqual({c: len(m) for c, m in msgs.items()}, {"sim-0": 3, "sim-1": 3})
        first = network.dials[0][1]
        first.dataReceived(json.dumps({"type": "ack", "ts": 1, "ref": msgs["sim-0"][0]["id"]}).encode() + b"\n")
        clock.advance(0.1)
        self.assertEqual(len([f for f in network.frames(first) if f["type"] == "msg"]), 4)
        self.assertEqual(fleet.stats.msgs, 7)

    def test_windowSkipsAControllerLostWithRoom(self) -> None:
        """
        A controller that got room (an ack) and then lost its connection is not sent to:
        with the other at its window, the offer waits.
        """
        clock, network, fleet = self.fleet(controllers=2, rate=1000.0, window=3)
        for _, protocol in network.dials:
            welcome(protocol)
        clock.advance(0.5)
        first = network.dials[0][1]
        sent = [f for f in network.frames(first) if f["type"] == "msg"]
        first.dataReceived(json.dumps({"type": "ack", "ts": 1, "ref": sent[0]["id"]}).encode() + b"\n")
        written = len(network.frames(first))
        first.connectionLost(None)
        clock.advance(0.05)
        self.assertEqual(len(network.frames(first)), written)
        self.assertEqual(fleet.stats.msgs, 6)

    def test_answersPingsAndAcksCommands(self) -> None:
        clock, network, fleet = self.fleet(controllers=1)
        (_, protocol), = network.dials
        welcome(protocol)
        protocol.dataReceived(b'{"type":"ping","ts":42}\n')
        sentMs = int(EPOCH * 1000) - 7
        protocol.dataReceived(
            json.dumps({"type": "cmd", "ts": 1, "id": "c1", "body": {"sent_ms": sentMs}}).encode()
            + b"\n"
        )
        frames = network.frames(protocol)
        self.assertEqual(frames[1]["type"], "pong")
        self.assertEqual(frames[1]["echo"], 42)
        self.assertEqual((frames[2]["type"], frames[2]["ref"]), ("ack", "c1"))
        self.assertEqual(fleet.stats.cmdMs, [7.0])
        self.assertEqual(fleet.stats.cmdReads, [("c1", EPOCH * 1000)])

    def test_reconnectWithBackoffToTheNextEndpoint(self) -> None:
        """
        A lost connection is dialled again after a jittered, growing delay, at the next
        endpoint; a welcome resets the backoff.
        """
        clock, network, fleet = self.fleet(controllers=1, backoffMin=1.0, backoffMax=8.0)
        (endpoint, protocol), = network.dials
        welcome(protocol)
        protocol.connectionLost(None)
        self.assertEqual(fleet.stats.connected, 0)
        clock.advance(0.99)
        self.assertEqual(len(network.dials), 1)
        clock.advance(2.0)  # first delay: 1 s plus up to 1 s of jitter
        self.assertEqual(len(network.dials), 2)
        self.assertNotEqual(network.dials[1][0], endpoint)
        network.dials[1][1].connectionLost(None)  # lost before any welcome: longer wait
        clock.advance(2.0)
        self.assertEqual(len(network.dials), 2)
        clock.advance(2.0)
        self.assertEqual(len(network.dials), 3)

    def test_fleetAtOnceDialsASliceEachTurn(self) -> None:
        """
        Connecting at once, the fleet dials a slice per reactor turn: the first sockets
        are connecting while the rest are still to be built, so the gateway sees the
        storm begin at once instead of after the whole fleet was built.
        """
        clock = Clock()
        network = FakeNetwork()
        frozen: list[int] = []
        fleet = Fleet(clock, SimOptions(endpoints=[("10.0.0.1", 7000)], controllers=450),
                      random.Random(4), connect=network, freeze=lambda: frozen.append(len(network.dials)))
        fleet.start()
        self.assertEqual(len(network.dials), 200)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [0.0], "the next slice")
        clock.advance(0)
        self.assertEqual(len(network.dials), 450)
        self.assertEqual(len({p.controller for _, p in network.dials}), 450)
        self.assertEqual(clock.getDelayedCalls(), [])
        # What each slice dialled is frozen out of the collector's way as it is made.
        self.assertEqual(frozen, [200, 400, 450])

    def test_stopCancelsTheSlicesLeft(self) -> None:
        clock = Clock()
        network = FakeNetwork()
        fleet = Fleet(clock, SimOptions(endpoints=[("10.0.0.1", 7000)], controllers=450),
                      random.Random(4), connect=network, freeze=lambda: None)
        fleet.start()
        fleet.stop()
        clock.advance(0)
        self.assertEqual(len(network.dials), 200)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_duplicateIds(self) -> None:
        clock, network, fleet = self.fleet(controllers=2, rate=100.0, duplicates=0.5)
        for _, protocol in network.dials:
            welcome(protocol)
        for _ in range(100):
            clock.advance(0.01)
        ids = [f["id"] for _, p in network.dials for f in network.frames(p) if f["type"] == "msg"]
        self.assertLess(len(set(ids)), len(ids) * 0.8)
        self.assertGreater(len(set(ids)), len(ids) * 0.2)

    def test_stormAbortsAShare(self) -> None:
        clock, network, fleet = self.fleet(controllers=20, stormEvery=5.0, stormShare=0.25)
        for _, protocol in network.dials:
            welcome(protocol)
        clock.advance(5.0)
        aborted = [p for _, p in network.dials if isinstance(p.transport, AbortableTransport)
                   and p.transport.aborted]
        self.assertEqual(len(aborted), 5)

    def test_percentile(self) -> None:
        self.assertEqual(percentile(list(range(1, 101)), 0.99), 99)
        self.assertEqual(percentile([5.0], 0.5), 5.0)
        self.assertIsNone(percentile([], 0.5))


class SimAgainstGatewayTests(PostgresTestCase):
    timeout = 90

    async def test_fleetAgainstARealGateway(self) -> None:
        """
        50 controllers at 200 msgs/s for 2 s: every msg sent is acked, every acked msg is
        in the inbox once, and a command sent to one of them is read and acked.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-sim", {})
        options = SimOptions(
            endpoints=[("127.0.0.1", listenerPort(gateway))], controllers=50, rate=200.0,
            duration=2.0,
        )
        commandSent: list[str] = []

        def tick(stats: Stats, elapsed: float) -> None:
            if stats.welcomes == 50 and not commandSent:
                commandSent.append("pending")
                d = self.db.runQuery("test", "SELECT send('sim-07', '{\"op\": 1}')::text")
                d.addCallback(lambda rows: commandSent.__setitem__(0, rows[0][0]))

        stats = await runSim(reactor, options, tick)
        self.assertEqual(stats.welcomes, 50)
        self.assertGreater(stats.msgs, 300)
        self.assertEqual(stats.acks, stats.msgs)
        self.assertEqual(stats.errors, 0)
        rows = await self.db.runQuery("test", "SELECT count(*), count(DISTINCT message_id) FROM inbox")
        self.assertEqual(rows, [(stats.acks, stats.acks)])
        self.assertEqual(stats.cmds, 1)
        state = await self.db.runQuery("test", "SELECT state FROM commands WHERE id = %s", (commandSent[0],))
        self.assertEqual(state, [("acked",)])

    async def test_commandWithProcs(self) -> None:
        """
        ctrlgw sim as users run it, with two processes: the summary adds them up, and
        --json writes the raw latencies and, by command id, when each cmd was read.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-sim", {})
        out = self.mktemp()
        running = getProcessOutputAndValue(
            sys.executable,
            ["-c", "from ctrlgw.cli import main; main()", "sim",
             f"127.0.0.1:{listenerPort(gateway)}", "-n", "20", "--rate", "50",
             "--duration", "2", "--procs", "2", "--json", out],
            env=dict(os.environ), reactor=reactor,
        )
        # One command to a controller of each process (each has its own prefix), once both
        # are online.
        for _ in range(100):
            online = await self.db.runQuery(
                "test", "SELECT count(*) FROM sessions WHERE online AND controller_id IN ('sim-0-0', 'sim-1-0')")
            if online == [(2,)]:
                break
            await deferLater(reactor, 0.05)
        sent = [(await self.db.runQuery("test", "SELECT send(%s, '{}')::text", (c,)))[0][0]
                for c in ("sim-0-0", "sim-1-0")]
        stdout, stderr, code = await running
        self.assertEqual(code, 0, stderr)
        summary = json.loads(stdout)
        self.assertEqual(summary["welcomes"], 20)
        self.assertEqual(summary["errors"], 0)
        self.assertGreater(summary["acks"], 40)
        self.assertEqual(summary["acks"], summary["msgs"])
        self.assertIn(b"connected 20", stderr)
        with open(out) as f:
            raw = json.load(f)
        self.assertEqual(len(raw["msg_ack_ms"]), summary["acks"])
        self.assertEqual(len(raw["welcome_ms"]), 20)
        self.assertEqual(sorted(i for i, _ in raw["cmd_reads"]), sorted(sent))
        self.assertEqual(summary["cmds"], 2)
        rows = await self.db.runQuery(
            "test", "SELECT count(DISTINCT controller_id) FROM sessions WHERE controller_id LIKE 'sim-%%'"
        )
        self.assertEqual(rows, [(20,)])
