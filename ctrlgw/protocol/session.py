"""
What every controller connection does, whatever its dialect: awaiting identification ->
claiming -> live -> closed.

A L{SessionProtocol} owns its socket's liveness (identification deadline, pings, idle
timeout), flow control in both directions, the claim of its session, handing messages to
the inbox and acking them only once they are safe, writing commands and closing with a
grace period.  It never touches the database.  A dialect (L{ctrlgw.protocol.connection} for
v1, L{ctrlgw.dialects}) subclasses it and says how each of these looks on its wire, by
implementing the hooks at the end of the class.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ctrlgw.clock import wallMillis
from ctrlgw.config import ListenerConfig, LivenessConfig, TimestampConfig
from ctrlgw.interfaces import (
    AuthFailed,
    Fenced,
    ICommandSettler,
    IControllerConnection,
    IMessageSink,
    IOwnership,
    Rejected,
    Session,
    Unavailable,
)
from ctrlgw.metrics import Metrics
from ctrlgw.protocol import messages as v1
from ctrlgw.registry import ConnectionRegistry

log = Logger()

# Disconnect reasons beyond the bye reasons: the peer went away on its own.
PEER_CLOSED = "peer_closed"

_FRAME_TYPES = ("hello", "msg", "ack", "nack", "ping", "pong", "invalid")
_OUT_TYPES = ("welcome", "ack", "cmd", "ping", "pong", "error", "bye")

# Pings written per reactor turn when many fall due at once.
PINGS_PER_TURN = 25


class TurnSlices:
    """
    Jobs due at one moment for many connections (the pings of one grid slot), run a slice
    per reactor turn: with 10,000 connections a slot holds over 300 pings, about 30 ms of
    work that would otherwise keep every frame and command waiting until it is all done.
    """

    def __init__(self, clock: IReactorTime, perTurn: int) -> None:
        self.clock = clock
        self.perTurn = perTurn
        self._due: deque[Callable[[], None]] = deque()
        self._call: IDelayedCall | None = None

    def add(self, job: Callable[[], None]) -> None:
        self._due.append(job)
        if self._call is None:
            self._call = self.clock.callLater(0, self._runSlice)

    def __len__(self) -> int:
        return len(self._due)

    def _runSlice(self) -> None:
        self._call = None
        for _ in range(min(self.perTurn, len(self._due))):
            job = self._due.popleft()
            try:
                job()
            except Exception:
                log.failure("a sliced job failed")
        if self._due:
            self._call = self.clock.callLater(0, self._runSlice)


class _FlowControl(TypingProtocol):
    """
    What the connection needs of its transport beyond ITCPTransport: it consumes our
    writes (IConsumer) and produces what we read (IPushProducer); every listener
    transport (TCP, UNIX, TLS) is both.
    """

    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


def _flowControl(transport: object) -> _FlowControl:
    return cast(_FlowControl, transport)


_PAUSED_BY_WRITES = "writes"
_PAUSED_BY_INBOX = "inbox"
# The inbox is full for this controller: not read until it has room again.
_PAUSED_BY_SINK = "sink"


class _PendingFrames:
    """
    Frames waiting to be handled, packed as one buffer and their lengths: a read of 64 KiB
    of one-byte lines is 32,768 frames, which as separate bytes objects would take a
    megabyte, and here takes 192 KiB.
    """

    def __init__(self) -> None:
        self._data = b""
        self._lengths = array("L")
        self._index = 0
        self._offset = 0

    def __len__(self) -> int:
        return len(self._lengths) - self._index

    @property
    def size(self) -> int:
        """
        The payload bytes waiting.
        """
        return len(self._data) - self._offset

    def extend(self, frames: Sequence[bytes]) -> None:
        self._data = self._data[self._offset :] + b"".join(frames)
        self._lengths = self._lengths[self._index :]
        self._lengths.extend(len(frame) for frame in frames)
        self._index = self._offset = 0

    def popleft(self) -> bytes:
        end = self._offset + self._lengths[self._index]
        payload = self._data[self._offset : end]
        self._index += 1
        self._offset = end
        if self._index == len(self._lengths):
            self.clear()
        return payload

    def clear(self) -> None:
        self._data = b""
        self._lengths = array("L")
        self._index = self._offset = 0


class State(Enum):
    AWAITING_HELLO = "awaiting_hello"
    CLAIMING = "claiming"
    LIVE = "live"
    CLOSED = "closed"


# The earliest phase of ping_interval at which the first ping after the welcome may fall.
# Drawn from [0.1, 1], the first pings of a fleet that reconnected at once come at
# 1 / 0.9 = 1.1 times the steady ping rate; from [0.5, 1] they came at twice it, for half
# an interval, just when its commands start (docs/architecture.md, "Periodic work").
FIRST_PING_PHASE = 0.1


@dataclass
class ConnectionContext:
    """
    What every connection of one gateway shares: configuration, seams, metrics and the set
    of open connections (for shutdown).
    """

    clock: IReactorTime
    liveness: LivenessConfig
    timestamps: TimestampConfig
    registry: ConnectionRegistry
    ownership: IOwnership
    sink: IMessageSink
    settler: ICommandSettler
    metrics: Metrics
    accepting: bool = True
    # Messages one connection may have waiting for their commit before we stop reading it.
    maxUnacked: int = 1000
    # Where in [FIRST_PING_PHASE, 1] of ping_interval the first ping after the welcome
    # falls: a fleet that reconnected at once would otherwise be pinged at once, every
    # interval.
    firstPingPhase: Callable[[], float] = lambda: 1.0
    # Pings fall on a grid of this many seconds (0: none), so the pings due in one slot go
    # out together (a slice per reactor turn): spread over the interval, yet batched.
    pingGrid: float = 0.0
    connections: set[SessionProtocol] = field(default_factory=set)
    # Open connections per listener, for its max_connections.
    openByListener: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Label lookups are cached: they are on the per-frame path.
        self.framesIn = {t: self.metrics.framesIn.labels(t) for t in _FRAME_TYPES}
        # By message class, so the per-frame path does no string work.
        self.framesInByClass = {
            kind: self.metrics.framesIn.labels(kind.__name__.lower())
            for kind in (v1.Hello, v1.Msg, v1.Ack, v1.Nack, v1.Ping, v1.Pong)
        }
        self.framesOut = {t: self.metrics.framesOut.labels(t) for t in _OUT_TYPES}
        self.pings = TurnSlices(self.clock, PINGS_PER_TURN)


@implementer(IPushProducer, IControllerConnection)
class SessionProtocol(Protocol):
    """
    One controller connection, its dialect's wire left to the subclass.
    """

    # Every stream listener's transport (tcp, ssl/tls, and unix, whose Server is a
    # tcp.Server) provides ITCPTransport, the interface that declares abortConnection.
    transport: ITCPTransport | None
    # Commands written and not yet answered that the dialect allows (None: as configured).
    maxInflight: int | None = None

    def __init__(
        self,
        context: ConnectionContext,
        listener: str,
        applySocketOptions: Callable[[Any], object] = lambda transport: None,
        timestamps: TimestampConfig | None = None,
    ) -> None:
        self.context = context
        self.listener = listener
        self.timestamps = timestamps or context.timestamps
        # The listener's liveness and auth mode (None: [auth] mode); its factory sets them.
        self.liveness: LivenessConfig = context.liveness
        self.authMode: str | None = None
        self.session: Session | None = None
        self.state = State.AWAITING_HELLO
        self.closeReason: str | None = None
        self._applySocketOptions = applySocketOptions
        self._timer: IDelayedCall | None = None
        self._abortCall: IDelayedCall | None = None
        self._lastHeard = 0.0
        self._nextPing = 0.0
        self._unacked = 0
        self._pausedBy: set[str] = set()
        # Frames parsed but not yet handled because the controller stopped reading what
        # we write: never more than one read's worth, handled when its reading resumes.
        self._pending = _PendingFrames()

    @property
    def peer(self) -> str:
        """
        The controller's address as host:port.  Read when needed, not at connect: behind
        a PROXY-protocol listener (haproxy:...) the real address is known only once the
        header has arrived.
        """
        if self.transport is None:
            return ""
        address = self.transport.getPeer()
        return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"

    @property
    def live(self) -> bool:
        return self.state is State.LIVE

    @property
    def writesPaused(self) -> bool:
        """
        Whether the transport's buffer is full (the controller is not reading).
        """
        return _PAUSED_BY_WRITES in self._pausedBy

    @property
    def pendingBytes(self) -> int:
        """
        Payload bytes received and parsed but not yet handled, because the controller is
        not reading what we write: at most one read's worth.
        """
        return self._pending.size

    @property
    def lastHeard(self) -> float:
        """
        When the last frame arrived (clock seconds).
        """
        return self._lastHeard

    # --- Twisted protocol events ---

    def connectionMade(self) -> None:
        ctx = self.context
        ctx.connections.add(self)
        ctx.openByListener[self.listener] = ctx.openByListener.get(self.listener, 0) + 1
        ctx.metrics.connections.labels(self.listener).inc()
        ctx.metrics.connectionsTotal.labels(self.listener).inc()
        transport = self.transport
        assert transport is not None  # makeConnection sets it before connectionMade
        self._applySocketOptions(transport)
        # As the producer of what we write: a controller that stops reading makes the
        # transport's buffer fill, and we stop reading (and delivering) until it drains.
        _flowControl(transport).registerProducer(self, True)
        now = ctx.clock.seconds()
        self._lastHeard = now
        self._arm(now + self.liveness.hello_timeout)

    def framesReceived(self, frames: Sequence[bytes]) -> None:
        """
        Handle the frames one read completed, in order, holding back the rest of the read
        when the controller does not read what we write or the inbox has no room.
        """
        if not frames:
            return
        self._lastHeard = self.context.clock.seconds()
        if self._pending:
            # Still waiting for the controller to read (a TLS transport may hand us what
            # it had decrypted): these queue behind the others.
            self._pending.extend(frames)
            self._handlePending()
            return
        for index, payload in enumerate(frames):
            if self.state is State.CLOSED:
                self.context.metrics.framesDropped.inc(len(frames) - index)
                return
            if self._held():
                # Answers go out as frames are handled; a controller that does not read
                # them must not make us buffer the answers to all it sent, and messages
                # the inbox has no room for are better left unread than read and refused:
                # the rest of this read waits.
                self._pending.extend(frames[index:])
                return
            self._handleFrame(payload)

    def _handlePending(self) -> None:
        pending = self._pending
        while pending and not self._held():
            if self.state is State.CLOSED:
                self.context.metrics.framesDropped.inc(len(pending))
                pending.clear()
                return
            self._handleFrame(pending.popleft())

    def _held(self) -> bool:
        """
        Whether frames must wait: the controller is not reading what we write, or the
        inbox has no room for its messages (then stop reading until it has).
        """
        if self.writesPaused or _PAUSED_BY_SINK in self._pausedBy:
            return True
        session = self.session
        if self.state is State.LIVE and session is not None:
            sink = self.context.sink
            if not sink.accepting(session.controller):
                self._pauseReading(_PAUSED_BY_SINK)
                self.context.metrics.inboxBackpressure.inc()
                sink.whenAccepting(session.controller, self._sinkAccepting)
                return True
        return False

    def _sinkAccepting(self) -> None:
        if _PAUSED_BY_SINK not in self._pausedBy:
            return
        # We chose not to read: that silence is ours, not the controller's.
        self._lastHeard = self.context.clock.seconds()
        self._resumeReading(_PAUSED_BY_SINK)
        if self.state is not State.CLOSED:
            self._handlePending()

    def _handleFrame(self, payload: bytes) -> None:
        try:
            self.frameReceived(payload)
        except Exception:
            # A bug must cost this connection, never the process or the other peers.
            log.failure("handling a frame failed; aborting the connection")
            self._pending.clear()
            self._finish(v1.BYE_PROTOCOL_ERROR)
            if self.transport is not None:
                self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        ctx = self.context
        self._cancelTimer()
        self._pending.clear()
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        if self.state is not State.CLOSED:
            self._finish(PEER_CLOSED)
        ctx.connections.discard(self)
        ctx.openByListener[self.listener] = ctx.openByListener.get(self.listener, 1) - 1
        ctx.metrics.connections.labels(self.listener).dec()
        ctx.metrics.disconnects.labels(self.closeReason or PEER_CLOSED).inc()

    # --- inbound messages ---

    def timestampProblem(self, ts: int) -> tuple[str, str] | None:
        """
        Whether a message stamped C{ts} (ms) is outside this listener's timestamp policy:
        (C{"stale"} or C{"future"}, a detail for the controller); C{None} if not.
        """
        policy = self.timestamps
        now = wallMillis(self.context.clock)
        if now - ts > policy.max_age * 1000:
            return "stale", f"ts is {now - ts} ms old; the limit is {policy.max_age:g}s"
        if ts - now > policy.max_future * 1000:
            return "future", (
                f"ts is {ts - now} ms ahead of the gateway clock; "
                f"the limit is {policy.max_future:g}s"
            )
        return None

    def submit(self, messageId: str, deviceTs: int, body: object) -> None:
        """
        Hand a message to the inbox; it is acked (L{messageStored}) only once it is safe.
        """
        session = self.session
        assert session is not None
        ctx = self.context
        d = ctx.sink.submit(session, messageId, deviceTs, body)
        self._unacked += 1
        if self._unacked >= ctx.maxUnacked:
            # Backpressure for this controller alone: stop reading until half its
            # messages are safe, rather than letting it fill everyone's buffer.
            self._pauseReading(_PAUSED_BY_INBOX)
        d.addCallbacks(
            self._stored,
            self._notStored,
            callbackArgs=(session, messageId),
            errbackArgs=(messageId,),
        )

    def _settled(self) -> None:
        self._unacked -= 1
        if _PAUSED_BY_INBOX in self._pausedBy and self._unacked <= self.context.maxUnacked // 2:
            # We chose not to read: that silence is ours, not the controller's.
            self._lastHeard = self.context.clock.seconds()
            self._resumeReading(_PAUSED_BY_INBOX)

    def _stored(self, _: None, session: Session, messageId: str) -> None:
        self._settled()
        if self.state is State.LIVE and self.session is session:
            self.messageStored(messageId)

    def _notStored(self, failure: Failure, messageId: str) -> None:
        self._settled()
        if failure.check(Fenced):
            # Another instance took over and this one missed the notification: the
            # database refused to store for a superseded epoch.
            if self.state is not State.CLOSED:
                self.context.metrics.takeovers.labels("fenced").inc()
                self.close(v1.BYE_TAKEOVER)
        elif self.state is not State.LIVE:
            return
        elif failure.check(Rejected):
            self.messageNotStored(messageId, v1.BAD_MESSAGE,
                                  f"refused by the database: {failure.value}")
        else:
            if not failure.check(Unavailable):
                log.failure("storing message {ref} failed", failure, ref=messageId)
            self.messageNotStored(messageId, v1.UNAVAILABLE, "not stored; retry later")

    # --- claiming a session ---

    def claim(self, controller: str, token: str | None) -> None:
        """
        The controller said who it is: admit it (L{welcome}) or refuse it (L{refuse}).
        """
        ctx = self.context
        if not ctx.accepting:
            self.refuse(v1.UNAVAILABLE, "the gateway is shutting down")
            return
        self.state = State.CLAIMING
        mode = () if self.authMode is None else (self.authMode,)
        d = ctx.ownership.claim(controller, token, self.listener, self.peer, *mode)
        d.addCallbacks(self._claimed, self._claimFailed)

    def _claimed(self, session: Session) -> None:
        ctx = self.context
        if self.state is not State.CLAIMING:
            # Gone (or timed out) while the claim was in flight.  The claim committed all
            # the same: an older connection of this controller here is superseded.
            ctx.ownership.release(session, self.closeReason or PEER_CLOSED)
            older = ctx.registry.supersededBy(session.controller, session.epoch)
            if older is not None:
                ctx.metrics.takeovers.labels("local").inc()
                older.close(v1.BYE_TAKEOVER)
            return
        self.session = session
        loser = ctx.registry.bind(self)
        if loser is not None:
            ctx.metrics.takeovers.labels("local").inc()
            log.info(
                "{controller} taken over locally (epoch {epoch})",
                controller=session.controller,
                epoch=session.epoch,
            )
            if loser is self:
                self.state = State.LIVE  # so that close() releases the session
                self.close(v1.BYE_TAKEOVER)
                return
            loser.close(v1.BYE_TAKEOVER)
        self.state = State.LIVE
        self.welcome(session)
        phase = min(1.0, max(FIRST_PING_PHASE, ctx.firstPingPhase()))
        self._nextPing = self._onPingGrid(ctx.clock.seconds() + self.liveness.ping_interval * phase)
        self._armLive()
        ctx.settler.sessionStarted(session)

    def _claimFailed(self, failure: Failure) -> None:
        if self.state is not State.CLAIMING:
            return
        if failure.check(AuthFailed):
            self.context.metrics.authFailures.labels(failure.value.reason).inc()
            self.refuse(v1.AUTH_FAILED, "authentication failed")
        elif failure.check(Unavailable):
            self.refuse(v1.UNAVAILABLE, str(failure.value))
        else:
            log.failure("claim failed", failure)
            self.refuse(v1.UNAVAILABLE, "the gateway could not admit you")

    # --- timers ---

    def _arm(self, at: float) -> None:
        self._cancelTimer()
        clock = self.context.clock
        self._timer = clock.callLater(max(0.0, at - clock.seconds()), self._tick)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        # One timer per connection: frames only record when they arrived, and the timer
        # works out what is due, so the per-frame path never reschedules anything.
        self._timer = None
        ctx = self.context
        now = ctx.clock.seconds()
        if self.state is State.AWAITING_HELLO:
            self.identificationTimedOut()
        elif self.state is State.CLAIMING:
            self.refuse(v1.UNAVAILABLE, "admission took too long; retry later")
        elif self.state is State.LIVE:
            if _PAUSED_BY_INBOX in self._pausedBy or _PAUSED_BY_SINK in self._pausedBy:
                # Not reading by our own choice (its messages are not safe yet).
                self._lastHeard = now
            if now >= self._lastHeard + self.liveness.idle_timeout:
                log.info(
                    "{controller} silent for {seconds:.1f}s: closing",
                    controller=self.session.controller if self.session else None,
                    seconds=now - self._lastHeard,
                )
                self.close(v1.BYE_IDLE_TIMEOUT)
                return
            if now >= self._nextPing:
                ctx.pings.add(self._pingIfLive)
                # From the slot it was due in, not from now: it stays on the grid.
                self._nextPing = max(
                    self._nextPing + self.liveness.ping_interval, self._onPingGrid(now)
                )
            self._armLive()

    def _pingIfLive(self) -> None:
        if self.state is State.LIVE:
            self.sendPing()

    def _onPingGrid(self, at: float) -> float:
        grid = self.context.pingGrid
        return math.ceil(at / grid) * grid if grid > 0 else at

    def _armLive(self) -> None:
        # The next thing due on a live connection: a ping, or the idle deadline.
        idleAt = self._lastHeard + self.liveness.idle_timeout
        self._arm(min(self._nextPing, idleAt))

    # --- commands ---

    def deliver(self, commandId: str, body: object, expiresMs: int) -> bool:
        """
        Write a command now, unless this connection is not live or the command has
        expired by the gateway clock: a command is never written stale.

        @return: whether the command was written.
        @raise FramingError: the command does not fit in one frame of this listener.
        @raise ValueError: the command's body is not one this dialect can write.
        """
        if self.state is not State.LIVE or self.writesPaused:
            return False
        if expiresMs <= wallMillis(self.context.clock):
            self.context.metrics.expiredAtWrite.inc()
            return False
        self.writeCommand(commandId, body, expiresMs)
        return True

    # --- closing ---

    def close(self, reason: str) -> None:
        """
        Close on purpose: from now on nothing received is acted on; say goodbye with
        C{reason} and close the socket, aborting it if the goodbye has not drained within
        C{close_grace} (a dead peer must never hold the connection open).
        """
        if self.state is State.CLOSED:
            return
        self._finish(reason)
        transport = self.transport
        if transport is None:
            return
        self.sayGoodbye(reason)
        # A registered producer would hold loseConnection open for ever.
        _flowControl(transport).unregisterProducer()
        grace = self.liveness.close_grace
        if grace > 0:
            transport.loseConnection()
            self._abortCall = self.context.clock.callLater(grace, transport.abortConnection)
        else:
            transport.abortConnection()

    # --- flow control (IPushProducer, towards the transport) ---

    def pauseProducing(self) -> None:
        self._pauseReading(_PAUSED_BY_WRITES)

    def resumeProducing(self) -> None:
        self._resumeReading(_PAUSED_BY_WRITES)
        self._handlePending()
        if self.state is State.LIVE and self.session is not None:
            # Commands held back while the controller was not reading may go now.
            self.context.settler.sessionStarted(self.session)

    def stopProducing(self) -> None:
        pass

    def _pauseReading(self, why: str) -> None:
        if not self._pausedBy and self.transport is not None:
            _flowControl(self.transport).pauseProducing()
        self._pausedBy.add(why)

    def _resumeReading(self, why: str) -> None:
        if why not in self._pausedBy:
            return
        self._pausedBy.discard(why)
        if not self._pausedBy and self.transport is not None and self.state is not State.CLOSED:
            _flowControl(self.transport).resumeProducing()

    def _finish(self, reason: str) -> None:
        if self._pending:
            self.context.metrics.framesDropped.inc(len(self._pending))
            self._pending.clear()
        wasLive = self.state is State.LIVE
        self.state = State.CLOSED
        self.closeReason = reason
        self._cancelTimer()
        if wasLive and self.session is not None:
            self.context.registry.unbind(self)
            self.context.ownership.release(self.session, reason)
            self.sessionEnded()

    # --- the dialect's wire: what a subclass implements ---

    def frameReceived(self, payload: bytes) -> None:
        """
        Act on one frame of the dialect (from L{framesReceived}).
        """
        raise NotImplementedError

    def welcome(self, session: Session) -> None:
        """
        Tell the controller it is admitted to C{session}.
        """
        raise NotImplementedError

    def refuse(self, code: str, detail: str) -> None:
        """
        Tell the controller it is not admitted (C{code} is a v1 error code:
        C{auth_failed}, C{unavailable}) and close.
        """
        raise NotImplementedError

    def identificationTimedOut(self) -> None:
        """
        The controller did not say who it is within C{hello_timeout}: close.
        """
        raise NotImplementedError

    def messageStored(self, messageId: str) -> None:
        """
        The message C{messageId} is committed: ack it.
        """
        raise NotImplementedError

    def messageNotStored(self, messageId: str, code: str, detail: str) -> None:
        """
        The message C{messageId} was not stored (C{code} a v1 error code).
        """
        raise NotImplementedError

    def sendPing(self) -> None:
        raise NotImplementedError

    def writeCommand(self, commandId: str, body: object, expiresMs: int) -> None:
        raise NotImplementedError

    def sayGoodbye(self, reason: str) -> None:
        """
        The last thing written before the socket closes on purpose for C{reason}.
        """
        raise NotImplementedError

    def sessionEnded(self) -> None:
        """
        The live session has ended (the connection is closing): drop what it waits for.
        """

    def reply(self, messageId: str, payload: object) -> bool:
        """
        Answer the controller's request C{messageId} with an application's C{payload}.

        @return: whether it was written (the request is still waiting for its answer).
        """
        return False

    def replyError(self, messageId: str, code: str, description: str) -> bool:
        """
        Answer the controller's request C{messageId} with an error.
        """
        return False


class ListenerProtocol(SessionProtocol):
    """
    A dialect's connection made from its listener's whole configuration (its options,
    its C{max_frame}, its timestamp policy), as L{ctrlgw.dialects.IDialect.buildProtocol}
    hands it.
    """

    def __init__(
        self,
        context: ConnectionContext,
        listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object] = lambda transport: None,
    ) -> None:
        super().__init__(
            context, listener.name, applySocketOptions,
            listener.timestampPolicy(context.timestamps),
        )
