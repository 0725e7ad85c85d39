# -*- test-case-name: tests.test_telematics -*-
"""
The GT06 protocol of Concox trackers, pure: cutting the stream into frames, decoding
them and encoding what the server writes.  No I/O here; buffers are bounded.

A frame (docs/dialects.md; checked against Concox's GT06 protocol document and Traccar's
C{Gt06ProtocolDecoderTest}): start C{78 78} with a 1-byte length or C{79 79} with a
2-byte one; the length counts the protocol number (1), the information content, the
serial number (2) and the CRC-ITU (2), which covers everything from the length to the
serial; stop C{0D 0A}.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ctrlgw.dialects.crc16 import crc16itu

SHORT = b"\x78\x78"
LONG = b"\x79\x79"
STOP = b"\x0d\x0a"

LOGIN = 0x01
LOCATION = 0x12
STATUS = 0x13
REPLY = 0x15  # the answer to a command, short frame
LOCATION_2 = 0x22
REPLY_LONG = 0x21  # the answer to a command, long frame
COMMAND = 0x80
LOCATIONS = (LOCATION, LOCATION_2)

# Frame error codes (ctrlgw_frame_errors_total{code}).
BAD_START = "bad_start"
BAD_LENGTH = "bad_length"
TOO_LARGE = "too_large"
BAD_CRC = "bad_crc"
BAD_IMEI = "bad_imei"
BAD_RECORD = "bad_record"
UNKNOWN_TYPE = "unknown_type"

# A frame's length counts at least the protocol number, serial and CRC.
_MIN_LENGTH = 5


class Gt06Error(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class Gt06Framer:
    """
    Cuts the stream into whole frames.  Whatever is not a frame (a wrong start, a wrong
    stop, a length out of bounds) is skipped up to the next start marker, and reported:
    the framing always resynchronises.  The buffer holds at most one frame of C{maxFrame}
    bytes.
    """

    def __init__(self, maxFrame: int) -> None:
        self.maxFrame = maxFrame
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[list[bytes], list[Gt06Error]]:
        buffer = self._buffer + data
        frames: list[bytes] = []
        errors: list[Gt06Error] = []
        offset = 0
        while len(buffer) - offset >= 2:
            start = buffer[offset : offset + 2]
            if start not in (SHORT, LONG):
                found = min((i for i in (buffer.find(SHORT, offset + 1),
                                         buffer.find(LONG, offset + 1)) if i >= 0),
                            default=-1)
                errors.append(Gt06Error(BAD_START, "bytes before a frame's start skipped"))
                # Keep a last byte that may begin a marker.
                offset = found if found >= 0 else max(offset, len(buffer) - 1)
                if found < 0:
                    break
                continue
            lengthSize = 1 if start == SHORT else 2
            if len(buffer) - offset < 2 + lengthSize:
                break
            length = int.from_bytes(buffer[offset + 2 : offset + 2 + lengthSize], "big")
            size = 2 + lengthSize + length + 2
            problem: Gt06Error | None = None
            if length < _MIN_LENGTH:
                problem = Gt06Error(BAD_LENGTH, f"a length of {length}")
            elif size > self.maxFrame:
                problem = Gt06Error(TOO_LARGE, f"a frame of {size} bytes; the limit is {self.maxFrame}")
            elif len(buffer) - offset < size:
                break
            elif buffer[offset + size - 2 : offset + size] != STOP:
                problem = Gt06Error(BAD_LENGTH, "the length does not end at 0D 0A")
            if problem is not None:
                errors.append(problem)
                offset += 1  # the next start marker is searched for from here
                continue
            frames.append(buffer[offset : offset + size])
            offset += size
        self._buffer = buffer[offset:]
        return frames, errors


@dataclass(frozen=True)
class Packet:
    protocol: int
    content: bytes
    serial: int

    @property
    def messageId(self) -> str:
        """
        Derived from the packet's content (not its serial): the same position sent again
        is stored once.
        """
        return "gt-" + hashlib.blake2b(bytes([self.protocol]) + self.content,
                                       digest_size=12).hexdigest()


def parseFrame(frame: bytes, checkCrc: bool = True) -> Packet:
    """
    One whole frame (from L{Gt06Framer}).

    @raise Gt06Error: C{bad_crc} (unless C{checkCrc} is false).
    """
    lengthSize = 1 if frame[:2] == SHORT else 2
    body = frame[2:-4]
    (crc,) = struct.unpack_from(">H", frame, len(frame) - 4)
    if checkCrc and crc != crc16itu(body):
        raise Gt06Error(BAD_CRC, f"CRC {crc:#06x}, computed {crc16itu(body):#06x}")
    (serial,) = struct.unpack_from(">H", body, len(body) - 2)
    return Packet(body[lengthSize], body[lengthSize + 1 : -2], serial)


def parseImei(packet: Packet) -> str:
    """
    The IMEI of a login packet: 8 bytes of BCD, 15 digits after a leading zero.
    """
    digits = packet.content[:8].hex()
    if len(digits) != 16 or not digits.isdigit():
        raise Gt06Error(BAD_IMEI, "the terminal id is 8 bytes of BCD digits")
    return digits[1:] if digits[0] == "0" else digits


def _utcMillis(raw: bytes) -> int:
    year, month, day, hour, minute, second = raw
    try:
        stamp = datetime(2000 + year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise Gt06Error(BAD_RECORD, f"no such date/time {raw.hex()}") from None
    return int(stamp.timestamp()) * 1000


def parseLocation(packet: Packet) -> dict[str, Any]:
    """
    The body of a GPS location (0x12, 0x22): date-time (6, UTC), GPS information length
    and satellites (a nibble each), latitude and longitude (4 each, in 1/1,800,000
    degree), speed (1, km/h), course and status (2: bit 12 positioned, bit 11 west,
    bit 10 north, bits 0-9 the course).
    """
    content = packet.content
    if len(content) < 18:
        raise Gt06Error(BAD_RECORD, f"a location of {len(content)} bytes")
    lat, lon = struct.unpack_from(">II", content, 7)
    speed = content[15]
    (flags,) = struct.unpack_from(">H", content, 16)
    return {
        "ts": _utcMillis(content[:6]),
        "lat": round((lat if flags & 0x0400 else -lat) / 1_800_000, 7),
        "lon": round((-lon if flags & 0x0800 else lon) / 1_800_000, 7),
        "speed": speed,
        "course": flags & 0x03FF,
        "satellites": content[6] & 0x0F,
        "valid": bool(flags & 0x1000),
    }


def parseStatus(packet: Packet) -> dict[str, Any]:
    """
    A heartbeat (0x13): terminal information, voltage level, GSM signal strength (1
    each), then alarm and language (2); anything after is kept as hex.
    """
    content = packet.content
    if len(content) < 3:
        raise Gt06Error(BAD_RECORD, f"a status of {len(content)} bytes")
    return {"terminal": content[0], "voltage": content[1], "gsm": content[2],
            "extra": content[3:].hex()}


def parseReply(packet: Packet) -> tuple[int, str]:
    """
    A command's answer: its server flag and its text.  Short (0x15): length (1, the flag's
    4 bytes and the text's), flag (4), ASCII text, language (2).  Long (0x21): flag (4),
    encoding (1: 1 ASCII, 2 UTF-16BE), text.
    """
    content = packet.content
    if packet.protocol == REPLY:
        if len(content) < 5 or content[0] < 4 or 1 + content[0] > len(content):
            raise Gt06Error(BAD_RECORD, "a reply's length does not fit")
        flag = int.from_bytes(content[1:5], "big")
        text = content[5 : 1 + content[0]].decode("ascii", "replace")
    else:
        if len(content) < 5:
            raise Gt06Error(BAD_RECORD, "a reply's length does not fit")
        flag = int.from_bytes(content[:4], "big")
        encoding = "utf-16-be" if content[4] == 2 else "ascii"
        text = content[5:].decode(encoding, "replace")
    return flag, text


# --- encoding ---


def frame(protocol: int, content: bytes, serial: int) -> bytes:
    """
    A frame, short if it fits.
    """
    length = 1 + len(content) + 2 + 2
    if length <= 0xFF:
        start, lengthBytes = SHORT, bytes([length])
    else:
        start, lengthBytes = LONG, struct.pack(">H", length)
    body = lengthBytes + bytes([protocol]) + content + struct.pack(">H", serial & 0xFFFF)
    return start + body + struct.pack(">H", crc16itu(body)) + STOP


def echoAck(protocol: int, serial: int) -> bytes:
    """
    The server's answer to a packet: its protocol number and serial, no content.
    """
    return frame(protocol, b"", serial)


def command(flag: int, text: bytes, serial: int) -> bytes:
    """
    A command (0x80): length of the flag and text (1), server flag (4), ASCII text.
    """
    return frame(COMMAND, bytes([4 + len(text)]) + struct.pack(">I", flag) + text, serial)


def encodeLogin(imei: str, serial: int) -> bytes:
    return frame(LOGIN, bytes.fromhex(imei.rjust(16, "0")), serial)


def encodeLocation(
    ts: int, lat: float, lon: float, speed: int, course: int, satellites: int,
    serial: int, valid: bool = True,
) -> bytes:
    stamp = datetime.fromtimestamp(ts / 1000, UTC)
    flags = (course & 0x3FF) | (0x1000 if valid else 0) | (0x0400 if lat >= 0 else 0) \
        | (0x0800 if lon < 0 else 0)
    content = bytes([stamp.year - 2000, stamp.month, stamp.day, stamp.hour, stamp.minute,
                     stamp.second, 0xC0 | (satellites & 0x0F)])
    content += struct.pack(">IIBH", round(abs(lat) * 1_800_000), round(abs(lon) * 1_800_000),
                           speed, flags)
    return frame(LOCATION, content, serial)


def encodeStatus(serial: int, terminal: int = 0x44, voltage: int = 4, gsm: int = 4) -> bytes:
    return frame(STATUS, bytes([terminal, voltage, gsm]) + b"\x00\x02", serial)


def encodeReply(flag: int, text: bytes, serial: int) -> bytes:
    return frame(REPLY, bytes([4 + len(text)]) + struct.pack(">I", flag) + text + b"\x00\x02",
                 serial)
