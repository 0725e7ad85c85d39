"""
Controller protocol v1: JSON frames to typed messages and back.

Pure functions, no I/O: L{decode} turns a frame's payload into one of the inbound message
classes or raises L{ProtocolError} with the error-frame code to answer; L{encode} turns a
gateway frame into payload bytes, stamping C{ts} with the time it is given (the caller
passes the write time).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import c_make_encoder  # type: ignore[attr-defined]  # not in typeshed
from typing import Any, TypeGuard

CONTROLLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A command id as the gateway writes it.  Narrower than both Python's uuid.UUID (which also
# takes urn:uuid:, braces and stray hyphens) and PostgreSQL's uuid input, so a ref that
# matches can never be refused by the database and jam a settlement batch.
COMMAND_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_ID_LENGTH = 128
# ts and echo go back out in frames, and into bigint columns: a bigger number would make a
# pong too long for its frame.
MAX_TS = 2**63 - 1
_tsRangeDetail = f"'ts' and 'echo' must be integers of at most {MAX_TS}"
MAX_TOKEN_LENGTH = 512
MAX_REASON_LENGTH = 1024

# Error-frame codes (docs/protocol.md lists them with what the gateway does after each).
BAD_FRAME = "bad_frame"
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
FRAME_TOO_LARGE = "frame_too_large"
UNKNOWN_TYPE = "unknown_type"
HELLO_REQUIRED = "hello_required"
BAD_CONTROLLER_ID = "bad_controller_id"
STALE_TIMESTAMP = "stale_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
AUTH_FAILED = "auth_failed"
UNAVAILABLE = "unavailable"

# Reasons a C{bye} gives.
BYE_TAKEOVER = "takeover"
BYE_SHUTDOWN = "shutdown"
BYE_IDLE_TIMEOUT = "idle_timeout"
BYE_PROTOCOL_ERROR = "protocol_error"
BYE_UNAVAILABLE = "unavailable"
BYE_REVOKED = "revoked"
BYE_KICKED = "kicked"


class ProtocolError(Exception):
    """
    A frame is not a valid v1 message; C{code} is the error frame's code and C{ref} the id
    of the message it refers to, when one could be read.
    """

    def __init__(self, code: str, detail: str, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Hello:
    ts: int
    controller: str
    token: str | None


@dataclass(frozen=True, slots=True)
class Msg:
    ts: int
    id: str
    body: Any


@dataclass(frozen=True, slots=True)
class Ack:
    ts: int
    ref: str


@dataclass(frozen=True, slots=True)
class Nack:
    ts: int
    ref: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    ts: int


@dataclass(frozen=True, slots=True)
class Pong:
    ts: int
    echo: int


Inbound = Hello | Msg | Ack | Nack | Ping | Pong


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finiteFloat(text: str) -> float:
    # 1e400 parses as infinity, which neither JSON nor PostgreSQL can hold.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _isInt(value: object) -> TypeGuard[int]:
    # TypeGuard, not TypeIs: a bool is an int to the type system but not here, so a
    # False answer must not narrow to "not int".
    return isinstance(value, int) and not isinstance(value, bool)


def _text(obj: dict[str, Any], key: str, maxLength: int, ref: str | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= maxLength:
        raise ProtocolError(
            BAD_MESSAGE, f"{key!r} must be a string of 1 to {maxLength} characters", ref
        )
    return value


def _storable(value: object) -> bool:
    """
    Whether every string in C{value} (keys included) can be stored by PostgreSQL.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


# One decoder for every frame: json.loads with hooks builds a decoder, and its scanner, per
# call (a tenth of the cost of a small frame).
_decoder = json.JSONDecoder(parse_constant=_rejectConstant, parse_float=_finiteFloat)
_scanOnce: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def loadJSON(payload: bytes) -> Any:
    """
    Parse UTF-8 JSON as PostgreSQL will accept it: no NaN or Infinity, no number out of
    a double's range.

    @raise ValueError: it is not such JSON (C{UnicodeDecodeError} and C{RecursionError}
        included).
    """
    text = payload.decode("utf-8")
    try:
        # A frame is a document with no whitespace around it: the scanner alone reads it,
        # without decode()'s two whitespace matches.  Anything else goes the long way,
        # which also names the error.
        try:
            obj, end = _scanOnce(text, 0)
            if end == len(text):
                return obj
        except StopIteration:
            pass
        return _decoder.decode(text)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


storable = _storable


def decode(payload: bytes) -> Inbound:
    """
    Decode one frame's payload.

    @raise ProtocolError: with the code the gateway answers with.
    """
    try:
        obj = loadJSON(payload)
    except ValueError as e:
        raise ProtocolError(BAD_JSON, f"not a UTF-8 JSON document: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, "a frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "'type' must be a string")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown type {kind[:32]!r}")
    ref = obj.get("id") if kind == "msg" and isinstance(obj.get("id"), str) else None
    ts = obj.get("ts")
    if not _isInt(ts) or ts < 0:
        raise ProtocolError(BAD_MESSAGE, "'ts' must be integer milliseconds since the epoch", ref)
    message = decoder(obj, ts)
    if b"\\u" in payload and not _storable(obj):
        # Only a \u escape can smuggle these in; PostgreSQL (jsonb, text) refuses them,
        # and one such message must never hold up anyone else's batch.
        raise ProtocolError(
            BAD_MESSAGE,
            "strings must not contain \\u0000 or unpaired surrogates",
            ref if ref is not None and _storable(ref) else None,
        )
    if ts > MAX_TS:
        raise ProtocolError(BAD_MESSAGE, _tsRangeDetail, ref)
    return message


def _decodeHello(obj: dict[str, Any], ts: int) -> Hello:
    controller = obj.get("controller")
    if not isinstance(controller, str) or not CONTROLLER_ID.fullmatch(controller):
        raise ProtocolError(
            BAD_CONTROLLER_ID, "'controller' must be 1-128 characters of [A-Za-z0-9._:-]"
        )
    token = obj.get("token")
    if token is not None:
        token = _text(obj, "token", MAX_TOKEN_LENGTH)
    return Hello(ts=ts, controller=controller, token=token)


def _decodeMsg(obj: dict[str, Any], ts: int) -> Msg:
    return Msg(ts=ts, id=_text(obj, "id", MAX_ID_LENGTH), body=obj.get("body"))


def _decodeAck(obj: dict[str, Any], ts: int) -> Ack:
    return Ack(ts=ts, ref=_text(obj, "ref", MAX_ID_LENGTH))


def _decodeNack(obj: dict[str, Any], ts: int) -> Nack:
    ref = _text(obj, "ref", MAX_ID_LENGTH)
    reason = obj.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH:
        raise ProtocolError(BAD_MESSAGE, f"'reason' must be a string of at most {MAX_REASON_LENGTH}")
    return Nack(ts=ts, ref=ref, reason=reason)


def _decodePing(obj: dict[str, Any], ts: int) -> Ping:
    return Ping(ts=ts)


def _decodePong(obj: dict[str, Any], ts: int) -> Pong:
    echo = obj.get("echo")
    if not _isInt(echo):
        raise ProtocolError(BAD_MESSAGE, "'echo' must be the ping's integer ts")
    if echo > MAX_TS:
        raise ProtocolError(BAD_MESSAGE, _tsRangeDetail)
    return Pong(ts=ts, echo=echo)


_DECODERS: dict[str, Callable[[dict[str, Any], int], Inbound]] = {
    "hello": _decodeHello,
    "msg": _decodeMsg,
    "ack": _decodeAck,
    "nack": _decodeNack,
    "ping": _decodePing,
    "pong": _decodePong,
}

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_asciiEncoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _oneShot(encoder: json.JSONEncoder) -> Callable[[object], str]:
    """
    C{encoder.encode} without building its C encoder again on every call (more than half
    the cost of encoding an ack).  Frames hold what JSON decoding or the database made, so
    they cannot refer to themselves and need no check for cycles.
    """
    if c_make_encoder is None:
        return encoder.encode
    assert not encoder.ensure_ascii and encoder.indent is None
    scan = c_make_encoder(
        None, encoder.default, json.encoder.encode_basestring, None, encoder.key_separator,
        encoder.item_separator, encoder.sort_keys, encoder.skipkeys, encoder.allow_nan,
    )
    return lambda value: "".join(scan(value, 0))


_encodeText = _oneShot(_encoder)


class RawJSON(str):
    """
    A JSON document as text, written into a frame as it is (a command body as PostgreSQL's
    jsonb prints it: always valid JSON, never decoded and encoded again).
    """


def encode(kind: str, ts: int, **fields: Any) -> bytes:
    """
    Encode a gateway frame of type C{kind} stamped with C{ts}.  L{RawJSON} fields go last,
    in their order, as they are.
    """
    frame = {"type": kind, "ts": ts}
    raw = []
    for name, value in fields.items():
        if isinstance(value, RawJSON):
            raw.append(b',"%s":%s' % (name.encode("ascii"), value.encode("utf-8")))
        else:
            frame[name] = value
    try:
        encoded = _encodeText(frame).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a peer may send one as a \ud800 escape, e.g. in a msg id that
        # is echoed as a ref) has no UTF-8 form; escaped, it goes back exactly as it came.
        encoded = _asciiEncoder.encode(frame).encode("ascii")
    if raw:
        encoded = b"".join([encoded[:-1], *raw, b"}"])
    return encoded
