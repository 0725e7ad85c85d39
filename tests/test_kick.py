"""
Kicking a controller (ctrlgw/kick.py, kick_controller() of migration 9): its live
connection closes wherever it is in the cluster within a second, with the reason in its
history, through C{ctrlgw kick}, C{DELETE /v1/controllers/{id}/connection} or SQL.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ctrlgw import cli
from ctrlgw.interfaces import Session
from ctrlgw.kick import Kicks, checkKick, kick, kickedChannel
from ctrlgw.metrics import Metrics
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.postgres import Store
from tests.gateways import (
    connectController,
    httpPort,
    listenerPort,
    sample,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase

EXAMPLE_CONFIG = str(Path(__file__).resolve().parent.parent / "etc" / "ctrlgw.ini")


@dataclass
class FakeConnection:
    session: Session | None
    closed: list[str] = field(default_factory=list)

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class FakeListener:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def subscribe(self, channel: str, handler: Any, onReconnected: Any = None) -> None:
        self.handlers[channel] = handler


class FakeStore:
    db = SimpleNamespace(schema="ctrlgw")


def session(controller: str, epoch: int) -> Session:
    return Session(controller=controller, epoch=epoch, session="s", instance="gw", listener="main", peer="")


class KicksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = ConnectionRegistry()
        self.metrics = Metrics()
        self.listener = FakeListener()
        self.kicks = Kicks(FakeStore(), self.registry, self.metrics, self.listener)  # type: ignore[arg-type]

    def bind(self, controller: str, epoch: int) -> FakeConnection:
        connection = FakeConnection(session(controller, epoch))
        self.registry.bind(connection)
        return connection

    def test_subscribes(self) -> None:
        self.assertEqual(list(self.listener.handlers), ["ctrlgw_kicked"])

    def test_closesTheKickedSession(self) -> None:
        """
        The connection of the ended epoch gets bye kicked; others are left alone.
        """
        kicked, other = self.bind("a", 5), self.bind("b", 6)
        self.listener.handlers["ctrlgw_kicked"]("a 5")
        self.assertEqual((kicked.closed, other.closed), (["kicked"], []))
        self.assertEqual(self.metrics.registry.get_sample_value("ctrlgw_kicks_total"), 1)

    def test_newerSessionStays(self) -> None:
        """
        A controller that reconnected before the notification arrived (a newer epoch)
        keeps its new connection.
        """
        newer = self.bind("a", 9)
        self.kicks.kickedNotified("a 5")
        self.assertEqual(newer.closed, [])
        self.assertEqual(self.metrics.registry.get_sample_value("ctrlgw_kicks_total"), 0)

    def test_unknownAndMalformed(self) -> None:
        connection = self.bind("a", 5)
        self.kicks.kickedNotified("zz 5")
        self.kicks.kickedNotified("a")
        self.kicks.kickedNotified("a five")
        self.assertEqual(connection.closed, [])

    def test_checkKick(self) -> None:
        """
        The boundary refuses what the database would: a bad id, a reason over 200.
        """
        checkKick("dev-1", "x" * 200)
        self.assertRaises(ValueError, checkKick, "dev 1", "")
        self.assertRaises(ValueError, checkKick, "dev-1", "x" * 201)


class ClusterKickTests(PostgresTestCase):
    timeout = 120

    def store(self) -> Store:
        return Store(self.db, "cli")

    async def twoGateways(self, token: str = "") -> tuple[Any, Any]:
        sections = {"http": {"api_token": token}} if token else {}
        a = await startGateway(self, self.dsn, self.schema, "gw-a", sections)
        b = await startGateway(self, self.dsn, self.schema, "gw-b", sections)
        return a, b

    async def history(self, controller: str) -> list[tuple[str, str, str]]:
        rows = await self.db.runQuery(
            "test", "SELECT kind, reason, instance_id FROM events WHERE controller_id = %s"
            " ORDER BY id", (controller,),
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]

    async def waitForBye(self, controller: Any, since: float) -> float:
        await waitUntil(lambda: controller.isClosed, 5, what="the kicked connection to close")
        [bye] = controller.of("bye")
        self.assertEqual(bye["reason"], "kicked")
        return controller.receivedAt[controller.frames.index(bye)] - since

    @deferred
    async def test_sqlKickClosesWithinASecond(self) -> None:
        """
        kick() on any database connection closes the controller's connection on the
        instance holding it within a second; its history says kicked, with the reason,
        and its session row is offline with reason kicked.
        """
        a, _ = await self.twoGateways()
        controller = await connectController(listenerPort(a))
        welcome = await controller.hello("dev-1")
        started = reactor.seconds()
        kicked = await kick(self.store(), "dev-1", "firmware update")
        assert kicked is not None
        self.assertEqual((kicked.instance, kicked.epoch), ("gw-a", welcome["epoch"]))
        took = await self.waitForBye(controller, started)
        self.assertLess(took, 1.0)
        sys.stderr.write(f"\nkick() call to bye kicked on the holding instance: {took * 1000:.1f} ms\n")
        self.assertEqual(sample(a, "ctrlgw_kicks_total"), 1)
        await waitUntil(lambda: sample(a, "ctrlgw_disconnects_total", {"reason": "kicked"}) == 1)
        history = await self.history("dev-1")
        self.assertIn(("kicked", "firmware update", "gw-a"), history)
        rows = await self.db.runQuery(
            "test", "SELECT online, disconnect_reason, epoch > %s FROM sessions"
            " WHERE controller_id = 'dev-1'", (welcome["epoch"],),
        )
        self.assertEqual(rows, [(False, "kicked", True)])
        # It may come back at once.
        again = await connectController(listenerPort(a))
        await again.hello("dev-1")
        again.close()

    @deferred
    async def test_notConnected(self) -> None:
        await self.twoGateways()
        self.assertIsNone(await kick(self.store(), "dev-nobody", "x"))
        self.assertEqual(await self.history("dev-nobody"), [])

    @deferred
    async def test_databaseRefusesLongReason(self) -> None:
        """
        The database refuses what checkKick refuses (the same limit on both sides).
        """
        from psycopg2 import DataError

        with self.assertRaises(DataError):
            await self.db.runQuery("test", "SELECT * FROM kick_controller('dev-1', %s)", ("x" * 201,))
        await self.db.runQuery("test", "SELECT * FROM kick_controller('dev-1', %s)", ("x" * 200,))

    @deferred
    async def test_httpApiOnAnotherInstance(self) -> None:
        """
        DELETE /v1/controllers/{id}/connection on gw-b closes the connection held by gw-a
        within a second; 404 once it is not connected, 400 for a bad id.
        """
        a, b = await self.twoGateways(token="secret")
        controller = await connectController(listenerPort(a))
        await controller.hello("dev-2")
        agent = Agent(reactor)
        headers = Headers({b"authorization": [b"Bearer secret"]})

        async def delete(path: str) -> tuple[int, dict[str, Any]]:
            url = f"http://127.0.0.1:{httpPort(b)}{path}".encode()
            response = await agent.request(b"DELETE", url, headers)
            return response.code, json.loads(await readBody(response))

        started = reactor.seconds()
        code, body = await delete("/v1/controllers/dev-2/connection?reason=stuck")
        self.assertEqual(code, 200, body)
        self.assertEqual(
            {k: body[k] for k in ("controller", "kicked", "instance", "reason")},
            {"controller": "dev-2", "kicked": True, "instance": "gw-a", "reason": "stuck"},
        )
        self.assertLess(await self.waitForBye(controller, started), 1.0)
        self.assertIn(("kicked", "stuck", "gw-a"), await self.history("dev-2"))
        code, body = await delete("/v1/controllers/dev-2/connection")
        self.assertEqual((code, body), (404, {"error": "controller not connected"}))
        code, _ = await delete("/v1/controllers/bad%20id/connection")
        self.assertEqual(code, 400)
        response = await agent.request(
            b"DELETE", f"http://127.0.0.1:{httpPort(b)}/v1/controllers/dev-2/connection".encode()
        )
        self.assertEqual(response.code, 401)
        await readBody(response)

    @deferred
    async def test_command(self) -> None:
        """
        ctrlgw kick ID --reason TEXT, from a process of its own as far as the database
        knows; exit 1 when the controller is not connected.
        """
        a, _ = await self.twoGateways()
        controller = await connectController(listenerPort(a))
        welcome = await controller.hello("dev-3")
        out, err = io.StringIO(), io.StringIO()
        common = ["--config", EXAMPLE_CONFIG, "--dsn", self.dsn, "--schema", self.schema]
        started = reactor.seconds()
        code = await cli.run(reactor, ["kick", "dev-3", "--reason", "by hand", *common], out, err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertEqual(
            out.getvalue(), f"kicked dev-3: session epoch {welcome['epoch']} on instance gw-a\n"
        )
        self.assertLess(await self.waitForBye(controller, started), 1.0)
        self.assertIn(("kicked", "by hand", "gw-a"), await self.history("dev-3"))
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(reactor, ["kick", "dev-3", *common], out, err)
        self.assertEqual((code, err.getvalue()), (1, "ctrlgw: controller dev-3 is not connected\n"))

    @deferred
    async def test_lostNotificationReconciled(self) -> None:
        """
        A kick whose notification the holding instance missed still closes the
        connection: the next reconciliation round reads the changed session row.
        """
        a, _ = await self.twoGateways()
        a.notifications._handlers[kickedChannel(self.schema)] = lambda payload: None
        controller = await connectController(listenerPort(a))
        await controller.hello("dev-4")
        await kick(self.store(), "dev-4", "lost")
        await waitUntil(lambda: controller.isClosed, 10, what="reconciliation to close it")
        self.assertEqual([f["reason"] for f in controller.of("bye")], ["takeover"])
        self.assertEqual(sample(a, "ctrlgw_kicks_total"), 0)
