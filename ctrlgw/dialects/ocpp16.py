# -*- test-case-name: tests.test_ocpp -*-
"""
OCPP 1.6J: charge points holding a WebSocket to the central system.

The charge point connects to C{ws://HOST:PORT<path><id>} with the subprotocol
C{ocpp1.6}.  Its id comes from the URL; with C{[auth] mode = token} it authenticates with
HTTP Basic (security profile 1: the id and the controller's token).  The upgrade is
answered only once the claim has committed, so a charger that is refused gets an HTTP
status, never an open socket.

Every CALL is validated against the OCPP 1.6 JSON schemas of the C{ocpp} package, stored
in the inbox (message id: the CALL's unique id; body C{{"action", "payload"}}) and
answered only after commit: by the gateway for what it can answer (C{BootNotification},
C{Heartbeat}, notifications), by an application through C{reply()} for the listener's
C{backend_actions}.  Commands (C{{"action", "payload"}}) are written as CALLs, one at a
time; the CALLRESULT settles them C{acked} with its payload as the result, a CALLERROR
C{nacked}.
"""

from __future__ import annotations

import json
from base64 import b64decode
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ocpp import exceptions as ocppErrors

# The package's own validator, so that codes match what its central systems answer.
from ocpp.messages import Call, CallResult, _validate_payload
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from ctrlgw.clock import wallMillis
from ctrlgw.config import ListenerConfig
from ctrlgw.framing import FramingError
from ctrlgw.framing._websocket import (
    GOING_AWAY,
    NORMAL,
    POLICY_VIOLATION,
    PROTOCOL_ERROR,
    Closed,
    Handshake,
    Message,
    WebSocketServer,
)
from ctrlgw.interfaces import Session
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import PEER_CLOSED, ConnectionContext, ListenerProtocol, State
from ctrlgw.protocol.writethrough import writeNow

log = Logger()

SUBPROTOCOL = "ocpp1.6"
OCPP_VERSION = "1.6"

CALL, CALLRESULT, CALLERROR = 2, 3, 4

# What a charge point may ask of the central system (OCPP 1.6 edition 2, and the security
# whitepaper's additions).
CHARGE_POINT_ACTIONS = frozenset({
    "Authorize", "BootNotification", "DataTransfer", "DiagnosticsStatusNotification",
    "FirmwareStatusNotification", "Heartbeat", "MeterValues", "StartTransaction",
    "StatusNotification", "StopTransaction", "LogStatusNotification",
    "SecurityEventNotification", "SignCertificate", "SignedFirmwareStatusNotification",
})
# What the central system may ask of a charge point: the commands.
CENTRAL_SYSTEM_ACTIONS = frozenset({
    "CancelReservation", "CertificateSigned", "ChangeAvailability", "ChangeConfiguration",
    "ClearCache", "ClearChargingProfile", "DataTransfer", "DeleteCertificate",
    "ExtendedTriggerMessage", "GetCompositeSchedule", "GetConfiguration", "GetDiagnostics",
    "GetInstalledCertificateIds", "GetLocalListVersion", "GetLog", "InstallCertificate",
    "RemoteStartTransaction", "RemoteStopTransaction", "ReserveNow", "Reset", "SendLocalList",
    "SetChargingProfile", "SignedUpdateFirmware", "TriggerMessage", "UnlockConnector",
    "UpdateFirmware",
})

# The error codes of OCPP-J 1.6 section 4.2.3; the ocpp package's names for two of them
# are those of later versions.
ERROR_CODES = frozenset({
    "NotImplemented", "NotSupported", "InternalError", "ProtocolError", "SecurityError",
    "FormationViolation", "PropertyConstraintViolation", "OccurenceConstraintViolation",
    "TypeConstraintViolation", "GenericError",
})
_CODE_IN_16 = {"FormatViolation": "FormationViolation",
               "OccurrenceConstraintViolation": "OccurenceConstraintViolation"}

# Unique ids are at most 36 characters (OCPP-J 1.6 section 4.1.3).
_MAX_UNIQUE_ID = 36
# Requests waiting for a backend's answer on one connection; a charge point sends one CALL
# at a time, so more is a misbehaving one.
_MAX_WAITING = 100
_MAX_DESCRIPTION = 255

_CLOSE_CODES = {
    v1.BYE_SHUTDOWN: GOING_AWAY,
    v1.BYE_UNAVAILABLE: GOING_AWAY,
    v1.BYE_PROTOCOL_ERROR: PROTOCOL_ERROR,
}


def _callError(uniqueId: str, code: str, description: str, details: object = None) -> str:
    return json.dumps(
        [CALLERROR, uniqueId, code, description[:_MAX_DESCRIPTION], details or {}],
        separators=(",", ":"),
    )


def _isoNow(clock_ms: int) -> str:
    return (
        datetime.fromtimestamp(clock_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _timestampOf(payload: Mapping[str, Any]) -> str | None:
    """
    The time a charge point stamped on what it reports, if it did.
    """
    if isinstance(payload.get("timestamp"), str):
        return payload["timestamp"]
    values = payload.get("meterValue")
    if isinstance(values, list) and values and isinstance(values[0], dict):
        stamp = values[0].get("timestamp")
        return stamp if isinstance(stamp, str) else None
    return None


def _millis(stamp: str) -> int | None:
    try:
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


class CallRefused(Exception):
    """
    A CALL the gateway answers with a CALLERROR and does not store.
    """

    def __init__(self, code: str, description: str) -> None:
        super().__init__(code, description)
        self.code = code
        self.description = description


def validate(kind: int, action: str, payload: object) -> None:
    """
    Check C{payload} against the OCPP 1.6 schema of C{action}'s request (C{kind} CALL) or
    response (CALLRESULT).

    @raise CallRefused: with the OCPP 1.6 error code.
    """
    message = (
        Call("0", action, payload) if kind == CALL
        else CallResult("0", payload, action)
    )
    try:
        _validate_payload(message, OCPP_VERSION)
    except ocppErrors.OCPPError as e:
        code = _CODE_IN_16.get(e.code, e.code)
        cause = e.details.get("cause") if isinstance(e.details, dict) else None
        raise CallRefused(code, str(cause or e.description)) from None


@dataclass
class _Waiting:
    """
    A request stored, or being stored, that has not been answered yet.
    """

    action: str
    stored: bool = False
    timer: IDelayedCall | None = None


class OcppProtocol(ListenerProtocol):
    """
    One charge point's WebSocket.
    """

    # OCPP-J: a sender has at most one CALL outstanding.
    maxInflight = 1

    def __init__(
        self,
        context: ConnectionContext,
        listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object] = lambda transport: None,
    ) -> None:
        super().__init__(context, listener, applySocketOptions)
        options = listener.options
        self.path: str = options["path"]
        self.replyTimeout: float = options["reply_timeout"]
        self.backendActions = frozenset(options["backend_actions"])
        self.heartbeatInterval = int(options["heartbeat_interval"])
        self.ws = WebSocketServer(listener.max_frame)
        self.controller: str | None = None
        self._upgraded = False
        self._waiting: dict[str, _Waiting] = {}
        # The command written and not answered yet.
        self._outstanding: str | None = None

    # --- bytes in ---

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.ws.feed(data)
        except FramingError as e:
            self._flush()
            self.context.metrics.frameErrors.labels(e.code).inc()
            if self.state is not State.CLOSED:
                self.close(v1.BYE_PROTOCOL_ERROR)
            return
        self._flush()
        if self.state is State.CLOSED:
            return
        if events or data:
            # Pings and pongs too: anything from the peer shows it is there.
            self._lastHeard = self.context.clock.seconds()
        messages = []
        for event in events:
            if isinstance(event, Handshake):
                self._handshake(event)
            elif isinstance(event, Message):
                messages.append(event.data)
            elif isinstance(event, Closed):
                self._finish(PEER_CLOSED)
                if self.transport is not None:
                    self.transport.loseConnection()
                return
        self.framesReceived(messages)

    def _flush(self) -> None:
        pending = self.ws.takeOutgoing()
        if pending and self.transport is not None:
            writeNow(self.transport, pending)

    def _handshake(self, request: Handshake) -> None:
        if self.state is not State.AWAITING_HELLO:
            return
        if not request.path.startswith(self.path):
            self._reject(404, f"charge points connect to {self.path}<id>")
            return
        controller = request.path[len(self.path) :]
        if not v1.CONTROLLER_ID.fullmatch(controller):
            self._reject(404, "a charge point id is 1-128 characters of [A-Za-z0-9._:-]")
            return
        if SUBPROTOCOL not in request.subprotocols:
            # OCPP-J section 3.1.2: complete the handshake without it, then close.
            self.context.metrics.frameErrors.labels("no_subprotocol").inc()
            self._upgraded = True
            self._write(self.ws.accept(None))
            self.close(v1.BYE_PROTOCOL_ERROR)
            return
        self.controller = controller
        self.claim(controller, self._token(controller, request.headers.get("authorization")))

    @staticmethod
    def _token(controller: str, authorization: str | None) -> str | None:
        """
        The password of HTTP Basic credentials for C{controller}; C{None} for anything
        else (no header, another scheme, another user), which token mode refuses.
        """
        if not authorization:
            return None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password if sep and user == controller else None

    def _reject(
        self, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self._write(self.ws.reject(status, [(b"content-type", b"text/plain"), *headers],
                                   detail.encode("utf-8") + b"\n"))
        self.close(v1.BYE_PROTOCOL_ERROR)

    # --- frames in ---

    def frameReceived(self, payload: bytes) -> None:
        try:
            message = v1.loadJSON(payload)
        except ValueError as e:
            self._refuseCall("-1", CallRefused("FormationViolation", f"not JSON: {e}"))
            return
        if not isinstance(message, list) or not message or not isinstance(message[0], int):
            self._refuseCall("-1", CallRefused(
                "FormationViolation", "a message is a JSON array [type, id, ...]"))
            return
        kind = message[0]
        uniqueId = message[1] if len(message) > 1 and isinstance(message[1], str) else None
        if uniqueId is None or not 0 < len(uniqueId) <= _MAX_UNIQUE_ID:
            self._refuseCall("-1", CallRefused(
                "FormationViolation", f"the unique id must be a string of 1-{_MAX_UNIQUE_ID} characters"))
            return
        if kind == CALL:
            self._call(uniqueId, message)
        elif kind == CALLRESULT:
            self._answered(uniqueId, message, ok=True)
        elif kind == CALLERROR:
            self._answered(uniqueId, message, ok=False)
        else:
            self._refuseCall(uniqueId, CallRefused(
                "PropertyConstraintViolation", f"unknown message type {kind}"))

    def _call(self, uniqueId: str, message: list[Any]) -> None:
        self.context.framesIn["msg"].inc()
        try:
            if len(message) != 4 or not isinstance(message[2], str):
                raise CallRefused("FormationViolation", "a CALL is [2, id, action, payload]")
            action, payload = message[2], message[3]
            if action not in CHARGE_POINT_ACTIONS:
                code = "NotSupported" if action in CENTRAL_SYSTEM_ACTIONS else "NotImplemented"
                raise CallRefused(code, f"unknown action {action[:64]!r}")
            validate(CALL, action, payload)
            if not v1.storable(payload):
                raise CallRefused(
                    "FormationViolation",
                    "strings must not contain \\u0000 or unpaired surrogates",
                )
            if uniqueId in self._waiting:
                raise CallRefused("ProtocolError", "a CALL with this id is still unanswered")
            if len(self._waiting) >= _MAX_WAITING:
                raise CallRefused("InternalError", "too many requests unanswered; retry later")
        except CallRefused as e:
            self._refuseCall(uniqueId, e)
            return
        self._waiting[uniqueId] = _Waiting(action)
        self.submit(uniqueId, self._deviceTs(payload), {"action": action, "payload": payload})

    def _deviceTs(self, payload: Mapping[str, Any]) -> int:
        now = wallMillis(self.context.clock)
        stamp = _timestampOf(payload)
        ts = _millis(stamp) if stamp is not None else None
        if ts is None:
            return now
        # Charge points replay queued transaction messages with their own old times by
        # design (OCPP-J section 3.7): stored, never refused, but counted.
        problem = self.timestampProblem(ts)
        if problem is not None:
            self.context.metrics.timestampsFlagged.labels(problem[0]).inc()
        return ts

    def _answered(self, uniqueId: str, message: list[Any], ok: bool) -> None:
        session = self.session
        if uniqueId != self._outstanding or session is None:
            log.debug("{controller} answered {id!r}, which is not outstanding",
                      controller=self.controller, id=uniqueId)
            return
        self._outstanding = None
        self.context.framesIn["ack" if ok else "nack"].inc()
        if ok:
            result = message[2] if len(message) > 2 else None
            self.context.settler.settle(session, uniqueId, True, "", result)
        else:
            code = message[2] if len(message) > 2 and isinstance(message[2], str) else "GenericError"
            description = message[3] if len(message) > 3 and isinstance(message[3], str) else ""
            details = message[4] if len(message) > 4 else None
            result = {"errorCode": code, "errorDescription": description, "errorDetails": details}
            reason = f"{code}: {description}" if description else code
            self.context.settler.settle(session, uniqueId, False, reason[:1000], result)

    # --- the session's steps, in OCPP ---

    def welcome(self, session: Session) -> None:
        self._upgraded = True
        self._write(self.ws.accept(SUBPROTOCOL))
        self.context.framesOut["welcome"].inc()

    def refuse(self, code: str, detail: str) -> None:
        if self._upgraded:
            self.close(v1.BYE_UNAVAILABLE)
        elif code == v1.AUTH_FAILED:
            self._reject(401, detail, [(b"www-authenticate", b'Basic realm="ctrlgw"')])
        else:
            self._reject(503, detail, [(b"retry-after", b"10")])

    def identificationTimedOut(self) -> None:
        self.close(v1.BYE_PROTOCOL_ERROR)

    def messageStored(self, messageId: str) -> None:
        waiting = self._waiting.get(messageId)
        if waiting is None:
            return
        if waiting.action in self.backendActions:
            waiting.stored = True
            waiting.timer = self.context.clock.callLater(
                self.replyTimeout, self._replyTimedOut, messageId
            )
            self.context.metrics.repliesWaiting.inc()
            return
        del self._waiting[messageId]
        self._result(messageId, self._builtinAnswer(waiting.action))
        self.context.framesOut["ack"].inc()

    def _builtinAnswer(self, action: str) -> dict[str, Any]:
        now = _isoNow(wallMillis(self.context.clock))
        if action == "BootNotification":
            return {"status": "Accepted", "currentTime": now, "interval": self.heartbeatInterval}
        if action == "Heartbeat":
            return {"currentTime": now}
        if action == "SignCertificate":
            return {"status": "Rejected"}
        return {}

    def messageNotStored(self, messageId: str, code: str, detail: str) -> None:
        if self._waiting.pop(messageId, None) is None:
            return
        error = "FormationViolation" if code == v1.BAD_MESSAGE else "InternalError"
        self._refuseCall(messageId, CallRefused(error, detail))

    def _replyTimedOut(self, messageId: str) -> None:
        waiting = self._waiting.pop(messageId, None)
        if waiting is None:
            return
        self.context.metrics.repliesWaiting.dec()
        self.context.metrics.replies.labels("timed_out").inc()
        self._refuseCall(messageId, CallRefused(
            "InternalError", f"no answer from the backend within {self.replyTimeout:g}s"))

    def reply(self, messageId: str, payload: object) -> bool:
        waiting = self._takeWaiting(messageId)
        if waiting is None:
            return False
        try:
            validate(CALLRESULT, waiting.action, payload)
        except CallRefused as e:
            log.warn("the backend's answer to {action} {id} is not valid OCPP: {reason}",
                     action=waiting.action, id=messageId, reason=e.description)
            self.context.metrics.replies.labels("invalid").inc()
            self._refuseCall(messageId, CallRefused(
                "InternalError", "the central system's answer was not valid"))
            return True
        self._result(messageId, payload)
        self.context.metrics.replies.labels("written").inc()
        return True

    def replyError(self, messageId: str, code: str, description: str) -> bool:
        if self._takeWaiting(messageId) is None:
            return False
        self._refuseCall(messageId, CallRefused(
            code if code in ERROR_CODES else "GenericError", description))
        self.context.metrics.replies.labels("written").inc()
        return True

    def _takeWaiting(self, messageId: str) -> _Waiting | None:
        waiting = self._waiting.get(messageId)
        if waiting is None or not waiting.stored or self.state is not State.LIVE:
            return None
        del self._waiting[messageId]
        if waiting.timer is not None and waiting.timer.active():
            waiting.timer.cancel()
        self.context.metrics.repliesWaiting.dec()
        return waiting

    def sendPing(self) -> None:
        self._write(self.ws.ping(str(wallMillis(self.context.clock)).encode("ascii")))
        self.context.framesOut["ping"].inc()

    def writeCommand(self, commandId: str, body: object, expiresMs: int) -> None:
        command = json.loads(body) if isinstance(body, str) else body
        if not (isinstance(command, dict) and set(command) == {"action", "payload"}):
            raise ValueError('an OCPP command is {"action": NAME, "payload": {...}}')
        action, payload = command["action"], command["payload"]
        if action not in CENTRAL_SYSTEM_ACTIONS:
            raise ValueError(f"{str(action)[:64]!r} is not an OCPP 1.6 request to a charge point")
        try:
            validate(CALL, action, payload)
        except CallRefused as e:
            raise ValueError(f"not a valid {action} request: {e.description}") from None
        self._writeText(json.dumps([CALL, commandId, action, payload], separators=(",", ":")))
        self._outstanding = commandId
        self.context.framesOut["cmd"].inc()

    def sayGoodbye(self, reason: str) -> None:
        if self._upgraded:
            code = _CLOSE_CODES.get(reason, POLICY_VIOLATION if reason == "revoked" else NORMAL)
            self._write(self.ws.close(code, reason))
            self.context.framesOut["bye"].inc()

    def sessionEnded(self) -> None:
        for waiting in self._waiting.values():
            if waiting.timer is not None and waiting.timer.active():
                waiting.timer.cancel()
                self.context.metrics.repliesWaiting.dec()
        self._waiting.clear()
        self._outstanding = None

    # --- writing ---

    def _result(self, uniqueId: str, payload: object) -> None:
        self._writeText(json.dumps([CALLRESULT, uniqueId, payload], separators=(",", ":")))

    def _refuseCall(self, uniqueId: str, error: CallRefused) -> None:
        self.context.metrics.frameErrors.labels(error.code).inc()
        if self.state is State.LIVE:
            self._writeText(_callError(uniqueId, error.code, error.description))
            self.context.framesOut["error"].inc()

    def _writeText(self, text: str) -> None:
        self._write(self.ws.frame(text))

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            writeNow(self.transport, data)


class RefusedUpgrade(Protocol):
    """
    A connection past its listener's C{max_connections}: answered 503 with Retry-After,
    whatever it asked, and closed.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail

    def connectionMade(self) -> None:
        assert self.transport is not None
        body = self.detail.encode("utf-8") + b"\n"
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 10\r\n"
            b"content-type: text/plain\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass
