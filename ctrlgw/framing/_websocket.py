# -*- test-case-name: tests.test_websocket -*-
"""
The server side of a WebSocket (RFC 6455), on the sans-I/O C{wsproto}: the HTTP upgrade,
subprotocol negotiation, ping/pong, the close handshake and whole messages of bounded
size.

Like the other framings it performs no I/O: L{WebSocketServer.feed} takes received bytes
and returns events; every method that must answer returns the bytes to write.  Pings are
answered, and a close is answered, inside L{feed}: what they produce waits in
L{WebSocketServer.outgoing} for the connection to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._interface import FramingError

# Close codes (RFC 6455 section 7.4.1).
NORMAL = CloseReason.NORMAL_CLOSURE
GOING_AWAY = CloseReason.GOING_AWAY
PROTOCOL_ERROR = CloseReason.PROTOCOL_ERROR
UNSUPPORTED_DATA = CloseReason.UNSUPPORTED_DATA
POLICY_VIOLATION = CloseReason.POLICY_VIOLATION
MESSAGE_TOO_BIG = CloseReason.MESSAGE_TOO_BIG

# A close reason must fit a control frame: 125 bytes, 2 of them the code.
_MAX_CLOSE_REASON = 123


@dataclass(frozen=True)
class Handshake:
    """
    The client asked to upgrade: C{path} is the request target's path, percent-decoded.
    """

    path: str
    subprotocols: tuple[str, ...]
    headers: dict[str, str]


@dataclass(frozen=True)
class Message:
    """
    One whole text message.
    """

    data: bytes


@dataclass(frozen=True)
class Closed:
    """
    The client closed (its close frame has been answered), with its C{code}.
    """

    code: int
    reason: str


WebSocketEvent = Handshake | Message | Closed


class WebSocketServer:
    """
    One server connection's WebSocket state.

    @ivar outgoing: Bytes produced while feeding (pongs, the answer to a close), to be
        written before anything else; L{takeOutgoing} empties it.
    """

    def __init__(self, maxMessage: int) -> None:
        self.maxMessage = maxMessage
        self._ws = WSConnection(ConnectionType.SERVER)
        self._parts: list[str] = []
        self._size = 0
        self.outgoing = b""
        self._spent: FramingError | None = None

    @property
    def open(self) -> bool:
        """
        Whether messages may be sent: upgraded and not closing.
        """
        return self._ws.state is ConnectionState.OPEN

    def takeOutgoing(self) -> bytes:
        data, self.outgoing = self.outgoing, b""
        return data

    def feed(self, data: bytes) -> list[WebSocketEvent]:
        """
        Add received bytes; return what they completed.

        @raise FramingError: the stream is not a WebSocket (C{bad_frame}) or a message is
            over C{maxMessage} bytes (C{frame_too_large}); a close frame saying so, if the
            upgrade was done, is in L{outgoing}.  Every later call raises it again.
        """
        if self._spent is not None:
            raise self._spent
        try:
            self._ws.receive_data(data)
            return self._events()
        except RemoteProtocolError as e:
            if e.event_hint is not None and not self.open:
                # Before the upgrade: wsproto has the HTTP error answer ready.
                self.outgoing += self._send(e.event_hint)
            else:
                self._closeFor(PROTOCOL_ERROR, str(e))
            self._spent = FramingError("bad_frame", f"not a WebSocket: {e}")
            raise self._spent from None

    def _events(self) -> list[WebSocketEvent]:
        found: list[WebSocketEvent] = []
        for event in self._ws.events():
            if isinstance(event, Request):
                found.append(self._handshake(event))
            elif isinstance(event, TextMessage):
                message = self._collect(event.data, event.message_finished)
                if message is not None:
                    found.append(Message(message.encode("utf-8")))
            elif isinstance(event, BytesMessage):
                self._closeFor(UNSUPPORTED_DATA, "only text messages are accepted")
                self._spent = FramingError("bad_frame", "a binary message; only text is accepted")
                raise self._spent
            elif isinstance(event, Ping):
                self.outgoing += self._send(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self.outgoing += self._send(event.response())
                found.append(Closed(event.code, event.reason or ""))
            # Pongs only prove the peer is there, which the read itself has shown.
            elif not isinstance(event, Pong):
                raise FramingError("bad_frame", f"unexpected WebSocket event {event!r}")
        return found

    def _handshake(self, request: Request) -> Handshake:
        target = urlsplit(request.target)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in request.extra_headers
        }
        return Handshake(unquote(target.path), tuple(request.subprotocols), headers)

    def _collect(self, part: str, finished: bool) -> str | None:
        self._size += len(part) if part.isascii() else len(part.encode("utf-8"))
        if self._size > self.maxMessage:
            self._closeFor(MESSAGE_TOO_BIG, f"messages are limited to {self.maxMessage} bytes")
            self._spent = FramingError(
                "frame_too_large", f"a message of over {self.maxMessage} bytes"
            )
            raise self._spent
        self._parts.append(part)
        if not finished:
            return None
        message = "".join(self._parts)
        self._parts, self._size = [], 0
        return message

    def _closeFor(self, code: int, reason: str) -> None:
        if self.open:
            self.outgoing += self.close(code, reason)

    def _send(self, event: Event) -> bytes:
        try:
            return self._ws.send(event)
        except LocalProtocolError:
            # The state moved on (the peer closed first): nothing to say any more.
            return b""

    # --- what the gateway sends ---

    def accept(self, subprotocol: str | None) -> bytes:
        return self._send(AcceptConnection(subprotocol=subprotocol))

    def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """
        Refuse the upgrade with an HTTP answer.
        """
        head = self._send(
            RejectConnection(
                status_code=status,
                headers=[*headers, (b"content-length", str(len(body)).encode("ascii"))],
                has_body=True,
            )
        )
        return head + self._send(RejectData(data=body, body_finished=True))

    def frame(self, text: str) -> bytes:
        """
        One text message.

        @raise FramingError: C{frame_too_large} if over C{maxMessage} bytes.
        """
        encoded = len(text.encode("utf-8"))
        if encoded > self.maxMessage:
            raise FramingError(
                "frame_too_large", f"{encoded} bytes, over the limit of {self.maxMessage}"
            )
        return self._send(TextMessage(data=text))

    def ping(self, payload: bytes) -> bytes:
        return self._send(Ping(payload=payload)) if self.open else b""

    def close(self, code: int, reason: str) -> bytes:
        """
        Start the close handshake (nothing if the WebSocket is not open).
        """
        if not self.open:
            return b""
        trimmed = reason.encode("utf-8")[:_MAX_CLOSE_REASON].decode("utf-8", "ignore")
        return self._send(CloseConnection(code=code, reason=trimmed))
