"""
Each CASE arm and WHERE guard of the outbox's claim, settle and unsend statements and the
inbox's fence (C{ctrlgw/store/postgres.py}), of C{claim_session} (migration 0005), of the requeue trigger
and of the two C{'*'} doorbells (migrations 0003 and 0006), against a real PostgreSQL: each
test fails when the arm or guard it names is taken out.  C{make mutate} checks that, with
the SQL mutants listed in C{tests/mutate.py} (C{SQL_MUTANTS}).

The guards that only a concurrent transaction can reach (the claim's re-check under
C{FOR KEY SHARE} / C{FOR UPDATE}) are the race tests' (C{test_store_races.py}).
"""

from __future__ import annotations

import json
import select
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from ctrlgw.interfaces import Fenced
from ctrlgw.store.postgres import (
    DUPLICATE,
    EXPIRED_AT_WRITE,
    NOT_WRITTEN,
    STORED,
    TOO_LARGE,
    UNDELIVERABLE,
    ClaimedCommand,
    ClaimPolicy,
    InboxRow,
    Store,
)
from tests.pg import PostgresTestCase
from tests.test_outbox_order import waitingOnLock

INSTANCE = "gw-a"
ACK_TIMEOUT = 10.0
BACKOFF = 3.0
MAX_ATTEMPTS = 3


def listen(dsn: str, channel: str) -> psycopg2.extensions.connection:
    """
    A connection of its own (blocking: call it in a thread) listening on C{channel}.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f'LISTEN "{channel}"')
    return conn


def payloads(conn: psycopg2.extensions.connection) -> list[str]:
    """
    The notifications that came, waiting up to 5 s for the first (blocking: call it in a
    thread).
    """
    if not conn.notifies:
        select.select([conn], [], [], 5.0)
    conn.poll()
    found = [n.payload for n in conn.notifies]
    conn.notifies.clear()
    return found


class OutboxGuardTests(PostgresTestCase):
    timeout = 60

    async def start(self, *controllers: str) -> dict[str, int]:
        """
        Register this instance and claim a session of each controller; their epochs.
        """
        self.store = Store(self.db, INSTANCE)
        await self.store.registerInstance("h", 1)
        return {c: (await self.store.claimSession(c, "main", "10.0.0.1:1")).epoch for c in controllers}

    async def send(self, controller: str, ttl: float = 60.0) -> str:
        return await self.store.sendCommand(controller, {"op": controller}, ttl)

    async def claim(self, sessions: dict[str, int], maxInflight: int = 1) -> list[ClaimedCommand]:
        return await self.store.claimCommands(
            list(sessions.items()), maxInflight, MAX_ATTEMPTS, ACK_TIMEOUT, BACKOFF
        )

    async def row(self, command: str) -> dict[str, Any]:
        ((state, attempts, finished, sentEpoch, detail, claims, retryIn),) = await self.db.runQuery(
            "test",
            "SELECT state, attempts, finished_at IS NOT NULL, sent_epoch, detail, claims,"
            " extract(epoch FROM next_attempt_at - sent_at)::float8"
            " FROM commands WHERE id = %s",
            (command,),
        )
        return {"state": state, "attempts": attempts, "finished": finished, "sentEpoch": sentEpoch,
                "detail": detail, "claims": claims, "retryIn": retryIn}

    async def makeDue(self, command: str) -> None:
        await self.db.runOperation(
            "test", "UPDATE commands SET next_attempt_at = now() - interval '1 second' WHERE id = %s",
            (command,),
        )

    # --- the claim ---

    async def test_claimOnlyCurrentOwnedOnlineSessions(self) -> None:
        """
        Only for a session that is the controller's current one (epoch), online, and
        this instance's.
        """
        epochs = await self.start("cur", "stale", "off", "theirs")
        for c in epochs:
            await self.send(c)
        await self.db.runOperation("test", "UPDATE sessions SET online = false WHERE controller_id = 'off'")
        await self.db.runOperation(
            "test", "UPDATE sessions SET instance_id = 'gw-b' WHERE controller_id = 'theirs'"
        )
        claimed = await self.claim({"cur": epochs["cur"], "stale": epochs["stale"] - 1,
                                    "off": epochs["off"], "theirs": epochs["theirs"]})
        self.assertEqual([c.controller for c in claimed], ["cur"])

    async def test_claimHeadIsUnfinishedFifo(self) -> None:
        """
        max_inflight counts a controller's first unfinished commands in FIFO order: a
        finished one no longer holds a place, the next in line goes.
        """
        epochs = await self.start("a")
        first, second = await self.send("a"), await self.send("a")
        (claimed,) = await self.claim(epochs)
        self.assertEqual(claimed.id, first)
        self.assertEqual(await self.claim(epochs), [])  # first is in flight: max_inflight 1
        await self.store.settleCommands([(first, "a", epochs["a"], True, "")])
        (claimed,) = await self.claim(epochs)
        self.assertEqual(claimed.id, second)

    async def test_claimInFifoOrder(self) -> None:
        epochs = await self.start("a")
        ids = [await self.send("a") for _ in range(3)]
        claimed = await self.claim(epochs, maxInflight=3)
        self.assertEqual([c.id for c in claimed], ids)

    async def test_claimNotAfterMaxAttempts(self) -> None:
        epochs = await self.start("a")
        command = await self.send("a")
        await self.db.runOperation(
            "test", "UPDATE commands SET attempts = %s WHERE id = %s", (MAX_ATTEMPTS, command)
        )
        self.assertEqual(await self.claim(epochs), [])
        await self.db.runOperation(
            "test", "UPDATE commands SET attempts = %s WHERE id = %s", (MAX_ATTEMPTS - 1, command)
        )
        self.assertEqual([c.id for c in await self.claim(epochs)], [command])

    async def test_claimNotExpired(self) -> None:
        epochs = await self.start("a")
        command = await self.send("a")
        await self.db.runOperation(
            "test", "UPDATE commands SET expires_at = now() - interval '1 second' WHERE id = %s", (command,)
        )
        self.assertEqual(await self.claim(epochs), [])

    async def test_claimSentOnlyWhenRetryDue(self) -> None:
        """
        A sent command is claimed again only once its retry is due, and then with the
        wait for its next ack grown by backoff.
        """
        epochs = await self.start("a")
        command = await self.send("a")
        (claimed,) = await self.claim(epochs)
        self.assertEqual((claimed.attempts, claimed.claim), (1, 1))
        row = await self.row(command)
        self.assertEqual((row["state"], row["sentEpoch"]), ("sent", epochs["a"]))
        self.assertAlmostEqual(row["retryIn"], ACK_TIMEOUT, places=3)
        self.assertEqual(await self.claim(epochs), [])
        await self.makeDue(command)
        (claimed,) = await self.claim(epochs)
        self.assertEqual((claimed.attempts, claimed.claim), (2, 2))
        self.assertAlmostEqual((await self.row(command))["retryIn"], ACK_TIMEOUT * BACKOFF, places=3)

    # --- settling acks and nacks ---

    async def sentCommand(self) -> tuple[dict[str, int], str]:
        epochs = await self.start("a", "b")
        command = await self.send("a")
        await self.claim(epochs)
        return epochs, command

    async def test_settleAckAndNack(self) -> None:
        epochs = await self.start("a", "b")
        ack, nack = await self.send("a"), await self.send("b")
        await self.claim(epochs)
        settled = await self.store.settleCommands(
            [(ack, "a", epochs["a"], True, "done"), (nack, "b", epochs["b"], False, "refused")]
        )
        self.assertEqual(sorted((i, s) for i, s, _ in settled), sorted([(ack, "acked"), (nack, "nacked")]))
        self.assertEqual(((await self.row(ack))["state"], (await self.row(nack))["detail"]),
                         ("acked", "refused"))

    async def test_settleOnlyForItsController(self) -> None:
        epochs, command = await self.sentCommand()
        self.assertEqual(await self.store.settleCommands([(command, "b", epochs["a"], True, "")]), [])
        self.assertEqual((await self.row(command))["state"], "sent")

    async def test_settleOnlyForItsSession(self) -> None:
        epochs, command = await self.sentCommand()
        self.assertEqual(await self.store.settleCommands([(command, "a", epochs["a"] - 1, True, "")]), [])
        self.assertEqual((await self.row(command))["state"], "sent")

    async def test_settleOnlyOnce(self) -> None:
        """
        Only a sent command is settled: a late nack after the ack changes nothing.
        """
        epochs, command = await self.sentCommand()
        await self.store.settleCommands([(command, "a", epochs["a"], True, "")])
        self.assertEqual(await self.store.settleCommands([(command, "a", epochs["a"], False, "x")]), [])
        self.assertEqual((await self.row(command))["state"], "acked")

    # --- reports of claimed commands not written ---

    async def report(self, command: str, epoch: int, claim: int, outcome: str) -> dict[str, Any]:
        await self.store.unsendCommands([(command, epoch, claim, outcome)])
        return await self.row(command)

    async def test_notWritten(self) -> None:
        """
        Not written: back to pending, the attempt undone, not finished, no session.
        """
        epochs, command = await self.sentCommand()
        row = await self.report(command, epochs["a"], 1, NOT_WRITTEN)
        self.assertEqual(
            (row["state"], row["attempts"], row["finished"], row["sentEpoch"], row["detail"]),
            ("pending", 0, False, None, "not written: the connection was gone or not reading"),
        )

    async def test_notWrittenTwiceUndoesOnce(self) -> None:
        epochs, command = await self.sentCommand()
        await self.report(command, epochs["a"], 1, NOT_WRITTEN)
        row = await self.report(command, epochs["a"], 1, NOT_WRITTEN)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))

    async def test_expiredAtFirstWrite(self) -> None:
        epochs, command = await self.sentCommand()
        row = await self.report(command, epochs["a"], 1, EXPIRED_AT_WRITE)
        self.assertEqual(
            (row["state"], row["attempts"], row["finished"], row["sentEpoch"], row["detail"]),
            ("expired", 1, True, epochs["a"], "ttl passed before it was written"),
        )

    async def test_expiredAtResend(self) -> None:
        epochs, command = await self.sentCommand()
        await self.makeDue(command)
        await self.claim(epochs)
        row = await self.report(command, epochs["a"], 2, EXPIRED_AT_WRITE)
        self.assertEqual(
            (row["state"], row["attempts"], row["finished"], row["detail"]),
            ("failed", 2, True, "ttl passed without an ack after 1 sends"),
        )

    async def test_undeliverable(self) -> None:
        epochs, command = await self.sentCommand()
        row = await self.report(command, epochs["a"], 1, UNDELIVERABLE)
        self.assertEqual((row["state"], row["attempts"], row["finished"], row["detail"]),
                         ("failed", 1, True, "the gateway could not write it"))

    async def test_tooLarge(self) -> None:
        epochs, command = await self.sentCommand()
        row = await self.report(command, epochs["a"], 1, TOO_LARGE)
        self.assertEqual((row["state"], row["detail"]), ("failed", "does not fit in one frame"))

    async def test_reportOnlyItsCommand(self) -> None:
        """
        A report names one command: another sent on the same session, in the same claim,
        is left alone.
        """
        epochs = await self.start("a")
        mine, other = await self.send("a"), await self.send("a")
        self.assertEqual(len(await self.claim(epochs, maxInflight=2)), 2)
        await self.report(mine, epochs["a"], 1, TOO_LARGE)
        self.assertEqual((await self.row(other))["state"], "sent")

    async def test_reportsInOneStatementEachTheirOwn(self) -> None:
        """
        Two reports in one statement, about two commands of one session and claim: each
        command takes its own report's outcome, not the other's.
        """
        epochs = await self.start("a")
        tooLarge, notWritten = await self.send("a"), await self.send("a")
        self.assertEqual(len(await self.claim(epochs, maxInflight=2)), 2)
        await self.store.unsendCommands(
            [(tooLarge, epochs["a"], 1, TOO_LARGE), (notWritten, epochs["a"], 1, NOT_WRITTEN)]
        )
        self.assertEqual((await self.row(tooLarge))["state"], "failed")
        self.assertEqual((await self.row(notWritten))["state"], "pending")

    async def test_reportOnlyItsSession(self) -> None:
        epochs, command = await self.sentCommand()
        row = await self.report(command, epochs["a"] + 1, 1, TOO_LARGE)
        self.assertEqual(row["state"], "sent")

    async def test_reportOnlyItsClaim(self) -> None:
        """
        A report about an earlier claim of the command changes nothing of the later one.
        """
        epochs, command = await self.sentCommand()
        await self.makeDue(command)
        await self.claim(epochs)
        row = await self.report(command, epochs["a"], 1, TOO_LARGE)
        self.assertEqual((row["state"], row["attempts"], row["claims"]), ("sent", 2, 2))

    async def test_reportAfterFinishedChangesNothing(self) -> None:
        epochs, command = await self.sentCommand()
        await self.store.settleCommands([(command, "a", epochs["a"], True, "")])
        row = await self.report(command, epochs["a"], 1, TOO_LARGE)
        self.assertEqual(row["state"], "acked")

    async def test_notWrittenAfterRequeue(self) -> None:
        """
        Put back to pending because its session ended, then reported not written: the
        attempt is undone all the same.  Any other report leaves it pending.
        """
        epochs, command = await self.sentCommand()
        await self.store.releaseSessions([("a", epochs["a"], "closed")])
        row = await self.row(command)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 1))
        row = await self.report(command, epochs["a"], 1, TOO_LARGE)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 1))
        row = await self.report(command, epochs["a"], 1, NOT_WRITTEN)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))

    # --- the claim's conditions again on the locked rows: what committed while it waited ---

    async def holdSession(self, controller: str) -> Any:
        """
        Another transaction holding the session row as a claim_session does.
        """
        holder = await self.other()
        await holder.runOperation("BEGIN")
        await holder.runQuery("SELECT 1 FROM sessions WHERE controller_id = %s FOR UPDATE", (controller,))
        return holder

    async def test_claimRefusedWhenTheSessionEndsWhileItWaits(self) -> None:
        """
        The session ends while a claim waits for its row: the claim's snapshot saw it
        online, the row it locked is offline, and nothing is claimed.
        """
        epochs = await self.start("a")
        command = await self.send("a")
        holder = await self.holdSession("a")
        await holder.runOperation("UPDATE sessions SET online = false WHERE controller_id = 'a'")
        claimed = Deferred.fromCoroutine(self.claim(epochs))
        await waitingOnLock(self, "ctrlgw_outbox_claim")
        await holder.runOperation("COMMIT")
        self.assertEqual(await claimed, [])
        self.assertEqual((await self.row(command))["state"], "pending")

    async def test_claimRefusedWhenResentWhileItWaits(self) -> None:
        """
        A command whose retry fell due is sent again while a claim waits for the
        session's row: the command's newest version says its retry is not due, and the
        claim leaves it.
        """
        epochs, command = await self.sentCommand()
        await self.makeDue(command)
        holder = await self.holdSession("a")
        claimed = Deferred.fromCoroutine(self.claim(epochs))
        await waitingOnLock(self, "ctrlgw_outbox_claim")
        await self.db.runOperation(
            "test", "UPDATE commands SET next_attempt_at = now() + interval '1 hour' WHERE id = %s",
            (command,),
        )
        await holder.runOperation("COMMIT")
        self.assertEqual(await claimed, [])
        self.assertEqual((await self.row(command))["attempts"], 1)

    # --- the requeue trigger ---

    async def test_requeuedOnNewSession(self) -> None:
        epochs, command = await self.sentCommand()
        await self.store.claimSession("a", "main", "10.0.0.1:2")
        row = await self.row(command)
        self.assertEqual((row["state"], row["detail"]), ("pending", "session ended before the ack"))

    async def test_notRequeuedByOtherController(self) -> None:
        """
        A new session, and then the end, of another controller requeue only what was
        sent to that controller, even when it had something sent too.
        """
        epochs = await self.start("a", "b")
        command, others = await self.send("a"), await self.send("b")
        await self.claim(epochs)
        newEpoch = (await self.store.claimSession("b", "main", "10.0.0.1:2")).epoch
        self.assertEqual((await self.row(others))["state"], "pending")
        self.assertEqual((await self.row(command))["state"], "sent")
        await self.claim({"b": newEpoch})
        await self.store.releaseSessions([("b", newEpoch, "closed")])
        self.assertEqual((await self.row(others))["state"], "pending")
        self.assertEqual((await self.row(command))["state"], "sent")


class InboxGuardTests(PostgresTestCase):
    """
    The inbox write stores only messages of the controller's current session (a stale
    frame from a superseded connection is fenced), in the order they arrived.
    """

    timeout = 60

    async def test_fencedStaleEpoch(self) -> None:
        store = Store(self.db, INSTANCE)
        await store.registerInstance("h", 1)
        old = await store.claimSession("a", "main", "p")
        new = await store.claimSession("a", "main", "p")
        results = await store.writeInbox([
            InboxRow("a", "m1", 1, new.epoch, {"n": 1}),
            InboxRow("a", "m2", 2, old.epoch, {"n": 2}),
            InboxRow("a", "m1", 1, new.epoch, {"n": 1}),
        ])
        self.assertEqual(results[0], STORED)
        self.assertIsInstance(results[1], Fenced)
        self.assertEqual(results[2], STORED)  # the same message twice in one batch: one row
        self.assertEqual(await store.writeInbox([InboxRow("a", "m1", 1, new.epoch, {"n": 1})]), [DUPLICATE])
        self.assertEqual(await self.db.runQuery("test", "SELECT message_id FROM inbox"), [("m1",)])

    async def test_arrivalOrder(self) -> None:
        store = Store(self.db, INSTANCE)
        await store.registerInstance("h", 1)
        claim = await store.claimSession("a", "main", "p")
        ids = [f"m{i}" for i in range(5)]
        await store.writeInbox([InboxRow("a", m, 1, claim.epoch, {}) for m in ids])
        self.assertEqual(await self.db.runQuery("test", "SELECT message_id FROM inbox ORDER BY id"),
                         [(m,) for m in ids])


class ClaimSessionGuardTests(PostgresTestCase):
    timeout = 60

    async def store(self, **policy: Any) -> Store:
        store = Store(self.db, INSTANCE, ClaimPolicy(**{"flapThreshold": 3, **policy}))
        await store.registerInstance("h", 1)
        return store

    async def test_firstClaimHasNoPrevious(self) -> None:
        store = await self.store()
        first = await store.claimSession("a", "main", "p")
        self.assertEqual((first.previousInstance, first.previousEpoch, first.previousOnline),
                         (None, None, False))
        second = await store.claimSession("a", "main", "p")
        self.assertEqual((second.previousInstance, second.previousEpoch, second.previousOnline),
                         (INSTANCE, first.epoch, True))

    async def test_previousOnDeadInstanceIsOffline(self) -> None:
        store = await self.store(instanceTtl=30.0)
        await store.claimSession("a", "main", "p")
        await self.db.runOperation("test", "UPDATE instances SET heartbeat_at = now() - interval '1 minute'")
        self.assertFalse((await store.claimSession("a", "main", "p")).previousOnline)

    async def test_flapping(self) -> None:
        """
        Taken over flap_threshold times within flap_window: flapping (admitted, and
        blocked for flap_cooldown); while blocked, a takeover is refused.
        """
        store = await self.store()
        claims = [await store.claimSession("a", "main", "p") for _ in range(4)]
        self.assertEqual([(c.flapping, c.refused) for c in claims],
                         [(False, False), (False, False), (False, False), (True, False)])
        self.assertIsNotNone(claims[3].blockedUntil)
        refused = await store.claimSession("a", "main", "p")
        self.assertEqual((refused.flapping, refused.refused), (True, True))

    async def test_flappingNotRefusedWhenPolicySaysAdmit(self) -> None:
        store = await self.store(refuseFlapping=False)
        claims = [await store.claimSession("a", "main", "p") for _ in range(5)]
        self.assertEqual([c.refused for c in claims], [False] * 5)

    async def test_blockNotWhileOffline(self) -> None:
        """
        A blocked controller whose session is offline (its device went quiet) is
        admitted: the block refuses takeovers only.
        """
        store = await self.store()
        claims = [await store.claimSession("a", "main", "p") for _ in range(4)]
        await store.releaseSessions([("a", claims[-1].epoch, "closed")])
        self.assertFalse((await store.claimSession("a", "main", "p")).refused)

    async def test_flapWindowStartsOver(self) -> None:
        """
        Takeovers further apart than flap_window start the count over.
        """
        store = await self.store(flapWindow=60.0)
        for _ in range(3):
            await store.claimSession("a", "main", "p")
        await self.db.runOperation(
            "test", "UPDATE sessions SET flap_window_start = now() - interval '2 minutes'"
        )
        self.assertFalse((await store.claimSession("a", "main", "p")).flapping)
        self.assertFalse((await store.claimSession("a", "main", "p")).flapping)

    async def test_blockExpires(self) -> None:
        store = await self.store()
        for _ in range(4):
            await store.claimSession("a", "main", "p")
        await self.db.runOperation(
            "test", "UPDATE sessions SET flap_blocked_until = now() - interval '1 second'"
        )
        self.assertFalse((await store.claimSession("a", "main", "p")).refused)

    async def test_batchJudgesEachHelloAsAloneItWould(self) -> None:
        """
        One batch of hellos, each controller in a different state, gets the answer each
        would get claimed alone; only the sessions that were online are told to drop.
        """
        store = await self.store(instanceTtl=30.0)
        theirs = Store(self.db, "gw-b", ClaimPolicy(flapThreshold=3, instanceTtl=30.0))
        await theirs.registerInstance("h", 2)
        gone = Store(self.db, "gw-dead", ClaimPolicy(flapThreshold=3, instanceTtl=30.0))
        await gone.registerInstance("h", 3)
        mine = await store.claimSession("mine", "main", "p")
        taken = await theirs.claimSession("theirs", "main", "p")
        dead = await gone.claimSession("dead", "main", "p")
        await self.db.runOperation(
            "test", "UPDATE instances SET heartbeat_at = now() - interval '1 minute'"
            " WHERE instance_id = 'gw-dead'")
        off = await store.claimSession("off", "main", "p")
        await store.releaseSessions([("off", off.epoch, "closed")])
        for _ in range(4):
            blocked = await store.claimSession("blocked", "main", "p")
        self.assertTrue(blocked.flapping)
        conn = await deferToThread(listen, self.dsn, f"{self.schema}_takeover")
        self.addCleanup(conn.close)

        names = ["theirs", "new", "blocked", "dead", "off", "mine"]
        claims = dict(zip(names, await store.claimSessions([(c, "main", "q") for c in names]),
                          strict=True))

        self.assertEqual(
            {c: (claim.previousInstance, claim.previousEpoch, claim.previousOnline,
                 claim.flapping, claim.refused) for c, claim in claims.items()},
            {"theirs": ("gw-b", taken.epoch, True, False, False),
             "new": (None, None, False, False, False),
             "blocked": (INSTANCE, blocked.epoch, True, True, True),
             "dead": ("gw-dead", dead.epoch, False, False, False),
             "off": (INSTANCE, off.epoch, False, False, False),
             "mine": (INSTANCE, mine.epoch, True, False, False)})
        self.assertEqual(claims["blocked"].blockedUntil, blocked.blockedUntil)
        admitted = [c for c in names if c != "blocked"]
        epochs = [claims[c].epoch for c in admitted]
        self.assertEqual(len(set(epochs)), len(epochs))
        self.assertGreater(min(epochs), max(taken.epoch, dead.epoch, off.epoch, mine.epoch))
        rows = await self.db.runQuery(
            "test", "SELECT controller_id, epoch, instance_id, online, peer FROM sessions"
            " ORDER BY controller_id")
        self.assertEqual(rows, sorted([(c, claims[c].epoch, INSTANCE, True, "q") for c in admitted]
                                      + [("blocked", blocked.epoch, INSTANCE, True, "p")]))
        told = sorted(json.loads(p)["c"] for p in await deferToThread(payloads, conn))
        self.assertEqual(told, ["dead", "mine", "theirs"])

    async def test_laterHelloInBatchWins(self) -> None:
        store = await self.store()
        claims = await store.claimSessions([("a", "main", "p1"), ("b", "main", "p"), ("a", "main", "p2")])
        self.assertGreater(claims[2].epoch, claims[0].epoch)
        self.assertEqual(await self.db.runQuery("test", "SELECT peer FROM sessions WHERE controller_id = 'a'"),
                         [("p2",)])


class SendManyLockOrderTests(PostgresTestCase):
    """
    send_many takes its per-controller locks in controller order, whatever the order of
    its arrays: two batches naming the same controllers in opposite orders then never
    hold one lock each while waiting for the other's.
    """

    timeout = 60

    async def test_locksInControllerOrder(self) -> None:
        """
        With b's lock held elsewhere, a batch for (b, a) waits for b while holding a:
        a later send for a waits behind it.  (Locked in array order, the batch would
        hold nothing while it waits, and the send for a would go through.)
        """
        holder, batch, single = await self.other(), await self.other(), await self.other()
        await holder.runOperation("BEGIN")
        await holder.runQuery("SELECT send('b', '{}')")
        await batch.runOperation("BEGIN")
        batchDone = batch.runQuery(
            "SELECT send_many(ARRAY['b', 'a'], ARRAY['{}', '{}']::jsonb[]) /* batch */"
        )
        await waitingOnLock(self, "/* batch */")
        await single.runOperation("BEGIN")
        singleDone = single.runQuery("SELECT send('a', '{}') /* single */")
        await waitingOnLock(self, "/* single */")
        await holder.runOperation("COMMIT")
        await batchDone
        await batch.runOperation("COMMIT")
        await singleDone
        await single.runOperation("COMMIT")
        self.assertEqual(len(await self.db.runQuery("test", "SELECT 1 FROM commands")), 4)


class DoorbellTests(PostgresTestCase):
    """
    One NOTIFY per statement names the controllers it concerns; past 7,000 bytes of ids
    it says C{'*'} instead (NOTIFY payloads are limited to 8,000 bytes).
    """

    timeout = 60

    async def ids(self, count: int) -> list[str]:
        # 10 bytes each, with the comma 11: 636 of them are 6,995 bytes, 637 are 7,006.
        return [f"ctrl-{i:05d}" for i in range(count)]

    async def test_commandsDoorbell(self) -> None:
        conn = await deferToThread(listen, self.dsn, f"{self.schema}_commands")
        self.addCleanup(conn.close)
        for count, star in ((636, False), (637, True)):
            ids = await self.ids(count)
            await self.db.runQuery(
                "test", "SELECT send_many(%s::text[], %s::jsonb[])", (ids, ["{}"] * count)
            )
            (payload,) = await deferToThread(payloads, conn)
            self.assertEqual(payload if star else sorted(payload.split(",")), "*" if star else ids)

    async def test_revokedDoorbell(self) -> None:
        conn = await deferToThread(listen, self.dsn, f"{self.schema}_revoked")
        self.addCleanup(conn.close)
        for count, star in ((636, False), (637, True)):
            ids = [f"r-{star:d}-{i[7:]}" + "x" * 3 for i in await self.ids(count)]
            await self.db.runOperation(
                "test",
                "INSERT INTO controllers (controller_id, token_sha256, enabled)"
                " SELECT unnest(%s::text[]), '\\x00'::bytea, true",
                (ids,),
            )
            await self.db.runOperation(
                "test", "UPDATE controllers SET enabled = false WHERE controller_id = ANY(%s)", (ids,)
            )
            (payload,) = await deferToThread(payloads, conn)
            self.assertEqual(payload if star else sorted(payload.split(",")), "*" if star else sorted(ids))
