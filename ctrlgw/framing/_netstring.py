# -*- test-case-name: tests.test_framing -*-
"""
The C{netstring} framing: C{<decimal length>:<payload>,}.

See U{https://cr.yp.to/proto/netstrings.txt}.
"""

from __future__ import annotations

from ._interface import FramingError, LengthPrefixedFraming, OptionlessFramingFactory


class NetstringFraming(LengthPrefixedFraming):
    """
    Frames are netstrings: the payload length in ASCII decimal, a colon, the
    payload and a comma.

    The length is checked as it arrives: a non-digit, a leading zero (other
    than in C{"0"} itself) or more digits than C{maxFrame} has are refused at
    once, so garbage is detected within a few bytes.
    """

    trailer = b","

    def __init__(self, maxFrame: int) -> None:
        super().__init__(maxFrame)
        self._maxDigits = len(str(maxFrame))
        self.headerLimit = self._maxDigits + 1

    def parseHeader(self, header: bytes) -> tuple[int, int] | None:
        colon = header.find(b":")
        digits = header if colon == -1 else header[:colon]
        # bytes.isdigit() only accepts ASCII digits, unlike int(), which
        # would also take whitespace, "+" and "_".
        if digits and not digits.isdigit():
            raise FramingError("bad_frame", f"netstring length {digits!r} is not decimal")
        if len(digits) > 1 and digits.startswith(b"0"):
            raise FramingError("bad_frame", f"netstring length {digits!r} has a leading zero")
        if len(digits) > self._maxDigits:
            raise FramingError(
                "bad_frame",
                f"netstring length has more digits than max_frame {self.maxFrame}",
            )
        if colon == -1:
            return None
        if not digits:
            raise FramingError("bad_frame", "netstring length is empty")
        return int(digits), colon + 1

    def encode(self, payload: bytes) -> bytes:
        return b"%d:%s," % (len(payload), payload)


netstringFraming = OptionlessFramingFactory(
    "netstring",
    "netstrings: <decimal length>:<payload>,",
    NetstringFraming,
)
