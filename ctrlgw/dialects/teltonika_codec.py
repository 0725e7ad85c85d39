# -*- test-case-name: tests.test_telematics -*-
"""
Teltonika's TCP protocol, pure: cutting the stream into frames, decoding them and
encoding what the server writes.  No I/O here; buffers are bounded.

Layouts (docs/dialects.md, checked against the worked examples of Teltonika's "Codec"
wiki page and Traccar's C{TeltonikaProtocolDecoderTest}):

 - identification: length (2 bytes, big-endian) + that many ASCII digits, the IMEI;
   answered C{01} (admitted) or C{00} (refused);
 - a packet: four zero bytes, the data length (4), the data -- codec id (1), N1 (1),
   N1 records or a Codec 12 message, N2 (1) -- and the CRC-16/IBM of the data (4, the
   upper two zero); an AVL packet is answered with the record count (4);
 - a lone C{FF} between packets: the device's keepalive.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

from ctrlgw.dialects.crc16 import crc16ibm

CODEC_8 = 0x08
CODEC_8E = 0x8E
CODEC_12 = 0x0C
AVL_CODECS = (CODEC_8, CODEC_8E)
COMMAND = 0x05
RESPONSE = 0x06
KEEPALIVE = b"\xff"

# The data field of an AVL packet is at most 1280 bytes (Teltonika: a device never sends
# more in one packet); Codec 12 responses may be longer, up to the listener's max_frame.
MAX_AVL_DATA = 1280
MAX_IMEI = 17  # 15 digits, and a little room for the 16-digit forms some devices send
_PREAMBLE = b"\x00\x00\x00\x00"
_HEADER = 8  # preamble + data length
# An 8-byte millisecond timestamp PostgreSQL can store (to_timestamp: before 294277 AD)
# and Python can read; beyond it a record is refused as bad_record.
MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z

# Frame error codes (ctrlgw_frame_errors_total{code}).
BAD_IMEI = "bad_imei"
BAD_PREAMBLE = "bad_preamble"
TOO_LARGE = "too_large"
BAD_CRC = "bad_crc"
BAD_LENGTH = "bad_length"
RECORD_COUNT_MISMATCH = "record_count_mismatch"
UNKNOWN_CODEC = "unknown_codec"
BAD_RECORD = "bad_record"


class TeltonikaError(Exception):
    """
    A frame that cannot be used; C{fatal} when the stream cannot be followed after it.
    """

    def __init__(self, code: str, detail: str, fatal: bool = False) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.fatal = fatal


class TeltonikaFramer:
    """
    Cuts a device's byte stream into its identification, then packets (and keepalives),
    as complete frames; the buffer never holds more than one frame of C{maxData} bytes of
    data.  After a fatal error it accepts nothing more.
    """

    def __init__(self, maxData: int) -> None:
        self.maxData = maxData
        self.identified = False
        self._buffer = b""
        self.failed = False

    def feed(self, data: bytes) -> tuple[list[bytes], TeltonikaError | None]:
        """
        The complete frames C{data} finishes, and a fatal error if the stream broke (the
        frames before it are good).
        """
        if self.failed:
            return [], None
        buffer = self._buffer + data
        frames: list[bytes] = []
        offset = 0
        error: TeltonikaError | None = None
        while True:
            size, error = self._frameSize(buffer, offset)
            if error is not None or size is None or len(buffer) - offset < size:
                break
            frames.append(buffer[offset : offset + size])
            offset += size
            self.identified = True
        self._buffer = b"" if error is not None else buffer[offset:]
        self.failed = error is not None
        return frames, error

    def _frameSize(self, buffer: bytes, offset: int) -> tuple[int | None, TeltonikaError | None]:
        available = len(buffer) - offset
        if not self.identified:
            if available < 2:
                return None, None
            (length,) = struct.unpack_from(">H", buffer, offset)
            if not 1 <= length <= MAX_IMEI:
                return None, TeltonikaError(BAD_IMEI, f"an IMEI of {length} bytes", fatal=True)
            return 2 + length, None
        if available < 1:
            return None, None
        if buffer[offset] == 0xFF:
            return 1, None
        head = buffer[offset : offset + min(available, 4)]
        if head != _PREAMBLE[: len(head)]:
            return None, TeltonikaError(BAD_PREAMBLE, "a packet starts with four zero bytes",
                                        fatal=True)
        if available < _HEADER:
            return None, None
        (length,) = struct.unpack_from(">I", buffer, offset + 4)
        if length > self.maxData:
            return None, TeltonikaError(
                TOO_LARGE, f"a packet of {length} bytes of data; the limit is {self.maxData}",
                fatal=True)
        if length < 3:
            return None, TeltonikaError(BAD_LENGTH, f"a packet of {length} bytes of data",
                                        fatal=True)
        return _HEADER + length + 4, None


def parseImei(frame: bytes) -> str:
    imei = frame[2:]
    if not imei.isdigit():
        raise TeltonikaError(BAD_IMEI, "an IMEI is ASCII digits", fatal=True)
    return imei.decode("ascii")


@dataclass(frozen=True)
class Record:
    """
    One AVL record; C{raw} is its bytes as sent, from which its message id is derived.
    """

    ts: int
    priority: int
    lon: float
    lat: float
    alt: int
    angle: int
    satellites: int
    speed: int
    event: int
    io: dict[str, Any]
    raw: bytes = field(repr=False)

    @property
    def messageId(self) -> str:
        """
        Derived from the record's bytes alone: the same record sent again (its packet's
        ack was lost) has the same id, and is stored once.
        """
        return "tk-" + hashlib.blake2b(self.raw, digest_size=12).hexdigest()

    def body(self) -> dict[str, Any]:
        return {
            "ts": self.ts, "priority": self.priority, "lat": self.lat, "lon": self.lon,
            "alt": self.alt, "angle": self.angle, "satellites": self.satellites,
            "speed": self.speed, "event": self.event, "io": self.io,
        }


@dataclass(frozen=True)
class AvlPacket:
    codec: int
    records: tuple[Record, ...]


@dataclass(frozen=True)
class CodecMessage:
    """
    A Codec 12 message: C{kind} 0x05 (command) or 0x06 (response), its text as bytes.
    """

    kind: int
    text: bytes


class _Reader:
    def __init__(self, data: bytes, offset: int, end: int) -> None:
        self.data = data
        self.offset = offset
        self.end = end

    def take(self, size: int) -> bytes:
        if self.offset + size > self.end:
            raise TeltonikaError(BAD_LENGTH, "the data ends inside a record")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def sint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big", signed=True)


def parsePacket(frame: bytes) -> AvlPacket | CodecMessage:
    """
    Decode one complete packet (from L{TeltonikaFramer}).

    @raise TeltonikaError: it fails its CRC, its counts disagree, its records do not fill
        its length exactly, or its codec is not 8, 8E or 12 (none fatal: the next packet
        is found by the length).
    """
    (length,) = struct.unpack_from(">I", frame, 4)
    data = frame[_HEADER : _HEADER + length]
    (crc,) = struct.unpack_from(">I", frame, _HEADER + length)
    if crc != crc16ibm(data):
        raise TeltonikaError(BAD_CRC, f"CRC {crc:#06x}, computed {crc16ibm(data):#06x}")
    codec, count = data[0], data[1]
    if data[-1] != count:
        raise TeltonikaError(RECORD_COUNT_MISMATCH, f"N1 {count}, N2 {data[-1]}")
    reader = _Reader(data, 2, len(data) - 1)
    if codec in AVL_CODECS:
        if length > MAX_AVL_DATA:
            raise TeltonikaError(TOO_LARGE, f"{length} bytes of AVL data; the limit is {MAX_AVL_DATA}")
        records = tuple(_record(reader, codec == CODEC_8E) for _ in range(count))
        result: AvlPacket | CodecMessage = AvlPacket(codec, records)
    elif codec == CODEC_12:
        kind = reader.uint(1)
        size = reader.uint(4)
        result = CodecMessage(kind, reader.take(size))
    else:
        raise TeltonikaError(UNKNOWN_CODEC, f"codec {codec:#04x} is not 8, 8E or 12")
    if reader.offset != reader.end:
        raise TeltonikaError(BAD_LENGTH, f"{reader.end - reader.offset} bytes after the records")
    return result


_GPS = struct.Struct(">QBiihHBH")  # timestamp .. speed: 24 bytes
_UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I"),
         8: struct.Struct(">Q")}


def _record(reader: _Reader, extended: bool) -> Record:
    start = reader.offset
    data = reader.data
    if start + _GPS.size > reader.end:
        raise TeltonikaError(BAD_LENGTH, "the data ends inside a record")
    ts, priority, lon, lat, alt, angle, satellites, speed = _GPS.unpack_from(data, start)
    if ts > MAX_TS_MS:
        raise TeltonikaError(BAD_RECORD, f"timestamp {ts} is past the year 9999")
    reader.offset = start + _GPS.size
    idSize = 2 if extended else 1
    ids = _UINT[idSize]
    event = reader.uint(idSize)
    reader.uint(idSize)  # the total count: the sum of the groups' below
    io: dict[str, Any] = {}
    for size in (1, 2, 4, 8):
        count = reader.uint(idSize)
        width = idSize + size
        end = reader.offset + count * width
        if end > reader.end:
            raise TeltonikaError(BAD_LENGTH, "the data ends inside a record")
        values = _UINT[size]
        for at in range(reader.offset, end, width):
            io[str(ids.unpack_from(data, at)[0])] = values.unpack_from(data, at + idSize)[0]
        reader.offset = end
    if extended:
        for _ in range(reader.uint(2)):
            key = str(reader.uint(2))
            io[key] = reader.take(reader.uint(2)).hex()
    return Record(ts, priority, lon / 1e7, lat / 1e7, alt, angle, satellites, speed, event, io,
                  data[start : reader.offset])


# --- encoding: what the gateway writes, and what the simulator sends ---

IMEI_ACCEPTED = b"\x01"
IMEI_REFUSED = b"\x00"


def recordCountAck(count: int) -> bytes:
    return struct.pack(">I", count)


def packet(codec: int, count: int, payload: bytes) -> bytes:
    data = bytes([codec, count]) + payload + bytes([count])
    return _PREAMBLE + struct.pack(">I", len(data)) + data + struct.pack(">I", crc16ibm(data))


def codec12(kind: int, text: bytes) -> bytes:
    """
    A Codec 12 frame: a command (0x05) or a response (0x06).
    """
    return packet(CODEC_12, 1, bytes([kind]) + struct.pack(">I", len(text)) + text)


def encodeImei(imei: str) -> bytes:
    return struct.pack(">H", len(imei)) + imei.encode("ascii")


def encodeRecord(
    ts: int, lat: float, lon: float, priority: int = 0, alt: int = 0, angle: int = 0,
    satellites: int = 0, speed: int = 0, event: int = 0,
    io: dict[int, int] | None = None, extended: bool = False,
) -> bytes:
    """
    One record; C{io} values go in the smallest of the 1, 2, 4 and 8-byte groups they fit.
    """
    idSize = 2 if extended else 1
    groups: dict[int, list[tuple[int, int]]] = {1: [], 2: [], 4: [], 8: []}
    for key, value in sorted((io or {}).items()):
        size = next(s for s in (1, 2, 4, 8) if value < 1 << (8 * s))
        groups[size].append((key, value))

    def n(value: int) -> bytes:
        return value.to_bytes(idSize, "big")

    out = struct.pack(">QBiihHBH", ts, priority, round(lon * 1e7), round(lat * 1e7), alt,
                      angle, satellites, speed)
    out += n(event) + n(sum(len(g) for g in groups.values()))
    for size, items in groups.items():
        out += n(len(items)) + b"".join(n(k) + v.to_bytes(size, "big") for k, v in items)
    if extended:
        out += b"\x00\x00"
    return out


def avlPacket(records: list[bytes], extended: bool = False) -> bytes:
    return packet(CODEC_8E if extended else CODEC_8, len(records), b"".join(records))
