"""
Tests for L{ctrlgw.protocol.connection.ControllerProtocol}, driven by a L{task.Clock} over
a L{StringTransport}.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ctrlgw.config import ListenerConfig
from ctrlgw.interfaces import AuthFailed, Fenced, IOwnership, Session, Unavailable
from ctrlgw.ownership import LocalOwnership
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import State
from ctrlgw.protocol.session import TurnSlices
from ctrlgw.settler import RecordingSettler

from .helpers import FakeController, MemorySink, makeClock, makeConfig, makeContext, millis, pump

HELLO_TIMEOUT = 5.0
PING_INTERVAL = 10.0
IDLE_TIMEOUT = 25.0
CLOSE_GRACE = 2.0
MAX_AGE = 60.0
MAX_FUTURE = 5.0
MAX_FRAME = 1024
# A step small enough to stop just short of a deadline, and exact in binary floating point.
EPS = 2.0**-7


@implementer(IOwnership)
class PendingOwnership(LocalOwnership):
    """
    A L{LocalOwnership} whose claims draw their epoch at once but complete only when the
    test says so.
    """

    def __init__(self, instance: str) -> None:
        super().__init__(instance)
        self.claims: list[tuple[Deferred[Session], Session]] = []
        self.tokens: list[str | None] = []

    def claim(
        self, controller: str, token: str | None, listener: str, peer: str
    ) -> Deferred[Session]:
        sessions: list[Session] = []
        super().claim(controller, token, listener, peer).addCallback(sessions.append)
        self.tokens.append(token)
        d: Deferred[Session] = Deferred()
        self.claims.append((d, sessions[0]))
        return d

    def complete(self, index: int) -> Session:
        d, session = self.claims[index]
        d.callback(session)
        return session

    def fail(self, index: int, error: Exception) -> None:
        self.claims[index][0].errback(Failure(error))


class ConnectionTestCase(SynchronousTestCase):
    framing = "lines"

    def setUp(self) -> None:
        self.clock = makeClock()
        self.sink = MemorySink()
        self.settler = RecordingSettler()
        self.ownership = self.makeOwnership()
        self.config = makeConfig(
            listener={"framing": self.framing, "max_frame": str(MAX_FRAME)},
            liveness={
                "hello_timeout": f"{HELLO_TIMEOUT:g}s",
                "ping_interval": f"{PING_INTERVAL:g}s",
                "idle_timeout": f"{IDLE_TIMEOUT:g}s",
                "close_grace": f"{CLOSE_GRACE:g}s",
            },
            timestamps={"max_age": f"{MAX_AGE:g}s", "max_future": f"{MAX_FUTURE:g}s"},
        )
        (self.listener,) = self.config.listeners
        self.context = makeContext(self.config, self.clock, self.sink, self.ownership, self.settler)
        self.metrics = self.context.metrics

    def makeOwnership(self) -> LocalOwnership:
        return LocalOwnership("gw-test")

    def connect(self, listener: ListenerConfig | None = None) -> FakeController:
        return FakeController(self.context, listener or self.listener)

    def live(self, controller: str = "c1") -> tuple[FakeController, dict[str, Any]]:
        fake = self.connect()
        welcome = fake.hello(controller)
        return fake, welcome

    def advance(self, seconds: float) -> None:
        pump(self.clock, seconds)

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def assertFrames(self, fake: FakeController, *expected: dict[str, Any]) -> list[dict[str, Any]]:
        """
        The gateway wrote exactly frames that contain the C{expected} fields, in order.
        """
        frames = fake.received()
        self.assertEqual(len(frames), len(expected), f"received {frames!r}")
        self.assertEqual(
            [{k: f.get(k) for k in e} for f, e in zip(frames, expected, strict=True)],
            list(expected),
            f"received {frames!r}",
        )
        return frames

    def assertClosedWith(self, fake: FakeController, code: str | None, bye: str) -> None:
        """
        The gateway sent an error C{code} (unless L{None}), then bye C{bye}, and is closing.
        """
        expected = [{"type": "bye", "reason": bye}]
        if code is not None:
            expected.insert(0, {"type": "error", "code": code})
        self.assertFrames(fake, *expected)
        self.assertTrue(fake.transport.disconnecting)
        self.assertIs(fake.protocol.state, State.CLOSED)


class HelloTests(ConnectionTestCase):
    def test_welcome(self) -> None:
        self.advance(0.123)
        fake = self.connect()
        fake.send({"type": "hello", "controller": "plant-1:pump.7"})
        (welcome,) = self.assertFrames(fake, {"type": "welcome"})
        session = self.ownership.current["plant-1:pump.7"]
        self.assertEqual(
            welcome,
            {
                "type": "welcome",
                "ts": millis(self.clock),
                "session": session.session,
                "epoch": session.epoch,
                "ping_interval": self.config.liveness.ping_interval,
            },
        )
        self.assertEqual(session.listener, self.listener.name)
        self.assertEqual(session.peer, "192.0.2.10:%d" % fake.transport.getPeer().port)
        self.assertIs(fake.protocol.session, session)
        self.assertIs(self.context.registry.lookup("plant-1:pump.7"), fake.protocol)
        self.assertFalse(fake.transport.disconnecting)

    def test_epochIncreasesPerController(self) -> None:
        first, welcome1 = self.live("c1")
        first.lose()
        second, welcome2 = self.live("c1")
        other, welcome3 = self.live("c2")
        self.assertGreater(welcome2["epoch"], welcome1["epoch"])
        self.assertNotEqual(welcome2["session"], welcome1["session"])
        self.assertEqual(welcome2["epoch"], self.ownership.current["c1"].epoch)
        self.assertEqual(welcome3["epoch"], self.ownership.current["c2"].epoch)

    def test_tokenAndCrlf(self) -> None:
        """
        A hello with a token is welcomed; lines may end in CRLF.
        """
        fake = self.connect()
        fake.sendRaw(b'{"type":"hello","ts":%d,"controller":"c1","token":"t0k"}\r\n' % fake.now())
        self.assertFrames(fake, {"type": "welcome"})

    def test_firstFrameNotHello(self) -> None:
        for first in (
            {"type": "msg", "id": "m1", "body": 1},
            {"type": "ack", "ref": "x"},
            {"type": "pong", "echo": 1},
        ):
            fake = self.connect()
            fake.send(first)
            self.assertClosedWith(fake, v1.HELLO_REQUIRED, v1.BYE_PROTOCOL_ERROR)
            fake.lose()
        self.assertEqual(self.sink.submissions, [])
        self.assertEqual(self.ownership.current, {})
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="protocol_error"), 3)

    def test_invalidFirstFrame(self) -> None:
        fake = self.connect()
        fake.sendPayload(b"not json")
        self.assertClosedWith(fake, v1.BAD_JSON, v1.BYE_PROTOCOL_ERROR)

    def test_framesAfterFailedHelloDropped(self) -> None:
        """
        Frames that arrive with (or after) a refused first frame are not acted on.
        """
        fake = self.connect()
        fake.sendRaw(
            fake.frame({"type": "msg", "id": "m1"})
            + fake.frame({"type": "hello", "controller": "c1"})
        )
        self.assertClosedWith(fake, v1.HELLO_REQUIRED, v1.BYE_PROTOCOL_ERROR)
        fake.send({"type": "hello", "controller": "c1"})
        self.assertEqual(fake.received(), [])
        self.assertEqual(self.ownership.current, {})
        self.assertEqual(self.value("ctrlgw_frames_dropped_total"), 2)

    def test_helloTimeout(self) -> None:
        fake = self.connect()
        self.advance(HELLO_TIMEOUT - EPS)
        self.assertEqual(fake.received(), [])
        self.assertFalse(fake.transport.disconnecting)
        self.advance(EPS)
        self.assertClosedWith(fake, v1.HELLO_REQUIRED, v1.BYE_PROTOCOL_ERROR)

    def test_helloInTime(self) -> None:
        fake = self.connect()
        self.advance(HELLO_TIMEOUT - EPS)
        fake.hello("c1")
        self.advance(1)
        self.assertEqual(fake.received(), [])
        self.assertFalse(fake.transport.disconnecting)

    def test_badControllerId(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "no spaces"})
        self.assertClosedWith(fake, v1.BAD_CONTROLLER_ID, v1.BYE_PROTOCOL_ERROR)
        self.assertEqual(self.ownership.current, {})
        self.assertEqual(self.value("ctrlgw_frame_errors_total", code="bad_controller_id"), 1)

    def test_notAccepting(self) -> None:
        self.context.accepting = False
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        self.assertClosedWith(fake, v1.UNAVAILABLE, v1.BYE_UNAVAILABLE)
        self.assertEqual(self.ownership.current, {})
        self.assertIsNone(self.context.registry.lookup("c1"))

    def test_secondHelloOnLiveConnection(self) -> None:
        fake, _ = self.live("c1")
        fake.send({"type": "hello", "controller": "c2"})
        self.assertFrames(fake, {"type": "error", "code": v1.BAD_MESSAGE})
        self.assertFalse(fake.transport.disconnecting)
        self.assertIs(self.context.registry.lookup("c1"), fake.protocol)
        self.assertIsNone(self.context.registry.lookup("c2"))


class ClaimTests(ConnectionTestCase):
    """
    Admission that takes time or fails.
    """

    ownership: PendingOwnership

    def makeOwnership(self) -> PendingOwnership:
        return PendingOwnership("gw-test")

    def test_welcomeWhenClaimCompletes(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1", "token": "secret"})
        self.assertEqual(self.ownership.tokens, ["secret"])
        self.assertEqual(fake.received(), [])
        self.advance(1)
        session = self.ownership.complete(0)
        self.assertFrames(
            fake, {"type": "welcome", "session": session.session, "ts": millis(self.clock)}
        )

    def test_framesWhileClaiming(self) -> None:
        """
        A msg sent before the welcome is refused with its id and never stored.
        """
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        fake.send({"type": "msg", "id": "early", "body": 1})
        fake.send({"type": "ping"})
        self.assertFrames(
            fake,
            {"type": "error", "code": v1.HELLO_REQUIRED, "ref": "early"},
            {"type": "pong"},
        )
        self.ownership.complete(0)
        self.assertFrames(fake, {"type": "welcome"})
        self.assertEqual(self.sink.submissions, [])

    def test_timeoutWhileClaiming(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        self.advance(HELLO_TIMEOUT)
        self.assertClosedWith(fake, v1.UNAVAILABLE, v1.BYE_UNAVAILABLE)
        session = self.ownership.complete(0)
        self.assertEqual(fake.received(), [])
        self.assertIsNone(self.context.registry.lookup("c1"))
        self.assertIn(session, [s for s, _ in self.ownership.released])

    def test_lostWhileClaiming(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        fake.lose()
        session = self.ownership.complete(0)
        self.assertIsNone(self.context.registry.lookup("c1"))
        self.assertEqual(self.ownership.released, [(session, "peer_closed")])
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="peer_closed"), 1)

    def test_abandonedClaimSupersedesTheOlderConnection(self) -> None:
        """
        A second connection of a controller goes away while its claim is in flight; the
        claim commits all the same, so the first connection, now superseded in the
        database, is taken over rather than left live.
        """
        first = self.connect()
        first.send({"type": "hello", "controller": "c1"})
        self.ownership.complete(0)
        first.received()
        second = self.connect()
        second.send({"type": "hello", "controller": "c1"})
        second.lose()
        session = self.ownership.complete(1)
        self.assertClosedWith(first, None, v1.BYE_TAKEOVER)
        self.assertIsNone(self.context.registry.lookup("c1"))
        self.assertIn((session, "peer_closed"), self.ownership.released)
        self.assertEqual(self.value("ctrlgw_takeovers_total", scope="local"), 1)

    def test_authFailed(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1", "token": "wrong"})
        self.ownership.fail(0, AuthFailed("bad_token"))
        self.assertClosedWith(fake, v1.AUTH_FAILED, v1.BYE_PROTOCOL_ERROR)
        self.assertEqual(self.value("ctrlgw_auth_failures_total", reason="bad_token"), 1)

    def test_claimUnavailable(self) -> None:
        fake = self.connect()
        fake.send({"type": "hello", "controller": "c1"})
        self.ownership.fail(0, Unavailable("database away"))
        self.assertClosedWith(fake, v1.UNAVAILABLE, v1.BYE_UNAVAILABLE)

    def test_outOfOrderClaims(self) -> None:
        """
        When an older claim completes after a newer one, the older connection loses: it is
        taken over at once and the newer one stays registered.
        """
        older, newer = self.connect(), self.connect()
        older.send({"type": "hello", "controller": "c1"})
        newer.send({"type": "hello", "controller": "c1"})
        newSession = self.ownership.complete(1)
        self.assertFrames(newer, {"type": "welcome", "epoch": newSession.epoch})
        oldSession = self.ownership.complete(0)
        self.assertLess(oldSession.epoch, newSession.epoch)
        self.assertClosedWith(older, None, v1.BYE_TAKEOVER)
        self.assertIs(self.context.registry.lookup("c1"), newer.protocol)
        older.lose()
        self.assertIs(self.context.registry.lookup("c1"), newer.protocol)
        self.assertEqual(newer.received(), [])
        self.assertFalse(newer.transport.disconnecting)


class MessageTests(ConnectionTestCase):
    def test_ackOnlyWhenSafe(self) -> None:
        fake, _ = self.live()
        sentAt = fake.now()
        fake.send({"type": "msg", "id": "m1", "body": {"t": 21.5}})
        (submission,) = self.sink.submissions
        self.assertEqual(
            (submission.session, submission.messageId, submission.deviceTs, submission.body),
            (fake.protocol.session, "m1", sentAt, {"t": 21.5}),
        )
        self.assertEqual(fake.received(), [])
        self.advance(0.5)
        self.assertEqual(fake.received(), [])
        self.sink.succeed("m1")
        self.assertFrames(fake, {"type": "ack", "ref": "m1", "ts": millis(self.clock)})

    def test_acksInCompletionOrder(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        fake.send({"type": "msg", "id": "m2", "body": 2})
        self.assertEqual(self.sink.messageIds, ["m1", "m2"])
        self.sink.succeed("m2")
        self.assertFrames(fake, {"type": "ack", "ref": "m2"})
        self.sink.succeed("m1")
        self.assertFrames(fake, {"type": "ack", "ref": "m1"})

    def test_sinkUnavailable(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.sink.fail("m1", Unavailable("buffer full"))
        self.assertFrames(fake, {"type": "error", "code": v1.UNAVAILABLE, "ref": "m1"})
        self.assertFalse(fake.transport.disconnecting)
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.sink.succeed("m1")
        self.assertFrames(fake, {"type": "ack", "ref": "m1"})

    def test_sinkFailsUnexpectedly(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.sink.fail("m1", RuntimeError("boom"))
        self.assertFrames(fake, {"type": "error", "code": v1.UNAVAILABLE, "ref": "m1"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_sinkFenced(self) -> None:
        """
        A sink that finds the session superseded closes the connection as taken over.
        """
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.sink.fail("m1", Fenced())
        self.assertClosedWith(fake, None, v1.BYE_TAKEOVER)

    def test_noAckAfterClose(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        fake.send({"type": "msg", "id": "m2", "body": 1})
        fake.protocol.close(v1.BYE_SHUTDOWN)
        self.assertClosedWith(fake, None, v1.BYE_SHUTDOWN)
        self.sink.succeed("m1")
        self.sink.fail("m2", Unavailable())
        self.assertEqual(fake.received(), [])

    def test_noAckAfterPeerClosed(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        fake.lose(Failure(ConnectionLost()))
        self.sink.succeed("m1")
        self.assertEqual(fake.received(), [])

    def test_staleTimestamp(self) -> None:
        fake, _ = self.live()
        limit = int(MAX_AGE * 1000)
        fake.send({"type": "msg", "id": "old", "ts": fake.now() - limit - 1, "body": 1})
        self.assertFrames(fake, {"type": "error", "code": v1.STALE_TIMESTAMP, "ref": "old"})
        self.assertEqual(self.sink.submissions, [])
        self.assertEqual(self.value("ctrlgw_timestamp_rejects_total", reason="stale"), 1)
        self.assertEqual(self.value("ctrlgw_timestamp_rejects_total", reason="future"), 0)
        self.assertFalse(fake.transport.disconnecting)
        fake.send({"type": "msg", "id": "oldest-ok", "ts": fake.now() - limit, "body": 1})
        self.assertEqual(self.sink.messageIds, ["oldest-ok"])

    def test_futureTimestamp(self) -> None:
        fake, _ = self.live()
        limit = int(MAX_FUTURE * 1000)
        fake.send({"type": "msg", "id": "ahead", "ts": fake.now() + limit + 1, "body": 1})
        self.assertFrames(fake, {"type": "error", "code": v1.FUTURE_TIMESTAMP, "ref": "ahead"})
        self.assertEqual(self.sink.submissions, [])
        self.assertEqual(self.value("ctrlgw_timestamp_rejects_total", reason="future"), 1)
        self.assertEqual(self.value("ctrlgw_timestamp_rejects_total", reason="stale"), 0)
        fake.send({"type": "msg", "id": "latest-ok", "ts": fake.now() + limit, "body": 1})
        self.assertEqual(self.sink.messageIds, ["latest-ok"])

    def test_timestampsAgainstCurrentClock(self) -> None:
        """
        Age is judged against the clock when the msg arrives, not when the session began.
        """
        fake, _ = self.live()
        sentAt = fake.now()
        for _ in range(int(MAX_AGE / (PING_INTERVAL / 2)) + 1):
            self.advance(PING_INTERVAL / 2)
            fake.send({"type": "ping"})
        fake.received()
        fake.send({"type": "msg", "id": "m", "ts": sentAt, "body": 1})
        self.assertFrames(fake, {"type": "error", "code": v1.STALE_TIMESTAMP, "ref": "m"})

    def test_unknownTypeWhileLive(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "telemetry", "body": 1})
        self.assertFrames(fake, {"type": "error", "code": v1.UNKNOWN_TYPE, "ref": None})
        self.assertFalse(fake.transport.disconnecting)
        self.assertIs(fake.protocol.state, State.LIVE)
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.assertEqual(self.sink.messageIds, ["m1"])
        self.assertEqual(self.value("ctrlgw_frame_errors_total", code="unknown_type"), 1)

    def test_invalidFramesWhileLive(self) -> None:
        fake, _ = self.live()
        fake.sendPayload(b"{oops")
        fake.send({"type": "msg", "id": "m1", "ts": "yesterday"})
        fake.send({"type": "ack"})
        self.assertFrames(
            fake,
            {"type": "error", "code": v1.BAD_JSON, "ref": None},
            {"type": "error", "code": v1.BAD_MESSAGE, "ref": "m1"},
            {"type": "error", "code": v1.BAD_MESSAGE, "ref": None},
        )
        self.assertFalse(fake.transport.disconnecting)
        self.assertEqual(self.sink.submissions, [])
        self.assertEqual(self.settler.answers, [])

    def test_loneSurrogateId(self) -> None:
        """
        A msg id with a lone surrogate escape cannot be stored: it is refused with
        bad_message, never reaches the sink, and the connection goes on.
        """
        fake, _ = self.live()
        fake.sendPayload(b'{"type":"msg","ts":%d,"id":"m\\udc00","body":1}' % fake.now())
        self.assertFrames(fake, {"type": "error", "code": v1.BAD_MESSAGE, "ref": None})
        self.assertEqual(self.sink.messageIds, [])
        self.assertFalse(fake.transport.disconnecting)

    def test_deeplyNestedBody(self) -> None:
        """
        A frame nested too deep to parse is answered with bad_json; the connection goes on.
        """
        config = makeConfig(listener={"framing": self.framing, "max_frame": "65536"})
        self.context = makeContext(config, self.clock, self.sink, self.ownership, self.settler)
        fake = FakeController(self.context, config.listeners[0])
        fake.hello("c1")
        depth = 30_000
        nested = b"[" * depth + b"]" * depth
        fake.sendPayload(b'{"type":"msg","ts":%d,"id":"m","body":%s}' % (fake.now(), nested))
        self.assertFrames(fake, {"type": "error", "code": v1.BAD_JSON})
        self.assertFalse(fake.transport.disconnecting)
        shallow = b"[" * 100 + b"]" * 100
        fake.sendPayload(b'{"type":"msg","ts":%d,"id":"ok","body":%s}' % (fake.now(), shallow))
        self.assertEqual(self.sink.messageIds, ["ok"])

    def test_settler(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "ack", "ref": "cmd-1"})
        fake.send({"type": "nack", "ref": "cmd-2", "reason": "busy"})
        fake.send({"type": "nack", "ref": "cmd-3"})
        session = fake.protocol.session
        self.assertEqual(
            self.settler.answers,
            [
                (session, "cmd-1", True, ""),
                (session, "cmd-2", False, "busy"),
                (session, "cmd-3", False, ""),
            ],
        )
        self.assertEqual(fake.received(), [])


class PingTests(ConnectionTestCase):
    def test_pong(self) -> None:
        fake, _ = self.live()
        self.advance(0.25)
        fake.send({"type": "ping", "ts": 123456})
        self.assertFrames(fake, {"type": "pong", "echo": 123456, "ts": millis(self.clock)})

    def test_gatewayPings(self) -> None:
        fake, _ = self.live()
        self.advance(PING_INTERVAL - EPS)
        self.assertEqual(fake.received(), [])
        self.advance(EPS)
        (ping,) = self.assertFrames(fake, {"type": "ping"})
        self.assertEqual(ping["ts"], millis(self.clock))
        count = self.value("ctrlgw_ping_round_trip_seconds_count")
        self.advance(0.25)
        fake.send({"type": "pong", "echo": ping["ts"]})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), count + 1)
        self.assertAlmostEqual(self.value("ctrlgw_ping_round_trip_seconds_sum"), 0.25, places=3)
        self.assertEqual(self.value("ctrlgw_controller_clock_skew_seconds_count"), 1)
        self.advance(PING_INTERVAL - 0.25)
        (second,) = self.assertFrames(fake, {"type": "ping"})
        self.assertEqual(second["ts"], ping["ts"] + int(PING_INTERVAL * 1000))

    def test_pongMustEchoLastPing(self) -> None:
        fake, _ = self.live()
        self.advance(PING_INTERVAL)
        (ping,) = self.assertFrames(fake, {"type": "ping"})
        fake.send({"type": "pong", "echo": ping["ts"] - 1})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), 0)
        fake.send({"type": "pong", "echo": ping["ts"]})
        fake.send({"type": "pong", "echo": ping["ts"]})
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), 1)

    def test_firstPingPhase(self) -> None:
        """
        The first ping after the welcome comes at the context's phase of the interval
        (a fleet that reconnected at once is not pinged at once), every later one a full
        interval after the one before; a phase outside [0.1, 1] is clamped.
        """
        self.context.firstPingPhase = lambda: 0.6
        fake, _ = self.live()
        self.advance(PING_INTERVAL * 0.6 - EPS)
        self.assertEqual(fake.received(), [])
        self.advance(EPS)
        (first,) = self.assertFrames(fake, {"type": "ping"})
        fake.send({"type": "pong", "echo": first["ts"]})
        self.advance(PING_INTERVAL - EPS)
        self.assertEqual(fake.received(), [])
        self.advance(EPS)
        self.assertFrames(fake, {"type": "ping"})
        self.context.firstPingPhase = lambda: 0.01
        other, _ = self.live("c2")
        self.advance(PING_INTERVAL * 0.1 - EPS)
        self.assertEqual([f for f in other.received() if f["type"] == "ping"], [])
        self.advance(EPS)
        self.assertEqual(len([f for f in other.received() if f["type"] == "ping"]), 1)

    def test_pingsOnTheGrid(self) -> None:
        """
        With a ping grid, pings fall on its slots (rounded up), one interval apart, with
        no drift even when the timer fires late.
        """
        self.context.pingGrid = 1.0
        self.advance(0.3)  # the welcome comes off the grid
        fake, _ = self.live()
        welcomed = self.clock.seconds()
        firstDue = math.ceil(welcomed + PING_INTERVAL)
        self.advance(firstDue - welcomed - EPS)
        self.assertEqual(fake.received(), [])
        self.advance(EPS + 0.05)  # fired a little late
        (first,) = self.assertFrames(fake, {"type": "ping"})
        fake.send({"type": "pong", "echo": first["ts"]})
        self.advance(firstDue + PING_INTERVAL - self.clock.seconds() - EPS)
        self.assertEqual(fake.received(), [])
        self.advance(EPS)
        self.assertFrames(fake, {"type": "ping"})

    def test_pingsOfASlotGoOutASlicePerTurn(self) -> None:
        """
        Pings falling due together are written a slice per reactor turn, each only if its
        connection is still live by then.
        """
        turns = TurnClock()
        self.context.pings = TurnSlices(turns, 2)
        fakes = [self.live(f"c{i}")[0] for i in range(5)]
        self.advance(PING_INTERVAL)
        self.assertEqual([fake.received() for fake in fakes], [[]] * 5, "none yet")
        fakes[3].protocol.close(v1.BYE_SHUTDOWN)
        fakes[3].received()
        turns.runTurn()
        self.assertEqual([len(fake.received()) for fake in fakes], [1, 1, 0, 0, 0])
        turns.runTurn()
        turns.runTurn()
        self.assertEqual([len(fake.received()) for fake in fakes], [0, 0, 1, 0, 1])
        self.assertEqual(turns.pending, [])

    def test_pingsKeepComing(self) -> None:
        """
        A controller that answers every ping is pinged every interval and never idles out.
        """
        fake, _ = self.live()
        for _ in range(10):
            self.advance(PING_INTERVAL)
            (ping,) = self.assertFrames(fake, {"type": "ping", "ts": millis(self.clock)})
            fake.send({"type": "pong", "echo": ping["ts"]})
        self.assertFalse(fake.transport.disconnecting)
        self.assertEqual(self.value("ctrlgw_ping_round_trip_seconds_count"), 10)


class TurnClock:
    """
    A clock whose calls run only when the test runs the next turn.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[float, Any]] = []

    def seconds(self) -> float:
        return 0.0

    def callLater(self, delay: float, f: Any, *args: Any) -> object:
        self.pending.append((delay, lambda: f(*args)))
        return object()

    def runTurn(self) -> None:
        turn, self.pending = self.pending, []
        for _, call in turn:
            call()


class TurnSlicesTests(SynchronousTestCase):
    def test_aSlicePerTurn(self) -> None:
        """
        Jobs run C{perTurn} at a time, in the order added, one turn after another until
        none is left; a job added while idle schedules the next turn.
        """
        clock = TurnClock()
        slices = TurnSlices(clock, 25)  # type: ignore[arg-type]
        ran: list[int] = []
        for i in range(60):
            slices.add(lambda i=i: ran.append(i))
        self.assertEqual((len(clock.pending), ran), (1, []))
        self.assertEqual(clock.pending[0][0], 0)
        clock.runTurn()
        self.assertEqual((ran, len(slices)), (list(range(25)), 35))
        clock.runTurn()
        clock.runTurn()
        self.assertEqual(ran, list(range(60)))
        self.assertEqual(clock.pending, [])
        slices.add(lambda: ran.append(60))
        clock.runTurn()
        self.assertEqual(ran[-1], 60)

    def test_aFailingJobSparesTheRest(self) -> None:
        clock = TurnClock()
        slices = TurnSlices(clock, 25)  # type: ignore[arg-type]
        ran: list[str] = []

        def fails() -> None:
            raise RuntimeError("broken")

        slices.add(fails)
        slices.add(lambda: ran.append("after"))
        clock.runTurn()
        self.assertEqual(ran, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class IdleTests(ConnectionTestCase):
    def test_idleTimeout(self) -> None:
        fake, _ = self.live()
        self.advance(IDLE_TIMEOUT - EPS)
        self.assertEqual([f["type"] for f in fake.received()], ["ping", "ping"])
        self.assertFalse(fake.transport.disconnecting)
        self.advance(EPS)
        self.assertClosedWith(fake, None, v1.BYE_IDLE_TIMEOUT)
        self.assertEqual(fake.transport.aborts, 0)
        self.assertIsNone(self.context.registry.lookup("c1"))
        self.advance(CLOSE_GRACE - EPS)
        self.assertEqual(fake.transport.aborts, 0)
        self.advance(EPS)
        self.assertEqual(fake.transport.aborts, 1)
        fake.lose()
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="idle_timeout"), 1)
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="peer_closed"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedWithinGrace(self) -> None:
        fake, _ = self.live()
        self.advance(IDLE_TIMEOUT)
        self.assertTrue(fake.transport.disconnecting)
        fake.lose()
        self.advance(CLOSE_GRACE * 2)
        self.assertEqual(fake.transport.aborts, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noGrace(self) -> None:
        config = makeConfig(
            liveness={"close_grace": "0", "ping_interval": "10s", "idle_timeout": "25s"}
        )
        self.context = makeContext(config, self.clock, self.sink, self.ownership, self.settler)
        fake = FakeController(self.context, config.listeners[0])
        fake.hello("c1")
        self.advance(25)
        self.assertEqual([f["type"] for f in fake.received()], ["ping", "ping", "bye"])
        self.assertTrue(fake.transport.disconnecting)
        self.assertEqual(fake.transport.aborts, 1)

    def test_activityPostponesIdle(self) -> None:
        fake, _ = self.live()
        self.advance(IDLE_TIMEOUT - 5)
        fake.send({"type": "ack", "ref": "x"})
        self.advance(IDLE_TIMEOUT - EPS)
        self.assertNotIn("bye", [f["type"] for f in fake.received()])
        self.assertFalse(fake.transport.disconnecting)
        self.advance(EPS)
        self.assertEqual(
            fake.received()[-1], {"type": "bye", "ts": millis(self.clock), "reason": "idle_timeout"}
        )

    def test_partialFrameIsNotActivity(self) -> None:
        fake, _ = self.live()
        self.advance(IDLE_TIMEOUT - 5)
        fake.sendRaw(b'{"type":"pi')
        self.advance(5)
        self.assertEqual(fake.received()[-1]["type"], "bye")

    def test_idleBeforeAck(self) -> None:
        """
        A pending ack does not keep a silent connection open, and is not written after.
        """
        fake, _ = self.live()
        fake.send({"type": "msg", "id": "m1", "body": 1})
        self.advance(IDLE_TIMEOUT)
        fake.received()
        self.sink.succeed("m1")
        self.assertEqual(fake.received(), [])


class TakeoverTests(ConnectionTestCase):
    def test_localTakeover(self) -> None:
        first, welcome1 = self.live("c1")
        first.send({"type": "msg", "id": "pending", "body": 1})
        second, welcome2 = self.live("c1")
        self.assertGreater(welcome2["epoch"], welcome1["epoch"])
        self.assertClosedWith(first, None, v1.BYE_TAKEOVER)
        self.assertEqual(self.value("ctrlgw_takeovers_total", scope="local"), 1)
        self.assertIs(self.context.registry.lookup("c1"), second.protocol)

        dropped = self.value("ctrlgw_frames_dropped_total")
        first.sendRaw(
            first.frame({"type": "msg", "id": "late1", "body": 1})
            + first.frame({"type": "msg", "id": "late2", "body": 1})
        )
        first.send({"type": "ack", "ref": "cmd"})
        self.assertEqual(self.value("ctrlgw_frames_dropped_total"), dropped + 3)
        self.assertEqual(self.sink.messageIds, ["pending"])
        self.assertEqual(self.settler.answers, [])
        self.sink.succeed("pending")
        self.assertEqual(first.received(), [])

        first.lose()
        self.assertIs(self.context.registry.lookup("c1"), second.protocol)
        self.assertEqual(self.ownership.current["c1"].epoch, welcome2["epoch"])
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="takeover"), 1)

        second.send({"type": "msg", "id": "m2", "body": 2})
        self.sink.succeed("m2")
        self.assertFrames(second, {"type": "ack", "ref": "m2"})
        self.assertFalse(second.transport.disconnecting)

    def test_takeoverAcrossListeners(self) -> None:
        config = makeConfig(listener={"framing": "int32"}, listenerName="alt")
        (alt,) = config.listeners
        first, _ = self.live("c1")
        second = self.connect(alt)
        second.hello("c1")
        self.assertClosedWith(first, None, v1.BYE_TAKEOVER)
        self.assertIs(self.context.registry.lookup("c1"), second.protocol)

    def test_takeoverReleasesOldSession(self) -> None:
        first, welcome1 = self.live("c1")
        self.live("c1")
        releases = [(s.epoch, reason) for s, reason in self.ownership.released]
        self.assertEqual(releases, [(welcome1["epoch"], "takeover")])

    def test_otherControllerUnaffected(self) -> None:
        a, _ = self.live("a")
        self.live("b")
        self.live("b")
        self.assertEqual(a.received(), [])
        self.assertIs(self.context.registry.lookup("a"), a.protocol)


class DeliverTests(ConnectionTestCase):
    def test_deliverStampsWriteTime(self) -> None:
        fake, _ = self.live()
        createdAt = millis(self.clock)
        expires = createdAt + 60_000
        self.advance(7.5)
        self.assertTrue(fake.protocol.deliver("cmd-1", {"set": 3}, expires))
        (cmd,) = self.assertFrames(fake, {"type": "cmd"})
        self.assertEqual(
            cmd,
            {
                "type": "cmd",
                "ts": millis(self.clock),
                "id": "cmd-1",
                "expires": expires,
                "body": {"set": 3},
            },
        )
        self.assertNotEqual(cmd["ts"], createdAt)

    def test_expiredNotWritten(self) -> None:
        fake, _ = self.live()
        expires = millis(self.clock) + 1000
        self.advance(1)
        self.assertFalse(fake.protocol.deliver("cmd-1", {}, expires))
        self.advance(1)
        self.assertFalse(fake.protocol.deliver("cmd-2", {}, expires))
        self.assertEqual(fake.received(), [])
        self.assertEqual(self.value("ctrlgw_commands_expired_at_write_total"), 2)
        self.assertTrue(fake.protocol.deliver("cmd-3", {}, millis(self.clock) + 1))
        self.assertFrames(fake, {"type": "cmd", "id": "cmd-3"})

    def test_notLive(self) -> None:
        fake = self.connect()
        far = millis(self.clock) + 60_000
        self.assertFalse(fake.protocol.deliver("cmd-1", {}, far))
        fake.hello("c1")
        fake.protocol.close(v1.BYE_SHUTDOWN)
        fake.received()
        self.assertFalse(fake.protocol.deliver("cmd-2", {}, far))
        self.assertEqual(fake.received(), [])
        self.assertEqual(self.value("ctrlgw_commands_expired_at_write_total"), 0)


class FramingErrorTests(ConnectionTestCase):
    def test_oversizeFrame(self) -> None:
        fake, _ = self.live()
        fake.sendRaw(b"x" * (MAX_FRAME * 4))
        self.assertClosedWith(fake, v1.FRAME_TOO_LARGE, v1.BYE_PROTOCOL_ERROR)
        self.assertEqual(self.value("ctrlgw_frame_errors_total", code="frame_too_large"), 1)
        self.assertIsNone(self.context.registry.lookup("c1"))
        fake.send({"type": "msg", "id": "m", "body": 1})
        self.assertEqual(self.sink.submissions, [])
        fake.lose()
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="protocol_error"), 1)

    def test_oversizeBeforeHello(self) -> None:
        fake = self.connect()
        fake.sendRaw(b"{" * (MAX_FRAME * 2) + b"\n")
        self.assertClosedWith(fake, v1.FRAME_TOO_LARGE, v1.BYE_PROTOCOL_ERROR)


class Int32Tests(MessageTests):
    """
    The message tests again, over the int32 framing.
    """

    framing = "int32"

    def test_oversizeAnnounced(self) -> None:
        fake, _ = self.live()
        fake.sendRaw(b"\x00\x01\x00\x00")
        self.assertClosedWith(fake, v1.FRAME_TOO_LARGE, v1.BYE_PROTOCOL_ERROR)


class NetstringTests(MessageTests):
    """
    The message tests again, over the netstring framing.
    """

    framing = "netstring"

    def test_badFrame(self) -> None:
        fake, _ = self.live()
        fake.sendRaw(b"2:{}")
        fake.sendRaw(b"x")
        self.assertClosedWith(fake, "bad_frame", v1.BYE_PROTOCOL_ERROR)


class MetricsTests(ConnectionTestCase):
    def connections(self, listener: str) -> float:
        """
        The open-connections gauge of C{listener}.
        """
        (family,) = self.metrics.connections.collect()
        return self.value(family.name, listener=listener)

    def test_connectionsPerListener(self) -> None:
        (alt,) = makeConfig(listener={"framing": "netstring"}, listenerName="alt").listeners
        main1, main2, alt1 = self.connect(), self.connect(), self.connect(alt)
        self.assertEqual(self.connections("main"), 2)
        self.assertEqual(self.connections("alt"), 1)
        main1.lose()
        self.assertEqual(self.connections("main"), 1)
        self.assertEqual(self.connections("alt"), 1)
        alt1.lose()
        main2.lose()
        self.assertEqual(self.connections("main"), 0)
        self.assertEqual(self.connections("alt"), 0)
        self.assertEqual(self.value("ctrlgw_connections_total", listener="main"), 2)
        self.assertEqual(self.value("ctrlgw_connections_total", listener="alt"), 1)
        self.assertEqual(self.context.connections, set())

    def test_openConnectionsTracked(self) -> None:
        a, b = self.connect(), self.connect()
        self.assertEqual(self.context.connections, {a.protocol, b.protocol})
        a.lose()
        self.assertEqual(self.context.connections, {b.protocol})

    def test_disconnectReasons(self) -> None:
        peer, _ = self.live("a")
        peer.lose()
        shut, _ = self.live("b")
        shut.protocol.close(v1.BYE_SHUTDOWN)
        shut.lose()
        bad = self.connect()
        bad.sendPayload(b"[]")
        bad.lose()
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="peer_closed"), 1)
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="shutdown"), 1)
        self.assertEqual(self.value("ctrlgw_disconnects_total", reason="protocol_error"), 1)

    def test_peerClosedReleases(self) -> None:
        fake, welcome = self.live("c1")
        fake.lose()
        self.assertIsNone(self.context.registry.lookup("c1"))
        self.assertEqual(
            [(s.session, reason) for s, reason in self.ownership.released],
            [(welcome["session"], "peer_closed")],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_framesCounted(self) -> None:
        fake, _ = self.live()
        fake.send({"type": "ping"})
        fake.send({"type": "msg", "id": "m", "body": None})
        self.sink.succeed("m")
        for kind in ("hello", "ping", "msg"):
            self.assertEqual(self.value("ctrlgw_frames_in_total", type=kind), 1, kind)
        for kind in ("welcome", "pong", "ack"):
            self.assertEqual(self.value("ctrlgw_frames_out_total", type=kind), 1, kind)


class FlowControlTests(ConnectionTestCase):
    """
    Backpressure both ways: a controller whose messages are not yet safe, and a controller
    that does not read what we write.
    """

    def setUp(self) -> None:
        super().setUp()
        self.context.maxUnacked = 4

    def sendMsgs(self, fake: FakeController, *ids: str) -> None:
        for messageId in ids:
            fake.send({"type": "msg", "id": messageId, "ts": fake.now(), "body": None})

    def test_tooManyUnackedPausesReading(self) -> None:
        """
        With maxUnacked messages waiting for their commit, the connection stops reading
        that controller; it reads again once half of them are safe.
        """
        fake, _ = self.live()
        self.sendMsgs(fake, "m1", "m2", "m3")
        self.assertEqual(fake.transport.producerState, "producing")
        self.sendMsgs(fake, "m4")
        self.assertEqual(fake.transport.producerState, "paused")
        self.sink.succeed("m1")
        self.assertEqual(fake.transport.producerState, "paused")
        self.sink.succeed("m2")
        self.assertEqual(fake.transport.producerState, "producing")
        self.assertFrames(fake, {"type": "ack", "ref": "m1"}, {"type": "ack", "ref": "m2"})

    def test_ourOwnPauseIsNotIdleness(self) -> None:
        """
        While reading is paused because the controller's messages are not safe yet, the
        idle timeout does not cut it off: the silence is ours.
        """
        fake, _ = self.live()
        self.sendMsgs(fake, "m1", "m2", "m3", "m4")
        self.advance(IDLE_TIMEOUT * 3)
        self.assertIs(fake.protocol.state, State.LIVE)
        for messageId in ("m1", "m2", "m3", "m4"):
            self.sink.succeed(messageId)
        fake.received()
        self.advance(IDLE_TIMEOUT + PING_INTERVAL)
        self.assertIs(fake.protocol.state, State.CLOSED)
        self.assertEqual(fake.protocol.closeReason, v1.BYE_IDLE_TIMEOUT)

    def test_slowReaderHoldsCommands(self) -> None:
        """
        When the transport's buffer is full (the controller does not read), reading stops
        and no command is written; when it drains, the outbox is told to try again.
        """
        fake, _ = self.live()
        far = millis(self.clock) + 60_000
        fake.protocol.pauseProducing()
        self.assertEqual(fake.transport.producerState, "paused")
        self.assertFalse(fake.protocol.deliver("cmd-1", {}, far))
        self.assertEqual(fake.received(), [])
        started = len(self.settler.started)
        fake.protocol.resumeProducing()
        self.assertEqual(fake.transport.producerState, "producing")
        self.assertEqual(len(self.settler.started), started + 1)
        self.assertTrue(fake.protocol.deliver("cmd-1", {}, far))

    def test_bothPausesMustLift(self) -> None:
        """
        Reading resumes only when neither reason to pause remains.
        """
        fake, _ = self.live()
        fake.protocol.pauseProducing()
        self.sendMsgs(fake, "m1", "m2", "m3", "m4")
        fake.protocol.resumeProducing()
        self.assertEqual(fake.transport.producerState, "paused")
        for messageId in ("m1", "m2"):
            self.sink.succeed(messageId)
        self.assertEqual(fake.transport.producerState, "producing")

    def test_fullInboxIsBackpressureNotRefusal(self) -> None:
        """
        When the inbox has no room (shared by every connection), the messages read but
        not yet handled wait, the connection is not read, nothing is refused; once the
        inbox is half empty the waiting messages go in and reading resumes.
        """
        self.sink.room = 2
        self.context.maxUnacked = 100
        fake, _ = self.live()
        self.sendMsgs(fake, "m1", "m2", "m3", "m4", "m5")
        self.assertEqual(self.sink.messageIds, ["m1", "m2"])
        self.assertEqual(fake.transport.producerState, "paused")
        self.assertEqual([f for f in fake.received() if f["type"] == "error"], [])
        # Room again (half of it free): one more goes in, then the inbox is full again.
        self.sink.succeed("m1")
        self.assertEqual(self.sink.messageIds, ["m1", "m2", "m3"])
        self.assertEqual(fake.transport.producerState, "paused")
        self.sink.succeed("m2")
        self.assertEqual(self.sink.messageIds, ["m1", "m2", "m3", "m4"])
        self.sink.succeed("m3")
        self.assertEqual(self.sink.messageIds, ["m1", "m2", "m3", "m4", "m5"])
        self.assertEqual(fake.transport.producerState, "producing")
        self.sink.succeed("m4")
        self.sink.succeed("m5")
        self.assertEqual(
            [f["ref"] for f in fake.received() if f["type"] == "ack"], ["m1", "m2", "m3", "m4", "m5"]
        )
        self.assertEqual([f for f in fake.received() if f["type"] == "error"], [])
        self.assertEqual(self.value("ctrlgw_inbox_backpressure_total"), 3)

    def test_fullInboxPauseIsNotIdleness(self) -> None:
        """
        Not read because the inbox is full: that silence is ours, so the idle timeout
        does not cut the controller off (what waited too long is refused as stale when
        it is handled, as any message would be).
        """
        self.sink.room = 1
        fake, _ = self.live()
        self.sendMsgs(fake, "m1", "m2")
        self.advance(IDLE_TIMEOUT * 3)
        self.assertIs(fake.protocol.state, State.LIVE)
        self.sink.succeed("m1")
        self.assertEqual(fake.transport.producerState, "producing")

    def test_closeUnregistersProducer(self) -> None:
        """
        Closing unregisters the connection as producer (or loseConnection would wait for
        ever).
        """
        fake, _ = self.live()
        self.assertIs(fake.transport.producer, fake.protocol)
        fake.protocol.close(v1.BYE_SHUTDOWN)
        self.assertIsNone(fake.transport.producer)
