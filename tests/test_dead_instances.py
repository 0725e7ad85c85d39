"""
No session stays owned by a dead instance: every live instance's heartbeat takes offline
the sessions of instances silent for longer than instance_ttl.
"""

from __future__ import annotations

from ctrlgw.store.postgres import Store
from tests.gateways import sample, startGateway, waitUntil
from tests.pg import PostgresTestCase


class DeadInstanceTests(PostgresTestCase):
    timeout = 60

    async def sessionOf(self, controller: str) -> tuple[bool, str | None]:
        rows = await self.db.runQuery(
            "test", "SELECT online, disconnect_reason FROM sessions WHERE controller_id = %s",
            (controller,),
        )
        return rows[0][0], rows[0][1]

    async def test_reapSessionsOfSilentInstances(self) -> None:
        """
        A's heartbeat is an hour old: its session goes offline (instance_dead), the
        command sent on it is back to pending, A's row is gone.  B's own session, and C's
        (heartbeat fresh), stay online.
        """
        stores = {name: Store(self.db, name) for name in ("gw-a", "gw-b", "gw-c")}
        for store in stores.values():
            await store.registerInstance("h", 1)
        onA = await stores["gw-a"].claimSession("c-a", "main", "10.0.0.1:1")
        await stores["gw-b"].claimSession("c-b", "main", "10.0.0.1:2")
        await stores["gw-c"].claimSession("c-c", "main", "10.0.0.1:3")
        await self.db.runQuery("test", "SELECT send('c-a', '{}')")
        (claimed,) = await stores["gw-a"].claimCommands([("c-a", onA.epoch)], 1, 5, 10.0, 2.0)
        await self.db.runOperation(
            "test", "UPDATE instances SET heartbeat_at = now() - interval '1 hour'"
            " WHERE instance_id = 'gw-a'"
        )
        self.assertEqual(await stores["gw-b"].reapDeadInstances(), 1)
        self.assertEqual(await self.sessionOf("c-a"), (False, "instance_dead"))
        self.assertEqual(await self.sessionOf("c-b"), (True, None))
        self.assertEqual(await self.sessionOf("c-c"), (True, None))
        state = await self.db.runQuery("test", "SELECT state FROM commands WHERE id = %s", (claimed.id,))
        self.assertEqual(state, [("pending",)])
        instances = await self.db.runQuery("test", "SELECT instance_id FROM instances ORDER BY 1")
        self.assertEqual(instances, [("gw-b",), ("gw-c",)])
        self.assertEqual(await stores["gw-b"].reapDeadInstances(), 0)

    async def test_heartbeatReaps(self) -> None:
        """
        A running gateway's heartbeat finds the silent instance by itself.
        """
        dead = Store(self.db, "gw-dead")
        await dead.registerInstance("h", 1)
        await dead.claimSession("c-1", "main", "10.0.0.1:1")
        await self.db.runOperation(
            "test", "UPDATE instances SET heartbeat_at = now() - interval '1 hour'"
            " WHERE instance_id = 'gw-dead'"
        )
        gateway = await startGateway(self, self.dsn, self.schema, "gw-live", {})
        await waitUntil(lambda: sample(gateway, "ctrlgw_sessions_reaped_total") == 1, 10,
                        what="the dead instance's session reaped")
        self.assertEqual(await self.sessionOf("c-1"), (False, "instance_dead"))
