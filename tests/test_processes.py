"""
Two gateway instances as two real C{twistd ctrlgw} processes sharing one PostgreSQL: a
takeover and command delivery across them.  Elsewhere the "across instances" tests run both
gateways in one process on one reactor, where they share a clock, a scheduler and Python's
memory; here they share only the database, as in production.  (The installed package is
what runs: reinstall after editing ctrlgw.)
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import Agent, readBody

from ctrlgw.outbox import FINAL_STATES
from tests.dbfaults import TwistdGateway
from tests.gateways import LineController, connectController, sleep, waitUntil
from tests.pg import PostgresTestCase

SECTIONS: dict[str, dict[str, object]] = {
    "cluster": {"heartbeat_interval": "1s", "instance_ttl": "5s", "reconcile_interval": "1s"},
    "outbox": {"poll_interval": "200ms", "ack_timeout": "30s"},
}


async def scrape(http: int, name: str, labels: dict[str, str] | None = None) -> float:
    """
    One sample of a child's C{/metrics}, as Prometheus would read it; 0 if absent.
    """
    response = await Agent(reactor, connectTimeout=5).request(
        b"GET", b"http://127.0.0.1:%d/metrics" % http
    )
    text = (await readBody(response)).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return 0.0


class TwoProcessTests(PostgresTestCase):
    timeout = 120

    async def twoGateways(self) -> tuple[TwistdGateway, TwistdGateway]:
        a, b = await gatherResults([
            Deferred.fromCoroutine(
                TwistdGateway.start(self, self.dsn, self.schema, name, SECTIONS)
            )
            for name in ("gw-a", "gw-b")
        ])
        return a, b

    async def controller(self, gateway: TwistdGateway, autoAck: bool = False) -> LineController:
        client = await connectController(gateway.port, autoAck=autoAck)
        self.addCleanup(client.close)
        return client

    async def send(self, controllers: list[str], body: object) -> list[str]:
        rows = await self.db.runQuery(
            "test",
            "SELECT id::text FROM send_many(%s::text[], %s::jsonb[], interval '30 seconds') AS id",
            (controllers, [json.dumps(body)] * len(controllers)),
        )
        return [r[0] for r in rows]

    async def status(self, command: str) -> dict[str, Any]:
        rows = await self.db.runQuery("test", "SELECT command_status(%s::uuid)", (command,))
        status = rows[0][0]
        assert status is not None, command
        return dict(status)

    async def waitFinal(self, command: str, timeout: float = 15.0) -> dict[str, Any]:
        started = reactor.seconds()
        while True:
            status = await self.status(command)
            if status["state"] in FINAL_STATES:
                return status
            self.assertLess(reactor.seconds() - started, timeout, f"{command}: {status}")
            await sleep(0.02)

    async def test_takeover(self) -> None:
        """
        A controller connected to process A says hello to process B: B welcomes it with a
        higher epoch, A says bye takeover and closes the old socket (A heard of it only
        through the database), the session row and the history name B, and B stores
        and acks what the controller sends.
        """
        a, b = await self.twoGateways()
        onA = await self.controller(a)
        first = await onA.hello("c-1")
        onA.send({"type": "msg", "id": "on-a", "body": {"n": 1}})
        await waitUntil(lambda: "on-a" in onA.ackedIds(), 10, what="the ack on A")

        onB = await self.controller(b)
        welcomed = reactor.seconds()
        second = await onB.hello("c-1")
        self.assertGreater(second["epoch"], first["epoch"])
        await waitUntil(lambda: onA.isClosed, 10, what="A closing the old connection")
        closedAfter = reactor.seconds() - welcomed
        self.assertEqual([f.get("reason") for f in onA.of("bye")], ["takeover"])

        onB.send({"type": "msg", "id": "on-b", "body": {"n": 2}})
        await waitUntil(lambda: "on-b" in onB.ackedIds(), 10, what="the ack on B")
        rows = await self.db.runQuery(
            "test", "SELECT message_id, instance_id, epoch FROM inbox"
            " WHERE controller_id = 'c-1' ORDER BY id",
        )
        self.assertEqual(rows, [("on-a", "gw-a", first["epoch"]), ("on-b", "gw-b", second["epoch"])])
        session = await self.db.runQuery(
            "test", "SELECT instance_id, epoch, online FROM sessions WHERE controller_id = 'c-1'"
        )
        self.assertEqual(session, [("gw-b", second["epoch"], True)])
        # History is written in batches: wait for the takeover to be there.
        started = reactor.seconds()
        while True:
            events = await self.db.runQuery(
                "test", "SELECT kind, instance_id, epoch FROM events"
                " WHERE controller_id = 'c-1' ORDER BY id",
            )
            if ("takeover", "gw-b", second["epoch"]) in events or reactor.seconds() - started > 10:
                break
            await sleep(0.05)
        self.assertIn(("connect", "gw-a", first["epoch"]), events)
        self.assertIn(("takeover", "gw-b", second["epoch"]), events)
        self.assertEqual(
            await scrape(a.http, "ctrlgw_disconnects_total", {"reason": "takeover"}), 1
        )
        self.assertFalse(onB.isClosed)
        print(f"\nwelcome on B -> old socket closed by A: {closedAfter * 1000:.0f} ms")

    async def test_commandsFollowTheController(self) -> None:
        """
        A command written by process A and not acked when its controller moves to process
        B is written again by B with the same id, and B's ack finishes it; meanwhile a
        controller that stays on A gets its own commands from A, and neither process
        writes a command to a controller the other holds.
        """
        a, b = await self.twoGateways()
        mover = await self.controller(a)
        await mover.hello("c-1")
        stayer = await self.controller(a, autoAck=True)
        await stayer.hello("c-2")
        (command,) = await self.send(["c-1"], {"op": "move"})
        await mover.waitFor("cmd", id=command)

        onB = await self.controller(b)
        await onB.hello("c-1")
        await waitUntil(lambda: mover.isClosed, 10, what="A closing the old connection")
        await onB.waitFor("cmd", id=command, timeout=10)
        onB.send({"type": "ack", "ref": command})
        acked = await self.waitFinal(command)
        self.assertEqual(acked["state"], "acked")
        self.assertEqual(
            [(e["state"], e["attempt"], e["instance"]) for e in acked["history"]],
            [("pending", 0, None), ("sent", 1, "gw-a"), ("pending", 1, "gw-b"),
             ("sent", 2, "gw-b"), ("acked", 2, "gw-b")],
        )

        # One statement for both: both processes hear the doorbell, each writes only to
        # the controller it holds.
        onB.autoAck = True
        toMover, toStayer = await self.send(["c-1", "c-2"], {"op": "both"})
        for command, instance in ((toMover, "gw-b"), (toStayer, "gw-a")):
            status = await self.waitFinal(command)
            self.assertEqual(status["state"], "acked")
            self.assertEqual({e["instance"] for e in status["history"][1:]}, {instance})
        self.assertEqual(onB.commandIds(), [acked["id"], toMover])
        self.assertEqual(stayer.commandIds(), [toStayer])
        self.assertEqual(mover.commandIds(), [acked["id"]])
        self.assertEqual(await scrape(a.http, "ctrlgw_frames_out_total", {"type": "cmd"}), 2)
        self.assertEqual(await scrape(b.http, "ctrlgw_frames_out_total", {"type": "cmd"}), 2)
