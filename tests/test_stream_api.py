"""
The stream over HTTP (GET /v1/stream as Server-Sent Events, resumable with Last-Event-ID),
POST /v1/commands, and ctrlgw tail --group, against a real gateway and PostgreSQL; and the
stream's doorbell on a fake clock.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ctrlgw import cli
from ctrlgw.stream import StreamDoorbell
from tests.gateways import (
    connectController,
    httpPort,
    listenerPort,
    nowMs,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase

TOKEN = "s3cret"


class SseClient(Protocol):
    """
    A raw HTTP/1.1 client for one GET: collects the SSE events.
    """

    def __init__(self, path: bytes, headers: dict[bytes, bytes]) -> None:
        self.request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(
            k + b": " + v + b"\r\n" for k, v in headers.items()
        ) + b"\r\n"
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if b" " in self.data else 0

    def events(self) -> list[dict[str, Any]]:
        body = self.data.partition(b"\r\n\r\n")[2].decode()
        found = []
        for block in body.split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in block.splitlines()
                if ": " in line and not line.startswith(":")
            )
            if "data" in fields:
                found.append({"id": fields["id"], "event": fields["event"],
                              **json.loads(fields["data"])})
        return found

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class StreamApiTests(PostgresTestCase):
    timeout = 60

    async def gateway(self) -> Any:
        return await startGateway(
            self, self.dsn, self.schema, "gw-a",
            {"http": {"api_token": TOKEN}, "stream": {"lease": "1s", "heartbeat": "200ms"}},
        )

    async def sse(self, gateway: Any, query: bytes, **headers: bytes) -> SseClient:
        client = SseClient(
            b"/v1/stream?" + query,
            {b"Authorization": b"Bearer " + TOKEN.encode(), **{k.encode(): v for k, v in headers.items()}},
        )
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", httpPort(gateway)), client)
        self.addCleanup(lambda: None if client.closed.called else client.close())
        return client

    @deferred
    async def test_sseDeliversAndResumes(self) -> None:
        """
        Messages a controller sends arrive as events with their entry id; after a
        disconnect, Last-Event-ID gets the entries after it again, then the new ones.
        """
        gateway = await self.gateway()
        device = await connectController(listenerPort(gateway), autoAck=True)
        self.addCleanup(device.close)
        await device.hello("dev-1")
        for n in range(3):
            device.send({"type": "msg", "id": f"m{n}", "ts": nowMs(), "body": {"n": n}})
        await waitUntil(lambda: len(device.of("ack")) == 3, 10, what="acks")
        first = await self.sse(gateway, b"group=app")
        await waitUntil(lambda: len(first.events()) >= 4, 10, what="4 events")
        events = first.events()
        self.assertEqual(first.status, 200)
        self.assertIn(b"content-type: text/event-stream", first.data.lower())
        self.assertEqual(
            [(e["event"], e["body"].get("state") or e["body"].get("message_id")) for e in events],
            [("presence", "online"), ("message", "m0"), ("message", "m1"), ("message", "m2")],
        )
        self.assertEqual([e["id"] for e in events], [e["entry_id"] for e in events])
        self.assertEqual(events[1]["controller_id"], "dev-1")
        self.assertEqual(events[1]["body"]["body"], {"n": 0})
        first.close()
        await first.closed
        device.send({"type": "msg", "id": "m3", "ts": nowMs(), "body": {"n": 3}})
        await waitUntil(lambda: len(device.of("ack")) == 4, 10, what="ack of m3")
        again = await self.sse(gateway, b"group=app", **{"Last-Event-ID": events[1]["id"].encode()})
        await waitUntil(lambda: len(again.events()) >= 3, 10, what="replay and m3")
        self.assertEqual(
            [e["body"].get("message_id") for e in again.events()], ["m1", "m2", "m3"]
        )

    @deferred
    async def test_sseNeedsTheTokenAndAGroup(self) -> None:
        gateway = await self.gateway()
        agent = Agent(reactor)
        url = b"http://127.0.0.1:%d/v1/stream?group=app" % httpPort(gateway)
        response = await agent.request(b"GET", url)
        await readBody(response)
        self.assertEqual(response.code, 401)
        auth = Headers({b"authorization": [b"Bearer " + TOKEN.encode()]})
        for bad, headers in [
            (b"group=no%20spaces", auth),
            (b"", auth),
        ]:
            response = await agent.request(
                b"GET", b"http://127.0.0.1:%d/v1/stream?" % httpPort(gateway) + bad, headers
            )
            self.assertEqual(response.code, 400, bad)
            self.assertIn("group", json.loads(await readBody(response))["error"])
        lastId = Headers({b"authorization": [b"Bearer " + TOKEN.encode()],
                          b"last-event-id": [b"nope"]})
        response = await agent.request(b"GET", url, lastId)
        self.assertEqual(response.code, 400)
        await readBody(response)

    @deferred
    async def test_batchSend(self) -> None:
        """
        POST /v1/commands: many controllers, one request, the ids in the order sent.
        """
        gateway = await self.gateway()
        agent = Agent(reactor)
        url = b"http://127.0.0.1:%d/v1/commands" % httpPort(gateway)
        auth = Headers({b"authorization": [b"Bearer " + TOKEN.encode()],
                        b"content-type": [b"application/json"]})
        from twisted.web.client import FileBodyProducer

        commands = [{"controller": f"c{n % 3}", "body": {"n": n}} for n in range(7)]
        response = await agent.request(
            b"POST", url, auth,
            FileBodyProducer(io.BytesIO(json.dumps({"commands": commands, "ttl": "1m"}).encode())),
        )
        answer = json.loads(await readBody(response))
        self.assertEqual(response.code, 201, answer)
        self.assertEqual(len(answer["ids"]), 7)
        rows = await self.db.runQuery(
            "c", "SELECT id::text, controller_id, body FROM commands"
        )
        byId = {i: (c, b) for i, c, b in rows}
        self.assertEqual(
            [byId[i] for i in answer["ids"]], [(c["controller"], c["body"]) for c in commands]
        )
        for bad in (
            {"commands": []},
            {"commands": [{"controller": "bad id", "body": 1}]},
            {"commands": [{"controller": "c1"}]},
            {"commands": [{"controller": "c1", "body": 1}], "ttl": "0s"},
        ):
            response = await agent.request(
                b"POST", url, auth, FileBodyProducer(io.BytesIO(json.dumps(bad).encode()))
            )
            await readBody(response)
            self.assertEqual(response.code, 400, bad)

    async def waitForNoPending(self) -> None:
        for _ in range(100):
            pending = await self.db.runQuery("p", "SELECT count(*) FROM stream_pending")
            if pending[0][0] == 0:
                return
            await sleep(0.05)
        self.fail(f"still pending: {pending}")

    @deferred
    async def test_tailGroup(self) -> None:
        """
        ctrlgw tail --group prints each entry as a JSON line, live, and acks it.
        """
        configPath = self.mktemp()
        with open(configPath, "w") as f:
            f.write("[listener:main]\nendpoint = tcp:0\n")
        await self.db.runOperation(
            "m", "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch)"
            " VALUES ('X', 'm1', now(), 'gw', 1)"
        )
        out, err = io.StringIO(), io.StringIO()
        run = Deferred.fromCoroutine(cli.run(
            reactor, ["--config", configPath, "--dsn", self.dsn, "--schema", self.schema,
                      "tail", "--group", "ops"], out=out, err=err,
        ))
        await waitUntil(lambda: out.getvalue().count("\n") >= 1 or run.called, 10,
                        what="first line")
        self.assertFalse(run.called, err.getvalue())
        await self.db.runOperation(
            "m", "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch)"
            " VALUES ('X', 'm2', now(), 'gw', 1)"
        )
        await waitUntil(lambda: out.getvalue().count("\n") >= 2, 10, what="second line")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        await self.waitForNoPending()
        self.assertEqual([line["body"]["message_id"] for line in lines], ["m1", "m2"])
        self.assertEqual(lines[0]["kind"], "message")
        self.assertTrue(lines[0]["at"].endswith("Z"))
        run.addErrback(lambda _: None)  # interrupted, as by ^C: ends the loop
        run.cancel()
        await run


class DoorbellTests(SynchronousTestCase):
    def test_ringWakesEveryWaiter(self) -> None:
        clock = Clock()
        bell = StreamDoorbell(clock)
        woken: list[bool] = []
        bell.wait(5).addCallback(woken.append)
        bell.wait(5).addCallback(woken.append)
        self.assertEqual(len(bell), 2)
        bell.ring()
        self.assertEqual(woken, [True, True])
        self.assertEqual((len(bell), clock.getDelayedCalls()), (0, []))

    def test_timeout(self) -> None:
        clock = Clock()
        bell = StreamDoorbell(clock)
        woken: list[bool] = []
        bell.wait(5).addCallback(woken.append)
        clock.advance(4.9)
        self.assertEqual(woken, [])
        clock.advance(0.1)
        self.assertEqual(woken, [False])
        self.assertEqual(len(bell), 0)

    def test_cancelLeavesNoTimer(self) -> None:
        clock = Clock()
        bell = StreamDoorbell(clock)
        d = bell.wait(5)
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertEqual((len(bell), clock.getDelayedCalls()), (0, []))
