"""
The command outbox: backend commands delivered through the instance that owns the socket.

Applications insert commands into PostgreSQL (C{send()}); this instance claims the due
commands of the controllers it holds -- when a doorbell NOTIFY names them, when one
connects, when one answers, when a retry falls due, and on a poll as the fallback -- in
batched claims, and writes them.  Expiry is checked again at the moment of writing, with
the gateway clock, and a claimed command that cannot be written is reported back at once.
Acks and nacks are settled in batches and only for the session the command was sent on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlgw.batching import BatchWriter
from ctrlgw.config import OutboxConfig
from ctrlgw.framing import FramingError
from ctrlgw.interfaces import ICommandSettler, Session
from ctrlgw.metrics import Metrics
from ctrlgw.protocol.messages import COMMAND_ID, RawJSON
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.postgres import (
    EXPIRED_AT_WRITE,
    NOT_WRITTEN,
    TOO_LARGE,
    UNDELIVERABLE,
    ClaimedCommand,
    Store,
    rejectsRow,
)

log = Logger()

FINAL_STATES = ("acked", "nacked", "expired", "failed")

# Controllers one poll wakes at most; more wait for the next round.
_MAX_DUE = 10_000

# Claim rounds running at once (each on a pool connection of its own).
_ROUNDS = 2

# The share of wall time the poll's whole-backlog queries may take (the lost-NOTIFY look-up
# and the queue-depth gauge each read every unfinished command of this instance's
# controllers): past it, each waits longer than poll_interval before it runs again, so a
# backlog of 100,000 commands costs the server a few percent, not a core.
_POLL_SHARE = 0.05


class CostBudget:
    """
    Whether a periodic query whose cost grows with the data may run now: after taking
    C{seconds}, it waits at least C{seconds / share} before the next run.
    """

    def __init__(self, clock: IReactorTime, share: float) -> None:
        self.clock = clock
        self.share = share
        self._notBefore = 0.0

    def allows(self) -> bool:
        return self.clock.seconds() >= self._notBefore

    def spent(self, seconds: float) -> None:
        self._notBefore = self.clock.seconds() + seconds / self.share


def commandsChannel(schema: str) -> str:
    return f"{schema}_commands"


def resultsChannel(schema: str) -> str:
    return f"{schema}_results"


@implementer(ICommandSettler)
class Outbox:
    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        registry: ConnectionRegistry,
        config: OutboxConfig,
        metrics: Metrics,
        clockSkew: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.clockSkew = clockSkew
        self._woken: dict[str, str] = {}  # controller -> what woke it (for metrics)
        self._wakeAll: str | None = None
        self._round: IDelayedCall | None = None
        self._rounds = 0  # claim rounds running
        self._dueLookup = False  # a round is asking the database which controllers are due
        self._claimingFor: set[str] = set()  # controllers a running claim statement is for
        self._retries: dict[str, IDelayedCall] = {}
        # Commands written on each controller's current session and not yet answered: at
        # its in-flight limit, the controller's answer (or its retry timer) wakes it.
        self._unanswered: dict[str, set[str]] = {}
        # Controllers whose last claim left nothing pending behind what it sent, with
        # nothing since that could have queued more: their answers need no claim.
        self._drained: set[str] = set()
        self._dueBudget = CostBudget(clock, _POLL_SHARE)
        self._depthBudget = CostBudget(clock, _POLL_SHARE)
        self._stopped = False
        self._settlements: BatchWriter[tuple[str, str, int, bool, str, str | None]] = BatchWriter(
            clock, self._settleBatch, batchSize=500, interval=0.002, maxBuffered=100_000,
            name="command settlements", isolate=rejectsRow,
            onRejected=metrics.rowsRejected.labels("settlements").inc,
        )
        self._unsent: BatchWriter[tuple[str, int, int, str, str]] = BatchWriter(
            clock, store.unsendCommands,
            batchSize=500, interval=0.002, maxBuffered=100_000, name="unsent commands",
            isolate=rejectsRow, onRejected=metrics.rowsRejected.labels("unsent").inc,
        )

    # --- what wakes the outbox ---

    def wake(self, controllers: Iterable[str] | None, source: str) -> None:
        """
        Claim soon for C{controllers} (C{None}: for every controller held here that the
        database says has a command due -- one indexed query, not a sweep of the fleet).
        """
        if self._stopped:
            return
        if controllers is None:
            self._wakeAll = self._wakeAll or source
        else:
            for controller in controllers:
                if self.registry.lookup(controller) is not None:
                    self._woken.setdefault(controller, source)
        self._scheduleRound()

    def _scheduleRound(self) -> None:
        # Up to _ROUNDS rounds at once, so a doorbell does not wait behind a long round (a
        # poll's, a connect storm's); a controller already being claimed for waits for that
        # claim to end.
        if self._stopped or self._round is not None or self._rounds >= _ROUNDS:
            return
        if (self._wakeAll and not self._dueLookup) or any(
            controller not in self._claimingFor for controller in self._woken
        ):
            self._round = self.clock.callLater(0, self._startRound)

    def doorbell(self, payload: str) -> None:
        """
        A NOTIFY on the commands channel: the controllers that have new commands.
        """
        self.wake(None if payload == "*" else payload.split(","), "notify")

    def sessionStarted(self, session: Session) -> None:
        # What the last session was sent went back to pending when this one was claimed.
        self._unanswered.pop(session.controller, None)
        self._drained.discard(session.controller)
        self.wake([session.controller], "connect")

    def poll(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        # Sweep first: a command it finishes may be all that held up the next in line.
        finished = await self.store.sweepCommands(self.config.max_attempts, 1000)
        for state in finished:
            self.metrics.commandsFinished.labels(state).inc()
        if self._dueBudget.allows():
            self.wake(None, "poll")
        if self._depthBudget.allows():
            started = self.clock.seconds()
            depth = await self.store.queueDepth()
            self._depthBudget.spent(self.clock.seconds() - started)
            for state in ("pending", "sent"):
                self.metrics.commandQueue.labels(state).set(depth.get(state, 0))

    # --- claiming and writing ---

    def _startRound(self) -> None:
        self._round = None
        self._rounds += 1
        d = Deferred.fromCoroutine(self._claimRound())
        d.addErrback(lambda f: log.warn("claiming commands failed: {error}", error=f.getErrorMessage()))
        d.addBoth(self._roundDone)
        # What else is woken may go alongside.
        self._scheduleRound()

    def _roundDone(self, _: object) -> None:
        self._rounds -= 1
        self._scheduleRound()

    def _takeTargets(self) -> dict[int, list[tuple[Session, str]]]:
        """
        The live sessions to claim for, each with what woke it, by the number of commands
        their dialect allows in flight; clears the wake-ups.
        """
        pending, self._woken = self._woken, {}
        byLimit: dict[int, list[tuple[Session, str]]] = {}
        configured = self.config.max_inflight
        for controller, source in pending.items():
            if controller in self._claimingFor:
                self._woken[controller] = source  # after the claim running for it
                continue
            connection = self.registry.lookup(controller)
            # Not one that has stopped reading: whatever was claimed for it would only be
            # reported back.  Its resumeProducing wakes it.
            if (
                connection is not None and connection.live and connection.session is not None
                and not connection.writesPaused
            ):
                # A dialect may allow fewer than max_inflight (OCPP: one CALL at a time).
                limit = connection.maxInflight
                limit = configured if limit is None else min(limit, configured)
                # With as many written and unanswered, a claim would find nothing due: the
                # answer wakes it (or, unanswered, its retry timer).
                if len(self._unanswered.get(controller, ())) >= limit:
                    # Whatever woke it may have queued more: its answer claims.
                    self._drained.discard(controller)
                    continue
                byLimit.setdefault(limit, []).append((connection.session, source))
        return byLimit

    async def _claimRound(self) -> None:
        if self._wakeAll is not None and not self._dueLookup:
            source, self._wakeAll = self._wakeAll, None
            started = self.clock.seconds()
            self._dueLookup = True
            try:
                due = await self.store.dueControllers(self.config.max_attempts, _MAX_DUE)
            finally:
                self._dueLookup = False
            self._dueBudget.spent(self.clock.seconds() - started)
            # Past _MAX_DUE, the rest wait for the next poll.
            for controller in due:
                self._woken.setdefault(controller, source)
        # One claim per in-flight limit: at most one per dialect in a round.
        for limit, targets in self._takeTargets().items():
            await self._claimFor(targets, limit)

    async def _claimFor(self, targets: list[tuple[Session, str]], maxInflight: int) -> None:
        for start in range(0, len(targets), self.config.claim_batch):
            chunk = targets[start : start + self.config.claim_batch]
            started = self.clock.seconds()
            controllers = [session.controller for session, _ in chunk]
            self._claimingFor.update(controllers)
            try:
                claimed = await self.store.claimCommands(
                    [(session.controller, session.epoch) for session, _ in chunk],
                    maxInflight,
                    self.config.max_attempts,
                    self.config.ack_timeout,
                    self.config.backoff,
                )
            finally:
                self._claimingFor.difference_update(controllers)
                # Those woken while this claim ran may go now.
                self._scheduleRound()
            self.metrics.claimSeconds.observe(self.clock.seconds() - started)
            found = {command.controller for command in claimed}
            for session, source in chunk:
                result = "found" if session.controller in found else "empty"
                self.metrics.claims.labels(source, result).inc()
                if result == "empty":
                    # What woke it may be behind a command answered but not yet settled.
                    self._drained.discard(session.controller)
            for command in claimed:
                # In FIFO order: the last command of a controller says whether more wait.
                if command.more:
                    self._drained.discard(command.controller)
                else:
                    self._drained.add(command.controller)
            if len(self._drained) > 2 * len(self.registry) + 1000:
                # Mostly controllers long gone: forgetting only costs a claim each.
                self._drained.clear()
            for command in claimed:
                # Everything claimed is written or reported back, whatever one row does.
                try:
                    self._write(command)
                except Exception:
                    log.failure("writing command {id} failed", id=command.id)
                    self._report(command, UNDELIVERABLE)

    def _write(self, command: ClaimedCommand) -> None:
        connection = self.registry.lookup(command.controller)
        if (
            connection is None
            or connection.session is None
            or connection.session.epoch != command.epoch
            # Not reading what we write: back to pending, resent when it drains.
            or connection.writesPaused
        ):
            self._report(command, NOT_WRITTEN)
            return
        try:
            written = connection.deliver(command.id, RawJSON(command.body), command.expiresMs)
        except FramingError:
            self._report(command, TOO_LARGE)
            return
        except ValueError as e:
            self._report(command, UNDELIVERABLE, str(e))
            return
        if not written:
            expired = connection.live
            self._report(command, EXPIRED_AT_WRITE if expired else NOT_WRITTEN)
            return
        self._unanswered.setdefault(command.controller, set()).add(command.id)
        if command.attempts > 1:
            self.metrics.commandRetries.inc()
        self.metrics.enqueueToWritten.observe(max(0.0, self._databaseNow() - command.createdAt))
        # A retry falls due after this attempt's ack timeout: wake then.
        delay = self.config.ack_timeout * self.config.backoff ** (command.attempts - 1)
        self._scheduleRetry(command.controller, delay)

    def _report(self, command: ClaimedCommand, outcome: str, detail: str = "") -> None:
        d = self._unsent.add((command.id, command.epoch, command.claim, outcome, detail))
        if outcome == NOT_WRITTEN:
            # Back to pending once this commits.  A connection that resumed reading before
            # then was woken too early (its claim found the command still sent): again now.
            def requeued(_: object) -> None:
                connection = self.registry.lookup(command.controller)
                if connection is not None and connection.live and not connection.writesPaused:
                    self.wake([command.controller], "requeued")

            d.addCallback(requeued)
        else:
            # Once that is recorded, the command is finished: the next one in line may go.
            # (Waking before the report commits would claim against a head still 'sent'.)
            def finished(_: object) -> None:
                expired = outcome == EXPIRED_AT_WRITE and command.attempts == 1
                self.metrics.commandsFinished.labels("expired" if expired else "failed").inc()
                self.wake([command.controller], "settle")

            d.addCallback(finished)
        d.addErrback(
            lambda f: log.warn("could not report command {id}: {error}", id=command.id,
                               error=f.getErrorMessage())
        )

    def _scheduleRetry(self, controller: str, delay: float) -> None:
        if self._stopped:
            return
        existing = self._retries.get(controller)
        if existing is not None and existing.active():
            if existing.getTime() <= self.clock.seconds() + delay:
                return
            existing.cancel()

        def due() -> None:
            self._retries.pop(controller, None)
            # Unanswered past its ack timeout: the poll may wake it again (the claim this
            # wakes notes again whatever it sends).
            self._unanswered.pop(controller, None)
            self.wake([controller], "retry")

        # A little after the database's next_attempt_at, so the claim finds it due.
        self._retries[controller] = self.clock.callLater(delay + 0.01, due)

    def _databaseNow(self) -> float:
        skew = self.clockSkew() or 0.0
        return self.clock.seconds() - skew

    # --- answers from controllers ---

    def settle(
        self, session: Session, ref: str, ok: bool, reason: str, result: object = None
    ) -> None:
        if not COMMAND_ID.fullmatch(ref):
            log.debug("{controller} answered an unknown command {ref!r}",
                      controller=session.controller, ref=ref)
            return
        unanswered = self._unanswered.get(session.controller)
        if unanswered is not None:
            unanswered.discard(ref)
            if not unanswered:
                del self._unanswered[session.controller]
                # Nothing written is left to retry; what follows, if anything, is the
                # answer's to claim (_answered).
                retry = self._retries.pop(session.controller, None)
                if retry is not None and retry.active():
                    retry.cancel()
        resultJson = None if result is None else json.dumps(result)
        d = self._settlements.add((ref, session.controller, session.epoch, ok, reason, resultJson))
        d.addCallback(lambda _: self._answered(session.controller))
        d.addErrback(lambda f: log.warn("could not settle command {ref}: {error}", ref=ref,
                                        error=f.getErrorMessage()))

    def _answered(self, controller: str) -> None:
        # The next command in line may go, unless the last claim saw none behind.
        if controller in self._drained:
            self.metrics.claimsSkipped.inc()
            return
        self.wake([controller], "settle")

    async def _settleBatch(
        self, rows: Sequence[tuple[str, str, int, bool, str, str | None]]
    ) -> Sequence[object]:
        settled = await self.store.settleCommands(rows)
        now = self._databaseNow()
        for _, state, createdAt in settled:
            self.metrics.commandsFinished.labels(state).inc()
            if state == "acked":
                self.metrics.enqueueToAcked.observe(max(0.0, now - createdAt))
        return [None] * len(rows)

    # --- lifecycle ---

    def stop(self) -> Deferred[list[tuple[bool, None]]]:
        self._stopped = True
        if self._round is not None and self._round.active():
            self._round.cancel()
        self._round = None
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        return DeferredList([self._settlements.drain(), self._unsent.drain()])

    def abandon(self) -> None:
        """
        Give up what could not be written before shutdown: unsettled acks leave their
        commands sent (they are retried on the controller's next session), unreported
        claims likewise.
        """
        self._settlements.abandon()
        self._unsent.abandon()
