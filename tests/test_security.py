"""
The security part of the failure suite, against real gateways, a real PostgreSQL, real
sockets and the C{ctrlgw} command as a real process:

  - revoking a controller (disable, re-key, delete) ends its session on whichever instance
    holds it, within a second, with C{bye} C{revoked}, and nothing it sends after the
    revocation committed is stored or acked;
  - failed hellos are rate-limited per peer host and per controller id;
  - the HTTP API answers 401 without its bearer token on every C{/v1} route and never shows
    a token or its hash;
  - a TLS listener never welcomes a plaintext client;
  - no token, API token or database password reaches the logs.

Measured figures are printed (C{FIGURE ...} lines).
"""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ctrlgw import cli
from ctrlgw.auth import hashToken, newToken
from ctrlgw.config import AuthConfig
from ctrlgw.interfaces import AuthFailed, Unavailable
from ctrlgw.ownership import EventLog, PostgresOwnership
from ctrlgw.revocation import BYE_REVOKED, revokedChannel
from ctrlgw.service import Gateway
from ctrlgw.store.postgres import Claim, ClaimPolicy, Store
from tests.gateways import (
    LineController,
    httpPort,
    listenerPort,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import iniText
from tests.pg import PostgresTestCase

TOKEN_MODE: dict[str, dict[str, object]] = {"auth": {"mode": "token"}}

# For the CLI as a real process: every test passes --dsn and --schema.
_CLI_INI = iniText(
    {
        "listener:main": {"endpoint": "tcp:0"},
        "database": {"dsn": "host=/nonexistent-ctrlgw-test port=1", "connect_timeout": "2s"},
    }
)


def figure(text: str) -> None:
    """
    Print a measured figure where trial's output shows it.
    """
    sys.__stdout__.write(f"\nFIGURE {text}\n")
    sys.__stdout__.flush()


def consoleScript() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ctrlgw")


class TimedController(LineController):
    """
    A L{LineController} that notes when its connection closed (reactor clock).
    """

    closedAt: float | None = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closedAt = reactor.seconds()
        super().connectionLost(reason)


class SecurityTestCase(PostgresTestCase):
    timeout = 120

    async def _setUp(self) -> None:
        await super()._setUp()
        self.configPath = self.mktemp()
        with open(self.configPath, "w", encoding="utf-8") as f:
            f.write(_CLI_INI)

    async def register(self, gateway: Gateway, controller: str) -> str:
        token = newToken()
        await gateway.store.addController(controller, hashToken(token), "")
        return token

    async def connect(
        self, gateway: Gateway, controller: str, token: str, bindHost: str | None = None
    ) -> TimedController:
        client = TimedController()
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", listenerPort(gateway),
            bindAddress=(bindHost, 0) if bindHost else None,
        )
        await connectProtocol(endpoint, client)
        self.addCleanup(client.leave)
        if controller:
            await client.hello(controller, token=token)
        return client

    async def script(self, *argv: str) -> tuple[int, str, str]:
        """
        Run the installed C{ctrlgw} console script against this test's schema.
        """
        result: Any = await getProcessOutputAndValue(
            consoleScript(),
            ["--config", self.configPath, "--dsn", self.dsn, "--schema", self.schema, *argv],
            env=dict(os.environ), reactor=reactor,
        )
        out, err, code = result
        return code, out.decode(), err.decode()

    async def revokedAt(self, controller: str) -> float:
        """
        When the trigger recorded the revocation (database clock, just before the commit).
        """
        rows = await self.db.runQuery(
            "t", "SELECT extract(epoch FROM max(at))::float8 FROM events"
            " WHERE controller_id = %s AND kind = 'revoked'", (controller,),
        )
        return float(rows[0][0])

    async def sessionRow(self, controller: str) -> tuple[Any, ...]:
        rows = await self.db.runQuery(
            "t", "SELECT epoch, online, disconnect_reason FROM sessions WHERE controller_id = %s",
            (controller,),
        )
        return tuple(rows[0])

    async def history(
        self, controller: str, until: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """
        The controller's events, oldest first; with C{until}, once that event is there
        (the gateways' history writers flush every 50 ms).
        """
        deadline = reactor.seconds() + 10
        while True:
            rows = await self.db.runQuery(
                "t", "SELECT kind, reason FROM events WHERE controller_id = %s ORDER BY id",
                (controller,),
            )
            events = [(kind, reason) for kind, reason in rows]
            if until is None or until in events or reactor.seconds() > deadline:
                return events
            await sleep(0.05)

    async def assertRevoked(
        self, client: TimedController, gateway: Gateway, controller: str, why: str,
        started: float, label: str,
    ) -> float:
        """
        C{client}'s session ended with C{bye} C{revoked} within a second of the revocation,
        its row and history say so, and its messages are not acked any more.
        """
        await waitUntil(lambda: client.isClosed, 5, 0.002, what=f"{controller} closed")
        assert client.closedAt is not None
        revoked = await self.revokedAt(controller)
        elapsed = client.closedAt - revoked
        figure(f"{label}: revocation commit -> socket closed {elapsed * 1000:.1f} ms "
               f"(command start -> closed {(client.closedAt - started) * 1000:.1f} ms)")
        self.assertLess(elapsed, 1.0)
        self.assertEqual([f["reason"] for f in client.of("bye")], [BYE_REVOKED])
        self.assertFalse(client.ackedIds())
        _, online, reason = await self.sessionRow(controller)
        self.assertEqual((online, reason), (False, "revoked"))
        history = await self.history(controller, until=("disconnect", "revoked"))
        self.assertIn(("revoked", why), history)
        self.assertEqual(history[-1], ("disconnect", "revoked"))
        self.assertEqual(sample(gateway, "ctrlgw_revocations_total", {"scope": "notified"}), 1)
        return elapsed


class RevocationTests(SecurityTestCase):
    async def twoGateways(self, **extra: dict[str, object]) -> tuple[Gateway, Gateway]:
        sections = {**TOKEN_MODE, **extra}
        a = await startGateway(self, self.dsn, self.schema, "gw-a", sections)
        b = await startGateway(self, self.dsn, self.schema, "gw-b", sections)
        return a, b

    async def test_disableEndsSessionsEverywhere(self) -> None:
        """
        C{ctrlgw controllers disable} (a real process) ends the controller's session on
        the instance that holds it, and only that controller's: on the other instance as on
        the first, within a second, with C{bye} C{revoked}.  Its next hello is refused.
        """
        a, b = await self.twoGateways()
        tokens = {c: await self.register(a, c) for c in ("dev-a", "dev-b", "bystander")}
        onA = await self.connect(a, "dev-a", tokens["dev-a"])
        onB = await self.connect(b, "dev-b", tokens["dev-b"])
        bystander = await self.connect(b, "bystander", tokens["bystander"])

        for controller, client, gateway, label in (
            ("dev-a", onA, a, "disable, session on gw-a"),
            ("dev-b", onB, b, "disable, session on gw-b"),
        ):
            started = reactor.seconds()
            code, out, err = await self.script("controllers", "disable", controller)
            self.assertEqual((code, err), (0, ""), err)
            await self.assertRevoked(client, gateway, controller, "disabled", started, label)
            again = await self.connect(gateway, "", "")
            answer = await again.helloAnswer(controller, token=tokens[controller])
            self.assertEqual((answer["type"], answer["code"]), ("error", "auth_failed"))

        bystander.send({"type": "msg", "id": "still-here", "body": None})
        await waitUntil(lambda: "still-here" in bystander.ackedIds(), 10, what="bystander ack")
        self.assertFalse(bystander.isClosed)
        self.assertEqual(sample(a, "ctrlgw_revocation_notifications_total"), 2)
        self.assertEqual(sample(b, "ctrlgw_revocation_notifications_total"), 2)

        # The history as ctrlgw prints it.
        code, out, err = await self.script("history", "dev-b", "--json")
        self.assertEqual(code, 0, err)
        kinds = [(e["kind"], e["reason"]) for e in json.loads(out)]
        self.assertIn(("revoked", "disabled"), kinds)
        self.assertIn(("disconnect", "revoked"), kinds)

    async def test_rekeyEndsSession(self) -> None:
        """
        Re-keying (C{ctrlgw controllers add} again, a real process) ends the session held
        with the old token, on the other instance too; the new token is admitted.
        """
        a, b = await self.twoGateways()
        token = await self.register(a, "rekeyed")
        client = await self.connect(b, "rekeyed", token)
        started = reactor.seconds()
        code, out, err = await self.script("controllers", "add", "rekeyed")
        self.assertEqual((code, err), (0, ""), err)
        await self.assertRevoked(client, b, "rekeyed", "rekeyed", started, "re-key, session on gw-b")
        [newer] = [line[7:] for line in out.splitlines() if line.startswith("token: ")]
        old = await self.connect(a, "", "")
        answer = await old.helloAnswer("rekeyed", token=token)
        self.assertEqual((answer["type"], answer["code"]), ("error", "auth_failed"))
        fresh = await self.connect(a, "rekeyed", newer)
        fresh.send({"type": "msg", "id": "after-rekey", "body": None})
        await waitUntil(lambda: "after-rekey" in fresh.ackedIds(), 10, what="ack after re-key")

    async def test_deleteEndsSession(self) -> None:
        """
        Deleting the controller's row ends its session too.
        """
        a, b = await self.twoGateways()
        token = await self.register(a, "deleted")
        client = await self.connect(a, "deleted", token)
        started = reactor.seconds()
        await self.db.runOperation("t", "DELETE FROM controllers WHERE controller_id = 'deleted'")
        await self.assertRevoked(client, a, "deleted", "deleted", started, "delete, session on gw-a")

    async def test_onlyRevocationsNotify(self) -> None:
        """
        One notification per statement, however many controllers it revokes; changing a
        note or enabling notifies nothing and ends no session.
        """
        a = await startGateway(self, self.dsn, self.schema, "gw-a", TOKEN_MODE)
        tokens = {c: await self.register(a, c) for c in ("n1", "n2", "n3", "keep")}
        clients = {c: await self.connect(a, c, t) for c, t in tokens.items()}
        await self.db.runOperation("t", "UPDATE controllers SET note = 'x'")
        await self.db.runOperation("t", "UPDATE controllers SET enabled = true")
        # A marker naming no connected controller, committed after the updates: once it is
        # heard, anything the updates notified would have been heard before it.
        await self.db.runOperation(
            "t", "SELECT pg_notify(%s, 'nobody-connected')", (f"{self.schema}_revoked",)
        )
        await waitUntil(lambda: sample(a, "ctrlgw_revocation_notifications_total") >= 1, 5,
                        what="the marker notification")
        self.assertEqual(sample(a, "ctrlgw_revocation_notifications_total"), 1)
        self.assertFalse(any(c.isClosed for c in clients.values()))
        await self.db.runOperation(
            "t", "UPDATE controllers SET enabled = false WHERE controller_id IN ('n1','n2','n3')"
        )
        await waitUntil(lambda: all(clients[c].isClosed for c in ("n1", "n2", "n3")), 5)
        self.assertEqual(sample(a, "ctrlgw_revocation_notifications_total"), 2)
        self.assertEqual(sample(a, "ctrlgw_revocations_total", {"scope": "notified"}), 3)
        self.assertFalse(clients["keep"].isClosed)

    async def test_tooManyToList(self) -> None:
        """
        A statement revoking more controllers than a notification can list notifies
        C{*}: each instance checks its own connections in one statement and closes the
        revoked ones with C{bye} C{revoked}.
        """
        a, b = await self.twoGateways()
        ids = [f"{i:03d}" + "x" * 120 for i in range(60)]
        await self.db.runOperation(
            "t", "INSERT INTO controllers (controller_id, token_sha256)"
            " SELECT unnest(%s::text[]), %s", (ids, hashToken("shared")),
        )
        first = await self.connect(a, ids[0], "shared")
        last = await self.connect(b, ids[-1], "shared")
        await self.db.runOperation("t", "UPDATE controllers SET enabled = false")
        await waitUntil(lambda: first.isClosed and last.isClosed, 5, what="both closed")
        for client, gateway in ((first, a), (last, b)):
            self.assertEqual([f["reason"] for f in client.of("bye")], [BYE_REVOKED])
            self.assertEqual(sample(gateway, "ctrlgw_revocations_total", {"scope": "checked"}), 1)

    async def test_lostNotificationFenced(self) -> None:
        """
        With the notification lost and no reconciliation running, a message sent after the
        revocation committed is neither stored nor acked: the fence refuses it and the
        connection is closed (C{bye} C{takeover}).  The row still says C{revoked}.
        """
        a = await startGateway(
            self, self.dsn, self.schema, "gw-a",
            {**TOKEN_MODE, "cluster": {"reconcile_interval": "1h", "full_reconcile_interval": "1h"}},
        )
        a.notifications._handlers[revokedChannel(self.schema)] = lambda payload: None
        token = await self.register(a, "fenced")
        client = await self.connect(a, "fenced", token)
        client.send({"type": "msg", "id": "before", "body": None})
        await waitUntil(lambda: "before" in client.ackedIds(), 10, what="ack before")
        await a.store.setControllerEnabled("fenced", False)
        client.send({"type": "msg", "id": "after", "body": None})
        await waitUntil(lambda: client.isClosed, 10, what="the fence to close it")
        self.assertEqual(client.ackedIds(), ["before"])
        self.assertEqual([f["reason"] for f in client.of("bye")], ["takeover"])
        rows = await self.db.runQuery("t", "SELECT message_id FROM inbox WHERE controller_id = 'fenced'")
        self.assertEqual(rows, [("before",)])
        self.assertEqual((await self.sessionRow("fenced"))[1:], (False, "revoked"))

    async def test_lostNotificationReconciled(self) -> None:
        """
        With the notification lost, a silent revoked session is closed by the next
        reconciliation round (every reconcile_interval: 1 s here).
        """
        a = await startGateway(self, self.dsn, self.schema, "gw-a", TOKEN_MODE)
        a.notifications._handlers[revokedChannel(self.schema)] = lambda payload: None
        token = await self.register(a, "quiet")
        client = await self.connect(a, "quiet", token)
        await a.store.setControllerEnabled("quiet", False)
        took = await waitUntil(lambda: client.isClosed, 10, what="reconciliation to close it")
        figure(f"lost notification, reconcile_interval 1s: revocation -> closed {took * 1000:.0f} ms")
        self.assertEqual(sample(a, "ctrlgw_revocations_total", {"scope": "notified"}), 0)
        self.assertEqual((await self.sessionRow("quiet"))[1:], (False, "revoked"))


class PausingStore(Store):
    """
    A store whose claims (one at a time or batched) wait for C{self.gate} once it is set.
    """

    gate: Deferred[None] | None = None
    # How many claims have reached the gate.
    atGate = 0

    async def claimSession(self, controller: str, listener: str, peer: str) -> Claim:
        if self.gate is not None:
            self.atGate += 1
            await self.gate
        return await super().claimSession(controller, listener, peer)

    async def claimSessions(self, hellos: Sequence[tuple[str, str, str]]) -> list[Claim]:
        if self.gate is not None:
            self.atGate += 1
            await self.gate
        return await super().claimSessions(hellos)


class ClaimRaceTests(PostgresTestCase):
    """
    A hello whose look-up read the old credentials but whose claim commits after the
    revocation must not become a session.
    """

    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = PausingStore(self.db, "gw-1", ClaimPolicy(refuseFlapping=False))
        await self.store.registerInstance("test-host", 1)
        self.events = EventLog(reactor, self.store, self.metrics)
        self.addCleanup(lambda: self.events.drain())
        self.token = newToken()
        await self.store.addController("racer", hashToken(self.token), "")

    def ownership(self, mode: str) -> PostgresOwnership:
        ownership = PostgresOwnership(
            reactor, self.store, self.events, AuthConfig(mode, 3, 60.0), self.metrics
        )
        self.addCleanup(ownership.drain)
        return ownership

    async def offline(self) -> bool:
        await sleep(0.1)
        rows = await self.db.runQuery("t", "SELECT online FROM sessions WHERE controller_id = 'racer'")
        return rows == [(False,)]

    async def test_revokedDuringClaim(self) -> None:
        """
        Token mode: the credentials are read again after the claim committed; the session
        is released and the hello refused.
        """
        ownership = self.ownership("token")
        self.store.gate = Deferred()
        claim = Deferred.fromCoroutine(
            ownership._claim("racer", self.token, "main", "192.0.2.1:1")
        )
        await waitUntil(lambda: self.store.atGate, 5, what="the claim past the look-up")
        await self.store.setControllerEnabled("racer", False)
        self.store.gate.callback(None)
        failure = await self.assertFailure(claim, AuthFailed)
        self.assertEqual(failure.reason, "revoked")
        await ownership.drain()
        self.assertTrue(await self.offline())
        self.assertEqual(sample_(self.metrics, "ctrlgw_revocations_total", {"scope": "claim"}), 1)

    async def test_notifiedDuringClaim(self) -> None:
        """
        Any mode: a revocation notified while the claim is in flight refuses it as
        C{unavailable} (it may have read the new credentials: it is to retry).
        """
        ownership = self.ownership("none")
        self.store.gate = Deferred()
        claim = Deferred.fromCoroutine(ownership._claim("racer", None, "main", "192.0.2.1:1"))
        await waitUntil(lambda: self.store.atGate, 5, what="the claim past the look-up")
        self.assertTrue(ownership.claimInFlight("racer"))
        ownership.revokeInFlight(["racer"])
        self.store.gate.callback(None)
        await self.assertFailure(claim, Unavailable)
        await ownership.drain()
        self.assertTrue(await self.offline())
        self.assertFalse(ownership.claimInFlight("racer"))


def sample_(metrics: Any, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class RateLimitTests(SecurityTestCase):
    """
    Failed hellos are limited per peer host and per controller id, end to end.
    """

    async def refusedFrom(self, gateway: Gateway, host: str, controller: str, token: str) -> str:
        client = await self.connect(gateway, "", "", bindHost=host)
        answer = await client.helloAnswer(controller, token=token)
        self.assertEqual((answer["type"], answer["code"]), ("error", "auth_failed"), answer)
        await waitUntil(lambda: client.isClosed, 5)
        return answer["code"]

    async def reasons(self, controller: str, last: str) -> list[str]:
        events = await self.history(controller, until=("auth_failed", last))
        return [r for kind, r in events if kind == "auth_failed"]

    async def test_perHost(self) -> None:
        """
        After max_failures failed hellos from one host, that host is refused even with a
        right token and for another controller; another host is admitted.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-a", {"auth": {"mode": "token", "max_failures": 3}}
        )
        good = await self.register(gateway, "victim")
        other = await self.register(gateway, "other")
        for _ in range(3):
            await self.refusedFrom(gateway, "127.0.0.2", "victim", "guess")
        await self.refusedFrom(gateway, "127.0.0.2", "victim", good)
        await self.refusedFrom(gateway, "127.0.0.2", "other", other)
        self.assertEqual(await self.reasons("victim", "rate_limited"), ["bad_token"] * 3 + ["rate_limited"])
        self.assertEqual(await self.reasons("other", "rate_limited"), ["rate_limited"])
        await self.connect(gateway, "victim", good, bindHost="127.0.0.3")
        self.assertEqual(sample(gateway, "ctrlgw_auth_failures_total", {"reason": "rate_limited"}), 2)

    async def test_perController(self) -> None:
        """
        Guesses for one controller id spread over many hosts are limited too: after
        4 x max_failures of them the id is refused from any host, and other ids are not.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-a", {"auth": {"mode": "token", "max_failures": 2}}
        )
        good = await self.register(gateway, "victim")
        other = await self.register(gateway, "other")
        hosts = [f"127.0.0.{n}" for n in range(10, 14)]
        for host in hosts:
            for _ in range(2):
                await self.refusedFrom(gateway, host, "victim", "guess")
        await self.refusedFrom(gateway, "127.0.0.20", "victim", good)
        self.assertEqual(
            await self.reasons("victim", "rate_limited"), ["bad_token"] * 8 + ["rate_limited"]
        )
        await self.connect(gateway, "other", other, bindHost="127.0.0.20")


class ApiTests(SecurityTestCase):
    API_TOKEN = "api-" + uuid.uuid4().hex

    async def request(
        self, gateway: Gateway, method: bytes, path: str, token: str | None,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        from twisted.web.client import FileBodyProducer

        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response = await Agent(reactor).request(
            method, f"http://127.0.0.1:{httpPort(gateway)}{path}".encode(), headers, producer
        )
        return response.code, await readBody(response)

    async def test_everyRouteNeedsTheToken(self) -> None:
        """
        Every route under /v1 (and an unknown one) answers 401 with no token, a wrong one,
        or another scheme, and the answer does not echo what was presented.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-a", {"http": {"api_token": self.API_TOKEN}}
        )
        command = str(uuid.uuid4())
        paths: Sequence[tuple[bytes, str, bytes | None]] = [
            (b"GET", "/v1/controllers", None),
            (b"GET", "/v1/controllers/c1", None),
            (b"GET", f"/v1/commands/{command}", None),
            (b"POST", "/v1/controllers/c1/commands", b'{"body": 1}'),
            (b"GET", "/v1/nothing/here", None),
            (b"DELETE", "/v1/controllers/c1", None),
            (b"DELETE", "/v1/controllers/c1/connection", None),
            (b"GET", "/v1/stream?group=app", None),
            (b"POST", "/v1/commands", b'{"commands": [{"controller": "c1", "body": 1}]}'),
        ]
        covered = {(m, len([s for s in p.split("/")[2:] if s])) for m, p, _ in paths}
        routes = {(method, depth) for method, depth, _ in gateway.api.routes}
        self.assertLessEqual(routes, covered)
        for method, path, body in paths:
            for presented in (None, "wrong-" + uuid.uuid4().hex, self.API_TOKEN[:-1],
                              self.API_TOKEN + "x"):
                code, answer = await self.request(gateway, method, path, presented, body)
                self.assertEqual(code, 401, (method, path, presented, answer))
                if presented:
                    self.assertNotIn(presented.encode(), answer)
        code, _ = await self.request(gateway, b"GET", "/v1/controllers", None)
        rows = await self.db.runQuery("t", "SELECT count(*) FROM commands")
        self.assertEqual((code, rows), (401, [(0,)]))

    async def test_noTokenOrHashShown(self) -> None:
        """
        With the token, no answer contains a controller's token, its hash (raw, hex or
        base64), or the API token.
        """
        import base64

        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-a",
            {**TOKEN_MODE, "http": {"api_token": self.API_TOKEN}},
        )
        token = await self.register(gateway, "c1")
        await self.connect(gateway, "c1", token)
        digest = hashToken(token)
        secrets = [token.encode(), digest, digest.hex().encode(), base64.b64encode(digest),
                   base64.urlsafe_b64encode(digest).rstrip(b"="), self.API_TOKEN.encode()]
        code, sent = await self.request(
            gateway, b"POST", "/v1/controllers/c1/commands", self.API_TOKEN, b'{"body": 1}'
        )
        self.assertEqual(code, 201, sent)
        answers = [sent]
        for path in ("/v1/controllers", "/v1/controllers/c1",
                     f"/v1/commands/{json.loads(sent)['id']}"):
            code, answer = await self.request(gateway, b"GET", path, self.API_TOKEN)
            self.assertEqual(code, 200, answer)
            answers.append(answer)
        for answer in answers:
            for secret in secrets:
                self.assertNotIn(secret, answer)


class RawClient(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


class TLSTests(SecurityTestCase):
    async def test_plaintextHelloRefused(self) -> None:
        """
        A plaintext hello, with a valid token, to an ssl: listener gets no welcome (no
        protocol frame at all), the socket is closed, and no session is claimed.
        """
        import shutil
        import tempfile
        from pathlib import Path

        from tests.test_auth import selfSignedCertificate

        directory = Path(tempfile.mkdtemp(prefix="ctrlgw-tls-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        keyPath, certPath, _ = selfSignedCertificate(directory)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-tls", {**TOKEN_MODE, "listener:main": {"endpoint": endpoint}}
        )
        token = await self.register(gateway, "plain")
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listenerPort(gateway)), client)
        hello = json.dumps({"type": "hello", "controller": "plain", "token": token, "ts": 0})
        client.transport.write(hello.encode() + b"\n")
        started = reactor.seconds()
        await waitUntil(lambda: client.closed.called, 20, what="the TLS listener to close it")
        figure(f"plaintext hello to ssl: listener closed after {(reactor.seconds() - started) * 1000:.0f} ms")
        self.assertNotIn(b"welcome", client.data)
        self.assertNotIn(b'"type"', client.data)
        rows = await self.db.runQuery("t", "SELECT count(*) FROM sessions")
        self.assertEqual(rows, [(0,)])
        self.assertEqual(sample(gateway, "ctrlgw_frames_in_total", {"type": "hello"}), 0)


class SecretsInLogsTests(SecurityTestCase):
    async def test_noSecretInLogs(self) -> None:
        """
        A gateway with a password in its DSN, token auth and an API token: a failed and a
        successful hello, API requests with a wrong and the right token, and a gateway and
        a ctrlgw command with an unreachable DSN log neither the password, nor a controller
        token (right or wrong), nor the API token.
        """
        password = "pw-" + uuid.uuid4().hex
        apiToken = "api-" + uuid.uuid4().hex
        wrongToken = "wrong-" + uuid.uuid4().hex
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        # The test server trusts local connections: a password in the DSN is ignored.
        dsn = f"{self.dsn}{'&' if '?' in self.dsn else '?'}password={password}"
        gateway = await startGateway(
            self, dsn, self.schema, "gw-secret",
            {**TOKEN_MODE, "http": {"api_token": apiToken}},
        )
        token = await self.register(gateway, "c1")
        intruder = await self.connect(gateway, "", "")
        answer = await intruder.helloAnswer("c1", token=wrongToken)
        self.assertEqual(answer.get("code"), "auth_failed")
        client = await self.connect(gateway, "c1", token)
        client.send({"type": "msg", "id": "m1", "body": {"token": "not-a-secret"}})
        await waitUntil(lambda: "m1" in client.ackedIds(), 10)
        agent = Agent(reactor)
        for presented in (wrongToken, apiToken):
            headers = Headers({b"authorization": [f"Bearer {presented}".encode()]})
            response = await agent.request(
                b"GET", f"http://127.0.0.1:{httpPort(gateway)}/v1/controllers/c1".encode(), headers
            )
            await readBody(response)

        badDsn = f"postgresql://ctrlgw:{password}@127.0.0.1:1/ctrlgw"
        broken = await startGateway(
            self, badDsn, self.schema, "gw-broken",
            {"database": {"connect_timeout": "1s"}}, waitReady=False,
        )
        await waitUntil(
            lambda: any("cannot connect" in (formatEvent(e) or "") for e in events), 20,
            what="the unreachable database to be logged",
        )
        await broken.service.stopService()
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(reactor, ["--config", self.configPath, "--dsn", badDsn,
                                       "controllers", "list"], out=out, err=err)
        self.assertEqual(code, 1)

        texts = [err.getvalue(), out.getvalue()]
        for event in events:
            texts.append(formatEvent(event) or "")
            texts.append(repr(event))
            failure = event.get("log_failure")
            if failure is not None:
                texts.append(failure.getTraceback())
        self.assertGreater(len(events), 20)
        for secret in (password, token, wrongToken, apiToken):
            leaks = [t for t in texts if secret in t]
            self.assertEqual(leaks, [], f"{secret[:6]}... appears in the logs")
