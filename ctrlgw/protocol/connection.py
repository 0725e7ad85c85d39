"""
The v1 protocol on one connection: ctrlgw's own JSON frames (L{ctrlgw.protocol.messages})
over a pluggable framing.

The session's life -- claims, liveness, flow control, the inbox and the outbox -- is
L{SessionProtocol}'s; this class says how each step looks in v1 frames.  Gateway frames are
stamped with the clock at the moment they are written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from ctrlgw.clock import wallMillis
from ctrlgw.config import TimestampConfig
from ctrlgw.framing import FramingError, IFraming
from ctrlgw.interfaces import Session
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import (
    PEER_CLOSED,
    ConnectionContext,
    SessionProtocol,
    State,
)
from ctrlgw.protocol.writethrough import writeNow

__all__ = ["PEER_CLOSED", "ConnectionContext", "ControllerProtocol", "State"]

log = Logger()

_MAX_DETAIL = 200


class ControllerProtocol(SessionProtocol):
    """
    The v1 protocol on one connection.
    """

    def __init__(
        self,
        context: ConnectionContext,
        listener: str,
        framing: IFraming,
        applySocketOptions: Callable[[Any], object] = lambda transport: None,
        timestamps: TimestampConfig | None = None,
    ) -> None:
        super().__init__(context, listener, applySocketOptions, timestamps)
        self.framing = framing
        self._lastPingTs: int | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            self._drop(data)
            return
        try:
            frames = self.framing.feed(data)
        except FramingError as e:
            self._fail(e.code, e.detail)
            return
        self.framesReceived(frames)

    def _drop(self, data: bytes) -> None:
        # A connection closed on purpose (superseded, idle, shutting down) acts on nothing
        # more; the frames are only counted.
        try:
            dropped = len(self.framing.feed(data))
        except FramingError:
            dropped = 1
        if dropped:
            self.context.metrics.framesDropped.inc(dropped)

    # --- inbound frames ---

    def frameReceived(self, payload: bytes) -> None:
        ctx = self.context
        try:
            message = v1.decode(payload)
        except v1.ProtocolError as e:
            ctx.framesIn["invalid"].inc()
            if self.state is State.AWAITING_HELLO:
                self._fail(e.code, e.detail, e.ref)
            else:
                self._sendError(e.code, e.detail, e.ref)
            return
        ctx.framesInByClass[type(message)].inc()

        if isinstance(message, v1.Ping):
            self._send("pong", echo=message.ts)
        elif self.state is State.LIVE:
            self._liveFrame(message)
        elif self.state is State.AWAITING_HELLO:
            if isinstance(message, v1.Hello):
                self.claim(message.controller, message.token)
            else:
                self._fail(v1.HELLO_REQUIRED, "the first frame must be a hello")
        elif isinstance(message, v1.Msg):
            # Claiming: the controller sent before its welcome; nothing is acked, it resends.
            self._sendError(v1.HELLO_REQUIRED, "wait for welcome before sending", message.id)
        elif not isinstance(message, v1.Pong):
            self._sendError(v1.HELLO_REQUIRED, "wait for welcome before sending")

    def _liveFrame(self, message: v1.Inbound) -> None:
        session = self.session
        assert session is not None
        if isinstance(message, v1.Msg):
            self._receiveMsg(message)
        elif isinstance(message, v1.Ack):
            self.context.settler.settle(session, message.ref, True, "")
        elif isinstance(message, v1.Nack):
            self.context.settler.settle(session, message.ref, False, message.reason)
        elif isinstance(message, v1.Pong):
            self._pongReceived(message)
        elif isinstance(message, v1.Hello):
            self._sendError(v1.BAD_MESSAGE, "already welcomed; reconnect to start a new session")

    def _receiveMsg(self, message: v1.Msg) -> None:
        problem = self.timestampProblem(message.ts)
        if problem is not None:
            kind, detail = problem
            self.context.metrics.timestampRejects.labels(kind).inc()
            code = v1.STALE_TIMESTAMP if kind == "stale" else v1.FUTURE_TIMESTAMP
            self._sendError(code, detail, message.id)
            return
        self.submit(message.id, message.ts, message.body)

    def _pongReceived(self, pong: v1.Pong) -> None:
        if pong.echo != self._lastPingTs:
            return
        self._lastPingTs = None
        now = wallMillis(self.context.clock)
        roundTrip = max(0, now - pong.echo)
        self.context.metrics.pingRoundTrip.observe(roundTrip / 1000)
        # The controller stamped its pong about half a round trip after our ping left.
        skew = pong.ts - (pong.echo + roundTrip / 2)
        self.context.metrics.controllerSkew.observe(skew / 1000)

    # --- the session's steps, in v1 frames ---

    def welcome(self, session: Session) -> None:
        self._send(
            "welcome",
            session=session.session,
            epoch=session.epoch,
            ping_interval=self.context.liveness.ping_interval,
        )

    def refuse(self, code: str, detail: str) -> None:
        if code == v1.AUTH_FAILED:
            self._fail(code, detail)
        else:
            self._fail(code, detail, bye=v1.BYE_UNAVAILABLE)

    def identificationTimedOut(self) -> None:
        self._fail(
            v1.HELLO_REQUIRED, f"no hello within {self.context.liveness.hello_timeout:g}s"
        )

    def messageStored(self, messageId: str) -> None:
        self._send("ack", ref=messageId)

    def messageNotStored(self, messageId: str, code: str, detail: str) -> None:
        self._sendError(code, detail, messageId)

    def sendPing(self) -> None:
        self._lastPingTs = self._send("ping")

    def writeCommand(self, commandId: str, body: object, expiresMs: int) -> None:
        self._send("cmd", id=commandId, expires=expiresMs, body=body)

    def sayGoodbye(self, reason: str) -> None:
        self._send("bye", reason=reason)

    # --- writing ---

    def _send(self, kind: str, **fields: Any) -> int:
        ts = wallMillis(self.context.clock)
        # Only reached once connected: from frames, timers armed in connectionMade, claims
        # it started, and close() after its own check.
        assert self.transport is not None
        writeNow(self.transport, self.framing.frame(v1.encode(kind, ts, **fields)))
        self.context.framesOut[kind].inc()
        return ts

    def _sendError(self, code: str, detail: str, ref: str | None = None) -> None:
        self.context.metrics.frameErrors.labels(code).inc()
        # Details quote parser messages of any length, and a ref of 128 characters that
        # need escaping takes 768 bytes: the frame must fit max_frame all the same, so the
        # detail goes first, then the ref.  The code is what counts.
        for fields in (
            {"ref": ref, "detail": detail[:_MAX_DETAIL]},
            {"ref": ref, "detail": ""},
            {"ref": None, "detail": ""},
        ):
            try:
                self._send("error", code=code, **fields)
            except FramingError:
                continue
            return

    def _fail(
        self, code: str, detail: str, ref: str | None = None, bye: str = v1.BYE_PROTOCOL_ERROR
    ) -> None:
        self._sendError(code, detail, ref)
        self.close(bye)
