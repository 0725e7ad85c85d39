"""
C{ctrlgw talk}: be a controller by hand, over the lines framing.

Says hello, prints every frame the gateway sends, answers its pings and (unless told not
to) acks its commands.  Each line typed is sent: a JSON object with a C{type} as it is
(C{ts} added when missing); any other JSON value, an object without a C{type} included, as
the body of a C{msg} with a fresh id; and text that is not JSON as a string body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver

from ctrlgw.clock import wallMillis


def _notJson(constant: str) -> Any:
    # Python reads NaN and Infinity, which are not JSON: the gateway would refuse the frame.
    raise ValueError(f"{constant} is not JSON")


def frameFor(text: str) -> dict[str, Any]:
    """
    The frame for a typed line: a JSON object with a C{type} is a frame already; any other
    JSON value is the body of a C{msg}, and so is text that is not JSON (as a string).
    """
    try:
        value: Any = json.loads(text, parse_constant=_notJson)
    except ValueError:
        value = text
    if isinstance(value, dict) and "type" in value:
        return value
    return {"type": "msg", "id": uuid.uuid4().hex[:12], "body": value}


class TalkingController(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(
        self, reactor: Any, controller: str, token: str | None, autoAck: bool, out: TextIO
    ) -> None:
        self.reactor = reactor
        self.controller = controller
        self.token = token
        self.autoAck = autoAck
        self.out = out
        self.done: Deferred[None] = Deferred()
        # What was typed before the welcome waits for it (the gateway would refuse it).
        self._waiting: list[dict[str, Any]] | None = []
        # Input ended (piped input, say): hang up once what was sent has been answered.
        self._inputEnded = False
        self._unanswered: set[str] = set()

    def connectionMade(self) -> None:
        hello: dict[str, Any] = {"type": "hello", "controller": self.controller}
        if self.token:
            hello["token"] = self.token
        self.send(hello)

    def send(self, frame: dict[str, Any]) -> None:
        frame.setdefault("ts", wallMillis(self.reactor))
        if frame.get("type") == "msg" and isinstance(frame.get("id"), str):
            self._unanswered.add(frame["id"])
        line = json.dumps(frame, separators=(",", ":"))
        self.out.write(f"> {line}\n")
        self.out.flush()
        self.sendLine(line.encode())

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        self.out.write(f"< {text}\n")
        self.out.flush()
        try:
            frame = json.loads(text)
        except ValueError:
            return
        if frame.get("type") == "welcome" and self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            for early in waiting:
                self.send(early)
            self._hangUpIfDone()
        elif frame.get("type") in ("ack", "error"):
            self._unanswered.discard(str(frame.get("ref")))
            self._hangUpIfDone()
        elif frame.get("type") == "ping":
            self.send({"type": "pong", "echo": frame.get("ts")})
        elif frame.get("type") == "cmd" and self.autoAck:
            self.send({"type": "ack", "ref": frame.get("id")})

    def typed(self, text: str) -> None:
        """
        Send a typed line (once welcomed; until then it waits).
        """
        text = text.strip()
        if not text:
            return
        frame = frameFor(text)
        if self._waiting is not None:
            self._waiting.append(frame)
        else:
            self.send(frame)

    def endOfInput(self) -> None:
        """
        Nothing more will be typed: hang up once welcomed and every msg sent is answered.
        """
        self._inputEnded = True
        self._hangUpIfDone()

    def _hangUpIfDone(self) -> None:
        if (
            self._inputEnded and self._waiting is None and not self._unanswered
            and self.transport is not None
        ):
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.out.write("connection closed\n")
        self.out.flush()
        if not self.done.called:
            self.done.callback(None)


class _Keyboard(LineReceiver):
    delimiter = b"\n"

    def __init__(self, onLine: Callable[[str], None], onEnd: Callable[[], None]) -> None:
        self.onLine = onLine
        self.onEnd = onEnd

    def lineReceived(self, line: bytes) -> None:
        self.onLine(line.decode("utf-8", "replace"))

    def connectionLost(self, reason: object = None) -> None:
        self.onEnd()


async def talk(
    reactor: Any,
    host: str,
    port: int,
    controller: str,
    token: str | None,
    autoAck: bool,
    out: TextIO,
    keyboard: Callable[[Protocol], object] | None = None,
) -> None:
    """
    Talk until the gateway closes the connection, or standard input has ended and every
    msg sent has been answered (so C{echo ... | ctrlgw talk} sends it and shows its ack).
    """
    protocol = TalkingController(reactor, controller, token, autoAck, out)
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)
    reader = _Keyboard(protocol.typed, protocol.endOfInput)
    if keyboard is None:
        from twisted.internet.stdio import StandardIO

        StandardIO(reader, reactor=reactor)
    else:
        keyboard(reader)
    await protocol.done
