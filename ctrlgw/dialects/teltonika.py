# -*- test-case-name: tests.test_telematics -*-
"""
Teltonika trackers (Codec 8, 8 Extended and 12 over TCP).

The device sends its IMEI (the controller id), answered C{01} once the claim has
committed or C{00} (then closed) when it is refused.  Each record of an AVL packet is
one inbox row (C{ctrlgw.dialects.teltonika_codec.Record.body}); the packet is answered
with its record count only once every record is committed.  A command
C{{"command": TEXT}} is written as a Codec 12 command (type 0x05); the device's Codec
12 response (type 0x06) settles it C{acked} with the response text as its result.
"""

from __future__ import annotations

import json

from twisted.internet.protocol import Protocol

from ctrlgw.config import ListenerConfig
from ctrlgw.dialects import teltonika_codec as codec
from ctrlgw.dialects.telematics import TelematicsProtocol
from ctrlgw.interfaces import Session
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import State
from ctrlgw.protocol.writethrough import writeNow

# A command's text: printable ASCII, as Teltonika's SMS/GPRS commands are.
MAX_COMMAND = 1024


def commandText(body: object) -> bytes:
    """
    The text of a command C{{"command": TEXT}}.

    @raise ValueError: any other body.
    """
    command = json.loads(body) if isinstance(body, str) else body
    if not (isinstance(command, dict) and set(command) == {"command"}
            and isinstance(command["command"], str)):
        raise ValueError('a tracker command is {"command": TEXT}')
    text = command["command"]
    if not (0 < len(text) <= MAX_COMMAND and text.isascii() and text.isprintable()):
        raise ValueError(f"a command is 1-{MAX_COMMAND} characters of printable ASCII")
    return text.encode("ascii")


class TeltonikaProtocol(TelematicsProtocol):
    def configure(self, listener: ListenerConfig) -> None:
        self.framer = codec.TeltonikaFramer(listener.max_frame)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        frames, error = self.framer.feed(data)
        if data:
            # A keepalive byte or a part of a packet: the device is there.
            self._lastHeard = self.context.clock.seconds()
        self.framesReceived(frames)
        if error is not None:
            self.fatal(error.code, error.detail)

    def frameReceived(self, payload: bytes) -> None:
        if self.state is State.AWAITING_HELLO:
            self._identify(payload)
        elif self.state is State.LIVE and payload != codec.KEEPALIVE:
            self._packet(payload)
        # While claiming: nothing is acted on, nothing answered; the device sends it again.

    def _identify(self, payload: bytes) -> None:
        self.context.framesIn["hello"].inc()
        try:
            imei = codec.parseImei(payload)
        except codec.TeltonikaError as e:
            self.frameError(e.code, e.detail)
            self.refuse(v1.BAD_CONTROLLER_ID, e.detail)
            return
        self.controller = imei
        self.claim(imei, None)

    def _packet(self, payload: bytes) -> None:
        try:
            parsed = codec.parsePacket(payload)
        except codec.TeltonikaError as e:
            # Not stored, not answered: the framing found the next packet by the length.
            self.frameError(e.code, e.detail)
            return
        if isinstance(parsed, codec.CodecMessage):
            if parsed.kind == codec.RESPONSE:
                self.commandAnswered(parsed.text.decode("utf-8", "replace"))
            return
        self.submitPacket(
            [(r.messageId, r.ts, r.body()) for r in parsed.records],
            codec.recordCountAck(len(parsed.records)),
        )

    # --- the session's steps ---

    def welcome(self, session: Session) -> None:
        assert self.transport is not None
        self.transport.write(codec.IMEI_ACCEPTED)
        self.context.framesOut["welcome"].inc()

    def refuse(self, code: str, detail: str) -> None:
        if self.transport is not None and self.state is not State.CLOSED:
            self.transport.write(codec.IMEI_REFUSED)
            self.context.framesOut["error"].inc()
        self.close(v1.BYE_UNAVAILABLE if code == v1.UNAVAILABLE else v1.BYE_PROTOCOL_ERROR)

    def writeCommand(self, commandId: str, body: object, expiresMs: int) -> None:
        frame = codec.codec12(codec.COMMAND, commandText(body))
        assert self.transport is not None
        writeNow(self.transport, frame)
        self.outstanding = commandId
        self.context.framesOut["cmd"].inc()


class RefusedTracker(Protocol):
    """
    A connection past its listener's C{max_connections}: closed at once (a tracker
    retries; a byte written before its IMEI would mean nothing to it).
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass
