"""
C{ctrlgw talk}: be a controller by hand, over the lines framing (or, with C{--dialect
ocpp1.6}, an OCPP charge point over WebSocket).

Says hello, prints every frame the gateway sends, answers its pings and (unless told not
to) acks its commands.  Each line typed is sent: a JSON object with a C{type} as it is
(C{ts} added when missing); any other JSON value, an object without a C{type} included, as
the body of a C{msg} with a fresh id; and text that is not JSON as a string body.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

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


def callFor(text: str) -> list[Any]:
    """
    The OCPP message for a typed line: a JSON array is sent as it is; C{Action} or
    C{Action {payload}} is a CALL with a fresh unique id.
    """
    try:
        value: Any = json.loads(text, parse_constant=_notJson)
    except ValueError:
        value = None
    if isinstance(value, list):
        return value
    action, _, payload = text.partition(" ")
    try:
        body = json.loads(payload, parse_constant=_notJson) if payload.strip() else {}
    except ValueError:
        body = payload
    return [2, uuid.uuid4().hex[:12], action, body]


class TalkingChargePoint(Protocol):
    """
    An OCPP 1.6J charge point by hand: the WebSocket upgrade to C{path}C{controller} with
    the subprotocol C{ocpp1.6} (HTTP Basic auth with C{token}), every message printed, the
    gateway's CALLs (commands) answered with C{{"status": "Accepted"}} unless told not to.
    """

    def __init__(
        self, reactor: Any, host: str, path: str, controller: str, token: str | None,
        autoAck: bool, out: TextIO,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.target = path + controller
        self.controller = controller
        self.token = token
        self.autoAck = autoAck
        self.out = out
        self.done: Deferred[None] = Deferred()
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._waiting: list[list[Any]] | None = []
        self._inputEnded = False
        self._unanswered: set[str] = set()

    def connectionMade(self) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            credentials = base64.b64encode(f"{self.controller}:{self.token}".encode())
            headers.append((b"authorization", b"Basic " + credentials))
        self._write(self.ws.send(Request(
            host=self.host, target=self.target, subprotocols=["ocpp1.6"], extra_headers=headers,
        )))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    def _say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def send(self, message: list[Any]) -> None:
        if len(message) > 1 and message[0] == 2:
            self._unanswered.add(str(message[1]))
        text = json.dumps(message, separators=(",", ":"))
        self._say(f"> {text}")
        self._write(self.ws.send(TextMessage(data=text)))

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self._say(f"< upgraded, subprotocol {event.subprotocol}")
                waiting, self._waiting = self._waiting or [], None
                for early in waiting:
                    self.send(early)
                self._hangUpIfDone()
            elif isinstance(event, RejectConnection):
                self._say(f"< refused: HTTP {event.status_code}")
            elif isinstance(event, TextMessage):
                self._message(event.data)
            elif isinstance(event, Ping):
                self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._say(f"< close {event.code} {event.reason or ''}".rstrip())
                self._write(self.ws.send(event.response()))
                if self.transport is not None:
                    self.transport.loseConnection()

    def _message(self, text: str) -> None:
        self._say(f"< {text}")
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, list) or len(message) < 2:
            return
        if message[0] in (3, 4):
            self._unanswered.discard(str(message[1]))
            self._hangUpIfDone()
        elif message[0] == 2 and self.autoAck:
            self.send([3, message[1], {"status": "Accepted"}])

    def typed(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        message = callFor(text)
        if self._waiting is not None:
            self._waiting.append(message)
        else:
            self.send(message)

    def endOfInput(self) -> None:
        self._inputEnded = True
        self._hangUpIfDone()

    def _hangUpIfDone(self) -> None:
        if self._inputEnded and self._waiting is None and not self._unanswered:
            self._write(self.ws.send(CloseConnection(code=1000, reason="done")))
            if self.transport is not None:
                self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self._say("connection closed")
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
    dialect: str = "v1",
    path: str = "/ocpp/",
) -> None:
    """
    Talk until the gateway closes the connection, or standard input has ended and every
    msg sent has been answered (so C{echo ... | ctrlgw talk} sends it and shows its ack).
    """
    protocol: TalkingController | TalkingChargePoint
    if dialect == "ocpp1.6":
        protocol = TalkingChargePoint(reactor, host, path, controller, token, autoAck, out)
    else:
        protocol = TalkingController(reactor, controller, token, autoAck, out)
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)
    reader = _Keyboard(protocol.typed, protocol.endOfInput)
    if keyboard is None:
        from twisted.internet.stdio import StandardIO

        StandardIO(reader, reactor=reactor)
    else:
        keyboard(reader)
    await protocol.done
