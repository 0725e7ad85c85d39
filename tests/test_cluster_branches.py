"""
The branches of L{ctrlgw.cluster.Cluster}, on a L{Clock}, real connections over
L{StringTransport}s and fakes of the store, the ownership and the listener: which
connections a reconciliation round drops and which session rows it releases (never a claim
still in flight), when a round is full or incremental, and what a takeover notification
does.

These are the fast tests C{make mutate} runs against C{ctrlgw/cluster.py}; the same rounds
against a real PostgreSQL are in C{test_cluster.py} and C{test_reconcile.py}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw import cluster
from ctrlgw.cluster import Cluster, takeoverChannel
from ctrlgw.store.postgres import SessionRow

from .helpers import FakeController, makeClock, makeConfig, makeContext

INSTANCE = "gw-here"
STATEMENT_TIMEOUT = 5.0
FULL_EVERY = 300.0


class FakeStore:
    def __init__(self) -> None:
        self.instance = INSTANCE
        self.db = SimpleNamespace(
            config=SimpleNamespace(statement_timeout=STATEMENT_TIMEOUT), schema="s1"
        )
        self.rows: list[SessionRow] = []
        self.reported: list[list[tuple[str, int, float]]] = []
        self.changedSince: list[float] = []
        self.now = 1000.0
        self.cleaned = 0
        self.reaped = 0
        self.calls: list[str] = []

    async def databaseTime(self) -> float:
        return self.now

    async def reconcile(self, local: Sequence[tuple[str, int, float]]) -> list[SessionRow]:
        self.reported.append(sorted(local))
        return list(self.rows)

    async def changedSessions(self, since: float) -> tuple[float, list[SessionRow]]:
        self.changedSince.append(since)
        return self.now, list(self.rows)

    async def registerInstance(self, host: str, pid: int) -> int:
        self.calls.append("register")
        return self.cleaned

    async def heartbeat(self, host: str, pid: int) -> None:
        self.calls.append("heartbeat")

    async def reapDeadInstances(self) -> int:
        self.calls.append("reap")
        return self.reaped

    async def unregisterInstance(self) -> None:
        self.calls.append("unregister")


class FakeOwnership:
    def __init__(self) -> None:
        self.admitting = False
        self.inFlight: set[str] = set()
        self.releasing: set[str] = set()
        self.released: list[tuple[str, int, str]] = []

    def claimInFlight(self, controller: str) -> bool:
        return controller in self.inFlight

    def releaseInFlight(self, controller: str) -> bool:
        return controller in self.releasing

    def releaseRow(self, controller: str, epoch: int, reason: str) -> None:
        self.released.append((controller, epoch, reason))


class FakeListener:
    def __init__(self) -> None:
        self.subscribed: list[tuple[str, Callable[[str], object], Callable[[], object]]] = []

    def subscribe(self, channel: str, onNotification: Callable[[str], object],
                  onReconnected: Callable[[], object] = lambda: None) -> None:
        self.subscribed.append((channel, onNotification, onReconnected))


class ClusterBranchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = makeClock()
        self.config = makeConfig(cluster={"full_reconcile_interval": f"{FULL_EVERY:g}s"})
        self.context = makeContext(self.config, self.clock)
        self.registry = self.context.registry
        self.metrics = self.context.metrics
        self.store = FakeStore()
        self.ownership = FakeOwnership()
        self.listener = FakeListener()
        self.skew: float | None = None
        self.cluster = Cluster(
            self.clock, self.store, self.registry, self.ownership,  # type: ignore[arg-type]
            self.config.cluster, self.metrics, self.listener,  # type: ignore[arg-type]
            clockSkew=lambda: self.skew,
        )

    def live(self, controller: str) -> FakeController:
        fake = FakeController(self.context, self.config.listeners[0])
        fake.hello(controller)
        fake.received()
        return fake

    def epoch(self, fake: FakeController) -> int:
        assert fake.protocol.session is not None
        return fake.protocol.session.epoch

    def row(self, fake: FakeController, epoch: int | None = None, instance: str = INSTANCE,
            online: bool = True) -> SessionRow:
        session = fake.protocol.session
        assert session is not None
        return SessionRow(session.controller, session.epoch if epoch is None else epoch,
                          instance, online)

    def reconcile(self) -> tuple[int, int]:
        result: tuple[int, int] = self.successResultOf(Deferred.fromCoroutine(self.cluster.reconcile()))
        return result

    def bye(self, fake: FakeController) -> list[str]:
        return [f["reason"] for f in fake.received() if f["type"] == "bye"]

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    # --- lifecycle ---

    def test_subscribes(self) -> None:
        ((channel, onNote, onReconnect),) = self.listener.subscribed
        self.assertEqual(channel, takeoverChannel("s1"))
        self.assertEqual(channel, "s1_takeover")
        self.assertEqual(onNote, self.cluster.takeoverNotified)

    def test_registerAdmits(self) -> None:
        """
        Claims are admitted only once the instance is registered.
        """
        self.store.cleaned = 3
        self.successResultOf(Deferred.fromCoroutine(self.cluster.register()))
        self.assertTrue(self.ownership.admitting)
        self.assertTrue(self.cluster.registered)
        self.successResultOf(Deferred.fromCoroutine(self.cluster.unregister()))
        self.assertEqual(self.store.calls, ["register", "unregister"])

    def test_unregisterOnlyIfRegistered(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.cluster.unregister()))
        self.assertEqual(self.store.calls, [])

    def test_heartbeatReaps(self) -> None:
        self.store.reaped = 4
        self.successResultOf(Deferred.fromCoroutine(self.cluster.heartbeat()))
        self.assertEqual(self.store.calls, ["heartbeat", "reap"])
        self.assertEqual(self.value("ctrlgw_sessions_reaped_total"), 4)

    # --- reconciliation: dropping connections no longer ours ---

    def test_fullRoundReportsLocalSessions(self) -> None:
        """
        The first round is full: it reports every bound session with how long ago it was
        last heard.
        """
        a, b = self.live("a"), self.live("b")
        self.clock.advance(2.5)
        self.reconcile()
        self.assertEqual(self.store.reported, [[("a", self.epoch(a), 2.5), ("b", self.epoch(b), 2.5)]])
        self.assertEqual(self.value("ctrlgw_reconcile_rounds_total", kind="full"), 1)

    def test_incrementalThenFull(self) -> None:
        """
        After a full round, rounds read only what changed since the previous one started
        (less the overlap for late commits), until the next full round is due.
        """
        self.live("a")
        self.reconcile()
        self.store.now = 1010.0
        self.clock.advance(FULL_EVERY - 1)
        self.reconcile()
        self.assertEqual(self.store.changedSince, [1000.0 - (STATEMENT_TIMEOUT + 1.0)])
        self.store.now = 1020.0
        self.reconcile()
        self.assertEqual(self.store.changedSince[1], 1010.0 - (STATEMENT_TIMEOUT + 1.0))
        self.assertEqual(len(self.store.reported), 1)
        self.clock.advance(1)
        self.reconcile()
        self.assertEqual(len(self.store.reported), 2)
        self.assertEqual(self.value("ctrlgw_reconcile_rounds_total", kind="changed"), 2)
        self.assertEqual(self.value("ctrlgw_reconcile_rounds_total", kind="full"), 2)

    def test_currentRowKept(self) -> None:
        a = self.live("a")
        self.store.rows = [self.row(a)]
        self.assertEqual(self.reconcile(), (0, 0))
        self.assertEqual(self.bye(a), [])
        self.assertEqual(self.value("ctrlgw_reconcile_rows_total", kind="full"), 1)
        self.assertEqual(self.value("ctrlgw_sessions_owned"), 1)

    def test_newerEpochDrops(self) -> None:
        """
        A newer epoch of the controller, even ours and online, drops the connection (and
        the row, bound to nothing here, is released).
        """
        a = self.live("a")
        newer = self.epoch(a) + 1
        self.store.rows = [self.row(a, epoch=newer)]
        self.assertEqual(self.reconcile(), (1, 1))
        self.assertEqual(self.bye(a), ["takeover"])
        self.assertEqual(self.value("ctrlgw_reconcile_aborts_total"), 1)
        self.assertEqual(self.ownership.released, [("a", newer, "reconciled")])

    def test_otherInstanceDrops(self) -> None:
        a = self.live("a")
        self.store.rows = [self.row(a, instance="gw-there")]
        self.assertEqual(self.reconcile(), (1, 0))
        self.assertEqual(self.bye(a), ["takeover"])

    def test_offlineDrops(self) -> None:
        a = self.live("a")
        self.store.rows = [self.row(a, online=False)]
        self.assertEqual(self.reconcile(), (1, 0))
        self.assertEqual(self.bye(a), ["takeover"])

    def test_olderEpochNotJudged(self) -> None:
        """
        A row older than the bound session (claimed after the query's snapshot) says
        nothing: the connection stays, the row is not released.
        """
        a = self.live("a")
        self.live("a")  # Epoch 2 replaces epoch 1 here.
        b = self.context.registry.lookup("a")
        assert b is not None and b.session is not None
        self.store.rows = [SessionRow("a", b.session.epoch - 1, "gw-there", False)]
        self.assertEqual(self.reconcile(), (0, 0))
        self.assertEqual(self.value("ctrlgw_reconcile_aborts_total"), 0)
        self.assertEqual(a.protocol.session is not None, True)

    # --- reconciliation: releasing rows with no connection ---

    def test_unboundRowReleased(self) -> None:
        self.store.rows = [SessionRow("gone", 4, INSTANCE, True)]
        self.assertEqual(self.reconcile(), (0, 1))
        self.assertEqual(self.ownership.released, [("gone", 4, "reconciled")])
        self.assertEqual(self.value("ctrlgw_reconcile_releases_total"), 1)

    def test_claimInFlightNotReleased(self) -> None:
        """
        A row of a claim that has committed but is not yet bound to its connection is
        never released: that would fence a fresh session.
        """
        self.ownership.inFlight.add("fresh")
        self.store.rows = [SessionRow("fresh", 1, INSTANCE, True)]
        self.assertEqual(self.reconcile(), (0, 0))
        self.assertEqual(self.ownership.released, [])

    def test_releaseInFlightNotReleasedAgain(self) -> None:
        """
        A row whose own release is queued here is left to it: the history gets the real
        reason (peer_closed, takeover, ...), not "reconciled".
        """
        self.ownership.releasing.add("leaving")
        self.store.rows = [SessionRow("leaving", 1, INSTANCE, True),
                           SessionRow("stray", 2, INSTANCE, True)]
        self.assertEqual(self.reconcile(), (0, 1))
        self.assertEqual(self.ownership.released, [("stray", 2, "reconciled")])

    def test_othersRowsNotReleased(self) -> None:
        self.store.rows = [SessionRow("x", 1, "gw-there", True), SessionRow("y", 1, INSTANCE, False)]
        self.assertEqual(self.reconcile(), (0, 0))
        self.assertEqual(self.ownership.released, [])

    def test_boundSameEpochNotReleased(self) -> None:
        a = self.live("a")
        self.store.rows = [self.row(a)]
        self.reconcile()
        self.assertEqual(self.ownership.released, [])

    def test_everyRowJudged(self) -> None:
        """
        A row that says nothing does not stop the round: the rows after it are judged.
        """
        a, b = self.live("a"), self.live("b")
        self.ownership.inFlight.add("fresh")
        self.store.rows = [
            SessionRow("x", 1, "gw-there", True),  # not ours, no connection
            SessionRow("fresh", 1, INSTANCE, True),  # claim in flight
            self.row(b, epoch=self.epoch(b) - 1),  # older than what is bound
            self.row(b),  # bound, current
            self.row(a, epoch=self.epoch(a) + 1),  # newer: drop a, release the row
            SessionRow("gone", 4, INSTANCE, True),  # ours, unbound: release
        ]
        self.assertEqual(self.reconcile(), (1, 2))
        self.assertEqual(self.ownership.released,
                         [("a", self.epoch(a) + 1, "reconciled"), ("gone", 4, "reconciled")])

    def test_heardJustNow(self) -> None:
        a = self.live("a")
        self.reconcile()
        self.assertEqual(self.store.reported, [[("a", self.epoch(a), 0.0)]])

    def test_largeRoundInChunks(self) -> None:
        """
        A round of more rows than a chunk is judged in chunks, the reactor running between
        them; every chunk is judged.
        """
        self.assertLess(cluster._JUDGE_CHUNK, 2500)
        rows = [SessionRow(f"gone-{i}", 1, INSTANCE, True) for i in range(2500)]
        self.store.rows = rows
        d = Deferred.fromCoroutine(self.cluster.reconcile())
        self.assertNoResult(d)
        self.assertEqual(len(self.ownership.released), cluster._JUDGE_CHUNK)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), (0, 2500))
        self.assertEqual(self.value("ctrlgw_reconcile_rows_total", kind="full"), 2500)

    def test_reconnectedRunsRound(self) -> None:
        """
        After LISTEN reconnects (notifications may have been lost) a round runs.
        """
        self.listener.subscribed[0][2]()
        self.assertEqual(len(self.store.reported), 1)

    def test_failedRoundLogged(self) -> None:
        async def broken() -> float:
            raise RuntimeError("database gone")

        self.store.databaseTime = broken  # type: ignore[method-assign]
        self.listener.subscribed[0][2]()
        self.assertEqual(self.value("ctrlgw_reconcile_rounds_total", kind="full"), 0)

    # --- takeover notifications ---

    def note(self, controller: str, epoch: int, owner: str = "gw-there", claimedMs: float | None = None) -> str:
        if claimedMs is None:
            claimedMs = self.clock.seconds() * 1000 - 250
        return json.dumps({"c": controller, "e": epoch, "i": owner, "t": claimedMs})

    def test_takeoverDrops(self) -> None:
        a = self.live("a")
        self.cluster.takeoverNotified(self.note("a", self.epoch(a) + 1))
        self.assertEqual(self.bye(a), ["takeover"])
        self.assertEqual(self.value("ctrlgw_takeovers_total", scope="remote"), 1)
        self.assertEqual(self.value("ctrlgw_takeover_notifications_total"), 1)
        self.assertEqual(round(self.value("ctrlgw_takeover_convergence_seconds_sum"), 3), 0.25)

    def test_takeoverOwnClaim(self) -> None:
        a = self.live("a")
        self.skew = 0.1
        self.cluster.takeoverNotified(self.note("a", self.epoch(a) + 1, owner=INSTANCE))
        self.assertEqual(self.value("ctrlgw_takeovers_total", scope="local"), 1)
        self.assertEqual(round(self.value("ctrlgw_takeover_convergence_seconds_sum"), 3), 0.15)

    def test_takeoverFromTheFutureClamped(self) -> None:
        a = self.live("a")
        self.cluster.takeoverNotified(
            self.note("a", self.epoch(a) + 1, claimedMs=self.clock.seconds() * 1000 + 5000)
        )
        self.assertEqual(self.value("ctrlgw_takeover_convergence_seconds_sum"), 0.0)
        self.assertEqual(self.value("ctrlgw_takeover_convergence_seconds_count"), 1)

    def test_takeoverSameEpochKept(self) -> None:
        a = self.live("a")
        self.cluster.takeoverNotified(self.note("a", self.epoch(a)))
        self.assertEqual(self.bye(a), [])
        self.assertEqual(self.value("ctrlgw_takeover_notifications_total"), 1)

    def test_malformedNotification(self) -> None:
        a = self.live("a")
        for payload in ("{", json.dumps({"c": "a"}), json.dumps({"c": "a", "e": "x", "i": "", "t": 0}),
                        json.dumps([1])):
            self.cluster.takeoverNotified(payload)
        self.assertEqual(self.bye(a), [])
        self.assertEqual(self.value("ctrlgw_takeover_notifications_total"), 4)

