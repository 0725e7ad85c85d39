"""
Branches of L{ctrlgw.protocol.connection.ControllerProtocol} that C{test_connection.py}
leaves open, on a L{Clock} over a L{StringTransport}: frames waiting while the inbox is
full (counted and dropped on close), the per-listener connection count, the transport's
streaming producer, ping round trip and clock skew, the first ping's phase and grid, a
hello timeout under a second, a claim that completes after its connection was closed, the
error texts for stale and future timestamps, an error that must shed its detail to fit,
and a bug in one frame's handling.

These run in C{make mutate} against C{ctrlgw/protocol/connection.py}, with
C{test_connection.py}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.interfaces import Session
from ctrlgw.ownership import LocalOwnership
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import ConnectionContext, State

from .helpers import (
    EPOCH_SECONDS,
    FakeController,
    MemorySink,
    makeClock,
    makeConfig,
    makeContext,
    millis,
)

PING_INTERVAL = 10.0
MAX_AGE = 60.0
MAX_FUTURE = 5.0


class SlowOwnership(LocalOwnership):
    """
    Claims that complete when the test says so.
    """

    def __init__(self, instance: str) -> None:
        super().__init__(instance)
        self.pending: list[tuple[Deferred[Session], Session]] = []

    def claim(self, controller: str, token: str | None, listener: str, peer: str) -> Deferred[Session]:
        sessions: list[Session] = []
        super().claim(controller, token, listener, peer).addCallback(sessions.append)
        d: Deferred[Session] = Deferred()
        self.pending.append((d, sessions[0]))
        return d

    def complete(self) -> None:
        d, session = self.pending.pop(0)
        d.callback(session)


class ConnectionBranchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpContext()

    def setUpContext(self, start: float = EPOCH_SECONDS, helloTimeout: str = "5s", room: int | None = None,
                     maxFrame: int = 1024, closeGrace: str = "2s", **changes: Any) -> None:
        self.clock = makeClock(start)
        self.config = makeConfig(
            listener={"max_frame": str(maxFrame)},
            liveness={"hello_timeout": helloTimeout, "ping_interval": f"{PING_INTERVAL:g}s",
                      "idle_timeout": "25s", "close_grace": closeGrace},
            timestamps={"max_age": f"{MAX_AGE:g}s", "max_future": f"{MAX_FUTURE:g}s"},
        )
        self.sink = MemorySink(room=room)
        self.ownership = SlowOwnership("gw")
        context = makeContext(self.config, self.clock, self.sink, self.ownership)
        self.context: ConnectionContext = dataclasses.replace(context, **changes) if changes else context
        self.metrics = self.context.metrics

    def connect(self) -> FakeController:
        return FakeController(self.context, self.config.listeners[0])

    def live(self, controller: str = "c1") -> FakeController:
        fake = self.connect()
        fake.send({"type": "hello", "controller": controller})
        self.ownership.complete()
        (welcome,) = fake.received()
        self.assertEqual(welcome["type"], "welcome")
        return fake

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def msg(self, fake: FakeController, n: int, **fields: Any) -> bytes:
        return fake.frame({"type": "msg", "id": f"m{n}", "body": n, **fields})

    # --- frames waiting for the inbox ---

    def test_waitingFramesCountedAndDropped(self) -> None:
        """
        Messages the inbox has no room for wait unread; as room comes back they are
        handled one by one, and those still waiting when the connection closes are
        counted as dropped.
        """
        self.setUpContext(room=2)
        fake = self.live()
        frames = [self.msg(fake, n) for n in range(5)]
        fake.sendRaw(b"".join(frames))
        self.assertEqual(self.sink.messageIds, ["m0", "m1"])
        payloads = [len(f) - 1 for f in frames]  # lines framing: less the newline
        self.assertEqual(fake.protocol.pendingBytes, sum(payloads[2:]))
        self.sink.succeed("m0")
        self.assertEqual(self.sink.messageIds, ["m0", "m1", "m2"])
        self.assertEqual(fake.protocol.pendingBytes, sum(payloads[3:]))
        fake.sendRaw(self.msg(fake, 5))  # Queued behind the others.
        self.assertEqual(fake.protocol.pendingBytes, sum(payloads[3:]) + len(self.msg(fake, 5)) - 1)
        fake.protocol.close("shutdown")
        self.assertEqual(self.value("ctrlgw_frames_dropped_total"), 3)
        self.assertEqual(fake.protocol.pendingBytes, 0)

    def test_droppedAfterSomeHandled(self) -> None:
        self.setUpContext(room=2)
        fake = self.live()
        fake.sendRaw(b"".join(self.msg(fake, n) for n in range(6)))
        self.sink.succeed("m0")  # m2 handled from the waiting frames: m3, m4, m5 wait
        self.assertEqual(self.sink.messageIds, ["m0", "m1", "m2"])
        fake.protocol.close("shutdown")
        self.assertEqual(self.value("ctrlgw_frames_dropped_total"), 3)

    def test_waitingFramesInOrder(self) -> None:
        self.setUpContext(room=2)
        fake = self.live()
        fake.sendRaw(b"".join(self.msg(fake, n) for n in range(3)))
        fake.sendRaw(self.msg(fake, 3))
        self.sink.succeed("m0")
        self.sink.succeed("m1")
        self.sink.succeed("m2")
        self.assertEqual(self.sink.messageIds, ["m0", "m1", "m2", "m3"])
        self.assertEqual(fake.protocol.pendingBytes, 0)

    # --- the connection and its transport ---

    def test_openByListener(self) -> None:
        name = self.config.listeners[0].name
        a = self.connect()
        b = self.connect()
        self.assertEqual(self.context.openByListener[name], 2)
        a.lose()
        self.assertEqual(self.context.openByListener[name], 1)
        b.lose()
        self.assertEqual(self.context.openByListener[name], 0)
        self.assertEqual(self.value("ctrlgw_connections", listener=name), 0)

    def test_streamingProducer(self) -> None:
        """
        The connection is the transport's streaming producer: the transport pauses it
        when its buffer fills, and resumes it when it drains.
        """
        fake = self.connect()
        self.assertIs(fake.transport.producer, fake.protocol)
        self.assertTrue(fake.transport.streaming)

    def test_noCloseGrace(self) -> None:
        """
        With close_grace 0 the socket is aborted at once; with a grace, only if the bye
        has not drained by then.
        """
        self.setUpContext(closeGrace="0s")
        fake = self.live()
        fake.protocol.close("shutdown")
        self.assertEqual(fake.transport.aborts, 1)
        self.setUpContext(closeGrace="500ms")
        fake = self.live()
        fake.protocol.close("shutdown")
        self.assertEqual(fake.transport.aborts, 0)
        self.assertTrue(fake.transport.disconnecting)
        self.clock.advance(0.5)
        self.assertEqual(fake.transport.aborts, 1)

    def test_resumeKeepsOtherPauses(self) -> None:
        """
        The transport resumes reading only once nothing holds it paused: not when the
        writes drain while the inbox is still full, and never once closed.
        """
        self.setUpContext(room=1)
        fake = self.live()
        fake.sendRaw(b"".join(self.msg(fake, n) for n in range(2)))  # the inbox is full
        self.assertEqual(fake.transport.producerState, "paused")
        fake.protocol.pauseProducing()
        fake.protocol.resumeProducing()
        self.assertEqual(fake.transport.producerState, "paused")
        fake.protocol.close("shutdown")
        self.sink.succeed("m0")
        self.assertEqual(fake.transport.producerState, "paused")

    def test_resumeAfterCloseStartsNothing(self) -> None:
        """
        A closed connection whose writes drain asks for no commands.
        """
        fake = self.live()
        started = len(self.context.settler.started)  # type: ignore[attr-defined]
        fake.protocol.pauseProducing()
        fake.protocol.resumeProducing()
        self.assertEqual(len(self.context.settler.started), started + 1)  # type: ignore[attr-defined]
        fake.protocol.pauseProducing()
        fake.protocol.close("shutdown")
        fake.protocol.resumeProducing()
        self.assertEqual(len(self.context.settler.started), started + 1)  # type: ignore[attr-defined]

    def test_closedGarbageCountsOne(self) -> None:
        """
        Bytes that do not even frame, after a close, count as one dropped frame.
        """
        fake = self.live()
        fake.protocol.close("shutdown")
        fake.sendRaw(b"x" * 2000)
        self.assertEqual(self.value("ctrlgw_frames_dropped_total"), 1)

    def test_bugAbortsConnection(self) -> None:
        fake = self.live()

        def broken(*args: object) -> None:
            raise ZeroDivisionError("bug")

        self.context.settler.settle = broken  # type: ignore[method-assign]
        fake.send({"type": "ack", "ref": "00000000-0000-4000-8000-000000000001"})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIs(fake.protocol.state, State.CLOSED)
        self.assertEqual(fake.protocol.closeReason, v1.BYE_PROTOCOL_ERROR)
        self.assertEqual(fake.transport.aborts, 1)

    # --- pings ---

    def assertFirstPingAt(self, fake: FakeController, at: float) -> None:
        """
        The first ping is written at C{at} (clock seconds), not a millisecond before.
        """
        self.clock.advance(at - 0.001 - self.clock.seconds())
        self.assertEqual(fake.received(), [])
        self.clock.advance(0.001)
        self.assertEqual([f["type"] for f in fake.received()], ["ping"])

    def test_firstPingPhaseClamped(self) -> None:
        """
        The first ping falls between a tenth and all of ping_interval after the welcome,
        whatever the phase drawn.
        """
        for phase, expected in ((1.7, PING_INTERVAL), (0.01, PING_INTERVAL / 10), (0.75, 7.5)):
            self.setUpContext(firstPingPhase=lambda phase=phase: phase)
            fake = self.live()
            self.assertFirstPingAt(fake, self.clock.seconds() + expected)

    def test_firstPingOnGrid(self) -> None:
        """
        With a ping grid, the first ping waits for the next grid point.
        """
        self.setUpContext(start=EPOCH_SECONDS + 0.3, pingGrid=0.5)
        fake = self.live()
        self.assertFirstPingAt(fake, EPOCH_SECONDS + 10.5)

    def skewBuckets(self) -> tuple[float, ...]:
        """
        The skew observations up to 0, 20 ms and 100 ms.
        """
        name = "ctrlgw_controller_clock_skew_seconds_bucket"
        return tuple(self.value(name, le=le) for le in ("0.0", "0.02", "0.1"))

    def test_pingRoundTripAndSkew(self) -> None:
        """
        A pong answering the last ping gives the round trip and the controller's clock
        skew (its pong was stamped half a round trip after our ping left).
        """
        fake = self.live()
        self.clock.advance(PING_INTERVAL)
        (ping,) = fake.received()
        self.clock.advance(0.2)
        # The controller's clock is 20 ms ahead of ours.  (A histogram with negative
        # buckets has no sum: the buckets around 20 ms tell.)
        fake.send({"type": "pong", "echo": ping["ts"], "ts": ping["ts"] + 100 + 20})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), 1)
        self.assertAlmostEqual(self.value("ctrlgw_ping_round_trip_seconds_sum"), 0.2, places=6)
        self.assertEqual(self.skewBuckets(), (0, 1, 1))
        # Only the last ping counts, once.
        fake.send({"type": "pong", "echo": ping["ts"], "ts": ping["ts"]})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), 1)

    def test_pongAtOnce(self) -> None:
        fake = self.live()
        self.clock.advance(PING_INTERVAL)
        (ping,) = fake.received()
        fake.send({"type": "pong", "echo": ping["ts"], "ts": ping["ts"]})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_sum"), 0.0)
        self.assertEqual(self.skewBuckets(), (1, 1, 1))

    # --- claims and timeouts ---

    def test_helloTimeoutUnderASecond(self) -> None:
        self.setUpContext(helloTimeout="300ms")
        fake = self.connect()
        self.clock.advance(0.299)
        self.assertEqual(fake.received(), [])
        self.clock.advance(0.001)
        (error, bye) = fake.received()
        self.assertEqual((error["code"], bye["type"]), (v1.HELLO_REQUIRED, "bye"))

    def test_claimCompletesAfterTimeout(self) -> None:
        """
        A claim that completes after its connection timed out is released with the
        reason the connection closed for.
        """
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        self.clock.advance(5.0)
        frames = fake.received()
        self.assertEqual(frames[-1], {**frames[-1], "type": "bye", "reason": v1.BYE_UNAVAILABLE})
        self.ownership.complete()
        ((session, reason),) = self.ownership.released
        self.assertEqual((session.controller, reason), ("c1", v1.BYE_UNAVAILABLE))

    def test_claimingIgnoresPong(self) -> None:
        """
        While the claim runs, a pong is ignored; a msg or an ack is answered with
        hello_required.
        """
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        fake.send({"type": "pong", "echo": 1, "ts": millis(self.clock)})
        self.assertEqual(fake.received(), [])
        fake.send({"type": "ack", "ref": "00000000-0000-4000-8000-000000000001"})
        (error,) = fake.received()
        self.assertEqual(error["code"], v1.HELLO_REQUIRED)
        self.assertIsNot(fake.protocol.state, State.CLOSED)

    # --- error texts ---

    def test_staleDetail(self) -> None:
        fake = self.live()
        ts = millis(self.clock) - int(MAX_AGE * 1000) - 500
        fake.send({"type": "msg", "id": "m1", "body": 1, "ts": ts})
        (error,) = fake.received()
        self.assertEqual(error["code"], v1.STALE_TIMESTAMP)
        self.assertTrue(error["detail"].startswith(f"ts is {int(MAX_AGE * 1000) + 500} ms old"), error)

    def test_futureDetail(self) -> None:
        fake = self.live()
        ts = millis(self.clock) + int(MAX_FUTURE * 1000) + 500
        fake.send({"type": "msg", "id": "m1", "body": 1, "ts": ts})
        (error,) = fake.received()
        self.assertEqual(error["code"], v1.FUTURE_TIMESTAMP)
        self.assertTrue(error["detail"].startswith(f"ts is {int(MAX_FUTURE * 1000) + 500} ms ahead"), error)

    def test_errorShedsDetailToFit(self) -> None:
        """
        An error whose ref and detail do not fit in one frame keeps its code and ref and
        drops the detail; if the ref alone does not fit either, it drops the ref too.
        """
        fake = self.live()
        for count, ref in ((150, "\x01" * 150), (160, None)):
            msgId = "\\u0001" * count  # 6 bytes each, in the frame and in the answer
            fake.sendPayload(b'{"type":"msg","ts":-1,"id":"%s","body":1}' % msgId.encode())
            (error,) = fake.received()
            self.assertEqual((error["code"], error.get("ref"), error["detail"]), (v1.BAD_MESSAGE, ref, ""))
        self.assertIsNot(fake.protocol.state, State.CLOSED)
        self.assertEqual(self.value("ctrlgw_frame_errors_total", code=v1.BAD_MESSAGE), 2)
