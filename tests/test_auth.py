"""
Tests for controller authentication: L{ctrlgw.auth} (tokens, the failure limiter),
L{ctrlgw.ownership.PostgresOwnership} in token mode against a real PostgreSQL, and a whole
gateway behind TLS.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.auth import FailureLimiter, hashToken, newToken, tokenMatches
from ctrlgw.config import AuthConfig
from ctrlgw.interfaces import AuthFailed
from ctrlgw.metrics import Metrics
from ctrlgw.ownership import EventLog, PostgresOwnership
from ctrlgw.service import Gateway
from ctrlgw.store.postgres import ClaimPolicy, Store
from tests.gateways import (
    LineController,
    connectEndpoint,
    listenerPort,
    metric,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase

# --- tokens and the limiter ---


class TokenTests(SynchronousTestCase):
    def test_hashToken(self) -> None:
        self.assertEqual(hashToken("s3cr3t"), hashlib.sha256(b"s3cr3t").digest())
        self.assertEqual(len(hashToken("x")), 32)
        self.assertEqual(hashToken("ü"), hashlib.sha256("ü".encode()).digest())
        self.assertNotEqual(hashToken("a"), hashToken("b"))

    def test_tokenMatches(self) -> None:
        expected = hashToken("right")
        self.assertTrue(tokenMatches("right", expected))
        self.assertFalse(tokenMatches("wrong", expected))
        self.assertFalse(tokenMatches("right ", expected))
        self.assertFalse(tokenMatches("", expected))
        self.assertFalse(tokenMatches(None, expected))

    def test_missingTokenNeverMatches(self) -> None:
        """
        No token matches nothing, not even a stored hash of the empty string.
        """
        self.assertFalse(tokenMatches(None, hashToken("")))

    def test_newToken(self) -> None:
        tokens = {newToken() for _ in range(50)}
        self.assertEqual(len(tokens), 50)
        for token in tokens:
            self.assertGreaterEqual(len(token), 43)
            self.assertTrue(tokenMatches(token, hashToken(token)))


class FailureLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limiter = FailureLimiter(self.clock, maxFailures=3, window=10.0, maxHosts=3)

    def test_blockedAfterMaxFailures(self) -> None:
        for _ in range(2):
            self.limiter.record("192.0.2.1")
            self.assertFalse(self.limiter.blocked("192.0.2.1"))
        self.limiter.record("192.0.2.1")
        self.assertTrue(self.limiter.blocked("192.0.2.1"))
        self.assertFalse(self.limiter.blocked("192.0.2.2"))

    def test_windowExpiry(self) -> None:
        """
        Failures count for C{window} seconds; a blocked host is let in again once enough
        of them have aged out (a sliding window, not a fixed one).
        """
        self.limiter.record("h")
        self.clock.advance(5)
        self.limiter.record("h")
        self.clock.advance(4)
        self.limiter.record("h")
        self.assertTrue(self.limiter.blocked("h"))
        self.clock.advance(0.999)  # the first failure is 9.999s old
        self.assertTrue(self.limiter.blocked("h"))
        self.clock.advance(0.002)  # ... now older than the window
        self.assertFalse(self.limiter.blocked("h"))
        self.limiter.record("h")
        self.assertTrue(self.limiter.blocked("h"))
        self.clock.advance(10.001)
        self.assertFalse(self.limiter.blocked("h"))

    def test_maxHosts(self) -> None:
        """
        At most C{maxHosts} hosts are remembered; the one that failed longest ago is
        forgotten first.
        """
        for host in ("a", "b", "c"):
            for _ in range(3):
                self.limiter.record(host)
        for _ in range(3):
            self.limiter.record("a")  # "a" is the most recent again
        self.limiter.record("d")
        self.assertFalse(self.limiter.blocked("b"))
        self.assertTrue(self.limiter.blocked("a"))
        self.assertTrue(self.limiter.blocked("c"))
        self.assertEqual(len(self.limiter._failures), 3)

    def test_memoryBounded(self) -> None:
        for i in range(1000):
            self.limiter.record(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(self.limiter._failures), 3)
        # Each host keeps at most maxFailures timestamps.
        for _ in range(100):
            self.limiter.record("busy")
        self.assertEqual(len(self.limiter._failures["busy"]), 3)

    def test_blockedDoesNotRecord(self) -> None:
        for _ in range(3):
            self.limiter.record("h")
        for _ in range(10):
            self.assertTrue(self.limiter.blocked("h"))
        self.clock.advance(10.001)
        self.assertFalse(self.limiter.blocked("h"))


# --- PostgresOwnership in token mode ---


class CountingStore(Store):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookups = 0

    async def lookupCredentials(self, controllers: Sequence[str]) -> list[object]:
        self.lookups += len(controllers)
        return await super().lookupCredentials(controllers)


class TokenOwnershipTests(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = CountingStore(
            self.db, "gw-1", ClaimPolicy(flapThreshold=1000, refuseFlapping=False)
        )
        await self.store.registerInstance("test-host", 1)
        self.events = EventLog(reactor, self.store, self.metrics)
        self.ownership = PostgresOwnership(
            reactor, self.store, self.events, AuthConfig("token", 3, 60.0), self.metrics
        )
        self.token = newToken()
        await self.store.addController("c1", hashToken(self.token), "pump")
        await self.store.addController("off", hashToken(self.token), "retired")
        await self.store.setControllerEnabled("off", False)
        self.addCleanup(lambda: self.ownership.drain())
        self.addCleanup(lambda: self.events.drain())

    async def refused(self, controller: str, token: str | None, peer: str) -> str:
        try:
            session = await self.ownership.claim(controller, token, "main", peer)
        except AuthFailed as e:
            return e.reason
        raise AssertionError(f"admitted: {session}")

    async def history(self, controller: str) -> list[tuple[Any, ...]]:
        await self.events.drain()
        return [(kind, reason, peer) for _, kind, reason, _, _, peer in await self.store.history(controller, 100)]

    @deferred
    async def test_admitted(self) -> None:
        session = await self.ownership.claim("c1", self.token, "main", "192.0.2.1:4000")
        self.assertEqual(session.controller, "c1")
        self.assertEqual(session.instance, "gw-1")
        self.assertGreater(session.epoch, 0)
        self.assertEqual((session.listener, session.peer), ("main", "192.0.2.1:4000"))
        rows = await self.db.runQuery(
            "t", "SELECT epoch, online FROM sessions WHERE controller_id = 'c1'"
        )
        self.assertEqual(rows, [(session.epoch, True)])
        self.assertEqual(await self.history("c1"), [("connect", "main", "192.0.2.1:4000")])

    @deferred
    async def test_reasons(self) -> None:
        """
        Each refusal names its reason; none opens a session.
        """
        self.assertEqual(await self.refused("c1", "wrong", "192.0.2.1:1"), "bad_token")
        self.assertEqual(await self.refused("c1", None, "192.0.2.2:1"), "bad_token")
        self.assertEqual(await self.refused("ghost", self.token, "192.0.2.3:1"), "unknown_controller")
        self.assertEqual(await self.refused("off", self.token, "192.0.2.4:1"), "disabled")
        sessions = await self.db.runQuery("t", "SELECT count(*) FROM sessions WHERE online")
        self.assertEqual(sessions, [(0,)])
        # Enabled again, the same token is admitted.
        await self.store.setControllerEnabled("off", True)
        session = await self.ownership.claim("off", self.token, "main", "192.0.2.4:2")
        self.assertEqual(session.controller, "off")

    @deferred
    async def test_rateLimited(self) -> None:
        """
        After C{max_failures} failures from one host, that host is refused -- even with the
        right token -- without a database look-up; other hosts are not.
        """
        for port in range(3):
            self.assertEqual(await self.refused("c1", "guess", f"198.51.100.7:{port}"), "bad_token")
        lookups = self.store.lookups
        self.assertEqual(await self.refused("c1", self.token, "198.51.100.7:99"), "rate_limited")
        self.assertEqual(await self.refused("ghost", "x", "198.51.100.7:100"), "rate_limited")
        self.assertEqual(self.store.lookups, lookups)
        session = await self.ownership.claim("c1", self.token, "main", "198.51.100.8:1")
        self.assertEqual(session.controller, "c1")
        self.assertEqual(self.store.lookups, lookups + 1)

    @deferred
    async def test_concurrentHellosCannotOutrunTheLimit(self) -> None:
        """
        Hellos from one host whose look-ups are all in flight at once count against the
        limit as they start: only max_failures of them reach the database.
        """
        lookups = self.store.lookups
        attempts = [
            Deferred.fromCoroutine(self.refused("c1", "guess", f"198.51.100.9:{port}"))
            for port in range(6)
        ]
        reasons = await gatherResults(attempts)
        self.assertEqual(sorted(reasons), ["bad_token"] * 3 + ["rate_limited"] * 3)
        self.assertEqual(self.store.lookups, lookups + 3)
        # A success is not held against the host.
        session = await self.ownership.claim("c1", self.token, "main", "198.51.100.10:1")
        self.assertEqual(session.controller, "c1")
        self.assertFalse(self.ownership.limiter.blocked("198.51.100.10"))

    @deferred
    async def test_lookupsBatched(self) -> None:
        """
        Hellos that arrive together read their credentials in one statement before their
        claims and re-check them in one statement after.
        """
        ids = [f"batch-{i}" for i in range(20)]
        for controller in ids:
            await self.store.addController(controller, hashToken(self.token), "")

        def statements(name: str) -> float:
            return self.metrics.registry.get_sample_value(
                "ctrlgw_db_query_seconds_count", {"query": name}
            ) or 0.0

        before = {n: statements(n) for n in ("controller_credentials_batch",
                                              "controller_credentials_recheck")}
        sessions = await gatherResults([
            self.ownership.claim(c, self.token, "main", f"192.0.2.{i}:1")
            for i, c in enumerate(ids)
        ])
        self.assertEqual(sorted(s.controller for s in sessions), sorted(ids))
        self.assertEqual({n: statements(n) - before[n] for n in before},
                         {n: 1.0 for n in before})

    @deferred
    async def test_authFailedEvents(self) -> None:
        """
        Every refusal is recorded as an C{auth_failed} event with its reason and peer.
        """
        await self.refused("c1", "wrong", "192.0.2.1:1")
        await self.refused("off", self.token, "192.0.2.1:2")
        await self.refused("c1", "wrong", "192.0.2.1:3")
        await self.refused("c1", self.token, "192.0.2.1:4")
        self.assertEqual(
            await self.history("c1"),
            [
                ("auth_failed", "rate_limited", "192.0.2.1:4"),
                ("auth_failed", "bad_token", "192.0.2.1:3"),
                ("auth_failed", "bad_token", "192.0.2.1:1"),
            ],
        )
        # Disabling it (in setUp) is in its history too.
        self.assertEqual(
            await self.history("off"),
            [("auth_failed", "disabled", "192.0.2.1:2"), ("revoked", "disabled", "")],
        )

    @deferred
    async def test_noTokenMode(self) -> None:
        """
        With C{mode = none} anyone is admitted, known or not, without a look-up.
        """
        ownership = PostgresOwnership(
            reactor, self.store, self.events, AuthConfig("none", 3, 60.0), Metrics()
        )
        self.addCleanup(ownership.drain)
        session = await ownership.claim("ghost", None, "main", "192.0.2.1:1")
        self.assertEqual(session.controller, "ghost")
        self.assertEqual(self.store.lookups, 0)

    @deferred
    async def test_release(self) -> None:
        """
        Releasing the session marks it offline; a release of a superseded session does not
        touch the newer one.
        """
        first = await self.ownership.claim("c1", self.token, "main", "192.0.2.1:1")
        second = await self.ownership.claim("c1", self.token, "main", "192.0.2.1:2")
        self.ownership.release(first, "takeover")
        await self.ownership.drain()
        rows = await self.db.runQuery("t", "SELECT epoch, online FROM sessions WHERE controller_id = 'c1'")
        self.assertEqual(rows, [(second.epoch, True)])
        ownership = PostgresOwnership(
            reactor, self.store, self.events, AuthConfig("token", 3, 60.0), self.metrics
        )
        ownership.release(second, "peer_closed")
        await ownership.drain()
        rows = await self.db.runQuery(
            "t", "SELECT epoch, online, disconnect_reason FROM sessions WHERE controller_id = 'c1'"
        )
        self.assertEqual(rows, [(second.epoch, False, "peer_closed")])
        kinds = [kind for kind, _, _ in await self.history("c1")]
        self.assertEqual(kinds.count("disconnect"), 2)
        self.assertIn("takeover", kinds)


# --- a gateway behind TLS ---


def selfSignedCertificate(directory: Path) -> tuple[Path, Path, bytes]:
    """
    A key and a self-signed certificate for C{localhost} and 127.0.0.1, as PEM files.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = directory / "key.pem", directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certPEM = certificate.public_bytes(serialization.Encoding.PEM)
    certPath.write_bytes(certPEM)
    return keyPath, certPath, certPEM


class TLSGatewayTests(PostgresTestCase):
    timeout = 120

    def certificate(self) -> tuple[Path, Path, bytes]:
        """
        L{selfSignedCertificate} in a directory removed when the test ends.
        """
        directory = Path(tempfile.mkdtemp(prefix="ctrlgw-tls-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return selfSignedCertificate(directory)

    async def tlsGateway(
        self, keyPath: Path, certPath: Path, **sections: dict[str, object]
    ) -> Gateway:
        """
        A gateway whose listener speaks TLS with the given key and certificate.
        """
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        sections = {"listener:main": {"endpoint": endpoint}, **sections}
        return await startGateway(self, self.dsn, self.schema, "gw-tls", sections)

    async def client(self, endpoint: IStreamClientEndpoint) -> LineController:
        """
        A controller connected through C{endpoint}; it leaves (and is waited for) when the
        test ends.
        """
        client = await connectEndpoint(endpoint)
        self.addCleanup(client.leave)
        return client

    @deferred
    async def test_tokenOverTLS(self) -> None:
        """
        A controller connecting over TLS with its token is welcomed and its messages are
        acked once stored; a wrong token over the same listener is refused.
        """
        keyPath, certPath, certPEM = self.certificate()
        gateway = await self.tlsGateway(keyPath, certPath, auth={"mode": "token"})
        token = newToken()
        await gateway.store.addController("tls-1", hashToken(token), "")
        port = listenerPort(gateway)
        trust = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(certPEM)
        )

        client = await self.client(SSL4ClientEndpoint(reactor, "127.0.0.1", port, trust))
        welcome = await client.helloAnswer("tls-1", token=token)
        self.assertEqual(welcome["type"], "welcome", welcome)
        for i in range(5):
            client.send({"type": "msg", "id": f"m{i}", "body": {"i": i}})
        await waitUntil(lambda: len(client.ackedIds()) == 5, 30, what="acks over TLS")
        self.assertEqual(sorted(client.ackedIds()), [f"m{i}" for i in range(5)])
        rows = await self.db.runQuery(
            "t", "SELECT message_id FROM inbox WHERE controller_id = 'tls-1' ORDER BY 1"
        )
        self.assertEqual([m for (m,) in rows], [f"m{i}" for i in range(5)])
        self.assertTrue(client.transport.getPeerCertificate() is not None)

        intruder = await self.client(SSL4ClientEndpoint(reactor, "127.0.0.1", port, trust))
        answer = await intruder.helloAnswer("tls-1", token="not-the-token")
        self.assertEqual((answer["type"], answer["code"]), ("error", "auth_failed"), answer)
        await waitUntil(lambda: intruder.isClosed, 10, what="the refused connection to close")
        self.assertEqual(metric(gateway, "ctrlgw_auth_failures_total", {"reason": "bad_token"}), 1)
        # The first controller is untouched by the intruder.
        client.send({"type": "msg", "id": "m5", "body": None})
        await waitUntil(lambda: "m5" in client.ackedIds(), 30, what="an ack after the refusal")

    @deferred
    async def test_plainTextRefused(self) -> None:
        """
        A client that does not speak TLS gets no protocol frame from a TLS listener.
        """
        keyPath, certPath, _ = self.certificate()
        gateway = await self.tlsGateway(keyPath, certPath)
        client = await self.client(TCP4ClientEndpoint(reactor, "127.0.0.1", listenerPort(gateway)))
        client.send({"type": "hello", "controller": "c1"})
        await waitUntil(lambda: client.isClosed, 20, what="the gateway to drop a non-TLS client")
        self.assertEqual(client.frames, [])
