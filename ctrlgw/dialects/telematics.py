# -*- test-case-name: tests.test_telematics -*-
"""
What the binary tracker dialects (C{teltonika}, C{gt06}) share: no application ping (a
tracker's liveness is its data, TCP keepalive and C{TCP_USER_TIMEOUT}, against the
listener's C{idle_timeout}), no goodbye frame (a connection taken over is aborted),
records replayed hours late stored with their own timestamps, and a packet answered only
once every record in it is committed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from ctrlgw.config import ListenerConfig
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import ConnectionContext, ListenerProtocol, State
from ctrlgw.protocol.writethrough import writeNow

log = Logger()


class _Packet:
    __slots__ = ("answer", "remaining", "failed")

    def __init__(self, answer: bytes, remaining: int) -> None:
        self.answer = answer
        self.remaining = remaining
        self.failed = False


class PacketAcks:
    """
    Packets whose records are being stored, in arrival order.  Each is answered once all
    its records are stored, and the answers go out in the order the packets came; a
    packet one of whose records was not stored is never answered (the device sends it
    again, and what was stored is not stored twice: record ids come from the records).
    """

    def __init__(self) -> None:
        self._packets: deque[_Packet] = deque()
        # By message id, the packets waiting for it (one record may be sent twice in one
        # packet, and then it is the same record).
        self._waiting: dict[str, deque[_Packet]] = {}

    def __len__(self) -> int:
        return len(self._packets)

    def add(self, messageIds: Sequence[str], answer: bytes) -> list[bytes]:
        """
        A packet of C{messageIds} was submitted; C{answer} goes out once they are stored.

        @return: the answers due now (a packet of no records is answered at once, in
            turn).
        """
        packet = _Packet(answer, len(messageIds))
        self._packets.append(packet)
        for messageId in messageIds:
            self._waiting.setdefault(messageId, deque()).append(packet)
        return self._due()

    def stored(self, messageId: str) -> list[bytes]:
        packet = self._take(messageId)
        if packet is not None:
            packet.remaining -= 1
        return self._due()

    def notStored(self, messageId: str) -> list[bytes]:
        packet = self._take(messageId)
        if packet is not None:
            packet.remaining -= 1
            packet.failed = True
        return self._due()

    def clear(self) -> None:
        self._packets.clear()
        self._waiting.clear()

    def _take(self, messageId: str) -> _Packet | None:
        waiting = self._waiting.get(messageId)
        if not waiting:
            return None
        packet = waiting.popleft()
        if not waiting:
            del self._waiting[messageId]
        return packet

    def _due(self) -> list[bytes]:
        answers = []
        while self._packets and self._packets[0].remaining <= 0:
            packet = self._packets.popleft()
            if not packet.failed:
                answers.append(packet.answer)
        return answers


class TelematicsProtocol(ListenerProtocol):
    """
    A tracker's TCP connection; the subclass parses its protocol.
    """

    # The device answers one command at a time, and its answers carry no id.
    maxInflight = 1

    def __init__(
        self,
        context: ConnectionContext,
        listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object] = lambda transport: None,
    ) -> None:
        super().__init__(context, listener, applySocketOptions)
        self.controller: str | None = None
        self.acks = PacketAcks()
        # The command written and not answered yet.
        self.outstanding: str | None = None
        self.configure(listener)

    def configure(self, listener: ListenerConfig) -> None:
        """
        Set up the subclass's parser for C{listener} (its C{max_frame}, its options).
        """

    # --- what the subclass calls ---

    def frameError(self, code: str, detail: str) -> None:
        self.context.metrics.frameErrors.labels(code).inc()
        log.debug("{controller} sent a bad frame: {code}: {detail}",
                  controller=self.controller, code=code, detail=detail)

    def fatal(self, code: str, detail: str) -> None:
        """
        The stream cannot be followed any further: count it and close.
        """
        self.frameError(code, detail)
        if self.state is not State.CLOSED:
            self.close(v1.BYE_PROTOCOL_ERROR)

    def submitPacket(self, records: Sequence[tuple[str, int, object]], answer: bytes) -> None:
        """
        Store C{records} (message id, device time, body); write C{answer} once all are.
        """
        for _, deviceTs, _ in records:
            self._flag(deviceTs)
        self._write(self.acks.add([messageId for messageId, _, _ in records], answer))
        for messageId, deviceTs, body in records:
            self.submit(messageId, deviceTs, body)
        self.context.framesIn["msg"].inc(len(records))

    def commandAnswered(self, result: str) -> None:
        session, commandId = self.session, self.outstanding
        if session is None or commandId is None:
            log.debug("{controller} answered no command: {result!r}",
                      controller=self.controller, result=result[:200])
            return
        self.outstanding = None
        self.context.framesIn["ack"].inc()
        self.context.settler.settle(session, commandId, True, "", result)

    def _flag(self, deviceTs: int) -> None:
        # Records buffered while out of coverage are hours old by design: stored, never
        # refused.  One from the future (a GPS week-rollover bug) is stored and counted.
        problem = self.timestampProblem(deviceTs)
        if problem is not None and problem[0] == "future":
            self.context.metrics.timestampsFlagged.labels("future").inc()

    def _write(self, chunks: Sequence[bytes]) -> None:
        if chunks and self.transport is not None and self.state is State.LIVE:
            writeNow(self.transport, b"".join(chunks))
            self.context.framesOut["ack"].inc(len(chunks))

    # --- the session's steps ---

    def messageStored(self, messageId: str) -> None:
        self._write(self.acks.stored(messageId))

    def messageNotStored(self, messageId: str, code: str, detail: str) -> None:
        # Not answered: the device sends the packet again.
        self._write(self.acks.notStored(messageId))

    def identificationTimedOut(self) -> None:
        self.close(v1.BYE_PROTOCOL_ERROR)

    def sendPing(self) -> None:
        # No application ping: liveness is the data, TCP keepalive and TCP_USER_TIMEOUT.
        pass

    def sayGoodbye(self, reason: str) -> None:
        # No goodbye frame exists.  Taken over: the newest connection wins and the old
        # socket is aborted at once (what it may still send is never acted on).
        if reason == v1.BYE_TAKEOVER and self.transport is not None:
            self.transport.abortConnection()

    def sessionEnded(self) -> None:
        self.acks.clear()
        self.outstanding = None
