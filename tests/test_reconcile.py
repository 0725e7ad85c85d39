"""
Reconciliation rounds read what changed, not the fleet: a round after a lost takeover
notification reads the rows that changed hands, catches a change that committed after the
previous round started (the overlap), and a full round records last-heard times.
"""

from __future__ import annotations

from ctrlgw.service import Gateway
from ctrlgw.store import postgres
from tests.gateways import LineController, connectController, listenerPort, sample, startGateway
from tests.pg import PostgresTestCase

# No periodic rounds, heartbeats or notifications while a test runs: it drives the rounds.
QUIET = {"reconcile_interval": "1h", "heartbeat_interval": "10m", "instance_ttl": "30m"}


class ReconcileTests(PostgresTestCase):
    timeout = 60

    async def gateway(self, instance: str) -> Gateway:
        gateway = await startGateway(self, self.dsn, self.schema, instance, {"cluster": QUIET})
        gateway.cluster.listener.stop()  # deaf: takeovers are seen only by reconciling
        return gateway

    async def fleet(self, gateway: Gateway, count: int) -> list[LineController]:
        clients = []
        for i in range(count):
            client = await connectController(listenerPort(gateway))
            self.addCleanup(client.close)
            await client.hello(f"c-{i}")
            clients.append(client)
        return clients

    async def changeElsewhere(self) -> None:
        """
        3,000 sessions claimed elsewhere in the cluster in one statement (one changed_at),
        and c-0 taken over by gw-b apart.
        """
        await self.db.runOperation(
            "test", "INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)"
            " SELECT 'x-' || g, g, gen_random_uuid(), 'gw-z', true FROM generate_series(1, 3000) g"
        )
        await self.db.runOperation(
            "test", "UPDATE sessions SET instance_id = 'gw-b', epoch = epoch + 100000"
            " WHERE controller_id = 'c-0'"
        )

    async def test_roundReadsOnlyWhatChanged(self) -> None:
        """
        With 100 controllers connected, a round after one takeover (notification lost)
        reads the one row that changed, and drops the superseded connection.
        """
        a = await self.gateway("gw-a")
        clients = await self.fleet(a, 100)
        # The claims changed 100 rows just now: age them past the overlap of rounds.
        await self.db.runOperation("test", "UPDATE sessions SET changed_at = now() - interval '1 hour'")
        await a.cluster.reconcile()
        rounds = sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "changed"})
        rows = sample(a, "ctrlgw_reconcile_rows_total", {"kind": "changed"})
        full = sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "full"})
        await self.db.runOperation(
            "test", "UPDATE sessions SET instance_id = 'gw-b', epoch = epoch + 1000"
            " WHERE controller_id = 'c-7'"
        )
        aborted, _ = await a.cluster.reconcile()
        self.assertEqual(aborted, 1)
        self.assertEqual(sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "changed"}), rounds + 1)
        self.assertEqual(sample(a, "ctrlgw_reconcile_rows_total", {"kind": "changed"}), rows + 1)
        self.assertEqual(sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "full"}), full)
        await clients[7].closed
        self.assertEqual(clients[7].of("bye")[-1]["reason"], "takeover")
        self.assertEqual([c for c in clients if c.isClosed], [clients[7]])

    async def test_largeRoundJudgedInChunks(self) -> None:
        """
        A round of more rows than one chunk (3,000 rows changed elsewhere in the cluster,
        and the superseded row of a local connection among them) still finds and drops
        that connection.
        """
        a = await self.gateway("gw-a")
        (client,) = await self.fleet(a, 1)
        await a.cluster.reconcile()
        await self.changeElsewhere()
        rows = sample(a, "ctrlgw_reconcile_rows_total", {"kind": "changed"})
        self.assertEqual(await a.cluster.reconcile(), (1, 0))
        self.assertGreaterEqual(sample(a, "ctrlgw_reconcile_rows_total", {"kind": "changed"}) - rows, 3001)
        await client.closed

    async def test_changedRowsReadInPages(self) -> None:
        """
        A round reads what changed a page at a time, in (changed_at, controller_id) order:
        3,000 rows stamped with one changed_at (one statement) and the row of a local
        connection changed apart, in pages of 1,000, are each read exactly once, and the
        superseded local connection is dropped.
        """
        self.patch(postgres, "CHANGED_PAGE", 1000)
        a = await self.gateway("gw-a")
        (client,) = await self.fleet(a, 1)
        await a.cluster.reconcile()
        since = (await a.store.databaseTime()) - 1.0
        await self.changeElsewhere()
        statements = sample(a, "ctrlgw_db_query_seconds_count", {"query": "reconcile_changed"})
        _, rows = await a.store.changedSessions(since)
        self.assertEqual(
            sorted(row.controller for row in rows),
            sorted(["c-0"] + [f"x-{g}" for g in range(1, 3001)]),
        )
        self.assertEqual(
            sample(a, "ctrlgw_db_query_seconds_count", {"query": "reconcile_changed"}) - statements,
            4,
        )
        self.assertEqual(await a.cluster.reconcile(), (1, 0))
        await client.closed

    async def test_lateCommitIsCaught(self) -> None:
        """
        A change stamped before a round started but committed after it is found by the
        next round: rounds overlap by more than a statement can take.
        """
        a = await self.gateway("gw-a")
        (client,) = await self.fleet(a, 1)
        await a.cluster.reconcile()
        late = await self.db.connect()
        self.addCleanup(late.close)
        await late.runOperation("BEGIN")
        await late.runOperation(
            "UPDATE sessions SET instance_id = 'gw-b', epoch = epoch + 1000"
            " WHERE controller_id = 'c-0'"
        )
        self.assertEqual(await a.cluster.reconcile(), (0, 0))  # not committed yet
        await late.runOperation("COMMIT")
        self.assertEqual(await a.cluster.reconcile(), (1, 0))
        await client.closed

    async def test_fullRoundRecordsLastSeen(self) -> None:
        """
        Changed-rows rounds never write last_seen_at; a full round, due every
        full_reconcile_interval, does.
        """
        a = await self.gateway("gw-a")
        await self.fleet(a, 3)
        await a.cluster.reconcile()
        await self.db.runOperation("test", "UPDATE sessions SET last_seen_at = now() - interval '1 hour'")
        await a.cluster.reconcile()
        stale = await self.db.runQuery(
            "test", "SELECT count(*) FROM sessions WHERE last_seen_at < now() - interval '30 minutes'"
        )
        self.assertEqual(stale, [(3,)])
        full = sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "full"})
        a.cluster._lastFull -= a.config.cluster.full_reconcile_interval
        await a.cluster.reconcile()
        self.assertEqual(sample(a, "ctrlgw_reconcile_rounds_total", {"kind": "full"}), full + 1)
        fresh = await self.db.runQuery(
            "test", "SELECT count(*) FROM sessions WHERE last_seen_at > now() - interval '1 minute'"
        )
        self.assertEqual(fresh, [(3,)])
