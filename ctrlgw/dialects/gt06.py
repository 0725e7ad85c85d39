# -*- test-case-name: tests.test_telematics -*-
"""
Concox GT06 trackers.

The device logs in (0x01) with its IMEI in BCD (the controller id), answered with the
echo of the login once the claim has committed; refused, it is closed (GT06 has no
refusal).  GPS locations (0x12, 0x22) become inbox rows C{{"ts", "lat", "lon", "speed",
"course", "satellites", "valid"}}, heartbeats (0x13) rows C{{"ts", "status": {...}}};
each packet is answered with its echo (protocol number and serial) only after commit.
A command C{{"command": TEXT}} goes out as 0x80; the device's reply (0x15, or 0x21 in a
long frame) settles it C{acked} with the reply's text as its result.
"""

from __future__ import annotations

from ctrlgw.clock import wallMillis
from ctrlgw.config import ListenerConfig
from ctrlgw.dialects import gt06_codec as codec
from ctrlgw.dialects.telematics import TelematicsProtocol
from ctrlgw.dialects.teltonika import commandText
from ctrlgw.interfaces import Session
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import State
from ctrlgw.protocol.writethrough import writeNow

# A 0x80 command fits a short frame: its length byte counts the flag and the text.
MAX_COMMAND = 200


class Gt06Protocol(TelematicsProtocol):
    def configure(self, listener: ListenerConfig) -> None:
        self.checkCrc: bool = listener.options["check_crc"]
        self.framer = codec.Gt06Framer(listener.max_frame)
        self._loginSerial = 0
        self._serial = 0
        self._serverFlag = 0

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        frames, errors = self.framer.feed(data)
        for error in errors:
            # Skipped up to the next start marker: the framing resynchronises.
            self.frameError(error.code, error.detail)
        if data:
            self._lastHeard = self.context.clock.seconds()
        self.framesReceived(frames)

    def frameReceived(self, payload: bytes) -> None:
        try:
            packet = codec.parseFrame(payload, self.checkCrc)
            if self.state is State.AWAITING_HELLO:
                self._login(packet)
            elif self.state is State.LIVE:
                self._packet(packet)
        except codec.Gt06Error as e:
            # Not stored, not answered.
            self.frameError(e.code, e.detail)

    def _login(self, packet: codec.Packet) -> None:
        if packet.protocol != codec.LOGIN:
            self.frameError("login_required", f"packet {packet.protocol:#04x} before login")
            return
        self.context.framesIn["hello"].inc()
        self.controller = codec.parseImei(packet)
        self._loginSerial = packet.serial
        self.claim(self.controller, None)

    def _packet(self, packet: codec.Packet) -> None:
        protocol = packet.protocol
        if protocol in codec.LOCATIONS:
            body = codec.parseLocation(packet)
            self.submitPacket([(packet.messageId, body["ts"], body)],
                              codec.echoAck(protocol, packet.serial))
        elif protocol == codec.STATUS:
            now = wallMillis(self.context.clock)
            status = codec.parseStatus(packet)
            # Heartbeats carry no time: each one is its own row, by arrival.
            row = (f"gt-hb-{now}-{packet.serial}", now, {"ts": now, "status": status})
            self.submitPacket([row], codec.echoAck(protocol, packet.serial))
        elif protocol in (codec.REPLY, codec.REPLY_LONG):
            self.commandAnswered(codec.parseReply(packet)[1])
        elif protocol == codec.LOGIN:
            if codec.parseImei(packet) != self.controller:
                self.fatal("bad_imei", "a second login with another IMEI")
                return
            self._write([codec.echoAck(codec.LOGIN, packet.serial)])
        else:
            raise codec.Gt06Error(codec.UNKNOWN_TYPE, f"protocol {protocol:#04x}")

    # --- the session's steps ---

    def welcome(self, session: Session) -> None:
        assert self.transport is not None
        self.transport.write(codec.echoAck(codec.LOGIN, self._loginSerial))
        self.context.framesOut["welcome"].inc()

    def refuse(self, code: str, detail: str) -> None:
        self.close(v1.BYE_UNAVAILABLE if code == v1.UNAVAILABLE else v1.BYE_PROTOCOL_ERROR)

    def writeCommand(self, commandId: str, body: object, expiresMs: int) -> None:
        text = commandText(body)
        if len(text) > MAX_COMMAND:
            raise ValueError(f"a GT06 command is at most {MAX_COMMAND} characters")
        self._serverFlag = (self._serverFlag + 1) & 0xFFFFFFFF
        self._serial = (self._serial + 1) & 0xFFFF
        assert self.transport is not None
        writeNow(self.transport, codec.command(self._serverFlag, text, self._serial))
        self.outstanding = commandId
        self.context.framesOut["cmd"].inc()
