# -*- test-case-name: tests.test_telematics -*-
"""
C{ctrlgw sim --dialect teltonika|gt06}: simulated GPS trackers, for the fleet of
L{ctrlgw.sim}.  Packets are built with the dialects' own codecs
(L{ctrlgw.dialects.teltonika_codec}, L{ctrlgw.dialects.gt06_codec}); each C{msg} the pacer
offers is one position (one record in one AVL packet, or one GT06 location), acked by the
gateway once stored.  Commands are answered (Codec 12 response, GT06 reply) unless
C{--no-ack}.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from ctrlgw.clock import wallMillis
from ctrlgw.dialects import gt06_codec as gt06
from ctrlgw.dialects import teltonika_codec as tk

if TYPE_CHECKING:
    from ctrlgw.sim import Fleet

TRACKER_DIALECTS = ("teltonika", "gt06")
# Packets kept for resending under --duplicates, per tracker.
_KEEP = 1000


def imeiFor(prefix: str, index: int) -> str:
    """
    A 15-digit IMEI for tracker C{index}: C{35}, the digits of C{prefix} (a worker's
    number), then the index.
    """
    digits = "".join(c for c in prefix if c.isdigit())
    return f"35{digits}{index:0{13 - len(digits)}d}"


class TrackerController(Protocol):
    """
    What the fleet sees of a simulated controller, for trackers.
    """

    def __init__(self, fleet: Fleet, controller: str) -> None:
        self.fleet = fleet
        self.controller = controller
        self.live = False
        self._helloAt = 0.0
        self._pending: dict[str, float] = {}
        # The ids whose acks are awaited, in the order their answers will come.
        self._awaiting: deque[str] = deque()
        self._sent: dict[str, bytes] = {}
        self._buffer = b""

    def now(self) -> float:
        return float(self.fleet.reactor.seconds())

    def position(self) -> tuple[int, float, float]:
        """
        A time and a position that differ with every message, so that none is taken for
        a retransmission.
        """
        seq = self.fleet._sequence
        ts = wallMillis(self.fleet.reactor) + int(self.fleet.options.skew * 1000)
        return ts, 52.0 + (seq % 100_000) * 1e-5, 13.0 + (seq // 100_000 % 1000) * 1e-4

    def sendMsg(self, messageId: str, body: object) -> None:
        packet = self._sent.get(messageId)
        if packet is None:
            packet = self.encode(messageId)
            self._sent[messageId] = packet
            if len(self._sent) > _KEEP:
                del self._sent[next(iter(self._sent))]
        self._pending[messageId] = self.now()
        self._awaiting.append(messageId)
        assert self.transport is not None
        self.transport.write(packet)
        self.fleet.stats.msgs += 1

    def encode(self, messageId: str) -> bytes:
        raise NotImplementedError

    def welcomed(self) -> None:
        self.live = True
        stats = self.fleet.stats
        stats.welcomes += 1
        stats.welcomeMs.append((self.now() - self._helloAt) * 1000)
        self.fleet.welcomed(self)  # type: ignore[arg-type]  # what the fleet uses of one

    def acked(self) -> None:
        if not self._awaiting:
            self.fleet.countError("unexpected_ack")
            return
        sentAt = self._pending.pop(self._awaiting.popleft(), None)
        if sentAt is not None:
            self.fleet.stats.acks += 1
            self.fleet.stats.ackMs.append((self.now() - sentAt) * 1000)

    def commandReceived(self) -> None:
        self.fleet.stats.cmds += 1
        self.fleet.stats.cmdMs.append(0.0)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.fleet.lost(self)  # type: ignore[arg-type]


class TeltonikaTracker(TrackerController):
    def connectionMade(self) -> None:
        self.fleet.stats.connects += 1
        self._helloAt = self.now()
        assert self.transport is not None
        self.transport.write(tk.encodeImei(self.controller))

    def encode(self, messageId: str) -> bytes:
        ts, lat, lon = self.position()
        seq = int(messageId.lstrip("m") or 0)
        record = tk.encodeRecord(ts, lat, lon, priority=0, satellites=9, speed=50,
                                 io={239: 1, 16: seq})
        return tk.avlPacket([record])

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            if not self.live:
                if self._buffer[:1] != tk.IMEI_ACCEPTED:
                    self.fleet.countError("refused")
                    self._buffer = b""
                    return
                self._buffer = self._buffer[1:]
                self.welcomed()
                continue
            if len(self._buffer) < 4:
                return
            if self._buffer[:4] != b"\x00\x00\x00\x00":
                # A record count: the sim sends one record per packet.
                self._buffer = self._buffer[4:]
                self.acked()
                continue
            if len(self._buffer) < 8:
                return
            (length,) = struct.unpack_from(">I", self._buffer, 4)
            if len(self._buffer) < 12 + length:
                return
            self._buffer = self._buffer[12 + length :]
            self.commandReceived()
            if self.fleet.options.ack and self.transport is not None:
                self.transport.write(tk.codec12(tk.RESPONSE, b"OK"))


class Gt06Tracker(TrackerController):
    def __init__(self, fleet: Fleet, controller: str) -> None:
        super().__init__(fleet, controller)
        self.framer = gt06.Gt06Framer(4096)
        self._serial = 0
        self._bySerial: dict[int, str] = {}

    def nextSerial(self) -> int:
        self._serial = (self._serial + 1) & 0xFFFF
        return self._serial

    def connectionMade(self) -> None:
        self.fleet.stats.connects += 1
        self._helloAt = self.now()
        assert self.transport is not None
        self.transport.write(gt06.encodeLogin(self.controller, self.nextSerial()))

    def encode(self, messageId: str) -> bytes:
        ts, lat, lon = self.position()
        return gt06.encodeLocation(ts, lat, lon, speed=50, course=90, satellites=9,
                                   serial=self.nextSerial())

    def sendMsg(self, messageId: str, body: object) -> None:
        super().sendMsg(messageId, body)
        (serial,) = struct.unpack_from(">H", self._sent[messageId], len(self._sent[messageId]) - 6)
        self._bySerial[serial] = messageId

    def dataReceived(self, data: bytes) -> None:
        frames, errors = self.framer.feed(data)
        for error in errors:
            self.fleet.countError(error.code)
        for frame in frames:
            packet = gt06.parseFrame(frame, checkCrc=False)
            if packet.protocol == gt06.LOGIN and not self.live:
                self.welcomed()
            elif packet.protocol == gt06.LOCATION:
                messageId = self._bySerial.pop(packet.serial, None)
                sentAt = self._pending.pop(messageId, None) if messageId else None
                if sentAt is not None:
                    self.fleet.stats.acks += 1
                    self.fleet.stats.ackMs.append((self.now() - sentAt) * 1000)
            elif packet.protocol == gt06.COMMAND:
                self.commandReceived()
                if self.fleet.options.ack and self.transport is not None:
                    flag = int.from_bytes(packet.content[1:5], "big")
                    self.transport.write(gt06.encodeReply(flag, b"OK", self.nextSerial()))


def trackerFor(fleet: Fleet, controller: str) -> TrackerController:
    if fleet.options.dialect == "teltonika":
        return TeltonikaTracker(fleet, controller)
    return Gt06Tracker(fleet, controller)
