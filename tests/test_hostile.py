"""
The hostile-input part of the failure suite: what a peer that is broken or malicious can
send, and what an application can queue, must never crash the gateway, grow its memory
past fixed bounds, or delay anyone else.

Properties (hypothesis, over fakes) cover every framing and protocol v1; the socket cases
run an in-process gateway on loopback against the real reactor and PostgreSQL.  Each socket
case prints what it measured (C{FIGURES hostile ...} lines on standard output).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import termios
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.framing import FramingError, findFraming
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import ControllerProtocol, State
from ctrlgw.protocol.factory import ControllerFactory, RefusedConnection
from ctrlgw.protocol.messages import MAX_TS
from tests.gateways import (
    LineController,
    connectController,
    listenerPort,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import FakeController, MemorySink, makeClock, makeConfig, makeContext
from tests.pg import PostgresTestCase

FRAMINGS = ("lines", "int32", "netstring")
# The most a framing may hold between reads beyond max_frame (docs/framing.md): netstring's
# digits of max_frame plus colon and comma, with room to spare.
HEADER_SLACK = 16
# Every frame type the gateway writes (docs/protocol.md, "Gateway to controller").
GATEWAY_TYPES = {"welcome", "ack", "cmd", "ping", "pong", "error", "bye"}
HEX_UUID = "5a13b9e4-b6a4-4a9b-9742-bfe28134835d"

HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    # Each framing's class runs the same mixin method: a different executor by design.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.differing_executors],
)


def documentedErrorCodes() -> set[str]:
    """
    The codes of the error-code table in docs/protocol.md.
    """
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    table = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))


DOCUMENTED_CODES = documentedErrorCodes()


def report(scenario: str, **figures: object) -> None:
    """
    Print a measured figure, one line per scenario, for the reliability table.
    """
    shown = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in figures.items())
    print(f"FIGURES hostile {scenario}: {shown}")


# --- framings ---

chunks = st.lists(st.binary(max_size=80), max_size=30)


class FramingHostileMixin:
    """
    Any bytes, in any chunks, into one framing: only L{FramingError}s come out, the
    buffer stays within max_frame plus its header, and a failed parser stays failed.
    """

    framing: str
    assertEqual: Callable[..., None]
    assertLessEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertRaises: Callable[..., Any]

    def make(self, maxFrame: int) -> Any:
        return findFraming(self.framing).configure(maxFrame, {})()

    @HYPOTHESIS
    @given(maxFrame=st.integers(1, 64), data=chunks)
    @example(maxFrame=1, data=[b"\xff" * 80])
    @example(maxFrame=9, data=[b"99999999999:"])
    def test_randomBytes(self, maxFrame: int, data: list[bytes]) -> None:
        framing = self.make(maxFrame)
        failed: str | None = None
        for chunk in data:
            if failed is not None:
                with self.assertRaises(FramingError) as e:
                    framing.feed(chunk)
                self.assertEqual(e.exception.code, failed)
                continue
            try:
                frames = framing.feed(chunk)
            except FramingError as e:
                self.assertIn(e.code, {v1.BAD_FRAME, v1.FRAME_TOO_LARGE})
                self.assertIn(e.code, DOCUMENTED_CODES)
                failed = e.code
                continue
            for frame in frames:
                self.assertLessEqual(len(frame), maxFrame)
            self.assertLessEqual(framing.buffered, maxFrame + HEADER_SLACK)

    @HYPOTHESIS
    @given(
        payloads=st.lists(st.binary(min_size=1, max_size=40).filter(
            lambda p: b"\n" not in p and not p.endswith(b"\r")), min_size=1, max_size=8),
        data=st.data(),
    )
    def test_truncated(self, payloads: list[bytes], data: st.DataObject) -> None:
        """
        A stream cut anywhere yields exactly the frames completed before the cut, never
        an error and never a piece of a frame; the rest of the stream completes it.
        """
        framing = self.make(64)
        encoder = self.make(64)
        wire = [encoder.frame(p) for p in payloads]
        stream = b"".join(wire)
        cut = data.draw(st.integers(0, len(stream)))
        before = framing.feed(stream[:cut])
        ends = [sum(len(w) for w in wire[: i + 1]) for i in range(len(wire))]
        self.assertEqual(before, [p for p, end in zip(payloads, ends, strict=True) if end <= cut])
        self.assertEqual(before + framing.feed(stream[cut:]), payloads)
        self.assertEqual(framing.buffered, 0)


class LinesHostileTests(FramingHostileMixin, SynchronousTestCase):
    framing = "lines"

    @HYPOTHESIS
    @given(maxFrame=st.integers(1, 4096), extra=st.integers(2, 5000), size=st.integers(1, 977))
    def test_oversizeLine(self, maxFrame: int, extra: int, size: int) -> None:
        """
        A line without its LF is refused once it is 2 bytes past max_frame, whatever the
        read sizes, having buffered at most max_frame + 1 bytes.
        """
        framing = self.make(maxFrame)
        line = b"x" * (maxFrame + extra)
        with self.assertRaises(FramingError) as e:
            for start in range(0, len(line), size):
                framing.feed(line[start : start + size])
                self.assertLessEqual(framing.buffered, maxFrame + 1)
        self.assertEqual(e.exception.code, v1.FRAME_TOO_LARGE)


class Int32HostileTests(FramingHostileMixin, SynchronousTestCase):
    framing = "int32"

    @HYPOTHESIS
    @given(maxFrame=st.integers(1, 1 << 20), data=st.data())
    def test_oversizePrefix(self, maxFrame: int, data: st.DataObject) -> None:
        """
        A length above max_frame, up to 4 GiB, is refused at the fourth header byte,
        with nothing but the header buffered.
        """
        length = data.draw(st.integers(maxFrame + 1, 2**32 - 1))
        framing = self.make(maxFrame)
        header = struct.pack(">I", length)
        self.assertEqual(framing.feed(header[:3]), [])
        self.assertEqual(framing.buffered, 3)
        with self.assertRaises(FramingError) as e:
            framing.feed(header[3:] + b"x" * 100)
        self.assertEqual(e.exception.code, v1.FRAME_TOO_LARGE)


class NetstringHostileTests(FramingHostileMixin, SynchronousTestCase):
    framing = "netstring"

    @HYPOTHESIS
    @given(maxFrame=st.integers(1, 1 << 20), digits=st.integers(1, 100_000))
    @example(maxFrame=65536, digits=100_000)
    def test_oversizePrefix(self, maxFrame: int, digits: int) -> None:
        """
        A length above max_frame, however many digits (here up to 10^5), is refused
        within the digits of max_frame plus one byte.
        """
        length = b"9" * digits
        if int(length[: len(str(maxFrame)) + 1]) <= maxFrame:
            length = str(maxFrame + 1).encode()
        framing = self.make(maxFrame)
        with self.assertRaises(FramingError) as e:
            framing.feed(length + b":" + b"x" * 10)
        self.assertIn(e.exception.code, {v1.FRAME_TOO_LARGE, v1.BAD_FRAME})
        self.assertLessEqual(framing.buffered, len(str(maxFrame)) + 1)


# --- protocol v1 over a connection ---

# Any JSON value, including the ones that are wrong for every field.
jsonValues = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False,
                                                                        allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["", "x" * 129, "c1", HEX_UUID, "\x00", "\ud800"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

VALID: dict[str, dict[str, Any]] = {
    "hello": {"controller": "c-hostile", "token": "t"},
    "msg": {"id": "m1", "body": {"t": 21.5}},
    "ack": {"ref": HEX_UUID},
    "nack": {"ref": HEX_UUID, "reason": "no"},
    "ping": {},
    "pong": {"echo": 1},
}


class Harness:
    """
    One gateway context over fakes, with a live bystander controller and a victim
    connection that gets the hostile input.
    """

    def __init__(self, framing: str, maxFrame: int = 4096, hello: bool = False) -> None:
        self.config = makeConfig(listener={"framing": framing, "max_frame": str(maxFrame)})
        self.clock = makeClock()
        self.sink = MemorySink()
        self.context = makeContext(self.config, self.clock, self.sink)
        (self.listener,) = self.config.listeners
        self.bystander = FakeController(self.context, self.listener)
        self.bystander.hello("bystander")
        self.victim = FakeController(self.context, self.listener)
        if hello:
            self.victim.hello("victim")

    def bystanderStillServed(self, case: SynchronousTestCase, n: int) -> None:
        """
        A valid msg from the bystander is submitted and acked as if nothing happened.
        """
        messageId = f"ok-{n}"
        self.bystander.send({"type": "msg", "id": messageId, "body": n})
        self.sink.succeed(messageId)
        frames = self.bystander.received()
        case.assertEqual([(f["type"], f.get("ref")) for f in frames], [("ack", messageId)])

    def checkVictim(self, case: SynchronousTestCase) -> list[dict[str, Any]]:
        """
        Everything written to the victim is a gateway frame; every error carries a
        documented code; a closed connection ended with a bye; its framing holds no more
        than max_frame plus a header.
        """
        protocol = self.victim.protocol
        frames = self.victim.received()
        for frame in frames:
            case.assertIn(frame["type"], GATEWAY_TYPES)
            if frame["type"] == "error":
                case.assertIn(frame["code"], DOCUMENTED_CODES, frame)
                case.assertLessEqual(len(frame["detail"]), 200)
        if protocol.state is State.CLOSED:
            case.assertTrue(self.victim.transport.disconnecting)
            if frames:
                case.assertEqual(frames[-1]["type"], "bye", frames)
        framing: Any = protocol.framing
        case.assertLessEqual(framing.buffered, self.listener.max_frame + HEADER_SLACK)
        case.assertEqual(protocol.pendingBytes, 0)
        return frames


class ProtocolHostileMixin:
    framing: str

    @HYPOTHESIS
    @given(data=st.lists(st.binary(max_size=200), max_size=20), live=st.booleans())
    def test_randomBytes(self, data: list[bytes], live: bool) -> None:
        """
        Random bytes on a connection, before or after its hello: nothing escapes
        dataReceived, every answer is a documented error or a close, and another
        controller is served as before.
        """
        case: Any = self
        h = Harness(self.framing, 1024, hello=live)
        for chunk in data:
            h.victim.sendRaw(chunk)
        h.checkVictim(case)
        h.bystanderStillServed(case, 1)

    @HYPOTHESIS
    @given(payload=st.binary(max_size=300), live=st.booleans())
    def test_randomPayload(self, payload: bytes, live: bool) -> None:
        """
        One well-framed frame of random bytes: answered, if refused, by an error with a
        documented code (closed before the hello, open after it).
        """
        case: Any = self
        h = Harness(self.framing, 1024, hello=live)
        try:
            h.victim.sendPayload(payload)
        except FramingError:
            return  # lines cannot carry this payload at all
        frames = h.checkVictim(case)
        errors = [f for f in frames if f["type"] == "error"]
        if errors and not live:
            case.assertIs(h.victim.protocol.state, State.CLOSED)
        if live:
            case.assertIsNot(h.victim.protocol.state, State.CLOSED)
        h.bystanderStillServed(case, 1)

    @HYPOTHESIS
    @given(
        kind=st.sampled_from(sorted(VALID)),
        data=st.data(),
        value=jsonValues,
        live=st.booleans(),
    )
    def test_wrongTypeInEveryField(
        self, kind: str, data: st.DataObject, value: object, live: bool
    ) -> None:
        """
        Any JSON value in any field of any frame type: accepted if it happens to be
        valid, else a documented error; a msg refused is never submitted.
        """
        case: Any = self
        fieldName = data.draw(st.sampled_from(["type", "ts", *VALID[kind]]))
        h = Harness(self.framing, 4096, hello=live)
        frame: dict[str, Any] = {"type": kind, "ts": h.victim.now(), **VALID[kind]}
        frame[fieldName] = value
        h.victim.sendPayload(json.dumps(frame).encode("utf-8", "surrogatepass"))
        frames = h.checkVictim(case)
        errors = [f for f in frames if f["type"] == "error"]
        if errors and errors[0]["ref"] is None and kind == "msg" and live:
            case.assertEqual(h.sink.messageIds, [])
        h.bystanderStillServed(case, 1)


class LinesProtocolHostileTests(ProtocolHostileMixin, SynchronousTestCase):
    framing = "lines"


class Int32ProtocolHostileTests(ProtocolHostileMixin, SynchronousTestCase):
    framing = "int32"


class NetstringProtocolHostileTests(ProtocolHostileMixin, SynchronousTestCase):
    framing = "netstring"


class ExtremeFrameTests(SynchronousTestCase):
    """
    The extreme cases, each on a live connection and before a hello, on every framing.
    """

    def cases(self, now: int) -> dict[str, bytes]:
        deep = b"[" * 100_000 + b"]" * 100_000
        huge = b"9" * 100_000
        return {
            "deep body": b'{"type":"msg","ts":%d,"id":"m","body":%s}' % (now, deep),
            "deep hello": b'{"type":"hello","ts":%d,"controller":%s}' % (now, deep),
            "deep top": deep,
            "huge int body": b'{"type":"msg","ts":%d,"id":"m","body":%s}' % (now, huge),
            "huge int ts": b'{"type":"ping","ts":%s}' % huge,
            "huge float": b'{"type":"msg","ts":%d,"id":"m","body":%s.5}' % (now, huge),
            "4300-digit ts": b'{"type":"ping","ts":%s}' % (b"9" * 4300),
            "ts past bigint": b'{"type":"ping","ts":%d}' % (MAX_TS + 1),
            "echo past bigint": b'{"type":"pong","ts":1,"echo":%d}' % (MAX_TS + 1),
            "invalid utf-8": b'{"type":"msg","ts":%d,"id":"\xff\xfe","body":1}' % now,
            "overlong utf-8": b'{"type":"msg","ts":%d,"id":"\xc0\xaf","body":1}' % now,
            "lone surrogate": b'{"type":"msg","ts":%d,"id":"m","body":"\\ud800"}' % now,
            "nul escape": b'{"type":"msg","ts":%d,"id":"m","body":"\\u0000"}' % now,
            "nan": b'{"type":"msg","ts":%d,"id":"m","body":NaN}' % now,
            "1e400": b'{"type":"msg","ts":%d,"id":"m","body":1e400}' % now,
            "many keys": b'{"type":"msg","ts":%d,"id":"m","body":{%s}}' % (
                now, b",".join(b'"k%d":%d' % (i, i) for i in range(20_000))),
        }

    def test_extremes(self) -> None:
        expected = {
            "many keys": None,  # valid: submitted
        }
        for framing in FRAMINGS:
            for live in (True, False):
                h = Harness(framing, 1 << 20, hello=live)
                for name, payload in self.cases(h.victim.now()).items():
                    h = Harness(framing, 1 << 20, hello=live)
                    started = time.perf_counter()
                    h.victim.sendPayload(payload)
                    elapsed = time.perf_counter() - started
                    frames = h.checkVictim(self)
                    errors = [f["code"] for f in frames if f["type"] == "error"]
                    if name in expected:
                        self.assertEqual(errors, [] if live else [v1.HELLO_REQUIRED], name)
                    else:
                        self.assertEqual(len(errors), 1, (framing, live, name, frames))
                        self.assertIn(errors[0], {v1.BAD_JSON, v1.BAD_MESSAGE,
                                                  v1.BAD_CONTROLLER_ID}, name)
                    self.assertLess(elapsed, 2.0, name)
                    h.bystanderStillServed(self, 1)

    def test_errorFitsSmallestFrame(self) -> None:
        """
        A msg id of 128 characters that each need a 6-byte escape (768 bytes echoed as
        ref) with a long detail still gets its error within max_frame 1024: the detail
        gives way first.  (Before: FramingError escaped dataReceived.)
        """
        for framing in FRAMINGS:
            h = Harness(framing, 1024, hello=True)
            msgId = "\\u0001" * 128
            ts = 10**18 + 10**17  # far in the future, under MAX_TS: a long detail
            h.victim.sendPayload(b'{"type":"msg","ts":%d,"id":"%s"}' % (ts, msgId.encode()))
            (error,) = h.checkVictim(self)
            self.assertEqual(error["code"], v1.FUTURE_TIMESTAMP)
            self.assertEqual(error["ref"], "\x01" * 128)
            self.assertIsNot(h.victim.protocol.state, State.CLOSED)

    def test_pongFitsFrame(self) -> None:
        """
        A ping whose ts is as long as the frame allows is refused rather than echoed in
        a pong that cannot fit.  (Before: FramingError escaped dataReceived.)
        """
        for framing in FRAMINGS:
            h = Harness(framing, 1024, hello=True)
            h.victim.sendPayload(b'{"type":"ping","ts":%s}' % (b"9" * 990))
            (error,) = h.checkVictim(self)
            self.assertEqual(error["code"], v1.BAD_MESSAGE)
            h.victim.send({"type": "ping", "ts": MAX_TS})
            (pong,) = h.checkVictim(self)
            self.assertEqual(pong["echo"], MAX_TS)

    def test_bugAbortsOneConnection(self) -> None:
        """
        An unexpected exception while handling a frame is logged and aborts that
        connection only.
        """
        h = Harness("lines", 1024, hello=True)

        def broken(*args: object) -> None:
            raise ZeroDivisionError("bug")

        h.victim.protocol._receiveMsg = broken  # type: ignore[method-assign]
        h.victim.send({"type": "msg", "id": "m", "body": 1})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIs(h.victim.protocol.state, State.CLOSED)
        self.assertEqual(h.victim.transport.aborts, 1)
        h.bystanderStillServed(self, 1)


class WriteBackpressureTests(SynchronousTestCase):
    """
    A controller that does not read cannot make us buffer the answers to everything it
    sent: once our writes pause, the rest of the read waits.
    """

    def test_floodWhilePaused(self) -> None:
        h = Harness("lines", 1024, hello=True)
        protocol = h.victim.protocol
        transport = h.victim.transport
        # The transport pauses us once more than 4 KiB is waiting (as tcp does at 64 KiB).
        original = transport.write

        def write(data: bytes) -> None:
            original(data)
            if len(transport.value()) > 4096 and not protocol.writesPaused:
                protocol.pauseProducing()

        transport.write = write  # type: ignore[method-assign]
        flood = b"{}\n" * 21_845  # one 64 KiB read of invalid frames, ~100 bytes of answer each
        protocol.dataReceived(flood)
        buffered = len(transport.value())
        self.assertLess(buffered, 4096 + 200)
        self.assertGreater(protocol.pendingBytes, 0)
        self.assertLess(protocol.pendingBytes, len(flood))
        report("unit never-reading flood", sent=len(flood), buffered=buffered,
               unbounded=21_845 * len(v1.encode("error", 1, code="bad_message", ref=None,
                                                detail="'type' must be a string")))
        # Draining lets the rest through, in order.
        answered = 0
        while protocol.pendingBytes:
            answered += len(h.victim.received())
            protocol.resumeProducing()
        answered += len(h.victim.received())
        self.assertEqual(answered, 21_845)

    def test_closeDropsPending(self) -> None:
        h = Harness("lines", 1024, hello=True)
        protocol = h.victim.protocol
        protocol.pauseProducing()
        protocol.dataReceived(b"{}\n" * 10)
        self.assertEqual(h.victim.received(), [])
        protocol.close(v1.BYE_SHUTDOWN)
        self.assertEqual(protocol.pendingBytes, 0)
        self.assertEqual(h.context.metrics.registry.get_sample_value(
            "ctrlgw_frames_dropped_total", {}), 10)


class ConnectionCapTests(SynchronousTestCase):
    def test_pastTheCap(self) -> None:
        """
        Past max_connections a new connection gets error unavailable and bye
        unavailable, is closed at once, and is counted; below it again, one is accepted.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        config = makeConfig(listener={"max_connections": "2"})
        (listener,) = config.listeners
        self.assertEqual(listener.max_connections, 2)
        context = makeContext(config, makeClock())
        factory = ControllerFactory.fromConfig(context, listener)
        factory.applySocketOptions = lambda transport: None
        addr = IPv4Address("TCP", "192.0.2.1", 1)

        def connect() -> tuple[Any, StringTransport]:
            protocol = factory.buildProtocol(addr)
            transport = StringTransport()
            protocol.makeConnection(transport)
            return protocol, transport

        first, _ = connect()
        connect()
        refused, transport = connect()
        self.assertIsInstance(refused, RefusedConnection)
        framing = listener.makeFraming()
        frames = [json.loads(f) for f in framing.feed(transport.value())]
        self.assertEqual([(f["type"], f.get("code"), f.get("reason")) for f in frames],
                         [("error", "unavailable", None), ("bye", None, "unavailable")])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(context.metrics.registry.get_sample_value(
            "ctrlgw_connections_refused_total",
            {"listener": "main", "reason": "max_connections"}), 1)
        first.connectionLost(None)
        self.assertIsInstance(connect()[0], ControllerProtocol)

    def test_zeroIsUnlimited(self) -> None:
        config = makeConfig(listener={"max_connections": "0"})
        context = makeContext(config, makeClock())
        factory = ControllerFactory.fromConfig(context, config.listeners[0])
        context.openByListener["main"] = 10**6
        self.assertIsInstance(factory.buildProtocol(None), ControllerProtocol)

    def test_badValue(self) -> None:
        from ctrlgw.config import ConfigError

        with self.assertRaises(ConfigError) as e:
            makeConfig(listener={"max_connections": "-1"})
        self.assertIn("[listener:main] max_connections", str(e.exception))


# --- real sockets against an in-process gateway ---


class RawSocket:
    """
    A controller on a plain non-blocking socket, optionally with a small receive buffer
    set before it connects, that reads only when told to.
    """

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.received = b""
        self.closed = False

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return 0

    async def sendAll(self, data: bytes, timeout: float = 10.0) -> None:
        started = reactor.seconds()
        while data and not self.closed:
            data = data[self.send(data):]
            if data:
                if reactor.seconds() - started > timeout:
                    raise AssertionError("could not send within {timeout}s")
                self.read()
                await sleep(0.01)

    def read(self) -> bytes:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self.received += data
        return self.received

    def frames(self) -> list[dict[str, Any]]:
        # Whole lines only: a frame the gateway has sent only part of so far (the socket's
        # buffer was full) comes whole in a later read.
        complete, _, _ = self.read().rpartition(b"\n")
        return [json.loads(line) for line in complete.split(b"\n") if line.strip()]

    def close(self) -> None:
        self.sock.close()


def userspaceBuffered(protocol: ControllerProtocol) -> int:
    """
    The bytes Twisted holds for this connection's socket (not yet handed to the kernel).
    """
    t: Any = protocol.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


def kernelQueued(protocol: ControllerProtocol) -> int:
    """
    The bytes in the kernel send queue of this connection's socket (SIOCOUTQ).
    """
    t: Any = protocol.transport
    return struct.unpack("i", fcntl.ioctl(t.socket.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def connectionOf(gateway: Any, controller: str | None = None) -> ControllerProtocol:
    for protocol in gateway.context.connections:
        if controller is None or (protocol.session and protocol.session.controller == controller):
            return protocol
    raise AssertionError(f"no connection for {controller}")


class HostileSocketTests(PostgresTestCase):
    timeout = 90

    async def gateway(self, listener: Mapping[str, object] = {},
                      liveness: Mapping[str, object] = {}) -> Any:
        return await startGateway(self, self.dsn, self.schema, "gw-h", {
            "listener:main": {"endpoint": "tcp:0:interface=127.0.0.1", **listener},
            "liveness": {"hello_timeout": "1s", "ping_interval": "1s", "idle_timeout": "2s",
                         "close_grace": "200ms", **liveness},
            "outbox": {"poll_interval": "200ms"},
        })

    async def controller(self, gateway: Any, name: str | None = None) -> LineController:
        client = await connectController(listenerPort(gateway))
        self.addCleanup(client.close)
        if name is not None:
            await client.hello(name)
        return client

    async def test_framesBeforeHello(self) -> None:
        """
        A msg, an ack, garbage JSON as the first frame: error + bye protocol_error and
        the socket is closed, every time.
        """
        gateway = await self.gateway()
        for first, code in [
            ({"type": "msg", "id": "m", "body": 1}, v1.HELLO_REQUIRED),
            ({"type": "ack", "ref": HEX_UUID}, v1.HELLO_REQUIRED),
            ({"type": "what"}, v1.UNKNOWN_TYPE),
        ]:
            client = await self.controller(gateway)
            client.send(first)
            await client.closed
            self.assertEqual([(f["type"], f.get("code") or f.get("reason")) for f in client.frames],
                             [("error", code), ("bye", "protocol_error")])

    async def test_helloFloodOneConnection(self) -> None:
        """
        A thousand hellos in one write: one welcome, an error for each other hello, the
        connection stays and its next msg is acked.
        """
        gateway = await self.gateway()
        raw = RawSocket(listenerPort(gateway))
        self.addCleanup(raw.close)
        hello = b'{"type":"hello","ts":%d,"controller":"flood"}\n' % int(time.time() * 1000)
        started = reactor.seconds()
        await raw.sendAll(hello * 1000)
        await waitUntil(lambda: len(raw.frames()) >= 1000, 20, what="1000 answers")
        elapsed = reactor.seconds() - started
        frames = raw.frames()
        self.assertEqual([f["type"] for f in frames].count("welcome"), 1)
        codes = {f["code"] for f in frames if f["type"] == "error"}
        self.assertLessEqual(codes, {v1.HELLO_REQUIRED, v1.BAD_MESSAGE})
        raw.send(b'{"type":"msg","ts":%d,"id":"after","body":1}\n' % int(time.time() * 1000))
        await waitUntil(lambda: any(f.get("ref") == "after" for f in raw.frames()), 10,
                        what="the ack of the msg after the flood")
        self.assertFalse(raw.closed)
        report("hello flood, one connection", hellos=1000, welcomes=1, seconds=elapsed)

    async def test_helloFloodManyConnections(self) -> None:
        """
        300 connections say hello at once: every one is welcomed, and a controller already
        connected keeps getting its acks meanwhile.
        """
        gateway = await self.gateway(liveness={"hello_timeout": "20s"})
        steady = await self.controller(gateway, "steady")
        n = 300
        socks = []
        for _ in range(n // 25):
            # Connected from the reactor's own thread: in batches, so that the accept
            # queue never fills while the reactor cannot accept.
            for _ in range(25):
                socks.append(RawSocket(listenerPort(gateway)))
                self.addCleanup(socks[-1].close)
            await sleep(0.01)
        started = reactor.seconds()
        now = int(time.time() * 1000)
        for i, s in enumerate(socks):
            s.send(b'{"type":"hello","ts":%d,"controller":"herd-%d"}\n' % (now, i))
        steady.send({"type": "msg", "id": "during", "body": 1})
        await waitUntil(lambda: "during" in steady.ackedIds(), 20, what="steady's ack")
        ackDelay = reactor.seconds() - started
        await waitUntil(lambda: all(s.frames() for s in socks), 30, what="every welcome")
        elapsed = reactor.seconds() - started
        self.assertEqual({s.frames()[0]["type"] for s in socks}, {"welcome"})
        report("hello flood, many connections", connections=n, all_welcomed_s=elapsed,
               bystander_ack_s=ackDelay)

    async def test_slowlorisNeverHello(self) -> None:
        """
        One byte every 0.25 s of a hello that never ends: closed by hello_timeout (1 s),
        error hello_required, bye protocol_error.
        """
        gateway = await self.gateway()
        raw = RawSocket(listenerPort(gateway))
        self.addCleanup(raw.close)
        started = reactor.seconds()
        trickle = b'{"type":"hello","controller":"' + b"x" * 1000
        for byte in trickle:
            raw.read()
            if raw.closed:
                break
            raw.send(bytes([byte]))
            await sleep(0.25)
        closedAfter = reactor.seconds() - started
        self.assertTrue(raw.closed)
        self.assertEqual([(f["type"], f.get("code") or f.get("reason")) for f in raw.frames()],
                         [("error", "hello_required"), ("bye", "protocol_error")])
        self.assertLess(closedAfter, 1.0 + 0.2 + 0.5)
        report("slowloris before hello", byte_every_s=0.25, hello_timeout_s=1.0,
               closed_after_s=closedAfter)

    async def test_slowlorisAfterHello(self) -> None:
        """
        After its welcome, a controller that trickles one byte every 0.25 s and never
        ends a frame is idle: closed by idle_timeout (2 s), bye idle_timeout.
        """
        gateway = await self.gateway()
        raw = RawSocket(listenerPort(gateway))
        self.addCleanup(raw.close)
        raw.send(b'{"type":"hello","ts":%d,"controller":"loris"}\n' % int(time.time() * 1000))
        await waitUntil(lambda: raw.frames(), 10, what="welcome")
        started = reactor.seconds()
        while not raw.closed and reactor.seconds() - started < 10:
            raw.send(b"x")
            await sleep(0.25)
            raw.read()
        closedAfter = reactor.seconds() - started
        self.assertTrue(raw.closed)
        last = raw.frames()[-1]
        self.assertEqual((last["type"], last.get("reason")), ("bye", "idle_timeout"))
        self.assertLess(closedAfter, 2.0 + 0.2 + 0.7)
        report("slowloris after hello", byte_every_s=0.25, idle_timeout_s=2.0,
               closed_after_s=closedAfter)

    async def test_neverReads(self) -> None:
        """
        A controller with a 4 KiB receive buffer that floods invalid frames and never
        reads: the gateway's buffer for it stays under Twisted's 64 KiB pause mark plus
        one answer, a bystander is served throughout, and the socket is closed by
        idle_timeout and aborted after close_grace.
        """
        gateway = await self.gateway()
        steady = await self.controller(gateway, "steady")
        raw = RawSocket(listenerPort(gateway), rcvbuf=4096)
        self.addCleanup(raw.close)
        raw.send(b'{"type":"hello","ts":%d,"controller":"deaf"}\n' % int(time.time() * 1000))
        await waitUntil(lambda: any(p.session and p.session.controller == "deaf"
                                    for p in gateway.context.connections), 10, what="deaf live")
        deaf = connectionOf(gateway, "deaf")
        chunk = b"{}\n" * 10_000
        sent = 0
        maxBuffered = maxKernel = maxPending = 0
        started = reactor.seconds()
        stalledSince = None
        gone = False
        n = 0
        while reactor.seconds() - started < 15:
            wrote = raw.send(chunk)
            sent += wrote
            if deaf.transport is not None and deaf.state is not State.CLOSED:
                maxBuffered = max(maxBuffered, userspaceBuffered(deaf))
                maxKernel = max(maxKernel, kernelQueued(deaf))
                maxPending = max(maxPending, deaf.pendingBytes)
            if deaf not in gateway.context.connections:
                gone = True
                break
            stalledSince = (stalledSince or reactor.seconds()) if not wrote else None
            n += 1
            steady.send({"type": "msg", "id": f"s{n}", "body": n})
            await sleep(0.02)
        closedAfter = reactor.seconds() - (stalledSince or started)
        self.assertTrue(gone, "the deaf controller's socket was never closed")
        self.assertLess(maxBuffered, 65536 + 1024)
        self.assertLess(maxPending, 65536)
        await waitUntil(lambda: f"s{n}" in steady.ackedIds(), 10, what="steady's acks")
        self.assertEqual(sample(gateway, "ctrlgw_disconnects_total", {"reason": "idle_timeout"}), 1)
        report("controller that never reads", sent_bytes=sent, max_twisted_buffer=maxBuffered,
               max_kernel_queue=maxKernel, max_pending_in=maxPending,
               closed_after_stall_s=closedAfter)

    async def test_connectionCap(self) -> None:
        """
        With max_connections = 5, the sixth connection gets error unavailable and bye
        unavailable and is closed; the five are unaffected; once one leaves, a new one
        is welcomed.
        """
        gateway = await self.gateway(listener={"max_connections": 5})
        five = [await self.controller(gateway, f"cap-{i}") for i in range(5)]
        extra = []
        started = reactor.seconds()
        for _ in range(20):
            client = await self.controller(gateway)
            extra.append(client)
        for client in extra:
            await client.closed
        refusedIn = reactor.seconds() - started
        for client in extra:
            self.assertEqual([(f["type"], f.get("code") or f.get("reason"))
                              for f in client.frames],
                             [("error", "unavailable"), ("bye", "unavailable")])
        self.assertEqual(sample(gateway, "ctrlgw_connections_refused_total",
                                {"listener": "main", "reason": "max_connections"}), 20)
        five[0].send({"type": "msg", "id": "still", "body": 1})
        await waitUntil(lambda: "still" in five[0].ackedIds(), 10, what="ack")
        await five[1].leave()
        await waitUntil(lambda: gateway.context.openByListener["main"] == 4, 5, what="4 open")
        await self.controller(gateway, "cap-new")
        report("connections past max_connections", cap=5, refused=20,
               refused_20_in_s=refusedIn)

    # --- poison commands from the application ---

    def sendDirectly(self, controller: str, body: str) -> str:
        """
        Call send() on a connection of its own, as an application would; return the
        SQLSTATE and first line of its error, or C{accepted}.
        """
        connection = psycopg2.connect(self.dsn)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(f'SET search_path = "{self.schema}"')
                cursor.execute("SELECT send(%s, %s::jsonb)", (controller, body))
        except psycopg2.Error as e:
            return f"{e.pgcode} {str(e).splitlines()[0]}"
        finally:
            connection.close()
        return "accepted"

    async def test_poisonCommands(self) -> None:
        """
        send() bodies that cannot be written end in a documented final state, bodies
        full of characters to escape arrive intact, and none of it delays the commands
        of another controller.
        """
        gateway = await self.gateway(listener={"max_frame": 2048},
                                     liveness={"idle_timeout": "30s", "ping_interval": "10s"})
        victim = await self.controller(gateway, "victim")
        victim.autoAck = True
        other = await self.controller(gateway, "other")
        other.autoAck = True

        async def send(controller: str, body: str) -> str:
            rows = await self.db.runQuery(
                "test", "SELECT send(%s, %s::jsonb, interval '20 seconds')::text",
                (controller, body))
            return str(rows[0][0])

        escapes = json.dumps({"s": "line\nbreak \"q\" back\\slash \t \x01 \u2028 é 😀 \x7f",
                              "k\n": ["\r\n", "}{", "\\u0000 (text, not an escape)"]})
        deep = "[" * 500 + "]" * 500
        big = json.dumps({"pad": "x" * 4000})
        bodies = {"big": big, "escapes": escapes, "deep": deep}
        ids = {}
        latencies = []
        for name, body in bodies.items():
            ids[name] = await send("victim", body)
            started = reactor.seconds()
            otherId = await send("other", '{"op": "%s"}' % name)
            await other.waitFor("cmd", id=otherId, timeout=10)
            latencies.append(reactor.seconds() - started)
        # Too deep for PostgreSQL: refused by send() itself, nothing queued.
        tooDeep = "[" * 100_000 + "]" * 100_000
        deepError = await deferToThread(self.sendDirectly, "victim", tooDeep)

        async def states() -> dict[str, tuple[str, str]]:
            rows = await self.db.runQuery(
                "test", "SELECT id::text, state, detail FROM commands"
                " WHERE controller_id = 'victim'")
            return {r[0]: (r[1], r[2]) for r in rows}

        final: dict[str, tuple[str, str]] = {}

        async def settled() -> bool:
            final.update(await states())
            return all(state in ("acked", "failed") for state, _ in final.values())

        deadline = reactor.seconds() + 20
        while not await settled():
            self.assertLess(reactor.seconds(), deadline, f"victim's commands: {final}")
            await sleep(0.1)
        self.assertEqual(final[ids["big"]], ("failed", "does not fit in one frame"))
        self.assertEqual(final[ids["escapes"]][0], "acked")
        self.assertEqual(final[ids["deep"]][0], "acked")
        cmds = {f["id"]: f for f in victim.of("cmd")}
        self.assertNotIn(ids["big"], cmds)
        # Delivered intact: the same JSON value as was sent.
        self.assertEqual(cmds[ids["escapes"]]["body"], json.loads(escapes))
        self.assertEqual(cmds[ids["deep"]]["body"], json.loads(deep))
        # 54001 statement_too_complex: stack depth limit exceeded.
        self.assertTrue(deepError.startswith("54001"), deepError)
        self.assertEqual(await self.db.runQuery(
            "test", "SELECT count(*) FROM commands WHERE controller_id = 'victim'"), [(3,)])
        report("poison commands", other_cmd_latency_max_s=max(latencies),
               too_deep=deepError[:60].replace(" ", "_"))
