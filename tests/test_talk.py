"""
C{ctrlgw talk}: a controller by hand, against a real gateway.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.cli import run
from ctrlgw.talk import frameFor, talk
from tests.gateways import listenerPort, sleep, startGateway, waitUntil
from tests.helpers import deferred
from tests.pg import PostgresTestCase


class FrameForTests(SynchronousTestCase):
    """
    What a typed line becomes.
    """

    def assertMsg(self, text: str, body: object) -> None:
        frame = frameFor(text)
        self.assertEqual((frame["type"], frame["body"]), ("msg", body), text)
        self.assertEqual(set(frame), {"type", "id", "body"}, text)
        self.assertRegex(frame["id"], r"^[0-9a-f]{12}$")

    def test_objectWithoutTypeIsBody(self) -> None:
        """
        The README tour's first line: a JSON object without a C{type} is a msg's body.
        """
        self.assertMsg('{"t": 21.5}', {"t": 21.5})
        self.assertMsg("{}", {})

    def test_objectWithTypeSentAsItIs(self) -> None:
        self.assertEqual(frameFor('{"type": "ack", "ref": "c-1"}'), {"type": "ack", "ref": "c-1"})
        self.assertEqual(frameFor('{"type": "nonsense"}'), {"type": "nonsense"})

    def test_otherJsonIsBody(self) -> None:
        self.assertMsg("[1, 2]", [1, 2])
        self.assertMsg("42", 42)
        self.assertMsg('"quoted"', "quoted")
        self.assertMsg("null", None)

    def test_textIsStringBody(self) -> None:
        self.assertMsg("hello there", "hello there")
        self.assertMsg("{not json", "{not json")
        # Python would read these as floats the gateway refuses; they are text.
        self.assertMsg("NaN", "NaN")
        self.assertMsg("[Infinity]", "[Infinity]")

    def test_freshIds(self) -> None:
        self.assertNotEqual(frameFor("a")["id"], frameFor("a")["id"])


def receivedFrames(out: io.StringIO) -> list[dict[str, Any]]:
    """
    The frames talk printed as received (its C{< } lines).
    """
    return [json.loads(line[2:]) for line in out.getvalue().splitlines() if line.startswith("< ")]


class TalkTests(PostgresTestCase):
    timeout = 60

    async def talking(self, controller: str) -> tuple[Any, io.StringIO, Any, Deferred[None]]:
        """
        A real gateway and talk connected to it as C{controller}, with a keyboard the
        test types on: (gateway, talk's output, keyboard, talk's end).
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-talk")
        out = io.StringIO()
        keyboards: list[Any] = []
        done = Deferred.fromCoroutine(
            talk(reactor, "127.0.0.1", listenerPort(gateway), controller, None, True, out,
                 keyboard=keyboards.append)
        )
        await waitUntil(lambda: keyboards, 10)
        return gateway, out, keyboards[0], done

    @deferred
    async def test_conversation(self) -> None:
        """
        talk says hello, sends what is typed (text as a msg body, JSON as it is) once
        welcomed, prints what the gateway sends and acks its commands.
        """
        gateway, out, keyboard, done = await self.talking("hand-1")
        keyboard.onLine("typed before the welcome")
        keyboard.onLine('{"type": "msg", "id": "j-1", "body": [1]}')
        await waitUntil(lambda: out.getvalue().count('"type":"ack"') == 2, 10)
        command = await gateway.store.sendCommand("hand-1", {"op": "blink"}, 30)
        await waitUntil(lambda: f'"ref":"{command}"' in out.getvalue(), 10)
        keyboard.onEnd()
        await done

        received = receivedFrames(out)
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
    async def test_pipedInput(self) -> None:
        """
        A line and the end of input, both before the welcome (as `echo ... | ctrlgw talk`
        gives them): talk waits for the welcome, sends the msg, hangs up once it is acked.
        """
        _, out, keyboard, done = await self.talking("pipe-1")
        keyboard.onLine('{"t": 21.5}')
        keyboard.onEnd()
        await done
        received = receivedFrames(out)
        self.assertEqual([f["type"] for f in received], ["welcome", "ack"])
        rows = await self.db.runQuery("t", "SELECT body FROM inbox WHERE controller_id = 'pipe-1'")
        self.assertEqual(rows, [({"t": 21.5},)])

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
