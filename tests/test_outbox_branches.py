"""
The branches of L{ctrlgw.outbox.Outbox}, on a L{Clock}, real connections over
L{StringTransport}s and a store fake that records each statement: what wakes a claim,
which sessions are claimed for, what becomes of a claimed command that cannot be written,
when a retry falls due, and what a settlement does.

These are the fast tests C{make mutate} runs against C{ctrlgw/outbox.py}; the same paths
against a real PostgreSQL are in C{test_outbox.py}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.outbox import CostBudget, Outbox, commandsChannel, resultsChannel
from ctrlgw.store.postgres import (
    EXPIRED_AT_WRITE,
    NOT_WRITTEN,
    TOO_LARGE,
    UNDELIVERABLE,
    ClaimedCommand,
)

from .helpers import FakeController, makeClock, makeConfig, makeContext, millis

COMMAND_ID = "00000000-0000-4000-8000-{:012d}"


class FakeStore:
    """
    The outbox's statements, recorded; each answers what the test queued for it.
    """

    def __init__(self) -> None:
        self.claims: list[list[tuple[str, int]]] = []
        self.claimArgs: list[tuple[int, int, float, float]] = []
        self.toClaim: list[list[ClaimedCommand]] = []
        self.unsent: list[tuple[str, int, int, str]] = []
        self.unsendResult: Deferred[None] | None = None
        self.settled: list[tuple[str, str, int, bool, str]] = []
        self.settleAnswer: list[tuple[str, str, float]] = []
        self.due: list[str] = []
        self.dueCalls: list[tuple[int, int]] = []
        self.sweeps: list[tuple[int, int]] = []
        self.swept: list[str] = []
        self.depth: dict[str, int] = {}
        self.beforeClaim: Callable[[], object] = lambda: None

    async def claimCommands(
        self, sessions: Sequence[tuple[str, int]], maxInflight: int, maxAttempts: int,
        ackTimeout: float, backoff: float,
    ) -> list[ClaimedCommand]:
        self.claims.append(list(sessions))
        self.beforeClaim()
        self.claimArgs.append((maxInflight, maxAttempts, ackTimeout, backoff))
        return self.toClaim.pop(0) if self.toClaim else []

    async def unsendCommands(self, rows: Sequence[tuple[str, int, int, str]]) -> list[object]:
        self.unsent.extend(rows)
        if self.unsendResult is not None:
            await self.unsendResult
        return [None] * len(rows)

    async def settleCommands(
        self, rows: Sequence[tuple[str, str, int, bool, str]]
    ) -> list[tuple[str, str, float]]:
        self.settled.extend(rows)
        answer, self.settleAnswer = self.settleAnswer, []
        return answer

    async def dueControllers(self, maxAttempts: int, limit: int) -> list[str]:
        self.dueCalls.append((maxAttempts, limit))
        return list(self.due)

    async def sweepCommands(self, maxAttempts: int, batch: int) -> list[str]:
        self.sweeps.append((maxAttempts, batch))
        return list(self.swept)

    async def queueDepth(self) -> dict[str, int]:
        return dict(self.depth)


class OutboxBranchTests(SynchronousTestCase):
    ACK_TIMEOUT = 2.0
    BACKOFF = 3.0

    def setUp(self) -> None:
        self.clock = makeClock()
        self.config = makeConfig(
            listener={"max_frame": "1024"},
            outbox={
                "ack_timeout": f"{self.ACK_TIMEOUT:g}s",
                "backoff": f"{self.BACKOFF:g}",
                "max_attempts": "5",
                "max_inflight": "2",
                "claim_batch": "2",
            },
        )
        self.context = makeContext(self.config, self.clock)
        self.metrics = self.context.metrics
        self.store = FakeStore()
        self.outbox = Outbox(
            self.clock, self.store, self.context.registry,  # type: ignore[arg-type]
            self.config.outbox, self.metrics, clockSkew=lambda: None,
        )

    def live(self, controller: str) -> FakeController:
        fake = FakeController(self.context, self.config.listeners[0])
        fake.hello(controller)
        return fake

    def epoch(self, fake: FakeController) -> int:
        assert fake.protocol.session is not None
        return fake.protocol.session.epoch

    def command(
        self, fake: FakeController, n: int = 1, body: Any = None, attempts: int = 1,
        ttl: float = 60.0, epoch: int | None = None,
    ) -> ClaimedCommand:
        session = fake.protocol.session
        assert session is not None
        return ClaimedCommand(
            id=COMMAND_ID.format(n),
            controller=session.controller,
            body=json.dumps({"op": "x"} if body is None else body),
            expiresMs=millis(self.clock) + int(ttl * 1000),
            attempts=attempts,
            epoch=session.epoch if epoch is None else epoch,
            createdAt=self.clock.seconds() - 1.0,
            claim=attempts,
        )

    def turn(self) -> None:
        """
        Let the claim round and the batched reports run.
        """
        for _ in range(5):
            self.clock.advance(0.005)

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def commands(self, fake: FakeController) -> list[dict[str, Any]]:
        return [f for f in fake.received() if f["type"] == "cmd"]

    # --- what wakes a claim, and for whom ---

    def test_channels(self) -> None:
        self.assertEqual(commandsChannel("s1"), "s1_commands")
        self.assertEqual(resultsChannel("s1"), "s1_results")

    def test_doorbellNamesControllers(self) -> None:
        """
        A doorbell listing controllers claims for those held here (live), and no others.
        """
        a, b = self.live("a"), self.live("b")
        self.live("c")
        self.outbox.doorbell("a,b,elsewhere")
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a)), ("b", self.epoch(b))]])
        self.assertEqual(self.store.dueCalls, [])
        self.assertEqual(self.store.claimArgs, [(2, 5, self.ACK_TIMEOUT, self.BACKOFF)])

    def test_doorbellStar(self) -> None:
        """
        The C{'*'} doorbell (a list too long for one NOTIFY) asks the database which
        controllers held here have commands due, and claims for those.
        """
        a = self.live("a")
        self.live("b")
        self.store.due = ["a", "gone"]
        self.outbox.doorbell("*")
        self.turn()
        self.assertEqual(self.store.dueCalls, [(5, 10_000)])
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="notify", result="empty"), 1)

    def test_nothingHeldNoClaim(self) -> None:
        self.outbox.doorbell("nobody")
        self.turn()
        self.assertEqual(self.store.claims, [])

    def test_notLiveNotClaimed(self) -> None:
        """
        A connection that is closing is not claimed for.
        """
        a = self.live("a")
        self.outbox.wake(["a"], "notify")
        a.protocol.close("shutdown")
        self.turn()
        self.assertEqual(self.store.claims, [])

    def test_claimBatch(self) -> None:
        """
        Sessions are claimed C{claim_batch} at a time, and each claim is counted as
        found or empty for what woke it.
        """
        fakes = [self.live(c) for c in ("a", "b", "c")]
        self.store.toClaim = [[self.command(fakes[1])], []]
        self.outbox.wake(["a", "b", "c"], "connect")
        self.turn()
        self.assertEqual([len(c) for c in self.store.claims], [2, 1])
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="connect", result="found"), 1)
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="connect", result="empty"), 2)
        self.assertEqual(len(self.commands(fakes[1])), 1)

    def test_roundsAlongsideALongOne(self) -> None:
        """
        A doorbell does not wait behind a long claim: up to two rounds run at once.  A
        controller being claimed for waits for that claim to end; a third round waits for
        one of the two.
        """
        for c in ("a", "b", "c"):
            self.live(c)
        aGate: Deferred[list[ClaimedCommand]] = Deferred()
        bGate: Deferred[list[ClaimedCommand]] = Deferred()
        gates = {"a": aGate, "b": bGate}
        calls: list[list[str]] = []

        def claim(sessions: Sequence[tuple[str, int]], *args: object) -> Deferred[list[ClaimedCommand]]:
            names = [c for c, _ in sessions]
            calls.append(names)
            gate = gates.pop(names[0], None)
            return gate if gate is not None else succeed([])

        self.store.claimCommands = claim  # type: ignore[assignment]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.outbox.wake(["b"], "notify")
        self.turn()
        self.outbox.wake(["a", "c"], "notify")
        self.turn()
        self.assertEqual(calls, [["a"], ["b"]])
        # b's claim ends: a is still being claimed for, so c goes alone.
        bGate.callback([])
        self.turn()
        self.assertEqual(calls, [["a"], ["b"], ["c"]])
        # a's claim ends: a again.
        aGate.callback([])
        self.turn()
        self.assertEqual(calls, [["a"], ["b"], ["c"], ["a"]])

    def test_sessionStarted(self) -> None:
        a = self.live("a")
        assert a.protocol.session is not None
        self.outbox.sessionStarted(a.protocol.session)
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])

    # --- writing what was claimed ---

    def test_written(self) -> None:
        a = self.live("a")
        command = self.command(a, body={"op": "reboot", "n": 1})
        self.store.toClaim = [[command]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        (frame,) = self.commands(a)
        self.assertEqual(
            (frame["id"], frame["expires"], frame["body"]),
            (command.id, command.expiresMs, {"op": "reboot", "n": 1}),
        )
        self.assertEqual(self.store.unsent, [])
        self.assertEqual(self.value("ctrlgw_command_retries_total"), 0)
        self.assertEqual(self.value("ctrlgw_command_claim_seconds_count"), 1)
        self.assertEqual(self.value("ctrlgw_command_claim_seconds_sum"), 0.0)

    def test_enqueueToWritten(self) -> None:
        """
        From the command's creation (database clock: the gateway's less its skew) to its
        write; a second attempt counts as a retry.
        """
        a = self.live("a")
        self.outbox.clockSkew = lambda: 0.1
        command = self.command(a, attempts=2)
        self.store.toClaim = [[dataclasses.replace(command, createdAt=self.clock.seconds() - 0.35)]]
        self.outbox.wake(["a"], "notify")
        self.clock.advance(0)
        self.assertEqual(len(self.commands(a)), 1)
        self.assertEqual(self.value("ctrlgw_command_retries_total"), 1)
        self.assertEqual(round(self.value("ctrlgw_command_enqueue_to_written_seconds_sum"), 6), 0.25)

    def test_writesPausedNotClaimedFor(self) -> None:
        """
        A connection whose transport buffer is full is not claimed for at all (whatever
        was claimed would only be reported back); once it reads again, it is.
        """
        a = self.live("a")
        a.received()
        a.protocol.pauseProducing()
        self.assertTrue(a.protocol.writesPaused)
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual(self.store.claims, [])
        a.protocol.resumeProducing()
        self.outbox.wake(["a"], "connect")
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])

    def test_writesPausedNotWritten(self) -> None:
        """
        A connection whose transport buffer fills while its claim is in flight is not
        written to: the command goes back to pending (not_written), it is neither expired
        nor failed, and nothing is woken for it until the connection drains.
        """
        a = self.live("a")
        a.received()
        self.store.beforeClaim = a.protocol.pauseProducing
        self.store.toClaim = [[self.command(a)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertTrue(a.protocol.writesPaused)
        self.assertEqual(self.commands(a), [])
        self.assertEqual(self.store.unsent,
                         [(COMMAND_ID.format(1), self.epoch(a), 1, NOT_WRITTEN, "")])
        self.assertEqual(len(self.store.claims), 1)
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="expired"), 0)
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="failed"), 0)

    def test_otherEpochNotWritten(self) -> None:
        """
        A command claimed for an earlier session of the controller is not written on
        the current one.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, epoch=self.epoch(a) - 1)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual(self.commands(a), [])
        self.assertEqual([u[3] for u in self.store.unsent], [NOT_WRITTEN])

    def test_goneNotWritten(self) -> None:
        """
        A connection that goes away while its claim runs: the command goes back to
        pending, as not written.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a)]]
        self.store.beforeClaim = a.lose
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertIsNone(self.context.registry.lookup("a"))
        self.assertEqual([u[3] for u in self.store.unsent], [NOT_WRITTEN])

    def test_tooLarge(self) -> None:
        """
        A command that does not fit in one frame of the listener is finished as
        too_large, the next in line woken once that is recorded.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, body={"blob": "x" * 2000})]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual(self.commands(a), [])
        self.assertEqual([u[3] for u in self.store.unsent], [TOO_LARGE])
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="failed"), 1)
        self.assertEqual(len(self.store.claims), 2)

    def test_expiredAtWriteFirstAttempt(self) -> None:
        """
        A command whose ttl passes between the claim and the write is not written, and
        on its first attempt it is finished as expired.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, ttl=0.0)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual(self.commands(a), [])
        self.assertEqual([u[3] for u in self.store.unsent], [EXPIRED_AT_WRITE])
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="expired"), 1)
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="failed"), 0)
        self.assertEqual(self.value("ctrlgw_commands_expired_at_write_total"), 1)

    def test_expiredAtWriteLaterAttempt(self) -> None:
        """
        Sent before and expired at a resend: failed, not expired (it may have run).
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, ttl=0.0, attempts=2)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual([u[3] for u in self.store.unsent], [EXPIRED_AT_WRITE])
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="failed"), 1)
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="expired"), 0)

    def test_reportWakesOnlyOnceRecorded(self) -> None:
        """
        The next command in line is claimed only after the report of an unwritten one
        has committed: before, the head would still read as sent.
        """
        a = self.live("a")
        self.store.unsendResult = Deferred()
        self.store.toClaim = [[self.command(a, ttl=0.0)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.assertEqual(len(self.store.claims), 1)
        self.store.unsendResult.callback(None)
        self.turn()
        self.assertEqual(len(self.store.claims), 2)
        self.assertEqual(
            self.value("ctrlgw_command_claims_total", source="settle", result="empty"), 1
        )

    def test_notWrittenWakesOnceRequeuedIfReadingAgain(self) -> None:
        """
        A command claimed while the connection stopped reading is reported not written;
        once that report commits (the command is pending again), a connection reading
        again by then is claimed for at once, not at the next poll.
        """
        a = self.live("a")
        a.received()
        self.store.unsendResult = Deferred()
        self.store.beforeClaim = a.protocol.pauseProducing
        self.store.toClaim = [[self.command(a)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.store.beforeClaim = lambda: None
        a.protocol.resumeProducing()
        self.assertEqual(len(self.store.claims), 1, "nothing before the report commits")
        self.store.unsendResult.callback(None)
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]] * 2)
        self.assertEqual(
            self.value("ctrlgw_command_claims_total", source="requeued", result="empty"), 1
        )

    def test_notWrittenStillPausedWaits(self) -> None:
        """
        If it still does not read when the report commits, nothing is claimed: its resume
        will wake it.
        """
        a = self.live("a")
        a.received()
        self.store.unsendResult = Deferred()
        self.store.beforeClaim = a.protocol.pauseProducing
        self.store.toClaim = [[self.command(a)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.store.unsendResult.callback(None)
        self.turn()
        self.assertEqual(len(self.store.claims), 1)

    def test_notWrittenGoneWaits(self) -> None:
        """
        Nor for a connection that has gone.
        """
        a = self.live("a")
        a.received()
        self.store.unsendResult = Deferred()
        self.store.beforeClaim = a.protocol.pauseProducing
        self.store.toClaim = [[self.command(a)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        a.protocol.resumeProducing()
        a.lose()
        self.store.unsendResult.callback(None)
        self.turn()
        self.assertEqual(len(self.store.claims), 1)

    def test_dialectInflightLimit(self) -> None:
        """
        A connection whose dialect allows fewer commands in flight than max_inflight (OCPP:
        one) is claimed for with its own limit, in a claim of its own; the others with
        max_inflight.
        """
        a, b = self.live("a"), self.live("b")
        a.protocol.maxInflight = 1
        b.protocol.maxInflight = 5  # more than max_inflight allows: max_inflight wins
        self.outbox.wake(["a", "b"], "notify")
        self.turn()
        byLimit = sorted(
            (args[0], claim) for args, claim in zip(self.store.claimArgs, self.store.claims,
                                                    strict=True)
        )
        self.assertEqual(byLimit, [(1, [("a", self.epoch(a))]), (2, [("b", self.epoch(b))])])

    def test_writeErrorUndeliverable(self) -> None:
        """
        A write that fails for any other reason reports the command undeliverable, and
        the rest of the claim is still written.
        """
        a, b = self.live("a"), self.live("b")
        self.store.toClaim = [[self.command(a, 1), self.command(b, 2)]]

        def broken(*args: object) -> bool:
            raise RuntimeError("boom")

        a.protocol.deliver = broken  # type: ignore[method-assign]
        self.outbox.wake(["a", "b"], "notify")
        self.turn()
        self.assertEqual(self.store.unsent,
                         [(COMMAND_ID.format(1), self.epoch(a), 1, UNDELIVERABLE, "")])
        self.assertEqual([c["id"] for c in self.commands(b)], [COMMAND_ID.format(2)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    # --- retries ---

    def claimsAt(self, *offsets: float) -> list[int]:
        """
        How many claims had been made at each of C{offsets} seconds from now.
        """
        start = self.clock.seconds()
        counts = []
        for offset in offsets:
            self.clock.advance(start + offset - self.clock.seconds())
            self.clock.advance(0)
            counts.append(len(self.store.claims))
        return counts

    def test_retryAfterAckTimeout(self) -> None:
        """
        After the first send, the controller is claimed for again once ack_timeout has
        passed (a little after, so the database finds it due).
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, attempts=1)]]
        self.outbox.wake(["a"], "notify")
        self.clock.advance(0)
        self.assertEqual(self.claimsAt(self.ACK_TIMEOUT, self.ACK_TIMEOUT + 0.02), [1, 2])
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="retry", result="empty"), 1)

    def test_retryBackoff(self) -> None:
        """
        After the n-th send the wait is ack_timeout * backoff^(n-1).
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, attempts=3)]]
        self.outbox.wake(["a"], "notify")
        self.clock.advance(0)
        wait = self.ACK_TIMEOUT * self.BACKOFF**2
        self.assertEqual(self.claimsAt(wait - 0.5, wait + 0.02), [1, 2])
        self.assertEqual(self.value("ctrlgw_command_retries_total"), 1)

    def test_retryEarliestWins(self) -> None:
        """
        Of two retries due for one controller, the earlier is kept: a later one does
        not push it back, an earlier one replaces it.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a, 1, attempts=2)], [self.command(a, 2, attempts=1)]]
        self.outbox.wake(["a"], "notify")  # Retry in 6 s.
        self.clock.advance(0)
        self.outbox.wake(["a"], "notify")  # Retry in 2 s: replaces it.
        self.clock.advance(0)
        self.store.toClaim = [[self.command(a, 3, attempts=2)]]
        self.assertEqual(self.claimsAt(self.ACK_TIMEOUT + 0.02), [3])
        # The claim at 2 s wrote a command due again in 6 s; nothing else is due before.
        self.assertEqual(self.claimsAt(5.9, 6.05), [3, 4])

    def test_laterRetryKeepsEarlier(self) -> None:
        a = self.live("a")
        self.store.toClaim = [[self.command(a, 1, attempts=1)], [self.command(a, 2, attempts=2)]]
        self.outbox.wake(["a"], "notify")  # Retry in 2 s.
        self.clock.advance(0)
        self.outbox.wake(["a"], "notify")  # Retry in 6 s: the one in 2 s stays.
        self.clock.advance(0)
        self.assertEqual(self.claimsAt(self.ACK_TIMEOUT - 0.01, self.ACK_TIMEOUT + 0.02), [2, 3])

    # --- answers ---

    def test_settleUnknownRef(self) -> None:
        a = self.live("a")
        assert a.protocol.session is not None
        self.outbox.settle(a.protocol.session, "not-a-command-id", True, "")
        self.turn()
        self.assertEqual(self.store.settled, [])

    def test_settle(self) -> None:
        """
        An ack is settled for the session it came on, then the controller is claimed
        for (the next command in line may go); an acked one is timed from its creation.
        """
        a = self.live("a")
        session = a.protocol.session
        assert session is not None
        ref = COMMAND_ID.format(7)
        self.store.settleAnswer = [(ref, "acked", self.clock.seconds() - 0.5)]
        self.outbox.settle(session, ref, True, "done")
        self.turn()
        self.assertEqual(self.store.settled, [(ref, "a", session.epoch, True, "done", None)])
        self.assertEqual(self.store.claims, [[("a", session.epoch)]])
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="acked"), 1)
        self.assertEqual(self.value("ctrlgw_command_enqueue_to_acked_seconds_count"), 1)
        self.assertEqual(round(self.value("ctrlgw_command_enqueue_to_acked_seconds_sum"), 1), 0.5)

    def test_settleNacked(self) -> None:
        a = self.live("a")
        session = a.protocol.session
        assert session is not None
        ref = COMMAND_ID.format(8)
        self.store.settleAnswer = [(ref, "nacked", self.clock.seconds())]
        self.outbox.settle(session, ref, False, "no")
        self.turn()
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="nacked"), 1)
        self.assertEqual(self.value("ctrlgw_command_enqueue_to_acked_seconds_count"), 0)

    # --- the poll and the lifecycle ---

    def test_poll(self) -> None:
        """
        A poll sweeps first, then claims for every controller held here with a command
        due, and sets the queue gauges.
        """
        a = self.live("a")
        self.store.swept = ["expired", "failed", "expired"]
        self.store.due = ["a"]
        self.store.depth = {"pending": 4}
        self.outbox.poll()
        self.turn()
        self.assertEqual(self.store.sweeps, [(5, 1000)])
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="expired"), 2)
        self.assertEqual(self.value("ctrlgw_commands_finished_total", state="failed"), 1)
        self.assertEqual(self.value("ctrlgw_command_queue", state="pending"), 4)
        self.assertEqual(self.value("ctrlgw_command_queue", state="sent"), 0)
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="poll", result="empty"), 1)

    def test_atItsInflightLimitNotClaimedFor(self) -> None:
        """
        A controller with as many commands written and unanswered as it may have in
        flight (2 here) is not claimed for, whatever wakes it (a claim would find nothing
        due); it is again once it answered one, or once its ack timeout passed.
        """
        a, b = self.live("a"), self.live("b")
        assert a.protocol.session is not None
        self.store.toClaim = [[self.command(a, 1), self.command(a, 2), self.command(b, 3)]]
        self.outbox.wake(["a", "b"], "notify")
        self.turn()
        self.store.due = ["a", "b"]
        self.store.claims.clear()
        self.outbox.poll()
        self.turn()
        self.outbox.doorbell("a,b")
        self.turn()
        self.assertEqual(self.store.claims, [[("b", self.epoch(b))], [("b", self.epoch(b))]])
        self.store.claims.clear()
        self.outbox.settle(a.protocol.session, COMMAND_ID.format(1), True, "")
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])
        self.outbox.doorbell("a")
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]] * 2)
        self.store.toClaim = [[self.command(a, 4)]]
        self.outbox.doorbell("a")
        self.turn()
        self.store.claims.clear()
        self.outbox.doorbell("a")
        self.turn()
        self.assertEqual(self.store.claims, [])
        # Unanswered past the ack timeout: the retry timer claims, and so may anything else.
        self.clock.advance(self.ACK_TIMEOUT + 0.02)
        self.assertIn(("a", self.epoch(a)), [s for claim in self.store.claims for s in claim])
        self.store.claims.clear()
        self.outbox.doorbell("a")
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(a))]])

    def test_answeredNoRetry(self) -> None:
        """
        Once everything written to a controller is answered, its retry timer is gone: no
        claim at the ack timeout.
        """
        a = self.live("a")
        assert a.protocol.session is not None
        self.store.toClaim = [[self.command(a, 1)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.outbox.settle(a.protocol.session, COMMAND_ID.format(1), True, "")
        self.turn()
        self.assertEqual(len(self.store.claims), 2)  # the answer's own wake
        self.clock.advance(self.ACK_TIMEOUT * 2)
        self.assertEqual(len(self.store.claims), 2)
        self.assertEqual(self.value("ctrlgw_command_claims_total", source="retry", result="empty"), 0)

    def test_answerClaimsOnlyIfMoreMayWait(self) -> None:
        """
        An answer claims for what follows unless the claim that sent the command saw no
        pending command behind it and nothing woke the controller since; a wake skipped
        while the controller was at its in-flight limit means more may wait.
        """
        a = self.live("a")
        session = a.protocol.session
        assert session is not None
        self.store.toClaim = [[dataclasses.replace(self.command(a, 1), more=False)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.outbox.settle(session, COMMAND_ID.format(1), True, "")
        self.turn()
        self.assertEqual(len(self.store.claims), 1)
        self.assertEqual(self.value("ctrlgw_command_claims_skipped_total"), 1)
        # Two written (the limit), the last with nothing behind; a doorbell meanwhile.
        self.store.toClaim = [[self.command(a, 2), dataclasses.replace(self.command(a, 3), more=False)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        self.outbox.doorbell("a")
        self.turn()
        self.assertEqual(len(self.store.claims), 2)
        self.outbox.settle(session, COMMAND_ID.format(2), True, "")
        self.turn()
        self.assertEqual(len(self.store.claims), 3)
        # More behind, as the claim said: the answer claims.
        self.store.toClaim = [[self.command(a, 4)]]
        self.outbox.settle(session, COMMAND_ID.format(3), True, "")
        self.turn()
        self.assertEqual(len(self.store.claims), 4)

    def test_anEmptyClaimMeansMoreMayWait(self) -> None:
        """
        A doorbell between an answer and its settlement claims nothing (the head is still
        sent): then the settlement claims, although the claim that sent it saw nothing
        behind.
        """
        b = self.live("b")
        session = b.protocol.session
        assert session is not None
        self.store.toClaim = [[dataclasses.replace(self.command(b, 10), more=False)]]
        self.outbox.wake(["b"], "notify")
        self.turn()
        self.outbox.settle(session, COMMAND_ID.format(10), True, "")
        self.outbox.doorbell("b")
        self.turn()
        self.assertEqual([s for s, _ in self.claimSources()], ["notify", "notify", "settle"])

    def claimSources(self) -> list[tuple[str, str]]:
        return [(source, result) for source in ("notify", "settle", "poll", "retry", "connect")
                for result in ("found", "empty")
                for _ in range(int(self.value("ctrlgw_command_claims_total", source=source, result=result)))]

    def test_newSessionForgetsWhatTheOldOneAwaited(self) -> None:
        a = self.live("a")
        self.store.toClaim = [[self.command(a, 1), self.command(a, 2)]]
        self.outbox.wake(["a"], "notify")
        self.turn()
        again = self.live("a")
        assert again.protocol.session is not None
        self.outbox.sessionStarted(again.protocol.session)
        self.turn()
        self.store.due = ["a"]
        self.store.claims.clear()
        self.outbox.poll()
        self.turn()
        self.assertEqual(self.store.claims, [[("a", self.epoch(again))]])

    def test_pollQueriesKeepToTheirShareOfTime(self) -> None:
        """
        The poll's look-ups over the whole backlog (due controllers, queue depth) wait
        their own duration divided by their share of time before they run again; the sweep
        runs on every poll.
        """
        self.live("a")
        self.store.due = ["a"]
        slow = self.store.dueControllers

        async def dueControllers(maxAttempts: int, limit: int) -> list[str]:
            self.clock.advance(0.1)
            return await slow(maxAttempts, limit)

        self.store.dueControllers = dueControllers  # type: ignore[assignment]
        self.outbox.poll()
        self.turn()
        self.assertEqual(len(self.store.dueCalls), 1)
        self.clock.advance(1.0)
        self.outbox.poll()
        self.turn()
        self.assertEqual((len(self.store.dueCalls), len(self.store.sweeps)), (1, 2))
        self.clock.advance(0.1 / 0.05)
        self.outbox.poll()
        self.turn()
        self.assertEqual((len(self.store.dueCalls), len(self.store.sweeps)), (2, 3))

    def test_costBudget(self) -> None:
        budget = CostBudget(self.clock, 0.25)
        self.assertTrue(budget.allows())
        budget.spent(0.5)
        self.clock.advance(1.99)
        self.assertFalse(budget.allows())
        self.clock.advance(0.01)
        self.assertTrue(budget.allows())

    def test_stopIdle(self) -> None:
        self.assertEqual(self.successResultOf(self.outbox.stop()), [(True, None), (True, None)])

    def test_stop(self) -> None:
        """
        Once stopped, nothing wakes a claim: not a doorbell, not a retry already due.
        """
        a = self.live("a")
        self.store.toClaim = [[self.command(a)]]
        self.outbox.wake(["a"], "notify")
        self.clock.advance(0)
        self.outbox.wake(["a"], "notify")  # A round scheduled, not started.
        done = self.outbox.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [c for c in self.clock.getDelayedCalls()
                                                        if c.func.__name__ != "due"])
        self.outbox.doorbell("a")
        self.clock.advance(60)
        self.assertEqual(len(self.store.claims), 1)
        self.assertEqual(self.successResultOf(done), [(True, None), (True, None)])
