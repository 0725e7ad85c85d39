"""
The commands users run, as real processes: the installed C{ctrlgw sessions}, C{send --wait},
C{status}, C{tail --commands} and C{history}, against a real C{twistd ctrlgw} and a real
PostgreSQL, with their output asserted line by line.  Where the README tour shows a
command, its argv is read from README.md (as test_readme_tour does), so the tour's
commands are the ones tested.  (The installed package is what runs: reinstall after
editing ctrlgw.)
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from ctrlgw.outbox import resultsChannel
from tests.dbfaults import TwistdGateway
from tests.dbwait import waitUntilListening
from tests.gateways import LineController, connectController, waitUntil
from tests.pg import PostgresTestCase
from tests.test_readme_tour import CTRLGW, ROOT, UUID, Process, findStep, tourSteps

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z"


class CliCommandTests(PostgresTestCase):
    timeout = 120

    async def _setUp(self) -> None:
        await super()._setUp()
        self.steps = tourSteps()
        self.gateway = await TwistdGateway.start(self, self.dsn, self.schema, "gw-cli", {
            "outbox": {"poll_interval": "200ms", "ack_timeout": "30s"},
        })

    def spawn(self, *argv: str) -> Process:
        """
        Run the installed C{ctrlgw argv --dsn .. --schema ..} from the checkout (so with
        its etc/ctrlgw.ini, as the tour does); killed at the end of the test if still
        running.
        """
        self.assertTrue(os.access(CTRLGW, os.X_OK), f"{CTRLGW} is not installed")
        process = Process()
        full = [CTRLGW, *argv, "--dsn", self.dsn, "--schema", self.schema]
        transport = reactor.spawnProcess(process, CTRLGW, full, env=dict(os.environ), path=ROOT)
        process.transport = transport  # type: ignore[attr-defined]

        async def kill() -> None:
            if not process.ended.called:
                transport.signalProcess(signal.SIGKILL)
                await process.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(kill()))
        return process

    async def ctrlgw(self, *argv: str) -> tuple[int | None, list[str], str]:
        """
        Run C{ctrlgw argv} to its end: exit code, lines printed, standard error.
        """
        process = self.spawn(*argv)
        code, _ = await process.ended
        return code, process.lines(), process.err.decode(errors="replace")

    def tour(self, *words: str) -> list[str]:
        """
        The argv (after C{ctrlgw}) of the README tour's C{ctrlgw words...} step.
        """
        return findStep(self.steps, *words).argv[1:]

    async def controller(self, name: str) -> LineController:
        client = await connectController(self.gateway.port)
        self.addCleanup(client.close)
        await client.hello(name)
        return client

    async def test_sessions(self) -> None:
        """
        C{ctrlgw sessions dev-1} (as in the tour) prints one row: online, on which
        instance, the welcome's epoch, since when, and the controller's address; C{--json}
        the same as objects; after it leaves, the row says offline and why; a controller
        that never connected is said so.
        """
        argv = self.tour("sessions")
        self.assertEqual(argv, ["sessions", "dev-1"])
        client = await self.controller("dev-1")
        welcome = client.of("welcome")[0]
        peer = f"127.0.0.1:{client.transport.getHost().port}"

        code, lines, err = await self.ctrlgw(*argv)
        self.assertEqual((code, err), (0, ""))
        header, row = lines
        self.assertEqual(header.split(), ["CONTROLLER", "ONLINE", "INSTANCE", "EPOCH", "SINCE",
                                          "LAST", "HEARD", "PEER", "LAST", "REASON"])
        self.assertRegex(
            row, rf"^dev-1 +yes +gw-cli +{welcome['epoch']} +{TIME} +{TIME} +{re.escape(peer)} +-$"
        )

        code, lines, err = await self.ctrlgw(*argv, "--json")
        self.assertEqual((code, err), (0, ""))
        (presence,) = json.loads("\n".join(lines))
        self.assertEqual(
            {k: presence[k] for k in ("controller", "online", "instance", "epoch", "session",
                                      "peer", "disconnect_reason")},
            {"controller": "dev-1", "online": True, "instance": "gw-cli",
             "epoch": welcome["epoch"], "session": welcome["session"], "peer": peer,
             "disconnect_reason": None},
        )

        await client.leave()

        async def offline() -> list[str]:
            return (await self.ctrlgw(*argv))[1]

        lines = await offline()
        deadline = reactor.seconds() + 10
        while lines[1].split()[1] != "no" and reactor.seconds() < deadline:
            lines = await offline()
        self.assertRegex(lines[1], rf"^dev-1 +no +gw-cli +{welcome['epoch']} .* +peer_closed$")

        code, lines, err = await self.ctrlgw("sessions", "nobody")
        self.assertEqual((code, lines, err), (0, ["controller nobody has never connected"], ""))

    async def test_sendWaitStatusTail(self) -> None:
        """
        With C{ctrlgw tail --commands} running: C{ctrlgw send dev-1 '{"op":"blink"}'
        --wait} (as in the tour) prints the id as soon as it is queued and C{acked} once
        the controller acks, exit 0; a nack prints C{nacked: REASON} and a command whose
        TTL passes offline C{expired: ...}, exit 1; C{ctrlgw status ID} prints the
        command's history as JSON; C{tail} printed each outcome as it happened, and ends
        with exit 0 on SIGTERM; C{ctrlgw history dev-1} (as in the tour) lists the
        connection.
        """
        tail = self.spawn("tail", "--commands")
        await waitUntilListening(self.db, resultsChannel(self.schema))
        client = await self.controller("dev-1")

        argv = self.tour("send")
        self.assertEqual(argv, ["send", "dev-1", '{"op":"blink"}', "--wait"])
        send = self.spawn(*argv)
        cmd = await client.waitFor("cmd", timeout=20)
        self.assertEqual(cmd["body"], {"op": "blink"})
        # The id is printed when the command is queued, before any outcome.
        await waitUntil(lambda: send.lines(), 10, what="the id printed")
        self.assertEqual(send.lines(), [cmd["id"]])
        self.assertFalse(send.ended.called)
        client.send({"type": "ack", "ref": cmd["id"]})
        self.assertEqual(await send.ended, (0, None), send.describe())
        self.assertEqual(send.lines(), [cmd["id"], "acked"])
        self.assertEqual(send.err, b"")
        acked = cmd["id"]

        nack = self.spawn("send", "dev-1", '{"op":"open_valve","valve":3}', "--wait")
        cmd = await client.waitFor("cmd", timeout=20, body={"op": "open_valve", "valve": 3})
        client.send({"type": "nack", "ref": cmd["id"], "reason": "valve 3 is locked out"})
        self.assertEqual(await nack.ended, (1, None), nack.describe())
        self.assertEqual(nack.lines(), [cmd["id"], "nacked: valve 3 is locked out"])
        nacked = cmd["id"]

        code, lines, err = await self.ctrlgw("send", "dev-9", '{"op":"x"}', "--ttl", "1s", "--wait")
        self.assertEqual(code, 1, err)
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], UUID)
        self.assertEqual(lines[1], "expired: ttl passed before it was written")
        expired = lines[0]

        code, lines, err = await self.ctrlgw("status", acked)
        self.assertEqual((code, err), (0, ""))
        status: dict[str, Any] = json.loads("\n".join(lines))
        self.assertEqual(
            (status["id"], status["controller"], status["state"], status["body"], status["attempts"]),
            (acked, "dev-1", "acked", {"op": "blink"}, 1),
        )
        self.assertEqual([(e["state"], e["instance"]) for e in status["history"]],
                         [("pending", None), ("sent", "gw-cli"), ("acked", "gw-cli")])
        code, lines, err = await self.ctrlgw("status", "1234")
        self.assertEqual((code, lines, err), (2, [], "ctrlgw: not a command id: '1234'\n"))
        unknown = "00000000-0000-0000-0000-000000000000"
        code, lines, err = await self.ctrlgw("status", unknown)
        self.assertEqual((code, lines, err), (1, [], f"ctrlgw: no command {unknown}\n"))

        await waitUntil(lambda: len(tail.lines()) >= 3, 10, what=tail.describe)
        tail.transport.signalProcess(signal.SIGTERM)  # type: ignore[attr-defined]
        self.assertEqual(await tail.ended, (0, None), tail.describe())
        outcomes = [json.loads(line) for line in tail.lines()]
        self.assertEqual(outcomes, [
            {"id": acked, "controller": "dev-1", "state": "acked", "detail": ""},
            {"id": nacked, "controller": "dev-1", "state": "nacked",
             "detail": "valve 3 is locked out"},
            {"id": expired, "controller": "dev-9", "state": "expired",
             "detail": "ttl passed before it was written"},
        ])

        argv = self.tour("history")
        self.assertEqual(argv, ["history", "dev-1"])
        code, lines, err = await self.ctrlgw(*argv)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(lines[0].split(), ["TIME", "KIND", "REASON", "INSTANCE", "EPOCH", "PEER"])
        welcome = client.of("welcome")[0]
        self.assertRegex(lines[-1], rf"^{TIME} +connect +main +gw-cli +{welcome['epoch']} +127\.0\.0\.1:\d+$")
