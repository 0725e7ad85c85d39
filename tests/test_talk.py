"""
C{ctrlgw talk}: a controller by hand, against a real gateway.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from ctrlgw.cli import run
from ctrlgw.talk import talk
from tests.gateways import listenerPort, sleep, startGateway, waitUntil
from tests.helpers import deferred
from tests.pg import PostgresTestCase


class TalkTests(PostgresTestCase):
    timeout = 60

    @deferred
    async def test_conversation(self) -> None:
        """
        talk says hello, sends what is typed (text as a msg body, JSON as it is) once
        welcomed, prints what the gateway sends and acks its commands.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-talk")
        out = io.StringIO()
        keyboards: list[Any] = []
        done = Deferred.fromCoroutine(
            talk(reactor, "127.0.0.1", listenerPort(gateway), "hand-1", None, True, out,
                 keyboard=keyboards.append)
        )
        await waitUntil(lambda: keyboards, 10)
        (keyboard,) = keyboards
        keyboard.onLine("typed before the welcome")
        keyboard.onLine('{"type": "msg", "id": "j-1", "body": [1]}')
        await waitUntil(lambda: out.getvalue().count('"type":"ack"') == 2, 10)
        command = await gateway.store.sendCommand("hand-1", {"op": "blink"}, 30)
        await waitUntil(lambda: f'"ref":"{command}"' in out.getvalue(), 10)
        keyboard.onEnd()
        await done

        received = [json.loads(line[2:]) for line in out.getvalue().splitlines() if line.startswith("< ")]
        self.assertEqual([f["type"] for f in received][:3], ["welcome", "ack", "ack"])
        rows = await self.db.runQuery(
            "t", "SELECT message_id, body FROM inbox WHERE controller_id = 'hand-1' ORDER BY id"
        )
        self.assertEqual(rows[1], ("j-1", [1]))
        self.assertEqual(rows[0][1], "typed before the welcome")
        for _ in range(100):
            status = await gateway.store.commandStatus(command)
            if status and status["state"] == "acked":
                break
            await sleep(0.05)
        self.assertEqual(status["state"] if status else None, "acked")
        self.assertTrue(out.getvalue().endswith("connection closed\n"))

    @deferred
    async def test_nobodyThere(self) -> None:
        """
        Nothing listening: one line and exit status 1.
        """
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["talk", "127.0.0.1:1"], out, err)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("cannot connect to 127.0.0.1:1", err.getvalue())
