"""
Tests for the binary tracker dialects C{teltonika} and C{gt06} (L{ctrlgw.dialects.teltonika},
L{ctrlgw.dialects.gt06}, their pure codecs and what they share in
L{ctrlgw.dialects.telematics}), and for the per-listener C{auth} and C{idle_timeout}.

The example packets are public and written by others:

 - C{WIKI_*}: the worked examples of Teltonika's "Codec" wiki page
   (https://wiki.teltonika-gps.com/view/Codec), with the values the page lists for them;
 - C{TRACCAR_*}: test vectors of Traccar's C{TeltonikaProtocolDecoderTest} and
   C{Gt06ProtocolDecoderTest} (github.com/traccar/traccar, src/test/java/org/traccar/
   protocol/); the values asserted for them are read off the layouts in docs/dialects.md.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.auth import hashToken
from ctrlgw.config import AuthConfig, ConfigError, parseConfig
from ctrlgw.dialects import gt06_codec as gt06
from ctrlgw.dialects import teltonika_codec as tk
from ctrlgw.dialects.crc16 import crc16ibm, crc16itu
from ctrlgw.dialects.telematics import PacketAcks
from ctrlgw.interfaces import AuthFailed, Unavailable
from ctrlgw.ownership import EventLog, PostgresOwnership
from ctrlgw.protocol.factory import ControllerFactory
from ctrlgw.protocol.session import State
from ctrlgw.sim import SimOptions, Stats, runSim
from ctrlgw.simtrackers import imeiFor
from ctrlgw.store.postgres import ClaimPolicy, Store
from tests.gateways import (
    TwistdProcess,
    freePort,
    gatewayConfigText,
    listenerPort,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import (
    EPOCH_SECONDS,
    MemorySink,
    RecordingTransport,
    deferred,
    iniText,
    makeClock,
    makeContext,
)
from tests.pg import PostgresTestCase

# --- the public example packets ---

WIKI_IMEI = "000F333536333037303432343431303133"  # IMEI 356307042441013
# Codec 8, example 1: one record, 2019-06-10 10:04:46 UTC, priority 1, no fix, event IO
# 1, IO 21=3, 1=1, 66=0x5E0F, 241=0x601A, 78=0.
WIKI_CODEC8 = (
    "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101"
    "425E0F01F10000601A014E0000000000000000010000C7CF"
)
# Codec 8, example 3: two records.
WIKI_CODEC8_TWO = (
    "000000000000004308020000016B40D57B480100000000000000000000000000000001010101000000000000"
    "016B40D5C198010000000000000000000000000000000101010101000000020000252C"
)
# Codec 8 Extended: 2019-06-10 11:36:32 UTC, event 1, IO 1=1, 17=0x1D, 16=0x015E2C88,
# 11=0x3544C87A, 14=0x1DD7E06A.
WIKI_CODEC8E = (
    "000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100"
    "010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994"
)
# Codec 12: the getinfo command the server sends.
WIKI_GETINFO = "000000000000000F0C010500000007676574696E666F0100004312"

TRACCAR_IMEI = "000F313233343536373839303132333435"  # IMEI 123456789012345
TRACCAR_CODEC8 = (
    "000000000000004c08010000016818d500580009c28d9f1cb3757a00be00c60f0053000f06f0011503c8000101"
    "1d00fc0007423799180053cdf80dce426f430f88190bb8560bb802f100005aa110002887e000010000ee8d"
)
# Codec 8 Extended with variable-length (NX) values: a VIN and a text.
TRACCAR_CODEC8E_NX = (
    "00000000000000a38e0100000178b11c9e1000040bbbc91f03190c002100e113001300000010000600ef0100f0"
    "0100150300c800004501001e070005004237e00018000a00ce166200430f970024059f000300f10000665900c7"
    "0000001e00100000a1b500000002010000115756315a5a5a32455a38363031353338380119002950303239392c"
    "50303637352c50303637342c50303637322c50303637312c50303437312c50324241430100001ad8"
)
# A Codec 12 response (type 0x06) from a device.
TRACCAR_RESPONSE = (
    "000000000000004f0c01060000004755555555777730362e343b30342e323b30302e303b30302e303b30302e30"
    "3b30302e303b30302e303b30302e303b30312e333b30302e303b31302e373b30302e303b5353530d0a010000e371"
)
TRACCAR_RESPONSE_TEXT = "UUUUww06.4;04.2;00.0;00.0;00.0;00.0;00.0;00.0;01.3;00.0;10.7;00.0;SSS\r\n"

GT06_LOGIN = "78780D01086471700328358100093F040D0A"  # IMEI 864717003283581, serial 9
GT06_LOGIN_IMEI = "864717003283581"
# Concox's protocol document: the answer to a login of serial 1.
CONCOX_LOGIN_ACK = "787805010001D9DC0D0A"
GT06_LOCATION_22 = "787822220F0C1D023305C9027AC8180C46586000140001CC00287D001F71000001000820860D0A"
GT06_LOCATION_12 = (
    "787821121303120b2524c70138e363085b549003d43301940057d200cd52c000006aa1ca0d0a"
)
GT06_STATUS = "7878151330802b00000642014f0008720000802b5ee4d4c90d0a"
GT06_REPLY = (
    "7878281520000000003c49434349443a38393838323339303030303039373330323635303e00020d446f260d0a"
)
GT06_REPLY_LONG_UTF16 = (
    "797900262100000000020043006f006d006d0061006e00640020006500720072006f0072002100236e850d0a"
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def flipped(packet: bytes, index: int) -> bytes:
    return packet[:index] + bytes([packet[index] ^ 0xFF]) + packet[index + 1 :]


# --- codecs ---


class CrcTests(SynchronousTestCase):
    def test_checkValues(self) -> None:
        """
        The catalogue's check values of CRC-16/ARC and CRC-16/X-25.
        """
        self.assertEqual(crc16ibm(b"123456789"), 0xBB3D)
        self.assertEqual(crc16itu(b"123456789"), 0x906E)


def _framed(data: bytes, identified: bool = True, maxData: int = 65536) -> list[bytes]:
    framer = tk.TeltonikaFramer(maxData)
    framer.identified = identified
    frames, error = framer.feed(data)
    assert error is None, error
    return frames


class TeltonikaCodecTests(SynchronousTestCase):
    def test_wikiCodec8(self) -> None:
        frames = _framed(h(WIKI_IMEI + WIKI_CODEC8), identified=False)
        self.assertEqual(tk.parseImei(frames[0]), "356307042441013")
        packet = tk.parsePacket(frames[1])
        assert isinstance(packet, tk.AvlPacket)
        (record,) = packet.records
        self.assertEqual(record.body(), {
            "ts": 1560161086000, "priority": 1, "lat": 0.0, "lon": 0.0, "alt": 0,
            "angle": 0, "satellites": 0, "speed": 0, "event": 1,
            "io": {"21": 3, "1": 1, "66": 0x5E0F, "241": 0x601A, "78": 0},
        })

    def test_wikiCodec8Extended(self) -> None:
        packet = tk.parsePacket(_framed(h(WIKI_CODEC8E))[0])
        assert isinstance(packet, tk.AvlPacket)
        self.assertEqual(packet.codec, tk.CODEC_8E)
        (record,) = packet.records
        self.assertEqual((record.ts, record.priority, record.event), (1560166592000, 1, 1))
        self.assertEqual(record.io, {"1": 1, "17": 0x1D, "16": 0x015E2C88,
                                     "11": 0x3544C87A, "14": 0x1DD7E06A})

    def test_traccarVectors(self) -> None:
        packet = tk.parsePacket(_framed(h(TRACCAR_CODEC8))[0])
        assert isinstance(packet, tk.AvlPacket)
        (record,) = packet.records
        self.assertEqual((record.ts, record.lat, record.lon, record.alt, record.angle,
                          record.satellites, record.speed),
                         (1546604839000, 48.1523066, 16.3745183, 190, 198, 15, 83))
        extended = tk.parsePacket(_framed(h(TRACCAR_CODEC8E_NX))[0])
        assert isinstance(extended, tk.AvlPacket)
        io = extended.records[0].io
        self.assertEqual(bytes.fromhex(io["256"]), b"WV1ZZZ2EZ86015388")
        self.assertEqual(bytes.fromhex(io["281"]), b"P0299,P0675,P0674,P0672,P0671,P0471,P2BAC")
        response = tk.parsePacket(_framed(h(TRACCAR_RESPONSE))[0])
        self.assertEqual(response, tk.CodecMessage(tk.RESPONSE, TRACCAR_RESPONSE_TEXT.encode()))

    def test_getinfoByteExact(self) -> None:
        self.assertEqual(tk.codec12(tk.COMMAND, b"getinfo"), h(WIKI_GETINFO))

    def test_encoderRoundTrip(self) -> None:
        raw = tk.encodeRecord(1_700_000_000_123, -33.5, 151.25, priority=2, alt=-12,
                              angle=359, satellites=9, speed=88, event=240,
                              io={1: 1, 66: 12500, 241: 24602, 16: 2**40}, extended=True)
        packet = tk.parsePacket(_framed(tk.avlPacket([raw], extended=True))[0])
        assert isinstance(packet, tk.AvlPacket)
        self.assertEqual(packet.records[0].body(), {
            "ts": 1_700_000_000_123, "priority": 2, "lat": -33.5, "lon": 151.25, "alt": -12,
            "angle": 359, "satellites": 9, "speed": 88, "event": 240,
            "io": {"1": 1, "66": 12500, "241": 24602, "16": 2**40},
        })

    def test_corrupt(self) -> None:
        """
        A flipped CRC byte, N1 differing from N2, records that do not fill the length,
        an AVL packet over 1,280 bytes of data: each refused with its code.
        """
        good = h(WIKI_CODEC8)
        with self.assertRaises(tk.TeltonikaError) as e:
            tk.parsePacket(flipped(good, len(good) - 1))
        self.assertEqual(e.exception.code, tk.BAD_CRC)
        mismatch = self._packetWithCounts(good, 2)
        with self.assertRaises(tk.TeltonikaError) as e:
            tk.parsePacket(mismatch)
        self.assertEqual(e.exception.code, tk.RECORD_COUNT_MISMATCH)
        short = tk.packet(tk.CODEC_8, 1, good[10:-5] + b"\x00")
        with self.assertRaises(tk.TeltonikaError) as e:
            tk.parsePacket(short)
        self.assertEqual(e.exception.code, tk.BAD_LENGTH)
        record = tk.encodeRecord(1, 0, 0, io={i: 1 for i in range(200)})
        big = tk.avlPacket([record] * 4)
        with self.assertRaises(tk.TeltonikaError) as e:
            tk.parsePacket(_framed(big)[0])
        self.assertEqual(e.exception.code, tk.TOO_LARGE)

    @staticmethod
    def _packetWithCounts(good: bytes, n2: int) -> bytes:
        data = bytearray(good[8:-4])
        data[-1] = n2
        return good[:8] + bytes(data) + crc16ibm(bytes(data)).to_bytes(4, "big")

    def test_framerFatal(self) -> None:
        framer = tk.TeltonikaFramer(2048)
        framer.identified = True
        frames, error = framer.feed(h("00000000") + (4096).to_bytes(4, "big"))
        assert error is not None
        self.assertEqual((frames, error.code, error.fatal), ([], tk.TOO_LARGE, True))
        self.assertEqual(framer.feed(h(WIKI_CODEC8)), ([], None))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600), st.booleans())
    def test_randomBytes(self, data: bytes, identified: bool) -> None:
        """
        Whatever arrives, the decoder answers frames or a TeltonikaError, never anything
        else, and buffers no more than one frame.
        """
        framer = tk.TeltonikaFramer(1024)
        framer.identified = identified
        frames, _ = framer.feed(data)
        for frame in frames:
            try:
                if len(frame) > 1 and frame[:4] == b"\x00" * 4:
                    tk.parsePacket(frame)
                elif frame[:1] != b"\xff":
                    tk.parseImei(frame)
            except tk.TeltonikaError:
                pass
        self.assertLessEqual(len(framer._buffer), 1024 + 12)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_anySplit(self, data: st.DataObject) -> None:
        stream = h(WIKI_IMEI + WIKI_CODEC8 + "FF" + WIKI_CODEC8E + TRACCAR_CODEC8E_NX)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
        framer = tk.TeltonikaFramer(65536)
        frames: list[bytes] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            more, error = framer.feed(stream[start:end])
            self.assertIsNone(error)
            frames.extend(more)
        self.assertEqual(frames, [h(WIKI_IMEI), h(WIKI_CODEC8), b"\xff", h(WIKI_CODEC8E),
                                  h(TRACCAR_CODEC8E_NX)])


class Gt06CodecTests(SynchronousTestCase):
    def parse(self, frame: str) -> gt06.Packet:
        frames, errors = gt06.Gt06Framer(1024).feed(h(frame))
        self.assertEqual(errors, [])
        return gt06.parseFrame(frames[0])

    def test_login(self) -> None:
        packet = self.parse(GT06_LOGIN)
        self.assertEqual((packet.protocol, packet.serial), (gt06.LOGIN, 9))
        self.assertEqual(gt06.parseImei(packet), GT06_LOGIN_IMEI)
        self.assertEqual(gt06.echoAck(gt06.LOGIN, 1), h(CONCOX_LOGIN_ACK))
        self.assertEqual(gt06.encodeLogin(GT06_LOGIN_IMEI, 9), h(GT06_LOGIN))

    def test_locations(self) -> None:
        self.assertEqual(gt06.parseLocation(self.parse(GT06_LOCATION_22)), {
            "ts": 1451357465000,  # 2015-12-29 02:51:05 UTC
            "lat": 23.1116933, "lon": 114.4092978, "speed": 0, "course": 0,
            "satellites": 9, "valid": True,
        })
        self.assertEqual(gt06.parseLocation(self.parse(GT06_LOCATION_12)), {
            "ts": 1552909056000, "lat": 11.3919128, "lon": 77.89064, "speed": 3,
            "course": 51, "satellites": 7, "valid": True,
        })

    def test_statusAndReplies(self) -> None:
        status = self.parse(GT06_STATUS)
        self.assertEqual(gt06.parseStatus(status)["terminal"], 0x30)
        self.assertEqual(gt06.parseReply(self.parse(GT06_REPLY)),
                         (0, "<ICCID:89882390000097302650>"))
        self.assertEqual(gt06.parseReply(self.parse(GT06_REPLY_LONG_UTF16)),
                         (0, "Command error!"))

    def test_encodedLocationRoundTrip(self) -> None:
        frame = gt06.encodeLocation(1_700_000_000_000, -33.8688, -151.2093, 42, 270, 7, 3)
        frames, _ = gt06.Gt06Framer(1024).feed(frame)
        self.assertEqual(gt06.parseLocation(gt06.parseFrame(frames[0])), {
            "ts": 1_700_000_000_000, "lat": -33.8688, "lon": -151.2093, "speed": 42,
            "course": 270, "satellites": 7, "valid": True,
        })

    def test_badCrc(self) -> None:
        bad = flipped(h(GT06_LOCATION_22), len(h(GT06_LOCATION_22)) - 3)
        frames, errors = gt06.Gt06Framer(1024).feed(bad)
        with self.assertRaises(gt06.Gt06Error) as e:
            gt06.parseFrame(frames[0])
        self.assertEqual(e.exception.code, gt06.BAD_CRC)
        self.assertEqual(gt06.parseFrame(frames[0], checkCrc=False).protocol, 0x22)

    def test_resynchronises(self) -> None:
        """
        Garbage, a frame whose length misses its stop bytes and an oversize length are
        skipped, reported, and the frames after them found (those after a wrong length
        once the bytes it claims have arrived).
        """
        stream = (b"\x01\x02garbage" + h(GT06_LOGIN) + h("7878ff22") + b"\x00" * 10
                  + h(GT06_LOCATION_22) + b"\x00" * 300 + h("7979ffff") + h(GT06_STATUS))
        frames, errors = gt06.Gt06Framer(1024).feed(stream)
        self.assertEqual(frames, [h(GT06_LOGIN), h(GT06_LOCATION_22), h(GT06_STATUS)])
        self.assertIn(gt06.BAD_START, [e.code for e in errors])
        self.assertIn(gt06.TOO_LARGE, [e.code for e in errors])
        self.assertIn(gt06.BAD_LENGTH, [e.code for e in errors])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600))
    def test_randomBytes(self, data: bytes) -> None:
        framer = gt06.Gt06Framer(512)
        frames, _ = framer.feed(data)
        for frame in frames:
            try:
                packet = gt06.parseFrame(frame, checkCrc=False)
                gt06.parseLocation(packet)
            except gt06.Gt06Error:
                pass
            try:
                gt06.parseReply(packet)
                gt06.parseStatus(packet)
                gt06.parseImei(packet)
            except gt06.Gt06Error:
                pass
        self.assertLessEqual(len(framer._buffer), 512)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_anySplit(self, data: st.DataObject) -> None:
        parts = [h(GT06_LOGIN), h(GT06_LOCATION_22), h(GT06_STATUS), h(GT06_REPLY_LONG_UTF16)]
        stream = b"".join(parts)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
        framer = gt06.Gt06Framer(1024)
        frames: list[bytes] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            more, errors = framer.feed(stream[start:end])
            self.assertEqual(errors, [])
            frames.extend(more)
        self.assertEqual(frames, parts)


class PacketAcksTests(SynchronousTestCase):
    def test_inOrderAfterAll(self) -> None:
        acks = PacketAcks()
        self.assertEqual(acks.add(["a", "b"], b"1"), [])
        self.assertEqual(acks.add(["c"], b"2"), [])
        self.assertEqual(acks.stored("c"), [])
        self.assertEqual(acks.stored("a"), [])
        self.assertEqual(acks.stored("b"), [b"1", b"2"])
        self.assertEqual(acks.add([], b"0"), [b"0"])

    def test_failedPacketNeverAnswered(self) -> None:
        acks = PacketAcks()
        acks.add(["a", "b"], b"1")
        acks.add(["a"], b"2")
        self.assertEqual(acks.notStored("a"), [])
        self.assertEqual(acks.stored("b"), [])
        self.assertEqual(acks.stored("a"), [b"2"])
        self.assertEqual(len(acks), 0)


# --- the protocols, on fakes ---


def trackerConfig(dialect: str, **listener: object):  # type: ignore[no-untyped-def]
    sections = {"listener:trk": {"endpoint": "tcp:0", "dialect": dialect, **listener}}
    return parseConfig(iniText(sections), "test.ini")


class TrackerEnd:
    """
    The tracker's end of one connection built by its listener's factory.
    """

    def __init__(self, dialect: str, sink: MemorySink | None = None, **listener: object) -> None:
        self.clock = makeClock()
        self.sink = sink or MemorySink()
        self.config = trackerConfig(dialect, **listener)
        self.context = makeContext(self.config, clock=self.clock, sink=self.sink)
        factory = ControllerFactory(self.context, self.config.listeners[0], lambda t: None)
        self.protocol: Any = factory.buildProtocol(None)
        self.transport = RecordingTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5027),
            peerAddress=IPv4Address("TCP", "192.0.2.9", 40000),
        )
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def storeAll(self) -> bytes:
        self.transport.clear()
        for submission in list(self.sink.submissions):
            if not submission.deferred.called:
                submission.deferred.callback(None)
        return self.transport.value()

    def errors(self, code: str) -> float:
        return self.context.metrics.frameErrors.labels(code)._value.get()


class TeltonikaProtocolTests(SynchronousTestCase):
    def live(self, **listener: object) -> TrackerEnd:
        end = TrackerEnd("teltonika", **listener)
        self.assertEqual(end.send(h(WIKI_IMEI)), b"\x01")
        self.assertIs(end.protocol.state, State.LIVE)
        return end

    def test_ackedAfterCommit(self) -> None:
        end = self.live()
        self.assertEqual(end.send(h(WIKI_CODEC8_TWO)), b"")
        self.assertEqual(len(end.sink.submissions), 2)
        end.sink.succeed(end.sink.submissions[0].messageId)
        self.assertEqual(end.transport.value(), b"")
        self.assertEqual(end.storeAll(), h("00000002"))
        first = end.sink.submissions[0]
        self.assertEqual((first.deviceTs, first.body["priority"]), (1560160861000, 1))

    def test_retransmissionSameIds(self) -> None:
        end = self.live()
        end.send(h(WIKI_CODEC8))
        end.storeAll()
        end.send(h(WIKI_CODEC8))
        self.assertEqual(end.storeAll(), h("00000001"))
        ids = end.sink.messageIds
        self.assertEqual(len(ids), 2)
        self.assertEqual(ids[0], ids[1])

    def test_notStoredNotAcked(self) -> None:
        end = self.live()
        end.send(h(WIKI_CODEC8))
        end.sink.fail(end.sink.messageIds[0], Unavailable("down"))
        self.assertEqual(end.transport.value(), b"")
        self.assertIs(end.protocol.state, State.LIVE)

    def test_corruptSkippedConnectionUsable(self) -> None:
        end = self.live()
        good = h(WIKI_CODEC8)
        self.assertEqual(end.send(flipped(good, len(good) - 2)), b"")
        self.assertEqual(end.errors(tk.BAD_CRC), 1)
        end.send(b"\xff")  # a keepalive: ignored
        end.send(good)
        self.assertEqual(end.storeAll(), h("00000001"))
        self.assertEqual(len(end.sink.submissions), 1)

    def test_oversizeLengthCloses(self) -> None:
        end = self.live()
        end.send(h("00000000") + (70000).to_bytes(4, "big") + b"\x08\x01")
        self.assertEqual(end.errors(tk.TOO_LARGE), 1)
        self.assertIs(end.protocol.state, State.CLOSED)
        self.assertEqual(end.sink.submissions, [])

    def test_refusedAnsweredZero(self) -> None:
        end = TrackerEnd("teltonika")

        def refuse(*args: object) -> Deferred[Any]:
            return Deferred.fromCoroutine(_raise(AuthFailed("unknown_controller")))

        end.context.ownership.claim = refuse  # type: ignore[method-assign]
        self.assertEqual(end.send(h(WIKI_IMEI)), b"\x00")
        self.assertIs(end.protocol.state, State.CLOSED)

    def test_commandCodec12(self) -> None:
        end = self.live()
        session = end.protocol.session
        end.transport.clear()
        self.assertTrue(end.protocol.deliver("c-1", '{"command": "getinfo"}', 2**62))
        self.assertEqual(end.transport.value(), h(WIKI_GETINFO))
        end.send(h(TRACCAR_RESPONSE))
        settler = end.context.settler
        self.assertEqual(settler.answers[-1], (session, "c-1", True, ""))
        self.assertEqual(settler.results[-1], TRACCAR_RESPONSE_TEXT)
        self.assertEqual(end.protocol.maxInflight, 1)
        for body in ('{"cmd": "x"}', '{"command": ""}', '{"command": "caf\\u00e9"}', "[]"):
            self.assertRaises(ValueError, end.protocol.writeCommand, "c-2", body, 2**62)

    def test_noPingAndListenerIdleTimeout(self) -> None:
        """
        Nothing is ever written to keep the connection alive; the listener's own
        idle_timeout closes a silent one (not [liveness] idle_timeout's 90s).
        """
        end = self.live(idle_timeout="30m")
        end.transport.clear()
        end.clock.advance(29 * 60)
        self.assertIs(end.protocol.state, State.LIVE)
        self.assertEqual(end.transport.value(), b"")
        end.send(b"\xff")
        end.clock.advance(29 * 60)
        self.assertIs(end.protocol.state, State.LIVE)
        end.clock.advance(61)
        self.assertIs(end.protocol.state, State.CLOSED)
        self.assertEqual(end.transport.value(), b"")

    def test_takeoverAborts(self) -> None:
        end = self.live()
        end.transport.clear()
        end.protocol.close("takeover")
        self.assertEqual(end.transport.aborts, 1)
        self.assertEqual(end.transport.value(), b"")

    def test_hoursOldStoredFutureFlagged(self) -> None:
        end = self.live()
        now = int(EPOCH_SECONDS * 1000)
        old = tk.encodeRecord(now - 6 * 3600_000, 1.0, 2.0)
        future = tk.encodeRecord(now + 20 * 365 * 86400_000, 1.0, 2.0)
        end.send(tk.avlPacket([old, future]))
        self.assertEqual([s.deviceTs for s in end.sink.submissions],
                         [now - 6 * 3600_000, now + 20 * 365 * 86400_000])
        flagged = end.context.metrics.timestampsFlagged
        self.assertEqual(flagged.labels("future")._value.get(), 1)
        self.assertEqual(flagged.labels("stale")._value.get(), 0)
        self.assertEqual(end.storeAll(), h("00000002"))


class RandomBytesToProtocols(SynchronousTestCase):
    """
    Whatever a live tracker sends, no frame handling fails (a failure would abort the
    connection at once) and nothing unexpected is stored.
    """

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=6), st.sampled_from(["teltonika", "gt06"]))
    def test_randomReads(self, reads: list[bytes], dialect: str) -> None:
        end = TrackerEnd(dialect)
        end.send(h(WIKI_IMEI if dialect == "teltonika" else GT06_LOGIN))
        for data in reads:
            end.send(data)
        end.storeAll()
        self.assertEqual(end.transport.aborts, 0)
        self.assertIn(end.protocol.state, (State.LIVE, State.CLOSED))

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_splitPacketsStoredAndAcked(self, data: st.DataObject) -> None:
        stream = h(WIKI_IMEI + WIKI_CODEC8 + "FF" + WIKI_CODEC8_TWO)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        end = TrackerEnd("teltonika")
        out = b""
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            out += end.send(stream[start:stop])
        out += end.storeAll()
        self.assertEqual(out, b"\x01" + h("00000001") + h("00000002"))
        self.assertEqual(len(end.sink.submissions), 3)


async def _raise(error: Exception) -> Any:
    raise error


class Gt06ProtocolTests(SynchronousTestCase):
    def live(self, **listener: object) -> TrackerEnd:
        end = TrackerEnd("gt06", **listener)
        self.assertEqual(end.send(h(GT06_LOGIN)), gt06.echoAck(gt06.LOGIN, 9))
        self.assertEqual(end.protocol.session.controller, GT06_LOGIN_IMEI)
        return end

    def test_locationEchoedAfterCommit(self) -> None:
        end = self.live()
        self.assertEqual(end.send(h(GT06_LOCATION_22)), b"")
        (submission,) = end.sink.submissions
        self.assertEqual(submission.deviceTs, 1451357465000)
        self.assertEqual(submission.body["lat"], 23.1116933)
        self.assertEqual(end.storeAll(), gt06.echoAck(0x22, 8))

    def test_statusEchoed(self) -> None:
        end = self.live()
        end.send(h(GT06_STATUS))
        (submission,) = end.sink.submissions
        self.assertEqual(submission.body["status"]["gsm"], 0x2B)
        self.assertEqual(end.storeAll(), gt06.echoAck(gt06.STATUS, 0x5EE4))

    def test_badCrcNotAnswered(self) -> None:
        end = self.live()
        location = h(GT06_LOCATION_22)
        self.assertEqual(end.send(flipped(location, 10)), b"")
        self.assertEqual(end.errors(gt06.BAD_CRC), 1)
        self.assertEqual(end.sink.submissions, [])
        end.send(location)
        self.assertEqual(len(end.sink.submissions), 1)

    def test_crcNotChecked(self) -> None:
        end = self.live(check_crc="no")
        end.send(flipped(h(GT06_LOCATION_22), len(h(GT06_LOCATION_22)) - 3))
        self.assertEqual(len(end.sink.submissions), 1)

    def test_loginRequired(self) -> None:
        end = TrackerEnd("gt06")
        self.assertEqual(end.send(h(GT06_LOCATION_22)), b"")
        self.assertIs(end.protocol.state, State.AWAITING_HELLO)
        self.assertEqual(end.errors("login_required"), 1)

    def test_command(self) -> None:
        end = self.live()
        end.transport.clear()
        end.protocol.deliver("c-9", {"command": "WHERE#"}, 2**62)
        self.assertEqual(end.transport.value(), gt06.command(1, b"WHERE#", 1))
        end.send(h(GT06_REPLY))
        self.assertEqual(end.context.settler.results[-1], "<ICCID:89882390000097302650>")
        self.assertEqual(end.context.settler.answers[-1][1:], ("c-9", True, ""))


class ListenerKeyTests(SynchronousTestCase):
    def test_authAndIdleTimeout(self) -> None:
        listener = trackerConfig("gt06", auth="registered", idle_timeout="30m").listeners[0]
        self.assertEqual((listener.auth, listener.idle_timeout), ("registered", 1800.0))
        inherited = trackerConfig("teltonika").listeners[0]
        self.assertEqual((inherited.auth, inherited.idle_timeout), (None, None))
        with self.assertRaises(ConfigError) as e:
            trackerConfig("teltonika", auth="imei")
        self.assertIn("auth", str(e.exception))

    def test_framingImplied(self) -> None:
        with self.assertRaises(ConfigError):
            trackerConfig("teltonika", framing="lines")
        with self.assertRaises(ConfigError):
            trackerConfig("teltonika", check_crc="no")

    def test_authModeReachesOwnership(self) -> None:
        end = TrackerEnd("teltonika", auth="registered")
        modes: list[object] = []

        def claim(*args: object) -> Deferred[Any]:
            modes.append(args[4:])
            return Deferred()

        end.context.ownership.claim = claim  # type: ignore[method-assign]
        end.send(h(WIKI_IMEI))
        self.assertEqual(modes, [("registered",)])


# --- registered mode, against PostgreSQL ---


class RegisteredOwnershipTests(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = Store(self.db, "gw-1", ClaimPolicy(flapThreshold=1000, refuseFlapping=False))
        await self.store.registerInstance("test-host", 1)
        self.events = EventLog(reactor, self.store, self.metrics)
        self.ownership = PostgresOwnership(
            reactor, self.store, self.events, AuthConfig("none", 3, 60.0), self.metrics
        )
        await self.store.addController("356307042441013", hashToken("unused"), "tracker")
        await self.store.addController("111", hashToken("unused"), "off")
        await self.store.setControllerEnabled("111", False)
        self.addCleanup(lambda: self.ownership.drain())
        self.addCleanup(lambda: self.events.drain())

    async def refusal(self, controller: str, mode: str | None) -> str | None:
        try:
            await self.ownership.claim(controller, None, "trk", "192.0.2.1:1", mode)
        except AuthFailed as e:
            return e.reason
        return None

    @deferred
    async def test_registered(self) -> None:
        """
        Registered mode admits a known, enabled id with no token, and refuses an unknown
        or disabled one; the same ownership admits anyone in its [auth] mode (none), and
        asks for the token in token mode.
        """
        self.assertIsNone(await self.refusal("356307042441013", "registered"))
        self.assertEqual(await self.refusal("999", "registered"), "unknown_controller")
        self.assertEqual(await self.refusal("111", "registered"), "disabled")
        self.assertIsNone(await self.refusal("999", None))
        self.assertEqual(await self.refusal("356307042441013", "token"), "bad_token")

    @deferred
    async def test_registeredFleetBehindOneAddress(self) -> None:
        """
        Many trackers behind one address claim at once in registered mode and are all
        admitted ([auth] max_failures is 3 here); ids refused from that address still
        count against it, and past the limit it is refused without a look-up.
        """
        for i in range(20):
            await self.store.addController(f"35000000000{i:04d}", hashToken("unused"), "")
        sessions = await gatherResults([
            self.ownership.claim(f"35000000000{i:04d}", None, "trk", f"198.51.100.1:{i}",
                                 "registered")
            for i in range(20)])
        self.assertEqual(len(sessions), 20)
        for i in range(3):
            self.assertEqual(await self.refusal(f"9{i}", "registered"), "unknown_controller")
        self.assertEqual(await self.refusal("356307042441013", "registered"), "rate_limited")


# --- through a real gateway and PostgreSQL ---


class Tracker(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self.isClosed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.isClosed = True
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def expect(self, data: bytes, timeout: float = 15) -> None:
        """
        Wait for exactly C{data} next, and consume it.
        """
        await waitUntil(lambda: len(self.received) >= len(data) or self.isClosed, timeout,
                        what=lambda: f"{data.hex()}; got {self.received.hex()}")
        got, self.received = self.received[: len(data)], self.received[len(data) :]
        if got != data:
            raise AssertionError(f"expected {data.hex()}, got {got.hex()}")


class TrackerGatewayTests(PostgresTestCase):
    timeout = 120

    async def gateway(self, dialect: str, **listener: object) -> Any:
        sections: dict[str, dict[str, object]] = {
            "listener:main": {"dialect": dialect, "auth": "registered", **listener},
            "outbox": {"poll_interval": "200ms"},
        }
        gateway = await startGateway(self, self.dsn, self.schema, "a", sections)
        return gateway

    async def connect(self, gateway: Any) -> Tracker:
        tracker = Tracker()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", listenerPort(gateway)), tracker)
        self.addCleanup(lambda: None if tracker.isClosed else tracker.transport.abortConnection())
        return tracker

    async def query(self, sql: str, *args: object) -> list[Any]:
        return list(await self.db.runQuery("test", sql, args))

    async def commandState(self, command: str, state: str) -> dict[str, Any]:
        status: dict[str, Any] = {}

        async def poll() -> bool:
            nonlocal status
            ((status,),) = await self.query("SELECT command_status(%s::uuid)", command)
            return bool(status["state"] == state)

        for _ in range(300):
            if await poll():
                return status
            await sleep(0.05)
        raise AssertionError(f"{command} is {status}")

    @deferred
    async def test_teltonikaExamplesLandInPostgres(self) -> None:
        """
        The wiki's Codec 8 and 8 Extended examples decode to their documented values in
        the inbox; the acks are byte-exact and sent once stored; a packet sent again is
        stored once; a flipped CRC byte is neither stored nor acked and the connection
        goes on; an unknown IMEI is answered 00.
        """
        gateway = await self.gateway("teltonika")
        await gateway.store.addController("356307042441013", hashToken("x"), "")
        stranger = await self.connect(gateway)
        stranger.send(h(TRACCAR_IMEI))
        await stranger.expect(b"\x00")
        await waitUntil(lambda: stranger.isClosed, 10, what="the stranger closed")

        truncated = await self.connect(gateway)
        truncated.send(h(WIKI_IMEI))
        await truncated.expect(b"\x01")
        truncated.send(h(WIKI_CODEC8E)[:30])
        await sleep(0.3)
        self.assertEqual(truncated.received, b"")

        tracker = await self.connect(gateway)
        tracker.send(h(WIKI_IMEI))
        await tracker.expect(b"\x01")
        await waitUntil(lambda: truncated.isClosed, 10, what="the truncated one taken over")
        self.assertEqual(truncated.received, b"")
        tracker.send(h(WIKI_CODEC8))
        await tracker.expect(h("00000001"))
        tracker.send(h(WIKI_CODEC8_TWO))
        await tracker.expect(h("00000002"))
        tracker.send(h(WIKI_CODEC8))  # its ack was lost, say
        await tracker.expect(h("00000001"))
        bad = h(WIKI_CODEC8E)
        tracker.send(flipped(bad, len(bad) - 1) + b"\xff")
        tracker.send(bad)
        await tracker.expect(h("00000001"))
        self.assertEqual(tracker.received, b"")
        rows = await self.query(
            "SELECT (extract(epoch FROM device_ts) * 1000)::bigint, body FROM inbox"
            " WHERE controller_id = '356307042441013' ORDER BY device_ts")
        self.assertEqual(len(rows), 4)
        self.assertEqual(rows[2], (1560161086000, {
            "ts": 1560161086000, "priority": 1, "lat": 0, "lon": 0, "alt": 0, "angle": 0,
            "satellites": 0, "speed": 0, "event": 1,
            "io": {"21": 3, "1": 1, "66": 24079, "241": 24602, "78": 0}}))
        self.assertEqual(rows[3][1]["io"], {"1": 1, "17": 29, "16": 22949000,
                                            "11": 893700218, "14": 500686954})
        self.assertEqual(sample(gateway, "ctrlgw_frame_errors_total", {"code": "bad_crc"}), 1)

        (command,), = await self.query(
            "SELECT send(%s, %s::jsonb)::text", "356307042441013", '{"command": "getinfo"}')
        await tracker.expect(h(WIKI_GETINFO))
        tracker.send(h(TRACCAR_RESPONSE))
        status = await self.commandState(command, "acked")
        self.assertEqual(status["result"], TRACCAR_RESPONSE_TEXT)

        # A second connection with the IMEI wins; the first is aborted.
        newer = await self.connect(gateway)
        newer.send(h(WIKI_IMEI))
        await newer.expect(b"\x01")
        await waitUntil(lambda: tracker.isClosed, 10, what="the older connection aborted")
        newer.send(h("00000000") + (70000).to_bytes(4, "big"))
        await waitUntil(lambda: newer.isClosed, 10, what="oversize packet closing")
        self.assertEqual(newer.received, b"")

    @deferred
    async def test_twistdProcess(self) -> None:
        """
        The wiki's Codec 8 example through a gateway process (twistd ctrlgw): admitted
        under auth = registered, acked 00000001, in the inbox with its own timestamp.
        """
        store = Store(self.db, "test", ClaimPolicy())
        await store.addController("356307042441013", hashToken("x"), "")
        port, http = freePort(), freePort()
        workdir = FilePath(self.mktemp())
        workdir.makedirs()
        config = workdir.child("gw.ini")
        config.setContent(gatewayConfigText(self.dsn, self.schema, "proc", {
            "listener:main": {"endpoint": f"tcp:{port}:interface=127.0.0.1",
                              "dialect": "teltonika", "auth": "registered",
                              "idle_timeout": "30m"},
            "http": {"endpoint": f"tcp:{http}:interface=127.0.0.1"},
        }).encode("utf-8"))
        child = TwistdProcess.spawn(
            self, ["-n", "--pidfile=", "ctrlgw", "--config", config.path], workdir.path)
        await child.waitReady(http, timeout=60)
        tracker = Tracker()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), tracker)
        self.addCleanup(lambda: None if tracker.isClosed else tracker.transport.abortConnection())
        tracker.send(h(WIKI_IMEI))
        await tracker.expect(b"\x01")
        tracker.send(h(WIKI_CODEC8)[:20])
        await sleep(0.05)
        tracker.send(h(WIKI_CODEC8)[20:])
        await tracker.expect(h("00000001"))
        rows = await self.query(
            "SELECT (extract(epoch FROM device_ts) * 1000)::bigint, body->'io' FROM inbox"
            " WHERE controller_id = '356307042441013'")
        self.assertEqual(rows, [(1560161086000,
                                 {"21": 3, "1": 1, "66": 24079, "241": 24602, "78": 0})])
        self.assertNotIn(b"Traceback", child.output, child.text())

    @deferred
    async def test_gt06ExamplesLandInPostgres(self) -> None:
        gateway = await self.gateway("gt06")
        await gateway.store.addController(GT06_LOGIN_IMEI, hashToken("x"), "")
        tracker = await self.connect(gateway)
        tracker.send(h(GT06_LOGIN))
        await tracker.expect(h("78780501000955940d0a"))
        location = h(GT06_LOCATION_22)
        tracker.send(flipped(location, 12))
        tracker.send(b"junk" + location[:9])
        tracker.send(location[9:])
        await tracker.expect(gt06.echoAck(0x22, 8))
        tracker.send(h(GT06_STATUS))
        await tracker.expect(gt06.echoAck(gt06.STATUS, 0x5EE4))
        rows = await self.query(
            "SELECT (extract(epoch FROM device_ts) * 1000)::bigint, body FROM inbox"
            " WHERE controller_id = %s ORDER BY id", GT06_LOGIN_IMEI)
        self.assertEqual(rows[0], (1451357465000, {
            "ts": 1451357465000, "lat": 23.1116933, "lon": 114.4092978, "speed": 0,
            "course": 0, "satellites": 9, "valid": True}))
        self.assertEqual(rows[1][1]["status"]["gsm"], 0x2B)
        self.assertEqual(len(rows), 2)
        self.assertEqual(sample(gateway, "ctrlgw_frame_errors_total", {"code": "bad_crc"}), 1)
        (command,), = await self.query(
            "SELECT send(%s, %s::jsonb)::text", GT06_LOGIN_IMEI, json.dumps({"command": "WHERE#"}))
        await tracker.expect(gt06.command(1, b"WHERE#", 1))
        tracker.send(h(GT06_REPLY))
        status = await self.commandState(command, "acked")
        self.assertEqual(status["result"], "<ICCID:89882390000097302650>")


class TrackerSimTests(PostgresTestCase):
    timeout = 90

    async def fleet(self, dialect: str) -> None:
        """
        A small fleet of simulated trackers: every tracker admitted, every position sent
        acked and in the inbox once, a command answered.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-sim", {
            "listener:main": {"dialect": dialect, "auth": "registered"}})
        options = SimOptions(endpoints=[("127.0.0.1", listenerPort(gateway))],
                             controllers=20, rate=100.0, duration=2.0, dialect=dialect)
        ids = [imeiFor(options.prefix, i) for i in range(20)]
        for imei in ids:
            await gateway.store.addController(imei, hashToken("x"), "")
        commandSent: list[str] = []

        def tick(stats: Stats, elapsed: float) -> None:
            if stats.welcomes == 20 and not commandSent:
                commandSent.append("pending")
                d = self.db.runQuery(
                    "test", "SELECT send(%s, '{\"command\": \"getinfo\"}')::text", (ids[3],))
                d.addCallback(lambda rows: commandSent.__setitem__(0, rows[0][0]))

        stats = await runSim(reactor, options, tick)
        self.assertEqual(stats.welcomes, 20)
        self.assertGreater(stats.msgs, 100)
        self.assertEqual(stats.acks, stats.msgs)
        self.assertEqual(stats.errors, 0, (stats.errorCodes, stats.counters()))
        rows = await self.db.runQuery(
            "test", "SELECT count(*), count(DISTINCT message_id) FROM inbox")
        self.assertEqual(rows, [(stats.acks, stats.acks)])
        self.assertEqual(stats.cmds, 1)
        state = await self.db.runQuery(
            "test", "SELECT state, result FROM commands WHERE id = %s", (commandSent[0],))
        self.assertEqual(state, [("acked", "OK")])

    def test_teltonikaFleet(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.fleet("teltonika"))

    def test_gt06Fleet(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.fleet("gt06"))
