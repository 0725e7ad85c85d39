"""
Tests for the C{ocpp1.6} dialect (L{ctrlgw.dialects.ocpp16}) and its WebSocket framing.

Logic is driven on a L{task.Clock} and a string transport, with C{wsproto}'s client side
playing the charge point; L{OcppGatewayTests} runs the C{ocpp} package's own
C{ChargePoint} over the C{websockets} library (L{tests.ocpp_chargepoint}, a process of its
own) against real gateways and a real PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from ctrlgw.auth import hashToken, newToken
from ctrlgw.config import ConfigError, parseConfig
from ctrlgw.dialects.ocpp16 import CALL, CallRefused, OcppProtocol, validate
from ctrlgw.framing import FramingError
from ctrlgw.framing._websocket import Closed, Handshake, Message, WebSocketServer
from ctrlgw.interfaces import Unavailable
from ctrlgw.protocol.session import State
from tests.gateways import listenerPort, startGateway, waitUntil
from tests.helpers import MemorySink, RecordingTransport, deferred, iniText, makeClock, makeContext
from tests.pg import PostgresTestCase

OCPP_LISTENER = {"listener:cp": {"endpoint": "tcp:0", "dialect": "ocpp1.6"}}


def ocppConfig(**listener: object):  # type: ignore[no-untyped-def]
    sections = {"listener:cp": {"endpoint": "tcp:0", "dialect": "ocpp1.6", **listener}}
    return parseConfig(iniText(sections), "test.ini")


class ChargePointEnd:
    """
    The charge point's end of one L{OcppProtocol}, speaking through C{wsproto}'s client.
    """

    def __init__(self, testCase: SynchronousTestCase, sink: MemorySink | None = None,
                 **listener: object) -> None:
        self.clock = makeClock()
        self.sink = sink or MemorySink()
        config = ocppConfig(**listener)
        self.context = makeContext(config, clock=self.clock, sink=self.sink)
        self.transport = RecordingTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8887),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 50000),
        )
        self.protocol = OcppProtocol(self.context, config.listeners[0])
        self.protocol.makeConnection(self.transport)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    def upgrade(self, target: str = "/ocpp/CP-1", subprotocols: tuple[str, ...] = ("ocpp1.6",),
                headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.feed(self.ws.send(Request(host="gw", target=target, subprotocols=list(subprotocols),
                                       extra_headers=list(headers))))
        self.read()

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def read(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events

    def send(self, message: object) -> None:
        self.feed(self.ws.send(TextMessage(data=json.dumps(message))))

    def messages(self) -> list[Any]:
        self.read()
        return [json.loads(e.data) for e in self.events if isinstance(e, TextMessage)]

    def accepted(self) -> AcceptConnection | None:
        self.read()
        return next((e for e in self.events if isinstance(e, AcceptConnection)), None)


class HandshakeTests(SynchronousTestCase):
    def test_upgradeAfterClaim(self) -> None:
        """
        The id comes from the URL (percent-decoded); the upgrade is answered with the
        ocpp1.6 subprotocol once the claim has committed, and the session is live.
        """
        end = ChargePointEnd(self)
        end.upgrade("/ocpp/CP%2D7")
        accepted = end.accepted()
        self.assertIsNotNone(accepted)
        assert accepted is not None
        self.assertEqual(accepted.subprotocol, "ocpp1.6")
        self.assertIs(end.protocol.state, State.LIVE)
        assert end.protocol.session is not None
        self.assertEqual(end.protocol.session.controller, "CP-7")

    def test_noSubprotocol(self) -> None:
        """
        Without ocpp1.6 the handshake completes without a subprotocol, then the gateway
        closes (OCPP-J section 3.1.2); no session is claimed.
        """
        end = ChargePointEnd(self)
        end.upgrade(subprotocols=("ocpp2.0.1",))
        events = end.read()
        accepted = [e for e in events if isinstance(e, AcceptConnection)]
        self.assertEqual([a.subprotocol for a in accepted], [None])
        self.assertTrue(any(isinstance(e, CloseConnection) for e in events))
        self.assertIsNone(end.protocol.session)
        self.assertIs(end.protocol.state, State.CLOSED)

    def test_wrongPath(self) -> None:
        end = ChargePointEnd(self)
        end.upgrade("/elsewhere/CP-1")
        rejected = [e for e in end.read() if isinstance(e, RejectConnection)]
        self.assertEqual([r.status_code for r in rejected], [404])
        self.assertTrue(end.transport.disconnecting)

    def test_badId(self) -> None:
        end = ChargePointEnd(self)
        end.upgrade("/ocpp/bad%20id")
        rejected = [e for e in end.read() if isinstance(e, RejectConnection)]
        self.assertEqual([r.status_code for r in rejected], [404])

    def test_customPath(self) -> None:
        end = ChargePointEnd(self, path="/cs/v16/")
        end.upgrade("/cs/v16/CP-2")
        self.assertIsNotNone(end.accepted())

    def test_unavailable(self) -> None:
        """
        A claim that fails for want of the database is a 503 with Retry-After before the
        upgrade, never an open socket.
        """
        end = ChargePointEnd(self)

        def failing(*args: object) -> Deferred[Any]:
            return Deferred.fromCoroutine(_raise(Unavailable("database unavailable")))

        end.context.ownership.claim = failing  # type: ignore[method-assign]
        end.upgrade()
        rejected = [e for e in end.read() if isinstance(e, RejectConnection)]
        self.assertEqual([r.status_code for r in rejected], [503])
        self.assertIn((b"retry-after", b"10"), rejected[0].headers)

    def test_handshakeDeadline(self) -> None:
        end = ChargePointEnd(self)
        end.clock.advance(end.context.liveness.hello_timeout + 0.1)
        self.assertIs(end.protocol.state, State.CLOSED)

    def test_basicCredentials(self) -> None:
        token = OcppProtocol._token
        basic = "Basic " + base64.b64encode(b"CP-1:s3cret").decode()
        self.assertEqual(token("CP-1", basic), "s3cret")
        self.assertIsNone(token("CP-2", basic), "another user's credentials")
        self.assertIsNone(token("CP-1", None))
        self.assertIsNone(token("CP-1", "Bearer s3cret"))
        self.assertIsNone(token("CP-1", "Basic !!!"))


async def _raise(error: Exception) -> Any:
    raise error


class CallTests(SynchronousTestCase):
    def live(self, **listener: object) -> ChargePointEnd:
        end = ChargePointEnd(self, **listener)
        end.upgrade()
        self.assertIsNotNone(end.accepted())
        return end

    def test_bootAnsweredAfterCommit(self) -> None:
        end = self.live()
        boot = {"chargePointVendor": "V", "chargePointModel": "M"}
        end.send([2, "b1", "BootNotification", boot])
        self.assertEqual(end.messages(), [], "answered before the commit")
        self.assertEqual(end.sink.messageIds, ["b1"])
        submission = end.sink.submissions[0]
        self.assertEqual(submission.body, {"action": "BootNotification", "payload": boot})
        end.sink.succeed("b1")
        (answer,) = end.messages()
        self.assertEqual(answer[:2], [3, "b1"])
        self.assertEqual(answer[2]["status"], "Accepted")
        self.assertEqual(answer[2]["interval"], 300)
        self.assertTrue(answer[2]["currentTime"].endswith("Z"))

    def test_builtinAnswers(self) -> None:
        end = self.live()
        end.send([2, "h1", "Heartbeat", {}])
        end.send([2, "s1", "StatusNotification",
                  {"connectorId": 1, "errorCode": "NoError", "status": "Available"}])
        for messageId in ("h1", "s1"):
            end.sink.succeed(messageId)
        heartbeat, status = end.messages()
        self.assertEqual(heartbeat[:2], [3, "h1"])
        self.assertIn("currentTime", heartbeat[2])
        self.assertEqual(status, [3, "s1", {}])

    def test_replayedTimestampStored(self) -> None:
        """
        A transaction message replayed hours late keeps its own timestamp and is stored,
        flagged in a metric, not refused.
        """
        end = self.live()
        old = "2020-01-02T03:04:05Z"
        end.send([2, "m1", "MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": old, "sampledValue": [{"value": "10"}]}]}])
        self.assertEqual(end.sink.messageIds, ["m1"])
        self.assertEqual(end.sink.submissions[0].deviceTs, 1577934245000)
        flagged = end.context.metrics.timestampsFlagged.labels("stale")._value.get()
        self.assertEqual(flagged, 1)

    def test_invalidPayload(self) -> None:
        """
        A payload the OCPP 1.6 schema refuses gets a CALLERROR with the spec's code and is
        not stored.
        """
        end = self.live()
        end.send([2, "x1", "BootNotification", {"chargePointVendor": "V"}])
        end.send([2, "x2", "StatusNotification",
                  {"connectorId": "one", "errorCode": "NoError", "status": "Available"}])
        end.send([2, "x3", "Heartbeat", {"extra": 1}])
        end.send([2, "x4", "StatusNotification",
                  {"connectorId": 1, "errorCode": "NoError", "status": "Sleeping"}])
        answers = end.messages()
        self.assertEqual([a[:3] for a in answers], [
            [4, "x1", "ProtocolError"],
            [4, "x2", "TypeConstraintViolation"],
            [4, "x3", "FormationViolation"],
            [4, "x4", "FormationViolation"],
        ])
        self.assertEqual(end.sink.messageIds, [])

    def test_unknownAction(self) -> None:
        end = self.live()
        end.send([2, "u1", "MakeCoffee", {}])
        end.send([2, "u2", "Reset", {"type": "Soft"}])
        self.assertEqual([a[:3] for a in end.messages()],
                         [[4, "u1", "NotImplemented"], [4, "u2", "NotSupported"]])
        self.assertEqual(end.sink.messageIds, [])

    def test_wrongShapes(self) -> None:
        end = self.live()
        for message in ({"a": 1}, [], [2], [2, 5, "Heartbeat", {}], [9, "z", "Heartbeat", {}],
                        [2, "z" * 37, "Heartbeat", {}], [2, "z", "Heartbeat"]):
            end.send(message)
        codes = [a[2] for a in end.messages()]
        self.assertEqual(len(codes), 7)
        self.assertTrue(all(code in ("FormationViolation", "PropertyConstraintViolation")
                            for code in codes), codes)
        self.assertIs(end.protocol.state, State.LIVE, "bad messages cost no connection")

    def test_notJson(self) -> None:
        end = self.live()
        end.feed(end.ws.send(TextMessage(data="[2, 'x'")))
        self.assertEqual(end.messages()[0][:3], [4, "-1", "FormationViolation"])

    def test_backendRequestWaitsForReply(self) -> None:
        end = self.live(reply_timeout="5s")
        end.send([2, "a1", "Authorize", {"idTag": "TAG"}])
        end.sink.succeed("a1")
        self.assertEqual(end.messages(), [], "only the backend answers an Authorize")
        self.assertTrue(end.protocol.reply("a1", {"idTagInfo": {"status": "Nonsense"}}))
        (answer,) = end.messages()
        self.assertEqual(answer[:3], [4, "a1", "InternalError"],
                         "a reply that is not a valid AuthorizeResponse is never sent as one")

    def test_validReply(self) -> None:
        end = self.live()
        end.send([2, "a2", "Authorize", {"idTag": "TAG"}])
        self.assertFalse(end.protocol.reply("a2", {"idTagInfo": {"status": "Accepted"}}),
                         "not before the request is stored")
        end.sink.succeed("a2")
        self.assertTrue(end.protocol.reply("a2", {"idTagInfo": {"status": "Accepted"}}))
        self.assertEqual(end.messages(), [[3, "a2", {"idTagInfo": {"status": "Accepted"}}]])
        self.assertFalse(end.protocol.reply("a2", {"idTagInfo": {"status": "Accepted"}}),
                         "answered once")

    def test_replyError(self) -> None:
        end = self.live()
        end.send([2, "d1", "DataTransfer", {"vendorId": "acme"}])
        end.sink.succeed("d1")
        self.assertTrue(end.protocol.replyError("d1", "NotSupported", "no such vendor"))
        self.assertEqual(end.messages(), [[4, "d1", "NotSupported", "no such vendor", {}]])

    def test_replyTimeout(self) -> None:
        end = self.live(reply_timeout="2s")
        end.send([2, "a3", "StartTransaction", {
            "connectorId": 1, "idTag": "T", "meterStart": 0, "timestamp": "2026-12-01T00:00:00Z"}])
        end.sink.succeed("a3")
        end.clock.advance(1.9)
        self.assertEqual(end.messages(), [])
        end.clock.advance(0.2)
        (answer,) = end.messages()
        self.assertEqual(answer[:3], [4, "a3", "InternalError"])
        self.assertFalse(end.protocol.reply("a3", {"idTagInfo": {"status": "Accepted"}, "transactionId": 1}))

    def test_notStored(self) -> None:
        end = self.live()
        end.send([2, "n1", "Heartbeat", {}])
        end.sink.fail("n1", Unavailable("full"))
        self.assertEqual(end.messages()[0][:3], [4, "n1", "InternalError"])

    def test_unstorableStrings(self) -> None:
        end = self.live()
        end.feed(end.ws.send(TextMessage(
            data='[2, "z1", "DataTransfer", {"vendorId": "a\\u0000b"}]')))
        self.assertEqual(end.messages()[0][:3], [4, "z1", "FormationViolation"])
        self.assertEqual(end.sink.messageIds, [])


class CommandTests(SynchronousTestCase):
    def live(self) -> ChargePointEnd:
        end = ChargePointEnd(self)
        end.upgrade()
        end.read()
        return end

    far = 4_102_444_800_000  # 2100

    def test_commandWrittenAsCall(self) -> None:
        end = self.live()
        commandId = "6b8b4567-327b-4c65-9b3f-2d1a4b5c6d7e"
        body = json.dumps({"action": "Reset", "payload": {"type": "Soft"}})
        self.assertTrue(end.protocol.deliver(commandId, body, self.far))
        self.assertEqual(end.messages(), [[2, commandId, "Reset", {"type": "Soft"}]])
        end.send([3, commandId, {"status": "Accepted"}])
        settler = end.context.settler
        self.assertEqual([(ref, ok) for _, ref, ok, _ in settler.answers], [(commandId, True)])
        self.assertEqual(settler.results, [{"status": "Accepted"}])

    def test_callErrorNacks(self) -> None:
        end = self.live()
        commandId = "6b8b4567-327b-4c65-9b3f-2d1a4b5c6d7f"
        body = json.dumps({"action": "UnlockConnector", "payload": {"connectorId": 1}})
        end.protocol.deliver(commandId, body, self.far)
        end.send([4, commandId, "NotSupported", "no lock", {}])
        (_, ref, ok, reason), = end.context.settler.answers
        self.assertEqual((ref, ok, reason), (commandId, False, "NotSupported: no lock"))

    def test_oneCallAtATime(self) -> None:
        self.assertEqual(OcppProtocol.maxInflight, 1)

    def test_badBodies(self) -> None:
        end = self.live()
        for body, why in (
            ({"type": "Soft"}, '{"action"'),
            ({"action": "Reset", "payload": {"type": "Hard"}, "x": 1}, '{"action"'),
            ({"action": "BootNotification", "payload": {}}, "not an OCPP 1.6 request"),
            ({"action": "Reset", "payload": {"type": "Sideways"}}, "not a valid Reset"),
        ):
            with self.assertRaises(ValueError) as caught:
                end.protocol.deliver("id", json.dumps(body), self.far)
            self.assertIn(why, str(caught.exception))
        self.assertEqual(end.messages(), [])

    def test_answerToUnknownIgnored(self) -> None:
        end = self.live()
        end.send([3, "nobody", {}])
        self.assertEqual(end.context.settler.answers, [])

    def test_takeoverCloses(self) -> None:
        end = self.live()
        end.protocol.close("takeover")
        closes = [e for e in end.read() if isinstance(e, CloseConnection)]
        self.assertEqual([(c.code, c.reason) for c in closes], [(1000, "takeover")])
        end.clock.advance(end.context.liveness.close_grace + 0.01)
        self.assertEqual(end.transport.aborts, 1, "aborted after close_grace")

    def test_pingsAndIdle(self) -> None:
        end = self.live()
        liveness = end.context.liveness
        end.clock.advance(liveness.ping_interval + 0.01)
        self.assertTrue(any(isinstance(e, Ping) for e in end.read()))
        end.clock.advance(liveness.idle_timeout)
        self.assertIs(end.protocol.state, State.CLOSED)
        self.assertEqual(end.protocol.closeReason, "idle_timeout")

    def test_pongKeepsAlive(self) -> None:
        end = self.live()
        liveness = end.context.liveness
        for _ in range(int(liveness.idle_timeout / liveness.ping_interval) * 2):
            end.clock.advance(liveness.ping_interval)
            for event in end.read():
                if isinstance(event, Ping):
                    end.feed(end.ws.send(event.response()))
            end.events.clear()
        self.assertIs(end.protocol.state, State.LIVE)


class ConfigTests(SynchronousTestCase):
    def test_framingImplied(self) -> None:
        (listener,) = ocppConfig().listeners
        self.assertEqual((listener.dialect, listener.framing), ("ocpp1.6", "websocket"))
        self.assertEqual(ocppConfig(framing="websocket").listeners[0].framing, "websocket")

    def test_otherFramingRefused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            ocppConfig(framing="lines")
        self.assertIn("framing", str(caught.exception))

    def test_backendActionsMustKeepDefaults(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            ocppConfig(backend_actions="Authorize")
        self.assertIn("backend_actions", str(caught.exception))
        extended = ocppConfig(backend_actions="Authorize,StartTransaction,StopTransaction,"
                              "DataTransfer,StatusNotification")
        self.assertIn("StatusNotification", extended.listeners[0].options["backend_actions"])

    def test_unknownDialect(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parseConfig(iniText({"listener:x": {"endpoint": "tcp:0", "dialect": "modbus"}}), "t")
        self.assertIn("known dialects", str(caught.exception))

    def test_dialectKeyOnV1(self) -> None:
        with self.assertRaises(ConfigError):
            parseConfig(iniText({"listener:x": {"endpoint": "tcp:0", "path": "/ocpp/"}}), "t")

    def test_timestampPolicyPerListener(self) -> None:
        config = parseConfig(iniText({"listener:x": {"endpoint": "tcp:0", "max_age": "2h"}}), "t")
        policy = config.listeners[0].timestampPolicy(config.timestamps)
        self.assertEqual((policy.max_age, policy.max_future), (7200.0, config.timestamps.max_future))
        # Every connection of the listener shares the one policy.
        self.assertIs(config.listeners[0].timestampPolicy(config.timestamps), policy)


class WebSocketFramingTests(SynchronousTestCase):
    def handshake(self, server: WebSocketServer) -> WSConnection:
        client = WSConnection(ConnectionType.CLIENT)
        (event,) = server.feed(client.send(Request(host="h", target="/ocpp/a%20b?x=1",
                                                   subprotocols=["ocpp1.6"])))
        self.assertEqual(event, Handshake("/ocpp/a b", ("ocpp1.6",), event.headers))
        client.receive_data(server.accept("ocpp1.6"))
        list(client.events())
        return client

    def test_fragmentedMessage(self) -> None:
        server = WebSocketServer(100)
        client = self.handshake(server)
        data = client.send(TextMessage(data="hello ", message_finished=False))
        data += client.send(TextMessage(data="world", message_finished=True))
        self.assertEqual(server.feed(data), [Message(b"hello world")])

    def test_oversize(self) -> None:
        server = WebSocketServer(10)
        client = self.handshake(server)
        with self.assertRaises(FramingError) as caught:
            server.feed(client.send(TextMessage(data="x" * 11)))
        self.assertEqual(caught.exception.code, "frame_too_large")
        client.receive_data(server.takeOutgoing())
        (close,) = client.events()
        assert isinstance(close, CloseConnection)
        self.assertEqual(close.code, 1009)
        self.assertRaises(FramingError, server.feed, b"")

    def test_pingAnswered(self) -> None:
        server = WebSocketServer(100)
        client = self.handshake(server)
        self.assertEqual(server.feed(client.send(Ping(payload=b"p"))), [])
        client.receive_data(server.takeOutgoing())
        (pong,) = client.events()
        self.assertEqual(pong.payload, b"p")

    def test_notHttp(self) -> None:
        server = WebSocketServer(100)
        with self.assertRaises(FramingError):
            server.feed(b"\x16\x03\x01garbage\r\n\r\n")

    def test_binaryRefused(self) -> None:
        from wsproto.events import BytesMessage
        server = WebSocketServer(100)
        client = self.handshake(server)
        with self.assertRaises(FramingError):
            server.feed(client.send(BytesMessage(data=b"\x00")))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=2000))
    def test_randomBytesNeverCrash(self, data: bytes) -> None:
        server = WebSocketServer(1000)
        client = self.handshake(server)
        try:
            events = server.feed(data)
        except FramingError:
            return
        self.assertTrue(all(isinstance(e, Closed) or (isinstance(e, Message) and len(e.data) <= 1000) for e in events))
        self.assertLessEqual(len(server.outgoing), 200)
        del client

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.text(max_size=50), min_size=1, max_size=10), st.data())
    def test_anySplit(self, texts: list[str], data: st.DataObject) -> None:
        server = WebSocketServer(10_000)
        client = self.handshake(server)
        stream = b"".join(client.send(TextMessage(data=t)) for t in texts)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
        got: list[Any] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got.extend(server.feed(stream[start:end]))
        self.assertEqual(got, [Message(t.encode("utf-8")) for t in texts])


class OcppDecoderProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=20,
    ))
    def test_anyJsonGetsAnAnswer(self, message: object) -> None:
        """
        Whatever JSON arrives: no crash, the connection stays live, and anything that is
        not stored is answered (a CALLERROR) or ignored (an answer to nothing).
        """
        end = ChargePointEnd(self)
        end.upgrade()
        end.read()
        end.send(message)
        self.assertIs(end.protocol.state, State.LIVE)
        for answer in end.messages():
            self.assertEqual(answer[0], 4)

    def test_validateCodes(self) -> None:
        validate(CALL, "Heartbeat", {})
        with self.assertRaises(CallRefused) as caught:
            validate(CALL, "Authorize", {"idTag": "x" * 21})
        self.assertEqual(caught.exception.code, "TypeConstraintViolation")


class ChargePointProcess(ProcessProtocol):
    """
    L{tests.ocpp_chargepoint} as a child process; C{events} are the JSON lines it printed.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        self.stderr = b""

    @classmethod
    def spawn(cls, testCase: Any, url: str, *args: str) -> ChargePointProcess:
        process = cls()
        script = os.path.join(os.path.dirname(__file__), "ocpp_chargepoint.py")
        reactor.spawnProcess(process, sys.executable, [sys.executable, script, url, *args],
                             env=dict(os.environ))

        async def stop() -> None:
            if not process.ended.called:
                process.transport.signalProcess("KILL")
                await process.ended

        testCase.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return process

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line.strip())

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    def leave(self) -> None:
        self.transport.closeStdin()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def waitFor(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        await waitUntil(lambda: self.of(kind) or self.ended.called, timeout,
                        what=lambda: f"{kind!r} from the charge point; got {self.events}, "
                                     f"stderr {self.stderr[-2000:]!r}")
        found = self.of(kind)
        if not found:
            raise AssertionError(f"charge point ended without {kind!r}: {self.events}, "
                                 f"stderr {self.stderr[-2000:]!r}")
        return found[0]


class OcppGatewayTests(PostgresTestCase):
    timeout = 120

    async def gateway(self, instance: str, **sections: dict[str, object]) -> Any:
        merged: dict[str, dict[str, object]] = {
            "listener:main": {"dialect": "ocpp1.6"},
            "outbox": {"poll_interval": "200ms"},
        }
        for name, items in sections.items():
            merged.setdefault(name, {}).update(items)
        return await startGateway(self, self.dsn, self.schema, instance, merged)

    def url(self, gateway: Any, chargePoint: str, credentials: str = "") -> str:
        return f"ws://{credentials}127.0.0.1:{listenerPort(gateway)}/ocpp/{chargePoint}"

    async def query(self, sql: str, *args: object) -> list[Any]:
        return list(await self.db.runQuery("test", sql, args))

    async def inboxRequest(self, controller: str, action: str) -> str:
        async def find() -> list[Any]:
            return await self.query(
                "SELECT message_id FROM inbox WHERE controller_id = %s AND body->>'action' = %s",
                controller, action)

        rows: list[Any] = []

        async def poll() -> None:
            nonlocal rows
            rows = await find()

        started = reactor.seconds()
        while not rows:
            await poll()
            if reactor.seconds() - started > 30:
                raise AssertionError(f"no {action} of {controller} in the inbox")
            await _sleep(0.05)
        return str(rows[0][0])

    async def commandState(self, command: str, state: str) -> dict[str, Any]:
        started = reactor.seconds()
        while True:
            (status,), = await self.query("SELECT command_status(%s::uuid)", command)
            if status["state"] == state:
                return dict(status)
            if status["state"] in ("acked", "nacked", "expired", "failed"):
                raise AssertionError(f"{command} ended {status['state']}: {status}")
            if reactor.seconds() - started > 30:
                raise AssertionError(f"{command} still {status['state']}")
            await _sleep(0.05)

    @deferred
    async def test_chargingBackendLoop(self) -> None:
        """
        Boot, heartbeat, status and meter values land in the inbox, answered by the
        gateway; an Authorize is answered by an application through reply(); a Reset
        command is acked with its result; a command the charger refuses is nacked.
        """
        gateway = await self.gateway("a")
        cp = ChargePointProcess.spawn(self, self.url(gateway, "CP-1"), "--id-tag", "TAG-9")
        connected = await cp.waitFor("connected")
        self.assertEqual(connected["subprotocol"], "ocpp1.6")
        boot = await cp.waitFor("boot")
        self.assertEqual((boot["status"], boot["interval"]), ("Accepted", 300))
        await cp.waitFor("meter_values")
        messageId = await self.inboxRequest("CP-1", "Authorize")
        (queued,), = await self.query(
            "SELECT reply(%s, %s, %s::jsonb)", "CP-1", messageId,
            json.dumps({"idTagInfo": {"status": "Accepted"}}))
        self.assertTrue(queued)
        authorize = await cp.waitFor("authorize")
        self.assertEqual(authorize["id_tag_info"], {"status": "Accepted"})
        rows = await self.query(
            "SELECT body->>'action', body->'payload', epoch FROM inbox WHERE controller_id = %s"
            " ORDER BY id", "CP-1")
        self.assertEqual([r[0] for r in rows], [
            "BootNotification", "Heartbeat", "StatusNotification", "MeterValues", "Authorize"])
        self.assertEqual(rows[4][1], {"idTag": "TAG-9"})
        await cp.waitFor("ready")

        (reset,), = await self.query(
            "SELECT send(%s, %s::jsonb)::text", "CP-1",
            json.dumps({"action": "Reset", "payload": {"type": "Soft"}}))
        status = await self.commandState(reset, "acked")
        self.assertEqual(status["result"], {"status": "Accepted"})
        (unlock,), = await self.query(
            "SELECT send(%s, %s::jsonb)::text", "CP-1",
            json.dumps({"action": "UnlockConnector", "payload": {"connectorId": 1}}))
        status = await self.commandState(unlock, "nacked")
        self.assertIn("NotSupported", status["detail"])
        (bad,), = await self.query(
            "SELECT send(%s, %s::jsonb)::text", "CP-1", json.dumps({"reboot": True}))
        status = await self.commandState(bad, "failed")
        self.assertIn('{"action"', status["detail"])
        requests = [e["action"] for e in cp.of("request")]
        self.assertEqual(requests, ["Reset", "UnlockConnector"])

    @deferred
    async def test_replyForSupersededSession(self) -> None:
        """
        A reply to a request of a session that has since been taken over is not written
        to the new session.
        """
        gateway = await self.gateway("a", **{"listener:main": {"reply_timeout": "60s"}})
        first = ChargePointProcess.spawn(self, self.url(gateway, "CP-2"))
        messageId = await self.inboxRequest("CP-2", "Authorize")
        second = ChargePointProcess.spawn(self, self.url(gateway, "CP-2"), "--quiet")
        await second.waitFor("ready")
        closed = await first.waitFor("closed")
        self.assertEqual(closed["reason"], "takeover")
        await self.query("SELECT reply(%s, %s, %s::jsonb)", "CP-2", messageId,
                         json.dumps({"idTagInfo": {"status": "Accepted"}}))
        await waitUntil(lambda: (metricValue(gateway, "ctrlgw_replies_total", outcome="late")
                                 or 0) >= 1, 10, what="the late reply dropped")
        self.assertEqual(second.of("request"), [])

    @deferred
    async def test_takeoverAcrossInstances(self) -> None:
        a = await self.gateway("a")
        b = await self.gateway("b")
        first = ChargePointProcess.spawn(self, self.url(a, "CP-3"), "--quiet")
        await first.waitFor("ready")
        second = ChargePointProcess.spawn(self, self.url(b, "CP-3"), "--quiet")
        await second.waitFor("ready")
        closed = await first.waitFor("closed")
        self.assertEqual((closed["code"], closed["reason"]), (1000, "takeover"))
        (owner,), = await self.query(
            "SELECT instance_id FROM sessions WHERE controller_id = %s AND online", "CP-3")
        self.assertEqual(owner, "b")
        self.assertEqual(second.of("closed"), [])

    @deferred
    async def test_basicAuth(self) -> None:
        """
        With [auth] mode = token, the charge point's password is its controller token;
        a wrong one is refused with HTTP 401 before the upgrade and counted.
        """
        gateway = await self.gateway("a", auth={"mode": "token"})
        token = newToken()
        await gateway.store.addController("CP-4", hashToken(token), "")
        wrong = ChargePointProcess.spawn(self, self.url(gateway, "CP-4", "CP-4:nope@"), "--quiet")
        refused = await wrong.waitFor("refused")
        self.assertEqual(refused["status"], 401)
        other = ChargePointProcess.spawn(self, self.url(gateway, "CP-4", f"CP-5:{token}@"),
                                         "--quiet")
        self.assertEqual((await other.waitFor("refused"))["status"], 401,
                         "another charge point's name with this one's token")
        right = ChargePointProcess.spawn(self, self.url(gateway, "CP-4", f"CP-4:{token}@"),
                                         "--quiet")
        await right.waitFor("ready")
        failures = sum(
            s.value for m in gateway.metrics.registry.collect() for s in m.samples
            if s.name == "ctrlgw_auth_failures_total")
        self.assertGreaterEqual(failures, 2)


def metricValue(gateway: Any, name: str, **labels: str) -> float | None:
    for family in gateway.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def _sleep(seconds: float) -> None:
    from tests.gateways import sleep

    await sleep(seconds)


class TalkOcppTests(PostgresTestCase):
    timeout = 60

    @deferred
    async def test_talkAsChargePoint(self) -> None:
        """
        ctrlgw talk --dialect ocpp1.6 upgrades with the ocpp1.6 subprotocol, sends typed
        actions as CALLs once upgraded, prints the answers and accepts the gateway's CALLs.
        """
        import io

        from ctrlgw.talk import talk

        gateway = await startGateway(self, self.dsn, self.schema, "gw-talk",
                                     {"listener:main": {"dialect": "ocpp1.6"}})
        out = io.StringIO()
        keyboards: list[Any] = []
        done = Deferred.fromCoroutine(
            talk(reactor, "127.0.0.1", listenerPort(gateway), "CP-T", None, True, out,
                 keyboard=keyboards.append, dialect="ocpp1.6")
        )
        await waitUntil(lambda: keyboards, 10)
        keyboards[0].onLine('BootNotification {"chargePointVendor": "V", "chargePointModel": "M"}')
        await waitUntil(lambda: '"status":"Accepted"' in out.getvalue(), 10)
        command = await gateway.store.sendCommand(
            "CP-T", {"action": "Reset", "payload": {"type": "Hard"}}, 30)
        await waitUntil(lambda: f'[2,"{command}","Reset"' in out.getvalue(), 10,
                        what=lambda: out.getvalue())
        for _ in range(100):
            status = await gateway.store.commandStatus(command)
            if status and status["state"] == "acked":
                break
            await _sleep(0.05)
        keyboards[0].onEnd()
        await done
        self.assertEqual(status["result"] if status else None, {"status": "Accepted"})
        self.assertIn("< upgraded, subprotocol ocpp1.6", out.getvalue())
        self.assertTrue(out.getvalue().endswith("connection closed\n"))


class RefusedUpgradeTests(SynchronousTestCase):
    def test_overMaxConnections(self) -> None:
        """
        Past max_connections an OCPP listener answers 503 with Retry-After, as HTTP (a
        charge point understands no v1 frame), and closes.
        """
        from ctrlgw.protocol.factory import ControllerFactory

        config = ocppConfig(max_connections="1")
        context = makeContext(config, clock=makeClock())
        factory = ControllerFactory.fromConfig(context, config.listeners[0])
        first = factory.buildProtocol(None)
        first.makeConnection(RecordingTransport())
        refused = factory.buildProtocol(None)
        transport = RecordingTransport()
        refused.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"retry-after: 10", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertIsInstance(first, OcppProtocol)


class ReplySqlTests(PostgresTestCase):
    async def request(self) -> None:
        await self.db.runOperation(
            "t", "INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)"
            " VALUES ('CP-9', 4, gen_random_uuid(), 'gw', true)", ())
        await self.db.runOperation(
            "t", "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch,"
            " body) VALUES ('CP-9', 'r1', now(), 'gw', 4, '{}')", ())

    async def refused(self, sql: str, *args: object) -> str:
        try:
            await self.db.runQuery("t", sql, args)
        except Exception as e:
            return str(e)
        raise AssertionError(f"accepted: {sql}")

    @deferred
    async def test_replyQueuedOnceWithTheRequestsEpoch(self) -> None:
        await self.request()
        first = await self.db.runQuery("t", "SELECT reply('CP-9', 'r1', '{\"a\": 1}')", ())
        again = await self.db.runQuery("t", "SELECT reply('CP-9', 'r1', '{\"a\": 2}')", ())
        self.assertEqual((first[0][0], again[0][0]), (True, False))
        rows = await self.db.runQuery("t", "SELECT epoch, payload FROM replies", ())
        self.assertEqual(rows, [(4, {"a": 1})])

    @deferred
    async def test_refusals(self) -> None:
        await self.request()
        self.assertIn("must be a JSON object",
                      await self.refused("SELECT reply('CP-9', 'r1', '[1]')"))
        self.assertIn("sent no message",
                      await self.refused("SELECT reply('CP-9', 'nope', '{}')"))
        self.assertIn("unknown error code",
                      await self.refused("SELECT reply_error('CP-9', 'r1', 'Oops', 'x')"))
        ok = await self.db.runQuery(
            "t", "SELECT reply_error('CP-9', 'r1', 'NotSupported', repeat('x', 300))", ())
        self.assertTrue(ok[0][0])
        rows = await self.db.runQuery(
            "t", "SELECT error_code, length(error_description) FROM replies", ())
        self.assertEqual(rows, [("NotSupported", 255)])

    @deferred
    async def test_claimFencedByEpoch(self) -> None:
        """
        Taking the replies of a session returns only those of that very epoch, owned by
        this instance, as current; older ones are taken (dropped) but not current.
        """
        from ctrlgw.store.postgres import Store

        await self.request()
        await self.db.runOperation(
            "t", "INSERT INTO replies (controller_id, message_id, epoch, payload) VALUES"
            " ('CP-9', 'old', 3, '{}'), ('CP-9', 'r1', 4, '{\"x\": 1}'),"
            " ('CP-9', 'newer', 5, '{}')", ())
        store = Store(self.db, "gw")
        replies = {r.messageId: r.current for r in await store.claimReplies([("CP-9", 4)])}
        self.assertEqual(replies, {"old": False, "r1": True})
        left = await self.db.runQuery("t", "SELECT message_id FROM replies", ())
        self.assertEqual(left, [("newer",)])
        other = Store(self.db, "gw-other")
        await self.db.runOperation(
            "t", "INSERT INTO replies (controller_id, message_id, epoch, payload) VALUES"
            " ('CP-9', 'r2', 4, '{}')", ())
        self.assertEqual([r.current for r in await other.claimReplies([("CP-9", 4)])], [False],
                         "not this instance's session")


class ChargePointSimTests(PostgresTestCase):
    timeout = 90

    @deferred
    async def test_fleet(self) -> None:
        """
        ctrlgw sim --dialect ocpp1.6: every charge point upgraded, every MeterValues acked
        once stored and in the inbox once, a command answered with its result.
        """
        from ctrlgw.sim import SimOptions, Stats, runSim

        gateway = await startGateway(self, self.dsn, self.schema, "gw-sim",
                                     {"listener:main": {"dialect": "ocpp1.6"}})
        options = SimOptions(endpoints=[("127.0.0.1", listenerPort(gateway))],
                             controllers=20, rate=100.0, duration=2.0, dialect="ocpp1.6")
        commandSent: list[str] = []

        def tick(stats: Stats, elapsed: float) -> None:
            if stats.welcomes == 20 and not commandSent:
                commandSent.append("pending")
                d = self.db.runQuery(
                    "test", "SELECT send(%s, %s::jsonb)::text",
                    ("sim-03", json.dumps({"action": "Reset", "payload": {"type": "Soft"}})))
                d.addCallback(lambda rows: commandSent.__setitem__(0, rows[0][0]))

        stats = await runSim(reactor, options, tick)
        self.assertEqual(stats.welcomes, 20)
        self.assertGreater(stats.msgs, 100)
        self.assertEqual(stats.acks, stats.msgs)
        self.assertEqual(stats.errors, 0, (stats.errorCodes, stats.counters()))
        rows = await self.db.runQuery(
            "test", "SELECT count(*), count(DISTINCT message_id) FROM inbox"
            " WHERE body->>'action' = 'MeterValues'")
        self.assertEqual(rows, [(stats.acks, stats.acks)])
        self.assertEqual(stats.cmds, 1)
        state = await self.db.runQuery(
            "test", "SELECT state, result FROM commands WHERE id = %s", (commandSent[0],))
        self.assertEqual(state, [("acked", {"status": "Accepted"})])
