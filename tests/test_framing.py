"""
Tests for L{ctrlgw.framing}.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from struct import pack
from textwrap import dedent
from typing import TYPE_CHECKING

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.plugin import IPlugin, getPlugins
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ctrlgw.framing import (
    FramingError,
    FramingOptionError,
    IFraming,
    IFramingFactory,
    availableFramings,
    findFraming,
    int32Framing,
    linesFraming,
    netstringFraming,
)
from twisted import plugins as twistedPlugins


def feedAll(framing: IFraming, chunks: Iterable[bytes]) -> list[bytes]:
    """
    Feed C{chunks} to C{framing} in order.

    @return: All the frames it returned, in order.
    """
    frames = []
    for chunk in chunks:
        frames.extend(framing.feed(chunk))
    return frames


def bytewise(data: bytes) -> list[bytes]:
    """
    C{data} cut into one-byte chunks.
    """
    return [data[i : i + 1] for i in range(len(data))]


def chunked(data: bytes, size: int) -> list[bytes]:
    """
    C{data} cut into chunks of C{size} bytes (the last may be shorter).
    """
    return [data[i : i + size] for i in range(0, len(data), size)]


if TYPE_CHECKING:
    # Lets the type checker see the assertions the mixin gets at run time.
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


class FramingTestsMixin(_MixinBase):
    """
    Tests every framing must pass.

    Subclasses set the class attributes below and implement
    L{oversizeStream}.  L{makeFraming} is the hook every test gets its
    framing from; it goes through the factory, as a listener does.

    @cvar factory: The framing's L{IFramingFactory}.
    @cvar maxFrame: The C{max_frame} used unless a test needs another.
    @cvar slack: How many bytes beyond C{maxFrame} the parser may hold:
        its header and trailer.
    @cvar example: A payload and its exact wire encoding.
    @cvar garbage: What a stray HTTP request line does to this framing: bytes,
        the error code they must be refused with as they arrive, and, for a
        framing that cannot tell garbage from data, the frames it hands up
        instead (the JSON layer then answers C{bad_json}).
    @cvar payloads: A hypothesis strategy for payloads this framing can
        carry, at most L{maxFrame} long.
    """

    factory: IFramingFactory
    maxFrame = 64
    slack: int
    example: tuple[bytes, bytes]
    garbage: tuple[bytes, str | None, list[bytes]]
    payloads: st.SearchStrategy[bytes]

    def makeFraming(self, maxFrame: int | None = None) -> IFraming:
        """
        Make a framing the way a listener does, via its factory.
        """
        if maxFrame is None:
            maxFrame = self.maxFrame
        return self.factory.configure(maxFrame, {})()

    def oversizeStream(self) -> bytes:
        """
        Ten times C{maxFrame} bytes of one frame that is too large: either
        announced as such or never ending.
        """
        raise NotImplementedError

    def assertFramingError(self, code: str, call: Callable[..., object], *args: object) -> None:
        """
        Assert that C{call(*args)} raises a L{FramingError} with C{code}.
        """
        error = self.assertRaises(FramingError, call, *args)
        self.assertEqual(error.code, code, f"wrong code; detail: {error.detail}")

    def test_interfaces(self) -> None:
        """
        The factory provides L{IFramingFactory} and L{IPlugin}, and the
        framings it makes provide L{IFraming}.
        """
        self.assertTrue(verifyObject(IFramingFactory, self.factory))
        self.assertTrue(IPlugin.providedBy(self.factory))
        self.assertTrue(verifyObject(IFraming, self.makeFraming()))

    def test_findFraming(self) -> None:
        """
        L{findFraming} finds the framing by its name.
        """
        self.assertIs(findFraming(self.factory.name), self.factory)

    def test_configureRejectsUnknownOption(self) -> None:
        """
        The built-in framings take no options; any key is refused with a
        L{FramingOptionError} carrying it.
        """
        error = self.assertRaises(
            FramingOptionError, self.factory.configure, self.maxFrame, {"colour": "red"}
        )
        self.assertEqual(error.key, "colour")
        self.assertIn(self.factory.name, error.reason)

    def test_configureRejectsNonPositiveMaxFrame(self) -> None:
        """
        A C{max_frame} below 1 is refused.
        """
        error = self.assertRaises(FramingOptionError, self.factory.configure, 0, {})
        self.assertEqual(error.key, "max_frame")

    def test_configureMakesIndependentFramings(self) -> None:
        """
        Each call of the configured callable makes a fresh framing, so
        connections do not share buffers.
        """
        makeFraming = self.factory.configure(self.maxFrame, {})
        first, second = makeFraming(), makeFraming()
        payload, wire = self.example
        self.assertEqual(first.feed(wire[:-1]), [])
        self.assertEqual(second.feed(wire), [payload])
        self.assertEqual(first.feed(wire[-1:]), [payload])

    def test_frame(self) -> None:
        """
        C{frame} produces the framing's wire format.
        """
        payload, wire = self.example
        self.assertEqual(self.makeFraming().frame(payload), wire)

    def test_oneFrame(self) -> None:
        """
        One complete frame fed at once is returned.
        """
        payload, wire = self.example
        self.assertEqual(self.makeFraming().feed(wire), [payload])

    def test_byteAtATime(self) -> None:
        """
        Frames fed one byte at a time are returned exactly when their last
        byte arrives.
        """
        framing = self.makeFraming()
        payloads = [b"first", b"x" * self.maxFrame, b"third"]
        for payload in payloads:
            wire = framing.frame(payload)
            self.assertEqual(feedAll(framing, bytewise(wire[:-1])), [])
            self.assertEqual(framing.feed(wire[-1:]), [payload])

    def test_manyFramesInOneChunk(self) -> None:
        """
        Every frame in one chunk is returned, in order, and a trailing
        partial frame is completed by the next chunk.
        """
        framing = self.makeFraming()
        payloads = [b"frame %d" % (i,) for i in range(100)]
        wire = b"".join(framing.frame(payload) for payload in payloads)
        self.assertEqual(framing.feed(wire + wire[:3]), payloads)
        self.assertEqual(framing.feed(wire[3:]), payloads)

    def test_emptyFeed(self) -> None:
        """
        Feeding no bytes returns no frames, also in the middle of a frame.
        """
        framing = self.makeFraming()
        payload, wire = self.example
        self.assertEqual(framing.feed(b""), [])
        self.assertEqual(framing.feed(wire[:2]), [])
        self.assertEqual(framing.feed(b""), [])
        self.assertEqual(framing.feed(wire[2:]), [payload])

    def test_roundTripEmptyPayload(self) -> None:
        """
        An empty payload survives C{frame} then C{feed}.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(framing.frame(b"")), [b""])

    def test_roundTripMaxSizePayload(self) -> None:
        """
        A payload of exactly C{maxFrame} bytes survives C{frame} then
        C{feed}.
        """
        framing = self.makeFraming()
        payload = bytes(range(65, 65 + 26)) * (self.maxFrame // 26 + 1)
        payload = payload[: self.maxFrame]
        self.assertEqual(framing.feed(framing.frame(payload)), [payload])

    def test_frameOversizePayload(self) -> None:
        """
        C{frame} refuses a payload longer than C{maxFrame}.
        """
        framing = self.makeFraming()
        self.assertFramingError("frame_too_large", framing.frame, b"x" * (self.maxFrame + 1))

    def test_oversizeFrameInOneChunk(self) -> None:
        """
        A frame too large, fed at once, is refused with
        C{frame_too_large}.
        """
        self.assertFramingError("frame_too_large", self.makeFraming().feed, self.oversizeStream())

    def test_oversizeFrameRefusedEarly(self) -> None:
        """
        A frame too large is refused before the parser has accepted more
        than C{maxFrame} plus header bytes, whatever the read size: the
        buffer stays bounded however much the peer sends.
        """
        for chunkSize in [1, 7, self.maxFrame]:
            framing = self.makeFraming()
            accepted = 0
            for chunk in chunked(self.oversizeStream(), chunkSize):
                try:
                    self.assertEqual(framing.feed(chunk), [])
                except FramingError as error:
                    self.assertEqual(error.code, "frame_too_large")
                    break
                accepted += len(chunk)
            else:
                self.fail(f"never refused with {chunkSize}-byte chunks")
            self.assertLessEqual(accepted, self.maxFrame + self.slack)

    def test_garbage(self) -> None:
        """
        Bytes that are not this framing are refused as they arrive, or, where
        the framing cannot tell, handed up as frames for the JSON layer to
        refuse: never buffered waiting for more.
        """
        garbage, code, frames = self.garbage
        if code is None:
            self.assertEqual(self.makeFraming().feed(garbage), frames)
            self.assertEqual(feedAll(self.makeFraming(), bytewise(garbage)), frames)
            return
        self.assertFramingError(code, self.makeFraming().feed, garbage)
        # Fed one byte at a time, too: the parser must not wait for more.
        framing = self.makeFraming()
        with self.assertRaises(FramingError) as caught:
            feedAll(framing, bytewise(garbage))
        self.assertEqual(caught.exception.code, code)

    def test_spentAfterError(self) -> None:
        """
        After an error every further C{feed}, even of valid data or of
        nothing, raises an error with the same code.
        """
        framing = self.makeFraming()
        self.assertFramingError("frame_too_large", framing.feed, self.oversizeStream())
        self.assertFramingError("frame_too_large", framing.feed, self.example[1])
        self.assertFramingError("frame_too_large", framing.feed, b"")

    # The one mixin method runs under three TestCase classes, which is what
    # differing_executors objects to: they share an example database key.
    # That is harmless here, since a replayed example is merely another
    # draw, valid for whichever framing replays it.
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(data=st.data())
    def test_anySplitRoundTrips(self, data: st.DataObject) -> None:
        """
        Any list of payloads, framed, concatenated and cut at arbitrary
        points, is parsed back to the same list.
        """
        payloads = data.draw(st.lists(self.payloads, max_size=20), label="payloads")
        framing = self.makeFraming()
        wire = b"".join(framing.frame(payload) for payload in payloads)
        cuts = data.draw(
            st.lists(st.integers(min_value=0, max_value=len(wire))).map(sorted), label="cuts"
        )
        bounds = [0, *cuts, len(wire)]
        chunks = [wire[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
        self.assertEqual(feedAll(framing, chunks), payloads)


class LinesFramingTests(FramingTestsMixin, SynchronousTestCase):
    """
    Tests for the C{lines} framing.
    """

    factory = linesFraming
    # A CR that may turn out to be half of the CRLF terminator.
    slack = 1
    # A line is a line: it goes up as a frame (CRLF tolerated).
    garbage = (b"GET / HTTP/1.1\r\n", None, [b"GET / HTTP/1.1"])
    example = (b"hello world", b"hello world\n")
    payloads = (
        st.binary(min_size=1, max_size=FramingTestsMixin.maxFrame)
        .map(lambda payload: payload.replace(b"\n", b"n"))
        .filter(lambda payload: not payload.endswith(b"\r"))
    )

    def oversizeStream(self) -> bytes:
        return b"x" * (10 * self.maxFrame)

    def test_roundTripEmptyPayload(self) -> None:
        """
        An empty line is a keep-alive the peer skips, so C{frame} refuses an
        empty payload instead of sending something that never arrives, and
        feeding an empty line yields nothing.
        """
        framing = self.makeFraming()
        self.assertFramingError("bad_frame", framing.frame, b"")
        self.assertEqual(framing.feed(b"\n"), [])

    def test_crlf(self) -> None:
        """
        One CR before the LF is stripped; other CRs are payload.
        """
        framing = self.makeFraming()
        self.assertEqual(
            framing.feed(b"one\r\ntwo\n\rthree\r\r\nfour\rfive\n"),
            [b"one", b"two", b"\rthree\r", b"four\rfive"],
        )

    def test_crlfSplitBetweenReads(self) -> None:
        """
        A CRLF split between two reads is still one terminator.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"one\r"), [])
        self.assertEqual(framing.feed(b"\n"), [b"one"])

    def test_crlfAtLimit(self) -> None:
        """
        A line of exactly C{maxFrame} bytes may end in CRLF even though its
        CR makes the buffer one byte longer than C{maxFrame}.
        """
        line = b"x" * self.maxFrame
        self.assertEqual(feedAll(self.makeFraming(), bytewise(line + b"\r\n")), [line])
        self.assertEqual(self.makeFraming().feed(line + b"\r\n"), [line])

    def test_crNotFollowedByLfAtLimit(self) -> None:
        """
        If the byte after a CR at C{maxFrame + 1} is not LF, the CR was
        payload and the line is too long.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"x" * self.maxFrame + b"\r"), [])
        self.assertFramingError("frame_too_large", framing.feed, b"y")

    def test_longLineRefusedWithoutLf(self) -> None:
        """
        A line is refused as soon as it is one byte longer than C{maxFrame}
        (and that byte is not a CR), without waiting for its LF.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"x" * self.maxFrame), [])
        self.assertFramingError("frame_too_large", framing.feed, b"x")
        self.assertFramingError(
            "frame_too_large", self.makeFraming().feed, b"x" * (self.maxFrame + 1)
        )

    def test_lineOneByteTooLong(self) -> None:
        """
        A complete line of C{maxFrame + 1} bytes is refused, whether it
        arrives whole or in pieces.
        """
        line = b"x" * (self.maxFrame + 1)
        self.assertFramingError("frame_too_large", self.makeFraming().feed, b"ok\n" + line + b"\n")
        framing = self.makeFraming()
        self.assertEqual(framing.feed(line[:10]), [])
        self.assertFramingError("frame_too_large", framing.feed, line[10:] + b"\n")

    def test_blankLinesSkipped(self) -> None:
        """
        Blank lines, LF or CRLF, are keep-alives and produce no frame.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"\n\r\n\none\n\n\r\ntwo\n"), [b"one", b"two"])
        self.assertEqual(feedAll(framing, bytewise(b"\r\n\n")), [])

    def test_frameRefusesLf(self) -> None:
        """
        A payload containing LF cannot be a line.
        """
        self.assertFramingError("bad_frame", self.makeFraming().frame, b"one\ntwo")

    def test_frameRefusesTrailingCr(self) -> None:
        """
        A payload ending in CR would lose it on the way, so it is refused.
        """
        self.assertFramingError("bad_frame", self.makeFraming().frame, b"one\r")


class Int32FramingTests(FramingTestsMixin, SynchronousTestCase):
    """
    Tests for the C{int32} framing.
    """

    factory = int32Framing
    slack = 4
    # "GET " read as a length is about 1.2 GB: refused as soon as the header is in.
    garbage = (b"GET / HTTP/1.1\r\n", "frame_too_large", [])
    example = (b"hello", b"\x00\x00\x00\x05hello")
    payloads = st.binary(max_size=FramingTestsMixin.maxFrame)

    def oversizeStream(self) -> bytes:
        body = b"x" * (10 * self.maxFrame - 4)
        return pack(">I", len(body)) + body

    def test_zeroLength(self) -> None:
        """
        A zero length is an empty frame, complete as soon as its header is.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"\x00\x00\x00"), [])
        self.assertEqual(framing.feed(b"\x00"), [b""])
        self.assertEqual(framing.feed(b"\x00\x00\x00\x00" * 3), [b"", b"", b""])

    def test_bigEndian(self) -> None:
        """
        The length is big-endian: the first byte is the most significant.
        """
        framing = self.makeFraming(0x0102)
        payload = b"y" * 0x0102
        self.assertEqual(framing.frame(payload)[:4], b"\x00\x00\x01\x02")
        self.assertEqual(framing.feed(b"\x00\x00\x01\x02" + payload), [payload])

    def test_lengthRefusedFromHeaderAlone(self) -> None:
        """
        A length above C{maxFrame} is refused when the fourth header byte
        arrives, before any body.
        """
        framing = self.makeFraming()
        header = pack(">I", self.maxFrame + 1)
        self.assertEqual(feedAll(framing, bytewise(header[:3])), [])
        self.assertFramingError("frame_too_large", framing.feed, header[3:])
        self.assertFramingError("frame_too_large", self.makeFraming().feed, b"\xff\xff\xff\xff")

    def test_lengthAtLimitAccepted(self) -> None:
        """
        A length of exactly C{maxFrame} waits for its body.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(pack(">I", self.maxFrame)), [])
        self.assertEqual(framing.feed(b"z" * self.maxFrame), [b"z" * self.maxFrame])


class NetstringFramingTests(FramingTestsMixin, SynchronousTestCase):
    """
    Tests for the C{netstring} framing.
    """

    factory = netstringFraming
    # Up to two length digits for maxFrame 64, the colon and the comma.
    slack = 4
    example = (b"hello", b"5:hello,")
    garbage = (b"GET / HTTP/1.1\r\n", "bad_frame", [])
    payloads = st.binary(max_size=FramingTestsMixin.maxFrame)

    def oversizeStream(self) -> bytes:
        header = b"%d:" % (self.maxFrame + 1,)
        return header + b"x" * (10 * self.maxFrame - len(header))

    def test_emptyPayload(self) -> None:
        """
        C{0:,} is an empty frame.
        """
        self.assertEqual(self.makeFraming().feed(b"0:,0:,"), [b"", b""])

    def test_leadingZeros(self) -> None:
        """
        A length with a leading zero is refused as soon as the digit after
        the zero arrives.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"0"), [])
        self.assertFramingError("bad_frame", framing.feed, b"5")
        self.assertFramingError("bad_frame", self.makeFraming().feed, b"05:hello,")
        self.assertFramingError("bad_frame", self.makeFraming().feed, b"00:,")

    def test_missingComma(self) -> None:
        """
        A payload not followed by a comma is refused when the byte where the
        comma belongs arrives.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"5:hello"), [])
        self.assertFramingError("bad_frame", framing.feed, b";")
        self.assertFramingError("bad_frame", self.makeFraming().feed, b"0:5:hello,")

    def test_nonDigitLength(self) -> None:
        """
        A length with anything but ASCII digits is refused, including what
        C{int()} would accept.
        """
        for header in [b"-1:", b"+1:x,", b" 1:x,", b"1 :x,", b"1_0:", b"\xd9\xa1:x,", b"x"]:
            self.assertFramingError("bad_frame", self.makeFraming().feed, header)

    def test_emptyLength(self) -> None:
        """
        A colon with no length before it is refused.
        """
        self.assertFramingError("bad_frame", self.makeFraming().feed, b":,")

    def test_tooManyDigits(self) -> None:
        """
        A length with more digits than C{maxFrame} is refused as
        C{bad_frame} as soon as the extra digit arrives, before any colon.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"10"), [])
        self.assertFramingError("bad_frame", framing.feed, b"0")

    def test_lengthAboveLimit(self) -> None:
        """
        A length above C{maxFrame} with no more digits than it is refused as
        C{frame_too_large} when the colon arrives, before any body.
        """
        framing = self.makeFraming()
        self.assertEqual(framing.feed(b"%d" % (self.maxFrame + 1,)), [])
        self.assertFramingError("frame_too_large", framing.feed, b":")


class PluginDiscoveryTests(SynchronousTestCase):
    """
    Tests for L{availableFramings}, L{findFraming} and plugin discovery.
    """

    builtins = {"lines": linesFraming, "int32": int32Framing, "netstring": netstringFraming}

    def test_builtinsArePlugins(self) -> None:
        """
        C{twisted/plugins/ctrlgw_framings.py} makes the built-ins visible to
        L{getPlugins}.
        """
        found = list(getPlugins(IFramingFactory))
        for builtin in self.builtins.values():
            self.assertTrue(
                any(plugin is builtin for plugin in found), f"{builtin!r} not in {found!r}"
            )

    def test_availableFramings(self) -> None:
        """
        L{availableFramings} maps each built-in's name to it, and returns a
        new mapping each time.
        """
        framings = availableFramings()
        for name, builtin in self.builtins.items():
            self.assertIs(framings[name], builtin)
        del framings["lines"]
        self.assertIs(availableFramings()["lines"], linesFraming)

    def test_findFramingUnknown(self) -> None:
        """
        L{findFraming} raises L{KeyError} for an unknown name, naming it and
        every known framing.
        """
        error = self.assertRaises(KeyError, findFraming, "morse")
        message = error.args[0]
        self.assertIn("'morse'", message)
        for name in self.builtins:
            self.assertIn(name, message)

    def installThirdPartyPlugin(self) -> None:
        """
        Make a third-party plugin module visible to L{getPlugins} for the
        rest of the test, the way an installed package would: a
        C{twisted/plugins} directory with no C{__init__.py} on C{sys.path}.

        The module provides C{reversed-lines}, and an impostor named
        C{lines}.
        """
        root = FilePath(self.mktemp())
        pluginDirectory = root.child("twisted").child("plugins")
        pluginDirectory.makedirs()
        pluginDirectory.child("thirdparty_framing.py").setContent(
            dedent(
                '''\
                """A third-party framing plugin, written by the tests."""

                from twisted.plugin import IPlugin
                from zope.interface import implementer

                from ctrlgw import framing
                from ctrlgw.framing import IFraming, IFramingFactory

                # Every IPlugin in this module's namespace is declared as one
                # of its plugins, so linesFraming must not be imported by name.


                @implementer(IFraming)
                class ReversedLines:
                    def __init__(self, inner):
                        self._inner = inner

                    def feed(self, data):
                        return [line[::-1] for line in self._inner.feed(data)]

                    def frame(self, payload):
                        return self._inner.frame(payload[::-1])


                @implementer(IPlugin, IFramingFactory)
                class ReversedLinesFactory:
                    def __init__(self, name):
                        self.name = name
                        self.description = "lines, reversed"

                    def configure(self, maxFrame, options):
                        makeLines = framing.linesFraming.configure(maxFrame, options)
                        return lambda: ReversedLines(makeLines())


                reversedLines = ReversedLinesFactory("reversed-lines")
                impostor = ReversedLinesFactory("lines")
                '''
            ).encode("utf-8")
        )

        # twisted.plugins computed its __path__ from sys.path when it was
        # imported, so a new directory has to be added to both.
        originalSysPath = sys.path[:]
        originalPluginPath = twistedPlugins.__path__[:]

        def restore() -> None:
            sys.path[:] = originalSysPath
            twistedPlugins.__path__[:] = originalPluginPath
            sys.modules.pop("twisted.plugins.thirdparty_framing", None)

        self.addCleanup(restore)
        # In front, so that getPlugins finds the impostor before the
        # built-in it tries to replace.
        sys.path.insert(0, root.path)
        twistedPlugins.__path__.insert(0, pluginDirectory.path)
        importlib.invalidate_caches()

    def test_thirdPartyPlugin(self) -> None:
        """
        A framing shipped as a plugin by another package is found by name
        and works.
        """
        self.assertRaises(KeyError, findFraming, "reversed-lines")
        self.installThirdPartyPlugin()
        factory = findFraming("reversed-lines")
        module = sys.modules["twisted.plugins.thirdparty_framing"]
        self.assertIs(factory, module.reversedLines)
        self.assertTrue(verifyObject(IFramingFactory, factory))
        framing = factory.configure(64, {})()
        self.assertEqual(framing.feed(b"olleh\n"), [b"hello"])
        self.assertEqual(framing.frame(b"hello"), b"olleh\n")

    def test_builtinWinsOverPluginOfSameName(self) -> None:
        """
        A plugin named like a built-in does not replace it.
        """
        self.installThirdPartyPlugin()
        self.assertIn("reversed-lines", availableFramings())
        self.assertIs(findFraming("lines"), linesFraming)
        self.assertIs(availableFramings()["lines"], linesFraming)
