# -*- test-case-name: tests.test_framing -*-
"""
The framing interfaces, their exceptions, and the bookkeeping shared by the
built-in framings.

A framing is a pure parser: it never touches a transport, so it can be
tested by feeding it bytes, and a connection can swap one framing for another
without changing anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface, implementer


class FramingError(Exception):
    """
    A frame could not be parsed or encoded.

    @ivar code: The code the gateway puts in the C{error} frame it sends
        before closing the connection: C{"bad_frame"} or
        C{"frame_too_large"}.
    @ivar detail: A human-readable explanation, for logs and the error frame.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class FramingOptionError(Exception):
    """
    A listener option for a framing is unknown or invalid.

    @ivar key: The offending option name, as written in the configuration.
    @ivar reason: Why it was rejected.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


class IFraming(Interface):
    """
    Turns a byte stream into frames and frames into bytes.

    One instance serves one connection and performs no I/O.
    """

    def feed(data: bytes) -> list[bytes]:
        """
        Add received bytes.

        @param data: Whatever the transport delivered; possibly empty,
            possibly part of a frame, possibly many frames.

        @return: Every frame completed by C{data}, in order.

        @raise FramingError: If the stream is malformed or announces a frame
            longer than the maximum.  Frames completed earlier in the same
            C{data} are discarded with it: the connection is about to be
            closed anyway.  After that the parser is spent and every further
            call raises an equal error again.

        The parser never buffers more than the maximum frame size plus its
        header (and trailer) bytes.
        """

    def frame(payload: bytes) -> bytes:
        """
        Encode one frame.

        @param payload: The frame's content.

        @return: The wire bytes for C{payload}.

        @raise FramingError: C{"frame_too_large"} if C{payload} is longer
            than the maximum frame size; C{"bad_frame"} if the framing
            cannot represent C{payload} at all.
        """


class IFramingFactory(Interface):
    """
    A named kind of framing that a listener can select with
    C{framing = NAME}.
    """

    name = Attribute("The name used in a listener's C{framing = NAME}.")
    description = Attribute("One line for C{--help} and the documentation.")

    def configure(maxFrame: int, options: Mapping[str, str]) -> Callable[[], IFraming]:
        """
        Validate a listener's framing-specific options.

        @param maxFrame: The listener's C{max_frame}: the longest payload, in
            bytes, a framing may accept or produce.
        @param options: Everything in the listener section except the keys
            the listener itself uses.

        @return: A zero-argument callable making one L{IFraming} per
            connection.

        @raise FramingOptionError: For an unknown key or a bad value.
        """


@implementer(IFraming)
class FramingBase:
    """
    The part of L{IFraming} every built-in framing shares: the size check in
    C{frame} and the rule that a parser is spent after its first error.

    Subclasses implement L{framesFrom} and L{encode}.

    @ivar maxFrame: The longest payload accepted or produced.
    """

    def __init__(self, maxFrame: int) -> None:
        self.maxFrame = maxFrame
        self._failure: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """
        See L{IFraming.feed}.
        """
        if self._failure is not None:
            # A fresh copy, so that the original traceback does not grow with
            # every re-raise.
            raise FramingError(self._failure.code, self._failure.detail)
        try:
            return self.framesFrom(data)
        except FramingError as failure:
            self._failure = failure
            raise

    def frame(self, payload: bytes) -> bytes:
        """
        See L{IFraming.frame}.
        """
        if len(payload) > self.maxFrame:
            raise FramingError(
                "frame_too_large",
                f"payload of {len(payload)} bytes exceeds max_frame {self.maxFrame}",
            )
        return self.encode(payload)

    @property
    def buffered(self) -> int:
        """
        The bytes this parser holds between calls to C{feed} (for tests and
        bounds checks): never more than C{maxFrame} plus the framing's header
        and trailer bytes.
        """
        raise NotImplementedError

    def framesFrom(self, data: bytes) -> list[bytes]:
        """
        Parse C{data}, which follows everything passed before.

        @return: The frames completed by C{data}.
        @raise FramingError: If the stream is malformed.
        """
        raise NotImplementedError

    def encode(self, payload: bytes) -> bytes:
        """
        Encode a payload already known to be no longer than L{maxFrame}.
        """
        raise NotImplementedError


class LengthPrefixedFraming(FramingBase):
    """
    A framing whose frames are a header announcing the payload length, the
    payload, then an optional fixed trailer.

    The body is collected as a list of chunks and joined once, so a large
    frame that trickles in over many reads costs linear time, and a length
    above L{maxFrame} is refused as soon as the header is complete, before
    any of the body is kept.

    Subclasses set L{headerLimit} and L{trailer} and implement
    L{parseHeader}.

    @cvar headerLimit: The longest header this framing can have with
        C{maxFrame}; set per instance by subclasses whose headers vary.
    @cvar trailer: Bytes that must follow every payload.
    """

    headerLimit: int
    trailer: bytes = b""

    def __init__(self, maxFrame: int) -> None:
        super().__init__(maxFrame)
        self._header = b""
        self._bodyLength: int | None = None
        self._bodyChunks: list[bytes] = []
        self._bodyMissing = 0

    @property
    def buffered(self) -> int:
        return len(self._header) + sum(len(chunk) for chunk in self._bodyChunks)

    def parseHeader(self, header: bytes) -> tuple[int, int] | None:
        """
        Parse the start of a frame.

        @param header: Between 1 and L{headerLimit} bytes from the start of
            a frame.

        @return: C{(payloadLength, headerSize)} once C{header} holds the
            whole header, or L{None} while it is a valid but incomplete
            prefix of one.  When C{header} is L{headerLimit} long, L{None} is
            not an option.

        @raise FramingError: If C{header} cannot start a valid header.
        """
        raise NotImplementedError

    def framesFrom(self, data: bytes) -> list[bytes]:
        frames = []
        position = 0
        while position < len(data):
            if self._bodyLength is None:
                earlier = self._header
                header = earlier + data[position : position + self.headerLimit - len(earlier)]
                parsed = self.parseHeader(header)
                if parsed is None:
                    # parseHeader promised to decide once headerLimit bytes
                    # are in, so this can only be the end of data.
                    self._header = header
                    break
                length, headerSize = parsed
                if length > self.maxFrame:
                    raise FramingError(
                        "frame_too_large",
                        f"frame of {length} bytes announced; max_frame is {self.maxFrame}",
                    )
                position += headerSize - len(earlier)
                self._header = b""
                self._bodyLength = length
                self._bodyMissing = length + len(self.trailer)
            # Falls through even at the end of data: a zero-length int32
            # frame is complete as soon as its header is.
            chunk = data[position : position + self._bodyMissing]
            position += len(chunk)
            self._bodyChunks.append(chunk)
            self._bodyMissing -= len(chunk)
            if self._bodyMissing == 0:
                frames.append(self._completeBody())
        return frames

    def _completeBody(self) -> bytes:
        """
        Take the collected body, check its trailer and reset for the next
        frame.

        @return: The payload.
        """
        assert self._bodyLength is not None
        body = b"".join(self._bodyChunks)
        payload = body[: self._bodyLength]
        if body[self._bodyLength :] != self.trailer:
            raise FramingError(
                "bad_frame",
                f"expected {self.trailer!r} after a {self._bodyLength}-byte payload",
            )
        self._bodyChunks = []
        self._bodyLength = None
        return payload


@implementer(IPlugin, IFramingFactory)
class OptionlessFramingFactory:
    """
    An L{IFramingFactory} for a framing that takes no options besides the
    maximum frame size.

    @ivar name: See L{IFramingFactory.name}.
    @ivar description: See L{IFramingFactory.description}.
    """

    def __init__(
        self, name: str, description: str, framingClass: Callable[[int], IFraming]
    ) -> None:
        """
        @param framingClass: Makes a connection's framing from the maximum
            frame size.
        """
        self.name = name
        self.description = description
        self._framingClass = framingClass

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.name!r}>"

    def configure(self, maxFrame: int, options: Mapping[str, str]) -> Callable[[], IFraming]:
        """
        See L{IFramingFactory.configure}.
        """
        for key in options:
            raise FramingOptionError(key, f"unknown option for framing {self.name}")
        if maxFrame < 1:
            raise FramingOptionError("max_frame", f"must be at least 1, not {maxFrame}")
        return partial(self._framingClass, maxFrame)
