"""
The README's "60-second tour", run as written: the installed C{ctrlgw talk} and C{ctrlgw
send} as real processes against a real gateway and PostgreSQL.

The commands, the typed line and the expected output are read from README.md itself, so
the tour and this test cannot drift apart.  (The installed package is what runs: reinstall
after editing ctrlgw.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.gateways import listenerPort, startGateway, waitUntil
from tests.pg import PostgresTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CTRLGW = os.path.join(os.path.dirname(sys.executable), "ctrlgw")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Step:
    """
    One C{$ command} of the tour, and the lines shown after it.
    """

    argv: list[str]
    shown: list[str] = field(default_factory=list)


def tourSteps() -> list[Step]:
    """
    Every command in the README tour's shell blocks, with what follows it.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## A 60-second tour", 1)[1].split("\n## ", 1)[0]
    steps: list[Step] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(shlex.split(line[2:], comments=True)))
            elif steps:
                # What the reader types carries a comment after a wide gap; output does not.
                steps[-1].shown.append(re.split(r"\s{2,}# ", line)[0])
    return steps


def findStep(steps: list[Step], *words: str) -> Step:
    for step in steps:
        if step.argv[:1] == [".venv/bin/ctrlgw"] and step.argv[1:1 + len(words)] == list(words):
            return step
    raise AssertionError(f"the README tour has no ctrlgw {' '.join(words)} step")


class Process(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def lines(self) -> list[str]:
        return self.out.decode("utf-8", "replace").splitlines()

    def frames(self, prefix: str) -> list[dict[str, Any]]:
        """
        The frames talk printed as sent (C{">"}) or received (C{"<"}).
        """
        return [json.loads(line[2:]) for line in self.lines() if line.startswith(prefix + " ")]

    def describe(self) -> str:
        return f"stdout:\n{self.out.decode(errors='replace')}\nstderr:\n{self.err.decode(errors='replace')}"


class ReadmeTourTests(PostgresTestCase):
    timeout = 120

    def spawn(self, argv: list[str]) -> tuple[Process, IProcessTransport]:
        """
        Run C{argv} (its C{.venv/bin/ctrlgw} replaced by this venv's) from the checkout,
        as the tour does; killed at the end of the test if still running.
        """
        self.assertTrue(os.access(CTRLGW, os.X_OK), f"{CTRLGW} is not installed")
        argv = [CTRLGW, *argv[1:]]
        process = Process()
        transport = reactor.spawnProcess(process, CTRLGW, argv, env=dict(os.environ), path=ROOT)

        async def kill() -> None:
            if not process.ended.called:
                transport.signalProcess(signal.SIGKILL)
                await process.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(kill()))
        return process, transport

    async def test_tour(self) -> None:
        """
        The typed C{{"t": 21.5}} goes out as the body of a msg, is acked and is in the
        inbox; C{ctrlgw send ... --wait} prints exactly the lines the README shows (a
        command id, then C{acked}) while talk prints the cmd and acks it.
        """
        steps = tourSteps()
        talkStep = findStep(steps, "talk")
        sendStep = findStep(steps, "send")
        typed = [line for line in talkStep.shown if line and line[:2] not in ("> ", "< ")]
        self.assertEqual(typed, ['{"t": 21.5}'], talkStep.shown)
        shownMsg = json.loads(talkStep.shown[talkStep.shown.index(typed[0]) + 1][2:])
        controller = talkStep.argv[talkStep.argv.index("--controller") + 1]

        gateway = await startGateway(self, self.dsn, self.schema, "gw-tour")
        address = f"127.0.0.1:{listenerPort(gateway)}"
        argv = [address if arg == "127.0.0.1:7000" else arg for arg in talkStep.argv]
        self.assertIn(address, argv)
        talk, talkTransport = self.spawn(argv)

        await waitUntil(lambda: talk.frames("<"), 30, what=talk.describe)
        self.assertEqual(talk.frames("<")[0]["type"], "welcome", talk.describe())
        talkTransport.write(typed[0].encode() + b"\n")

        def acked() -> list[dict[str, Any]]:
            return [f for f in talk.frames("<") if f.get("type") in ("ack", "error")]

        await waitUntil(acked, 15, what=talk.describe)
        msgs = [f for f in talk.frames(">") if f.get("type") == "msg"]
        self.assertEqual(len(msgs), 1, talk.describe())
        (msg,) = msgs
        self.assertEqual(msg["body"], {"t": 21.5})
        self.assertEqual(
            {k: v for k, v in msg.items() if k not in ("id", "ts")},
            {k: v for k, v in shownMsg.items() if k not in ("id", "ts")},
        )
        self.assertEqual([(f["type"], f.get("ref")) for f in acked()], [("ack", msg["id"])])
        rows = await self.db.runQuery(
            "t", "SELECT message_id, body FROM inbox WHERE controller_id = %s", (controller,)
        )
        self.assertEqual(rows, [(msg["id"], {"t": 21.5})])

        send, _ = self.spawn([*sendStep.argv, "--dsn", self.dsn, "--schema", self.schema])
        code = await send.ended
        self.assertEqual(code, (0, None), send.describe())
        printed = send.lines()
        shown = [line for line in sendStep.shown if line]
        self.assertEqual(len(printed), len(shown), f"README shows {shown}, ctrlgw printed {printed}")
        for expected, actual in zip(shown, printed, strict=True):
            if UUID.match(expected):
                self.assertRegex(actual, UUID)
            else:
                self.assertEqual(actual, expected)
        command = printed[0]
        cmds = [f for f in talk.frames("<") if f.get("type") == "cmd"]
        self.assertEqual([(c["id"], c["body"]) for c in cmds], [(command, {"op": "blink"})])
        self.assertIn({"type": "ack", "ref": command}, [
            {k: v for k, v in f.items() if k != "ts"} for f in talk.frames(">")
        ])

        talkTransport.closeStdin()
        self.assertEqual(await talk.ended, (0, None), talk.describe())
        self.assertEqual(talk.lines()[-1], "connection closed")
        self.assertNotIn(b"Traceback", talk.err + send.err)
