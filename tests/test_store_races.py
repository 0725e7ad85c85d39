"""
Interleavings under READ COMMITTED that the statements must survive, forced with a third
connection holding a lock inside an open transaction.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from ctrlgw.store.postgres import STORED, InboxRow, Store
from tests.dbwait import backendPid, waitUntilBlocked
from tests.gateways import nowMs
from tests.helpers import deferred
from tests.pg import PostgresTestCase

CLAIM = dict(maxInflight=1, maxAttempts=3, ackTimeout=10.0, backoff=2.0)


class RaceTests(PostgresTestCase):
    timeout = 60

    async def blocker(self, *statements: str) -> tuple[Any, int]:
        """
        A connection with an open transaction that has run C{statements}, and its backend
        pid; rolled back by the test (or at cleanup).
        """
        connection = await self.db.connect()
        await connection.runOperation("BEGIN")
        for statement in statements:
            await connection.runOperation(statement)
        self.addCleanup(connection.close)
        return connection, await backendPid(connection)

    @deferred
    async def test_claimDoesNotReviveASettledCommand(self) -> None:
        """
        A retry claim that waits on a lock while the command's ack is settled must not
        turn the acked command back into sent (FOR UPDATE re-checks only its own WHERE on
        the newest row version).
        """
        db = await self.openDatabase(pool_size=3)
        store = Store(db, "gw-a")
        await store.registerInstance("h", 1)
        claim = await store.claimSession("X", "main", "p")
        command = await store.sendCommand("X", {"op": 1}, 3600)
        (first,) = await store.claimCommands([("X", claim.epoch)], **CLAIM)
        self.assertEqual(first.id, command)
        await db.runOperation(
            "t", "UPDATE commands SET next_attempt_at = now() - interval '1 second'"
        )
        # Something holds the session row (as a claim_session in progress would).
        blocker, blockerPid = await self.blocker(
            "SELECT 1 FROM sessions WHERE controller_id = 'X' FOR UPDATE"
        )
        retry = Deferred.fromCoroutine(store.claimCommands([("X", claim.epoch)], **CLAIM))
        await waitUntilBlocked(self.db, "EXECUTE ctrlgw_outbox_claim", blockedBy=blockerPid)
        self.assertFalse(retry.called)
        settled = await store.settleCommands([(command, "X", claim.epoch, True, "")])
        self.assertEqual([state for _, state, _ in settled], ["acked"])
        await blocker.runOperation("ROLLBACK")
        self.assertEqual(await retry, [])
        status = await store.commandStatus(command)
        assert status is not None
        self.assertEqual((status["state"], status["attempts"]), ("acked", 1))
        self.assertEqual([h["state"] for h in status["history"]], ["pending", "sent", "acked"])

    @deferred
    async def test_takeoverWaitsForAnInboxWriteInProgress(self) -> None:
        """
        A takeover committing while an inbox write of the old session is under way cannot
        slip in between: the claim waits for the write, so nothing of the old session is
        stored after the new one was committed.
        """
        db = await self.openDatabase(pool_size=3)
        old = Store(db, "gw-a")
        new = Store(db, "gw-b")
        claim = await old.claimSession("X", "main", "p")
        # An uncommitted row with the same key makes the write wait after its snapshot.
        blocker, blockerPid = await self.blocker(
            "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch)"
            " VALUES ('X', 'm1', now(), 'other', 0)"
        )
        order: list[str] = []
        write = Deferred.fromCoroutine(
            old.writeInbox([InboxRow("X", "m1", nowMs(), claim.epoch, {})])
        ).addCallback(lambda result: order.append("write") or result)
        writer = await waitUntilBlocked(self.db, "WITH batch AS", blockedBy=blockerPid)
        self.assertFalse(write.called)
        takeover = Deferred.fromCoroutine(new.claimSession("X", "main", "q")).addCallback(
            lambda result: order.append("takeover") or result
        )
        # The takeover waits for the write (its key-share lock on the session row), not
        # for the blocker.
        await waitUntilBlocked(self.db, "claim_session", blockedBy=writer)
        self.assertEqual(order, [])
        await blocker.runOperation("ROLLBACK")
        self.assertEqual(await write, [STORED])
        newer = await takeover
        self.assertEqual(order, ["write", "takeover"])
        self.assertGreater(newer.epoch, claim.epoch)
