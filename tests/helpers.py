"""
Small helpers shared by ctrlgw's tests.

L{makeConfig} builds a L{GatewayConfig} from an ini text with one listener,
L{makeContext} wires a L{ConnectionContext} to in-memory seams,
L{FakeController} drives one L{ControllerProtocol} over a L{StringTransport},
L{MemorySink} is an L{IMessageSink} whose Deferreds the test fires, and L{deferred} makes
an async test method a trial test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from ctrlgw.config import GatewayConfig, ListenerConfig, Overrides, parseConfig
from ctrlgw.interfaces import ICommandSettler, IMessageSink, IOwnership, Session
from ctrlgw.metrics import Metrics
from ctrlgw.ownership import LocalOwnership
from ctrlgw.protocol.connection import ConnectionContext, ControllerProtocol
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.settler import RecordingSettler


def deferred(method: Callable[[Any], Coroutine[Any, Any, Any]]) -> Callable[[Any], Deferred[Any]]:
    """
    Run an async test method as a Deferred-returning trial test.
    """

    def test(self: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(method(self))

    test.__name__ = method.__name__
    test.__doc__ = method.__doc__
    return test


# A plausible "now" for test clocks: 2023-11-14T22:13:20Z, in seconds.
EPOCH_SECONDS = 1_700_000_000.0


def iniText(sections: Mapping[str, Mapping[str, object]]) -> str:
    """
    Render C{{section: {key: value}}} as ini text.
    """
    lines = []
    for section, items in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in items.items())
        lines.append("")
    return "\n".join(lines)


def makeConfig(
    listener: Mapping[str, object] | None = None,
    listenerName: str = "main",
    overrides: Overrides | None = None,
    source: str = "test.ini",
    **sections: Mapping[str, object],
) -> GatewayConfig:
    """
    Parse a configuration with one listener through L{parseConfig}.

    @param listener: Keys of the C{[listener:NAME]} section; C{endpoint} defaults
        to C{tcp:0}.
    @param sections: Other sections by name, e.g.
        C{makeConfig(liveness={"ping_interval": "10s", "idle_timeout": "25s"})}.
    """
    listenerItems = {"endpoint": "tcp:0", **(listener or {})}
    text = iniText({f"listener:{listenerName}": listenerItems, **sections})
    return parseConfig(text, source, overrides or Overrides())


def makeClock(start: float = EPOCH_SECONDS) -> Clock:
    """
    A L{Clock} set to a realistic wall-clock time.
    """
    clock = Clock()
    clock.advance(start)
    return clock


def pump(clock: Clock, seconds: float) -> None:
    """
    Advance C{clock} by C{seconds} the way time passes: stopping at each delayed call
    that comes due on the way, so that calls scheduled from calls run at their own time
    (a single C{clock.advance(seconds)} runs them all at the end time).
    """
    target = clock.seconds() + seconds
    while True:
        due = [call.getTime() for call in clock.getDelayedCalls() if call.getTime() <= target]
        if not due:
            break
        clock.rightNow = max(clock.rightNow, min(due))
        clock.advance(0)
    clock.rightNow = target
    clock.advance(0)


def millis(clock: Clock) -> int:
    """
    The clock's time as protocol milliseconds.
    """
    return int(clock.seconds() * 1000)


@dataclass
class Submission:
    session: Session
    messageId: str
    deviceTs: int
    body: object
    deferred: Deferred[None]


@implementer(IMessageSink)
class MemorySink:
    """
    Records every submitted message; each submission's Deferred fires only when the
    test calls L{succeed} or L{fail}.
    """

    def __init__(self, room: int | None = None) -> None:
        self.submissions: list[Submission] = []
        # Messages it holds at most before it stops accepting (None: no limit); it
        # accepts again once half of that is free, as the inbox does.
        self.room = room
        self._waiting: list[Callable[[], object]] = []

    @property
    def inFlight(self) -> int:
        return sum(1 for s in self.submissions if not s.deferred.called)

    def accepting(self, controller: str) -> bool:
        return self.room is None or self.inFlight < self.room

    def whenAccepting(self, controller: str, callback: Callable[[], object]) -> None:
        if self.accepting(controller):
            callback()
        else:
            self._waiting.append(callback)

    def _settled(self) -> None:
        if self._waiting and self.room is not None and self.inFlight <= self.room // 2:
            waiting, self._waiting = self._waiting, []
            for callback in waiting:
                callback()

    def submit(
        self, session: Session, messageId: str, deviceTs: int, body: object
    ) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.submissions.append(Submission(session, messageId, deviceTs, body, d))
        return d

    @property
    def messageIds(self) -> list[str]:
        return [s.messageId for s in self.submissions]

    def _pending(self, messageId: str) -> Submission:
        for submission in self.submissions:
            if submission.messageId == messageId and not submission.deferred.called:
                return submission
        raise KeyError(f"no pending submission {messageId!r}")

    def succeed(self, messageId: str) -> None:
        """
        Say that the (oldest pending) message C{messageId} is safe.
        """
        self._pending(messageId).deferred.callback(None)
        self._settled()

    def fail(self, messageId: str, error: BaseException) -> None:
        """
        Fail the (oldest pending) submission of C{messageId} with C{error}.
        """
        self._pending(messageId).deferred.errback(Failure(error))
        self._settled()


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} that counts calls to C{abortConnection}.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aborts = 0

    def abortConnection(self) -> None:
        self.aborts += 1
        super().abortConnection()


def makeContext(
    config: GatewayConfig | None = None,
    clock: Clock | None = None,
    sink: IMessageSink | None = None,
    ownership: IOwnership | None = None,
    settler: ICommandSettler | None = None,
    metrics: Metrics | None = None,
) -> ConnectionContext:
    """
    A L{ConnectionContext} on in-memory seams: L{LocalOwnership}, L{MemorySink},
    L{RecordingSettler}, fresh L{Metrics} on their own registry.
    """
    if config is None:
        config = makeConfig()
    return ConnectionContext(
        clock=clock if clock is not None else makeClock(),
        liveness=config.liveness,
        timestamps=config.timestamps,
        registry=ConnectionRegistry(),
        ownership=ownership if ownership is not None else LocalOwnership("test-instance"),
        sink=sink if sink is not None else MemorySink(),
        settler=settler if settler is not None else RecordingSettler(),
        metrics=metrics if metrics is not None else Metrics(CollectorRegistry()),
    )


class FakeController:
    """
    The controller end of one L{ControllerProtocol} on a L{RecordingTransport}.

    Frames are encoded and decoded with the listener's own framing.
    """

    _nextPort = 40000

    def __init__(
        self, context: ConnectionContext, listener: ListenerConfig, connect: bool = True
    ) -> None:
        self.context = context
        self.listener = listener
        FakeController._nextPort += 1
        self.transport = RecordingTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 7000),
            peerAddress=IPv4Address("TCP", "192.0.2.10", FakeController._nextPort),
        )
        self.protocol = ControllerProtocol(context, listener.name, listener.makeFraming())
        self._encoder = listener.makeFraming()
        self._decoder = listener.makeFraming()
        if connect:
            self.connect()

    def connect(self) -> None:
        self.protocol.makeConnection(self.transport)

    def now(self) -> int:
        return int(self.context.clock.seconds() * 1000)

    def frame(self, message: Mapping[str, Any]) -> bytes:
        """
        The wire bytes of C{message}, stamped with the clock unless it has a C{ts}.
        """
        message = dict(message)
        message.setdefault("ts", self.now())
        return self._encoder.frame(json.dumps(message).encode("utf-8"))

    def send(self, message: Mapping[str, Any]) -> None:
        self.protocol.dataReceived(self.frame(message))

    def sendPayload(self, payload: bytes) -> None:
        """
        Send C{payload} as one frame, whatever it contains.
        """
        self.protocol.dataReceived(self._encoder.frame(payload))

    def sendRaw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> list[dict[str, Any]]:
        """
        Decode and consume everything the gateway has written so far.
        """
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(payload) for payload in self._decoder.feed(data)]

    def hello(self, controller: str, token: str | None = None) -> dict[str, Any]:
        """
        Say hello and return the welcome (failing if anything else came back).
        """
        message: dict[str, Any] = {"type": "hello", "controller": controller}
        if token is not None:
            message["token"] = token
        self.send(message)
        frames = self.received()
        types = [f["type"] for f in frames]
        if types != ["welcome"]:
            raise AssertionError(f"expected one welcome, got {frames!r}")
        return frames[0]

    def lose(self, reason: Failure | None = None) -> None:
        """
        Report the connection lost to the protocol, as a reactor would.
        """
        self.transport.connected = False
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))
