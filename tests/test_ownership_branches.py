"""
The branches of L{ctrlgw.ownership}, on a L{Clock} and a store fake whose statements the
test answers: admission (unknown, bad token, disabled, rate limits per host and per id),
the claim (flapping refused or admitted, a takeover recorded), the re-check after the claim
(revoked meanwhile: released and refused), the claims in flight that reconciliation must
not fence, releases, and the event log.

These are the fast tests C{make mutate} runs against C{ctrlgw/ownership.py}; the same paths
against a real PostgreSQL are in C{test_auth.py}, C{test_security.py} and C{test_cluster.py}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.auth import hashToken
from ctrlgw.config import AuthConfig
from ctrlgw.interfaces import AuthFailed, Session, Unavailable
from ctrlgw.ownership import PER_CONTROLLER_FAILURES, EventLog, LocalOwnership, PostgresOwnership
from ctrlgw.store.postgres import Claim, Event

from .helpers import makeClock, makeContext

INSTANCE = "gw-here"
MAX_FAILURES = 3
WINDOW = 60.0
TOKEN = "s3cret"


class FakeStore:
    """
    Statements the test answers: C{credentials} by controller (absent: unknown), the
    claims queued in C{toClaim} (default: a fresh epoch 1 claim).
    """

    def __init__(self) -> None:
        self.instance = INSTANCE
        self.credentials: dict[str, tuple[bytes, bool]] = {}
        self.recheck: dict[str, tuple[bytes, bool] | None] = {}
        self.lookups: list[list[str]] = []
        self.rechecks: list[list[str]] = []
        self.claimed: list[list[tuple[str, str, str]]] = []
        self.toClaim: list[Claim] = []
        self.claimGate: Deferred[None] | None = None
        self.lookupError: Exception | None = None
        self.claimError: Exception | None = None
        self.recheckError: Exception | None = None
        self.released: list[tuple[str, int, str]] = []
        self.releaseGate: Deferred[None] | None = None
        self.events: list[Event] = []

    async def lookupCredentials(self, controllers: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        self.lookups.append(list(controllers))
        if self.lookupError is not None:
            raise self.lookupError
        return [self.credentials.get(c) for c in controllers]

    async def recheckCredentials(self, controllers: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        self.rechecks.append(list(controllers))
        if self.recheckError is not None:
            raise self.recheckError
        return [self.recheck.get(c, self.credentials.get(c)) for c in controllers]

    async def claimSessions(self, hellos: Sequence[tuple[str, str, str]]) -> list[Claim]:
        self.claimed.append(list(hellos))
        if self.claimError is not None:
            raise self.claimError
        if self.claimGate is not None:
            await self.claimGate
        claims = []
        for _ in hellos:
            claims.append(self.toClaim.pop(0) if self.toClaim else Claim("sess-1", 1, None, None, False))
        return claims

    async def releaseSessions(self, rows: Sequence[tuple[str, int, str]]) -> list[object]:
        self.released.extend(rows)
        if self.releaseGate is not None:
            await self.releaseGate
        return [None] * len(rows)

    async def writeEvents(self, events: Sequence[Event]) -> list[object]:
        self.events.extend(events)
        return [None] * len(events)


class OwnershipFixture(SynchronousTestCase):
    mode = "token"

    def setUp(self) -> None:
        self.clock = makeClock()
        self.metrics = makeContext(clock=self.clock).metrics
        self.store = FakeStore()
        self.store.credentials["a"] = (hashToken(TOKEN), True)
        self.events = EventLog(self.clock, self.store, self.metrics)  # type: ignore[arg-type]
        self.ownership = PostgresOwnership(
            self.clock, self.store, self.events,  # type: ignore[arg-type]
            AuthConfig(mode=self.mode, max_failures=MAX_FAILURES, failure_window=WINDOW),
            self.metrics,
        )

    def claim(self, controller: str = "a", token: str | None = TOKEN,
              peer: str = "192.0.2.1:4000") -> Deferred[Session]:
        d = self.ownership.claim(controller, token, "main", peer)
        self.clock.advance(0)
        return d

    def flush(self) -> list[tuple[str, str, str, int | None]]:
        """
        Write the batched events and releases; the events so far.
        """
        self.clock.advance(0.1)
        return [(e.controller, e.kind, e.reason, e.epoch) for e in self.store.events]

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def refused(self, d: Deferred[Session]) -> str:
        return str(self.failureResultOf(d, AuthFailed).value)

    def revokedDuringClaim(self, controllers: list[str] | None) -> Deferred[Session]:
        self.store.claimGate = Deferred()
        d = self.claim()
        self.ownership.revokeInFlight(controllers)
        gate, self.store.claimGate = self.store.claimGate, None
        gate.callback(None)
        self.clock.advance(0)
        return d


class OwnershipBranchTests(OwnershipFixture):

    # --- admission ---

    def test_admitted(self) -> None:
        session = self.successResultOf(self.claim())
        self.assertEqual(
            (session.controller, session.session, session.epoch, session.instance,
             session.listener, session.peer),
            ("a", "sess-1", 1, INSTANCE, "main", "192.0.2.1:4000"),
        )
        self.assertEqual(self.store.claimed, [[("a", "main", "192.0.2.1:4000")]])
        self.assertEqual(self.store.rechecks, [["a"]])
        self.assertEqual(self.flush(), [("a", "connect", "main", 1)])

    def test_notAdmitting(self) -> None:
        self.ownership.admitting = False
        self.failureResultOf(self.claim(), Unavailable)
        self.assertEqual(self.store.lookups, [])
        self.assertFalse(self.ownership.claimInFlight("a"))

    def test_unknown(self) -> None:
        self.assertEqual(self.refused(self.claim("nobody")), "unknown_controller")
        self.assertEqual(self.store.claimed, [])
        self.assertEqual(self.flush(), [("nobody", "auth_failed", "unknown_controller", None)])

    def test_badToken(self) -> None:
        self.assertEqual(self.refused(self.claim(token="wrong")), "bad_token")
        self.assertEqual(self.refused(self.claim(token=None)), "bad_token")

    def test_disabled(self) -> None:
        self.store.credentials["a"] = (hashToken(TOKEN), False)
        self.assertEqual(self.refused(self.claim()), "disabled")

    def test_rateLimitedPerHost(self) -> None:
        """
        After max_failures failures from one host, its hellos are refused without a
        look-up, for any controller, until the failures age out of the window.
        """
        for _ in range(MAX_FAILURES):
            self.refused(self.claim(token="wrong"))
        self.assertEqual(self.refused(self.claim()), "rate_limited")
        self.assertEqual(len(self.store.lookups), MAX_FAILURES)
        # Another host is not limited.
        self.successResultOf(self.claim(peer="192.0.2.2:1"))
        self.clock.advance(WINDOW)
        self.successResultOf(self.claim())

    def test_successForgiven(self) -> None:
        """
        A hello that succeeds does not count as a failure.
        """
        for _ in range(MAX_FAILURES - 1):
            self.refused(self.claim(token="wrong"))
        for _ in range(3):
            self.successResultOf(self.claim())
        self.refused(self.claim(token="wrong"))
        self.assertEqual(self.refused(self.claim()), "rate_limited")

    def test_rateLimitedPerController(self) -> None:
        """
        A guesser spreading its hellos for one id over many hosts is limited too, after
        PER_CONTROLLER_FAILURES times as many failures.
        """
        limit = MAX_FAILURES * PER_CONTROLLER_FAILURES
        for i in range(limit):
            self.refused(self.claim(token="wrong", peer=f"198.51.100.{i}:1"))
        self.assertEqual(self.refused(self.claim(peer="203.0.113.9:1")), "rate_limited")
        self.store.credentials["b"] = (hashToken(TOKEN), True)
        self.successResultOf(self.claim("b", peer="203.0.113.9:1"))

    def test_lookupFailureForgiven(self) -> None:
        """
        A look-up that fails is no authentication failure: the claim fails, the limits
        are not charged.
        """
        self.store.lookupError = RuntimeError("database gone")
        for _ in range(MAX_FAILURES + 1):
            self.failureResultOf(self.claim(), RuntimeError)
        self.store.lookupError = None
        self.successResultOf(self.claim())
        self.assertFalse(self.ownership.claimInFlight("a"))

    # --- the claim ---

    def test_claimFailureNotRetried(self) -> None:
        """
        A claim statement that fails refuses its hellos; it is never run again behind
        their back.
        """
        self.store.claimError = RuntimeError("database gone")
        d = self.claim()
        self.clock.advance(5)
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(len(self.store.claimed), 1)
        self.assertFalse(self.ownership.claimInFlight("a"))

    def test_hostWithoutPort(self) -> None:
        """
        Failures count per host, whatever the port; an IPv6 host is its whole address.
        """
        for port in range(MAX_FAILURES):
            self.refused(self.claim(token="wrong", peer=f"192.0.2.7:{4000 + port}"))
        self.assertEqual(self.refused(self.claim(peer="192.0.2.7:5000")), "rate_limited")
        for port in range(MAX_FAILURES):
            self.refused(self.claim(token="wrong", peer=f"2001:db8::1:{4000 + port}"))
        self.successResultOf(self.claim(peer="2001:db8::2:4000"))

    def test_takeoverRecorded(self) -> None:
        self.store.toClaim = [Claim("sess-2", 7, "gw-there", 6, True)]
        self.successResultOf(self.claim())
        self.assertEqual(self.flush(), [("a", "connect", "main", 7),
                                        ("a", "takeover", "from gw-there epoch 6", 7)])

    def test_previousOfflineNoTakeover(self) -> None:
        self.store.toClaim = [Claim("sess-2", 7, "gw-there", 6, False)]
        self.successResultOf(self.claim())
        self.assertEqual([e[1] for e in self.flush()], ["connect"])

    def test_flappingRefused(self) -> None:
        self.store.toClaim = [Claim("sess-2", 9, None, None, False, flapping=True, refused=True)]
        self.failureResultOf(self.claim(), Unavailable)
        self.assertEqual(self.value("ctrlgw_flapping_detections_total"), 1)
        self.assertEqual(self.store.rechecks, [])
        self.assertEqual(self.flush(), [("a", "refused", "flapping", None)])

    def test_flappingAdmitted(self) -> None:
        self.store.toClaim = [Claim("sess-2", 9, None, None, False, flapping=True)]
        self.assertEqual(self.successResultOf(self.claim()).epoch, 9)
        self.assertEqual(self.value("ctrlgw_flapping_detections_total"), 1)

    def test_claimInFlight(self) -> None:
        """
        From the hello until its claim is handed back, the controller has a claim in
        flight (reconciliation must not release its fresh row); two at once are tracked
        apart.
        """
        self.store.claimGate = Deferred()
        d1 = self.claim()
        d2 = self.claim()
        self.assertTrue(self.ownership.claimInFlight("a"))
        self.assertFalse(self.ownership.claimInFlight("b"))
        gate, self.store.claimGate = self.store.claimGate, None
        gate.callback(None)
        self.clock.advance(0)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertFalse(self.ownership.claimInFlight("a"))

    # --- revoked during the claim ---

    def test_recheckRevoked(self) -> None:
        """
        Credentials changed between the look-up and the committed claim: the new
        session is released and the hello refused.
        """
        self.store.recheck["a"] = (hashToken(TOKEN), False)
        self.assertEqual(self.refused(self.claim()), "revoked")
        events = self.flush()
        self.assertEqual(self.store.released, [("a", 1, "revoked")])
        self.assertEqual(events, [("a", "auth_failed", "revoked", 1)])
        self.assertEqual(self.value("ctrlgw_revocations_total", scope="claim"), 1)

    def test_recheckFails(self) -> None:
        self.store.recheckError = RuntimeError("database gone")
        self.failureResultOf(self.claim(), RuntimeError)
        self.flush()
        self.assertEqual(self.store.released, [("a", 1, "claim_failed")])

    def test_revokedInFlight(self) -> None:
        """
        A revocation notified while the claim is in flight refuses it (to be retried at
        once), whatever its look-ups read; one for another controller does not.
        """
        self.failureResultOf(self.revokedDuringClaim(["a", "c"]), Unavailable)
        self.assertEqual(self.flush(), [("a", "refused", "revoked", 1)])
        self.assertEqual(self.store.released, [("a", 1, "revoked")])

    def test_revokedInFlightOther(self) -> None:
        self.successResultOf(self.revokedDuringClaim(["b"]))
        self.assertEqual(self.store.released, [])

    def test_revokedAllInFlight(self) -> None:
        self.failureResultOf(self.revokedDuringClaim(None), Unavailable)

    # --- releases and shutdown ---

    def test_release(self) -> None:
        session = self.successResultOf(self.claim())
        self.ownership.release(session, "closed")
        events = self.flush()
        self.assertEqual(self.store.released, [("a", 1, "closed")])
        self.assertEqual(events[-1], ("a", "disconnect", "closed", 1))

    def test_releaseInFlightUntilWritten(self) -> None:
        """
        A queued release is in flight until written (reconciliation leaves its row
        alone meanwhile); two for one controller, until both are.
        """
        self.store.releaseGate = Deferred()
        self.ownership.releaseRow("b", 2, "gone")
        self.assertTrue(self.ownership.releaseInFlight("b"), "one release, being written")
        self.store.releaseGate.callback(None)
        self.store.releaseGate = None
        self.clock.advance(0.1)
        self.assertFalse(self.ownership.releaseInFlight("b"))
        self.ownership.releaseRow("a", 3, "gone")
        self.ownership.releaseRow("a", 4, "gone")
        self.assertTrue(self.ownership.releaseInFlight("a"))
        self.assertFalse(self.ownership.releaseInFlight("b"))
        self.successResultOf(self.ownership.drain())
        self.assertEqual(self.store.released, [("b", 2, "gone"), ("a", 3, "gone"), ("a", 4, "gone")])
        self.assertFalse(self.ownership.releaseInFlight("a"))

    def test_drainAndAbandon(self) -> None:
        self.ownership.releaseRow("a", 3, "gone")
        d = self.ownership.drain()
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.store.released, [("a", 3, "gone")])

    def test_abandon(self) -> None:
        """
        Abandoned, the claims still waiting behind the one in flight are refused.
        """
        self.store.claimGate = Deferred()
        self.claim()
        waiting = self.claim()
        self.assertEqual(len(self.store.claimed), 1)
        self.ownership.abandon()
        self.failureResultOf(waiting, Unavailable)


class NoAuthOwnershipTests(OwnershipFixture):
    """
    With auth mode none nothing is looked up, but a revocation in flight still counts.
    """

    mode = "none"

    def test_noLookups(self) -> None:
        self.successResultOf(self.claim("nobody", token=None))
        self.assertEqual(self.store.lookups, [])
        self.assertEqual(self.store.rechecks, [])
        self.assertEqual(self.store.claimed, [[("nobody", "main", "192.0.2.1:4000")]])

    def test_revokedInFlight(self) -> None:
        self.failureResultOf(self.revokedDuringClaim(["a"]), Unavailable)
        self.flush()
        self.assertEqual(self.store.released, [("a", 1, "revoked")])
        self.assertEqual(self.value("ctrlgw_revocations_total", scope="claim"), 1)

    def test_notRevoked(self) -> None:
        self.successResultOf(self.revokedDuringClaim([]))
        self.flush()
        self.assertEqual(self.store.released, [])


class EventLogTests(SynchronousTestCase):
    def test_dropsWhenFull(self) -> None:
        clock = makeClock()
        metrics = makeContext(clock=clock).metrics
        store = FakeStore()
        log = EventLog(clock, store, metrics, maxBuffered=2)  # type: ignore[arg-type]
        for i in range(3):
            log.record("a", "connect", str(i), i, "p")
        self.assertEqual(metrics.registry.get_sample_value("ctrlgw_events_dropped_total"), 1)
        d = log.drain()
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual([(e.reason, e.epoch, e.peer) for e in store.events], [("0", 0, "p"), ("1", 1, "p")])


class LocalOwnershipTests(SynchronousTestCase):
    def test_epochsPerController(self) -> None:
        local = LocalOwnership("gw")
        a1 = self.successResultOf(local.claim("a", None, "main", "p"))
        a2 = self.successResultOf(local.claim("a", None, "main", "p"))
        b1 = self.successResultOf(local.claim("b", None, "main", "p"))
        self.assertEqual((a1.epoch, a2.epoch, b1.epoch), (1, 2, 1))
        self.assertNotEqual(a1.session, a2.session)
        local.release(a1, "old")
        self.assertEqual(local.current["a"], a2)
        local.release(a2, "closed")
        self.assertNotIn("a", local.current)
        self.assertEqual(local.released, [(a1, "old"), (a2, "closed")])
