# -*- test-case-name: tests.test_framing -*-
"""
The C{lines} framing: one frame per LF-terminated line.
"""

from __future__ import annotations

from ._interface import FramingBase, FramingError, OptionlessFramingFactory


class LinesFraming(FramingBase):
    """
    Frames are lines terminated by C{b"\\n"}.

    A C{b"\\r"} right before the C{b"\\n"} is stripped, so controllers that
    send CRLF work unchanged.  Blank lines are skipped, because controllers
    send them as keep-alives.  A line is refused as soon as it is longer than
    C{maxFrame} (plus one byte for a CR that may turn out to be half of a
    CRLF), without waiting for its LF.
    """

    def __init__(self, maxFrame: int) -> None:
        super().__init__(maxFrame)
        # The unterminated tail of the stream, kept as chunks so that a long
        # line arriving in small reads is joined once rather than re-copied
        # on every read.
        self._partialChunks: list[bytes] = []
        self._partialLength = 0

    @property
    def buffered(self) -> int:
        return self._partialLength

    def framesFrom(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            if data:
                self._partialChunks.append(data)
                self._partialLength += len(data)
                self._checkPartial(data)
            return []
        lines = data.split(b"\n")
        if self._partialChunks:
            self._partialChunks.append(lines[0])
            lines[0] = b"".join(self._partialChunks)
        partial = lines.pop()
        self._partialChunks = [partial] if partial else []
        self._partialLength = len(partial)
        frames = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                continue
            if len(line) > self.maxFrame:
                raise self._tooLarge()
            frames.append(line)
        if partial:
            self._checkPartial(partial)
        return frames

    def _checkPartial(self, lastChunk: bytes) -> None:
        """
        Refuse the unterminated tail once it can no longer become a line of
        at most C{maxFrame} bytes.

        @param lastChunk: The most recent piece of the tail.
        """
        if self._partialLength <= self.maxFrame:
            return
        if self._partialLength == self.maxFrame + 1 and lastChunk.endswith(b"\r"):
            return
        raise self._tooLarge()

    def _tooLarge(self) -> FramingError:
        return FramingError("frame_too_large", f"line longer than max_frame {self.maxFrame} bytes")

    def encode(self, payload: bytes) -> bytes:
        if b"\n" in payload:
            raise FramingError("bad_frame", "a lines payload cannot contain LF")
        # These would arrive as a different payload (CR stripped) or not at
        # all (blank lines are keep-alives), so refuse them instead.
        if payload.endswith(b"\r"):
            raise FramingError("bad_frame", "a lines payload cannot end with CR")
        if not payload:
            raise FramingError("bad_frame", "a lines payload cannot be empty")
        return payload + b"\n"


linesFraming = OptionlessFramingFactory(
    "lines",
    "LF-terminated lines; CRLF tolerated, blank lines skipped",
    LinesFraming,
)
