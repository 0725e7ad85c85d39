"""
Every session time comes from the database clock, whatever the instance's clock says.
"""

from __future__ import annotations

from tests.gateways import SkewedReactor, connectController, listenerPort, startGateway
from tests.pg import PostgresTestCase


class SessionTimeTests(PostgresTestCase):
    timeout = 60

    async def test_lastSeenOnTheDatabaseClock(self) -> None:
        """
        An instance whose clock runs two minutes ahead records last_seen_at on the
        database clock: within a second of now(), not two minutes in the future.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-skewed",
            {"cluster": {"reconcile_interval": "1h"},
             "timestamps": {"max_future": "10m", "max_instance_skew": "10m"}},
            gatewayReactor=SkewedReactor(120.0),
        )
        client = await connectController(listenerPort(gateway))
        self.addCleanup(client.close)
        await client.hello("c-1")
        await gateway.cluster.reconcileAll()
        rows = await self.db.runQuery(
            "test",
            "SELECT extract(epoch FROM last_seen_at - now())::float8 FROM sessions"
            " WHERE controller_id = 'c-1'",
        )
        self.assertLess(abs(rows[0][0]), 1.0, f"last_seen_at is {rows[0][0]:+.1f}s off now()")

