"""
Tests for L{ctrlgw.protocol.messages}: decoding controller frames, encoding gateway frames.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.protocol import messages as v1

TS = 1_700_000_000_123


M = TypeVar("M")


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode("utf-8")


def decodeAs(kind: type[M], data: bytes) -> M:
    """
    Decode C{data}, which must be a message of class C{kind}.
    """
    message = v1.decode(data)
    assert isinstance(message, kind), message
    return message


class DecodeTests(SynchronousTestCase):
    """
    Every inbound type decodes to its message class with its fields.
    """

    def test_hello(self) -> None:
        message = v1.decode(payload(type="hello", ts=TS, controller="plant-7:pump.2_a"))
        self.assertEqual(message, v1.Hello(ts=TS, controller="plant-7:pump.2_a", token=None))

    def test_helloWithToken(self) -> None:
        message = v1.decode(payload(type="hello", ts=TS, controller="c1", token="s3cr3t"))
        self.assertEqual(message, v1.Hello(ts=TS, controller="c1", token="s3cr3t"))

    def test_helloNullToken(self) -> None:
        """
        An explicit C{null} token is the same as none.
        """
        message = v1.decode(payload(type="hello", ts=TS, controller="c1", token=None))
        self.assertEqual(message, v1.Hello(ts=TS, controller="c1", token=None))

    def test_msg(self) -> None:
        body = {"temp": 21.5, "tags": ["a", "ü"], "nested": {"n": None}}
        message = v1.decode(payload(type="msg", ts=TS, id="m-1", body=body))
        self.assertEqual(message, v1.Msg(ts=TS, id="m-1", body=body))

    def test_msgScalarBody(self) -> None:
        for body in (0, "text", [1, 2], None, True):
            message = v1.decode(payload(type="msg", ts=TS, id="m", body=body))
            self.assertEqual(message, v1.Msg(ts=TS, id="m", body=body))

    def test_ack(self) -> None:
        self.assertEqual(
            v1.decode(payload(type="ack", ts=TS, ref="cmd-9")), v1.Ack(ts=TS, ref="cmd-9")
        )

    def test_nack(self) -> None:
        self.assertEqual(
            v1.decode(payload(type="nack", ts=TS, ref="cmd-9", reason="busy")),
            v1.Nack(ts=TS, ref="cmd-9", reason="busy"),
        )

    def test_nackWithoutReason(self) -> None:
        self.assertEqual(
            v1.decode(payload(type="nack", ts=TS, ref="cmd-9")),
            v1.Nack(ts=TS, ref="cmd-9", reason=""),
        )

    def test_ping(self) -> None:
        self.assertEqual(v1.decode(payload(type="ping", ts=TS)), v1.Ping(ts=TS))

    def test_pong(self) -> None:
        self.assertEqual(
            v1.decode(payload(type="pong", ts=TS, echo=TS - 40)), v1.Pong(ts=TS, echo=TS - 40)
        )

    def test_zeroTimestamp(self) -> None:
        self.assertEqual(v1.decode(payload(type="ping", ts=0)), v1.Ping(ts=0))

    def test_unknownFieldsIgnored(self) -> None:
        self.assertEqual(
            v1.decode(payload(type="ack", ts=TS, ref="r", extra={"x": 1})), v1.Ack(ts=TS, ref="r")
        )

    def test_limits(self) -> None:
        """
        Ids, tokens and reasons at their maximum length are accepted.
        """
        longId = "i" * v1.MAX_ID_LENGTH
        self.assertEqual(decodeAs(v1.Msg, payload(type="msg", ts=TS, id=longId)).id, longId)
        self.assertEqual(decodeAs(v1.Ack, payload(type="ack", ts=TS, ref=longId)).ref, longId)
        token = "t" * v1.MAX_TOKEN_LENGTH
        self.assertEqual(
            decodeAs(v1.Hello, payload(type="hello", ts=TS, controller="c", token=token)).token,
            token,
        )
        reason = "r" * v1.MAX_REASON_LENGTH
        self.assertEqual(
            decodeAs(v1.Nack, payload(type="nack", ts=TS, ref="x", reason=reason)).reason, reason
        )

    @given(st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True))
    def test_validControllerIds(self, controller: str) -> None:
        message = decodeAs(v1.Hello, payload(type="hello", ts=TS, controller=controller))
        self.assertEqual(message.controller, controller)


class DecodeErrorTests(SynchronousTestCase):
    """
    Every way a frame can be invalid raises L{v1.ProtocolError} with the code to answer.
    """

    def assertCode(self, code: str, data: bytes, ref: str | None = None) -> v1.ProtocolError:
        error = self.assertRaises(v1.ProtocolError, v1.decode, data)
        self.assertEqual((error.code, error.ref), (code, ref), error.detail)
        self.assertTrue(error.detail)
        return error

    def test_notUtf8(self) -> None:
        self.assertCode(v1.BAD_JSON, b'{"type":"ping","ts":1,"x":"\xff\xfe"}')
        self.assertCode(v1.BAD_JSON, '{"type":"ping","ts":1}'.encode("utf-16"))

    def test_notJson(self) -> None:
        for data in (b"", b"hello", b"{", b'{"type":"ping",}', b"{'type':'ping'}", b'{"a":1} x'):
            self.assertCode(v1.BAD_JSON, data)

    def test_whitespaceAroundTheDocument(self) -> None:
        """
        JSON allows whitespace around a document; a frame with some decodes as one without.
        """
        for data in (b' {"type":"ping","ts":1}', b'{"type":"ping","ts":1}\r\n', b'\t{"type":"ping","ts":1} '):
            self.assertEqual(v1.decode(data), v1.Ping(ts=1))

    def test_nonStandardConstants(self) -> None:
        """
        NaN and the infinities are not JSON, wherever they appear.
        """
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            self.assertCode(v1.BAD_JSON, b'{"type":"msg","ts":1,"id":"m","body":%s}' % constant)
            self.assertCode(v1.BAD_JSON, b'{"type":"ping","ts":%s}' % constant)

    def test_notAnObject(self) -> None:
        for data in (b"[]", b'["type","ping"]', b'"ping"', b"42", b"null", b"true"):
            self.assertCode(v1.BAD_JSON, data)

    def test_tooDeeplyNested(self) -> None:
        """
        A document nested deeper than the parser can go is refused like any other bad JSON,
        not with an exception the connection does not expect.
        """
        deep = b'{"type":"msg","ts":1,"id":"m","body":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        self.assertCode(v1.BAD_JSON, deep)

    def test_unknownType(self) -> None:
        for kind in ("welcome", "cmd", "bye", "error", "HELLO", "", "x" * 1000):
            error = self.assertCode(v1.UNKNOWN_TYPE, payload(type=kind, ts=TS))
            self.assertLess(len(error.detail), 100)

    def test_badType(self) -> None:
        self.assertCode(v1.BAD_MESSAGE, payload(ts=TS))
        for kind in (None, 1, ["ping"], {"t": "ping"}, True):
            self.assertCode(v1.BAD_MESSAGE, payload(type=kind, ts=TS))

    def test_badTimestamp(self) -> None:
        valid: dict[str, dict[str, Any]] = {
            "hello": {"controller": "c"},
            "msg": {"id": "m"},
            "ack": {"ref": "r"},
            "nack": {"ref": "r"},
            "ping": {},
            "pong": {"echo": 1},
        }
        for kind, fields in valid.items():
            ref = "m" if kind == "msg" else None
            self.assertCode(v1.BAD_MESSAGE, payload(type=kind, **fields), ref)
            for ts in (None, "1700000000000", 1.5, 1e12, -1, True, False, [1]):
                self.assertCode(v1.BAD_MESSAGE, payload(type=kind, ts=ts, **fields), ref)

    def test_badMsgId(self) -> None:
        for fields in ({}, {"id": None}, {"id": ""}, {"id": 7}, {"id": "x" * 129}, {"id": ["m"]}):
            self.assertCode(v1.BAD_MESSAGE, payload(type="msg", ts=TS, body=1, **fields))

    def test_badAckRef(self) -> None:
        for kind in ("ack", "nack"):
            for fields in ({}, {"ref": ""}, {"ref": 3}, {"ref": "x" * 129}):
                self.assertCode(v1.BAD_MESSAGE, payload(type=kind, ts=TS, **fields))

    def test_badNackReason(self) -> None:
        for reason in (None, 5, ["x"], "r" * (v1.MAX_REASON_LENGTH + 1)):
            self.assertCode(v1.BAD_MESSAGE, payload(type="nack", ts=TS, ref="c", reason=reason))

    def test_badPongEcho(self) -> None:
        for fields in ({}, {"echo": None}, {"echo": "1"}, {"echo": 1.5}, {"echo": True}):
            self.assertCode(v1.BAD_MESSAGE, payload(type="pong", ts=TS, **fields))

    def test_badToken(self) -> None:
        for token in ("", 5, ["t"], "t" * (v1.MAX_TOKEN_LENGTH + 1)):
            self.assertCode(
                v1.BAD_MESSAGE, payload(type="hello", ts=TS, controller="c", token=token)
            )

    def test_badControllerId(self) -> None:
        for controller in (
            None,
            "",
            5,
            ["c"],
            "c" * 129,
            "with space",
            "slash/ed",
            "ümlaut",
            "semi;colon",
            "abc\n",
            "\nabc",
            "tab\t",
        ):
            self.assertCode(
                v1.BAD_CONTROLLER_ID, payload(type="hello", ts=TS, controller=controller)
            )
        self.assertCode(v1.BAD_CONTROLLER_ID, payload(type="hello", ts=TS))

    @given(st.text(min_size=1, max_size=130))
    def test_controllerIdAlphabet(self, controller: str) -> None:
        """
        A controller id is accepted exactly when it is 1-128 characters of [A-Za-z0-9._:-].
        """
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
        valid = len(controller) <= 128 and set(controller) <= allowed
        data = payload(type="hello", ts=TS, controller=controller)
        if valid:
            self.assertEqual(decodeAs(v1.Hello, data).controller, controller)
        else:
            self.assertCode(v1.BAD_CONTROLLER_ID, data)

    def test_nonFiniteNumbersRefused(self) -> None:
        """
        A number too large for a float (1e400 would become infinity, which neither JSON
        nor PostgreSQL holds) is refused as bad_json.
        """
        self.assertCode(v1.BAD_JSON, b'{"type":"msg","ts":1,"id":"m","body":1e400}')
        self.assertCode(v1.BAD_JSON, b'{"type":"msg","ts":1,"id":"m","body":[-1e999]}')

    def test_unstorableStringsRefused(self) -> None:
        """
        A \\u0000 or an unpaired surrogate anywhere in a frame (PostgreSQL cannot store
        either) is refused with bad_message, echoing the id only when it is clean.
        """
        self.assertCode(
            v1.BAD_MESSAGE, b'{"type":"msg","ts":1,"id":"m","body":{"k":"a\\u0000"}}', ref="m"
        )
        self.assertCode(
            v1.BAD_MESSAGE, b'{"type":"msg","ts":1,"id":"m","body":{"\\ud800":1}}', ref="m"
        )
        self.assertCode(v1.BAD_MESSAGE, b'{"type":"msg","ts":1,"id":"m\\ud800","body":1}')
        self.assertCode(v1.BAD_MESSAGE, b'{"type":"nack","ts":1,"ref":"c","reason":"\\u0000"}')
        # A properly paired escape is fine.
        message = decodeAs(v1.Msg, b'{"type":"msg","ts":1,"id":"m","body":"\\ud83d\\ude00"}')
        self.assertEqual(message.body, "\U0001f600")


class EncodeTests(SynchronousTestCase):
    """
    Gateway frames are compact UTF-8 JSON objects with C{type} and C{ts} first.
    """

    def roundTrip(self, kind: str, **fields: Any) -> dict[str, Any]:
        data = v1.encode(kind, TS, **fields)
        self.assertIsInstance(data, bytes)
        self.assertNotIn(b"\n", data)
        decoded = json.loads(data.decode("utf-8"))
        self.assertEqual(decoded, {"type": kind, "ts": TS, **fields})
        self.assertEqual(list(decoded)[:2], ["type", "ts"])
        return decoded

    def test_welcome(self) -> None:
        self.roundTrip("welcome", session="3f2c", epoch=7, ping_interval=30.0)

    def test_ack(self) -> None:
        self.roundTrip("ack", ref="m-1")

    def test_cmd(self) -> None:
        self.roundTrip("cmd", id="c-1", expires=TS + 5000, body={"set": [1, "ü", None]})

    def test_ping(self) -> None:
        self.roundTrip("ping")

    def test_pong(self) -> None:
        self.roundTrip("pong", echo=TS - 3)

    def test_error(self) -> None:
        self.roundTrip("error", code=v1.STALE_TIMESTAMP, ref="m-1", detail="too old")
        self.roundTrip("error", code=v1.HELLO_REQUIRED, ref=None, detail="say hello")

    def test_bye(self) -> None:
        for reason in (
            v1.BYE_TAKEOVER,
            v1.BYE_SHUTDOWN,
            v1.BYE_IDLE_TIMEOUT,
            v1.BYE_PROTOCOL_ERROR,
            v1.BYE_UNAVAILABLE,
        ):
            self.roundTrip("bye", reason=reason)

    def test_compactUtf8(self) -> None:
        """
        Non-ASCII text is written as UTF-8, not as escapes, and without padding.
        """
        data = v1.encode("cmd", TS, id="c", expires=TS, body="grüß 温度")
        self.assertIn("grüß 温度".encode(), data)
        self.assertNotIn(b" :", data)
        self.assertNotIn(b", ", data)

    def test_newlinesEscaped(self) -> None:
        """
        Line breaks inside strings are escaped, so the frame fits the lines framing.
        """
        data = v1.encode("cmd", TS, id="c", expires=TS, body="a\nb\r\nc")
        self.assertNotIn(b"\n", data)
        self.assertEqual(json.loads(data)["body"], "a\nb\r\nc")

    def test_nanRefused(self) -> None:
        self.assertRaises(ValueError, v1.encode, "cmd", TS, id="c", expires=TS, body=float("nan"))

    def test_loneSurrogateEchoed(self) -> None:
        """
        A string with a lone surrogate (no UTF-8 form) is still encoded as valid UTF-8
        JSON that decodes to the same string.
        """
        data = v1.encode("ack", TS, ref="m\ud800")
        self.assertEqual(json.loads(data.decode("utf-8"))["ref"], "m\ud800")

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=5), children, max_size=4)
            ),
            max_leaves=20,
        )
    )
    def test_bodyRoundTrip(self, body: object) -> None:
        """
        Whatever JSON body a command has, a controller reads back the same value.
        """
        self.roundTrip("cmd", id="c", expires=TS, body=body)

    @given(
        st.text(
            alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
            min_size=1,
            max_size=v1.MAX_ID_LENGTH,
        )
    )
    def test_msgIdEcho(self, messageId: str) -> None:
        """
        Any msg id the decoder accepts can be echoed in an ack that decodes to it.
        """
        message = decodeAs(v1.Msg, json.dumps({"type": "msg", "ts": TS, "id": messageId}).encode())
        data = v1.encode("ack", TS, ref=message.id)
        self.assertEqual(json.loads(data.decode("utf-8"))["ref"], messageId)
