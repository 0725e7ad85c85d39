# -*- test-case-name: tests.test_framing -*-
"""
The C{int32} framing: a 4-byte big-endian length, then the payload.
"""

from __future__ import annotations

from struct import Struct

from ._interface import LengthPrefixedFraming, OptionlessFramingFactory

_prefix = Struct(">I")


class Int32Framing(LengthPrefixedFraming):
    """
    Frames are a 4-byte unsigned big-endian payload length followed by the
    payload.  A zero length is an empty frame.
    """

    headerLimit = _prefix.size

    def parseHeader(self, header: bytes) -> tuple[int, int] | None:
        if len(header) < _prefix.size:
            return None
        (length,) = _prefix.unpack_from(header)
        return length, _prefix.size

    def encode(self, payload: bytes) -> bytes:
        return _prefix.pack(len(payload)) + payload


int32Framing = OptionlessFramingFactory(
    "int32",
    "4-byte unsigned big-endian length prefix, then the payload",
    Int32Framing,
)
