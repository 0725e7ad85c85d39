"""
The gateway's HTTP probes over its real listener: C{/readyz} names what keeps it from
taking traffic (database, migrations, clock), C{/healthz} answers while the process runs,
C{/metrics} exports the gauges.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from ctrlgw.service import Gateway
from tests.gateways import (
    QUICK_DATABASE_TIMEOUTS,
    SkewedReactor,
    httpPort,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase, PrivatePostgres


class ProbeTestCase(PostgresTestCase):
    timeout = 120

    async def _setUp(self) -> None:
        await super()._setUp()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=10)

    async def get(self, gateway: Gateway, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{httpPort(gateway)}{path}".encode("ascii")
        response = await self.agent.request(b"GET", url)
        body = await readBody(response)
        return response.code, body

    async def ready(self, gateway: Gateway) -> tuple[int, dict[str, Any]]:
        code, body = await self.get(gateway, "/readyz")
        return code, json.loads(body)

    async def waitForReadiness(self, gateway: Gateway, code: int, timeout: float = 30) -> dict[str, Any]:
        """
        Poll C{/readyz} until it answers C{code}; return its body.
        """
        deadline = reactor.seconds() + timeout
        while True:
            answer = await self.ready(gateway)
            if answer[0] == code or reactor.seconds() > deadline:
                break
            await sleep(0.1)
        self.assertEqual(answer[0], code, f"/readyz still answers {answer}")
        return answer[1]


class ReadinessTests(ProbeTestCase):
    @deferred
    async def test_ready(self) -> None:
        """
        Once the database is up, the schema current and the clock measured, C{/readyz}
        answers 200 with every check passing.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-ready", waitReady=False)
        body = await self.waitForReadiness(gateway, 200)
        self.assertEqual(body["status"], "ready")
        self.assertEqual(body["failing"], [])
        checks = body["checks"]
        self.assertTrue({"database", "migrations", "clock", "listener:main"} <= set(checks), checks)
        self.assertEqual({name for name, check in checks.items() if not check["ok"]}, set())
        self.assertEqual(checks["database"]["detail"], "up")
        self.assertIn("schema version", checks["migrations"]["detail"])
        self.assertIn("skew", checks["clock"]["detail"])

    @deferred
    async def test_healthAndMetrics(self) -> None:
        gateway = await startGateway(self, self.dsn, self.schema, "gw-health")
        code, body = await self.get(gateway, "/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        code, body = await self.get(gateway, "/metrics")
        self.assertEqual(code, 200)
        lines = body.decode("utf-8").splitlines()
        self.assertIn("ctrlgw_db_up 1.0", lines)
        self.assertTrue(any(line.startswith("ctrlgw_instance_clock_skew_seconds ") for line in lines))
        self.assertTrue(any(line.startswith("ctrlgw_inbox_buffered_unacked ") for line in lines))

    @deferred
    async def test_notMigrated(self) -> None:
        """
        With C{migrate = off} on an empty schema, the gateway is not ready and says the
        migrations are missing, though the database is up.
        """
        schema = "t_" + uuid.uuid4().hex[:12]
        self.addCleanup(self.db.runOperation, "drop", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        gateway = await startGateway(
            self, self.dsn, schema, "gw-unmigrated", {"database": {"migrate": "off"}},
            waitReady=False,
        )
        await waitUntil(
            lambda: gateway.db.up and gateway.instanceSkew is not None, 30, what="the database"
        )
        code, body = await self.ready(gateway)
        self.assertEqual(code, 503)
        self.assertEqual(body["status"], "unready")
        self.assertIn("migrations", body["failing"])
        self.assertNotIn("database", body["failing"])
        self.assertNotIn("clock", body["failing"])
        self.assertIn("schema version 0", body["checks"]["migrations"]["detail"])

    @deferred
    async def test_unreachableDatabase(self) -> None:
        """
        A gateway whose database cannot be reached is alive (C{/healthz} 200) but not ready,
        naming the database.
        """
        gateway = await startGateway(
            self, "postgresql://postgres:@/postgres?host=/nonexistent-ctrlgw-socket-dir",
            self.schema, "gw-unreachable", QUICK_DATABASE_TIMEOUTS, waitReady=False,
        )
        await waitUntil(
            lambda: gateway.service.getServiceNamed("http").port is not None, 30, what="http"
        )
        code, body = await self.ready(gateway)
        self.assertEqual(code, 503)
        self.assertIn("database", body["failing"])
        self.assertEqual(body["checks"]["database"], {"ok": False, "detail": "unreachable"})
        self.assertIn("clock", body["failing"])
        code, _ = await self.get(gateway, "/healthz")
        self.assertEqual(code, 200)
        _, metrics = await self.get(gateway, "/metrics")
        self.assertIn("ctrlgw_db_up 0.0", metrics.decode().splitlines())


class ClockReadinessTests(ProbeTestCase):
    @deferred
    async def test_skewedClock(self) -> None:
        """
        An instance whose clock is far off the database's is not ready, naming the clock
        alone.
        """
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-skewed", waitReady=False,
            gatewayReactor=SkewedReactor(30.0),
        )
        await waitUntil(lambda: gateway.instanceSkew is not None, 30, what="the clock check")
        self.assertLess(abs((gateway.instanceSkew or 0) - 30.0), 1.0)
        await waitUntil(
            lambda: {n for n, c in gateway.readiness.evaluate().items() if not c["ok"]} == {"clock"},
            30,
            what=lambda: f"everything but the clock to be ready: {gateway.readiness.evaluate()}",
        )
        code, body = await self.ready(gateway)
        self.assertEqual(code, 503)
        self.assertEqual(body["failing"], ["clock"])
        detail = body["checks"]["clock"]["detail"]
        match = re.fullmatch(r"skew ([+-][0-9.]+)s, limit 2s", detail)
        self.assertIsNotNone(match, detail)
        assert match is not None
        self.assertLess(abs(float(match.group(1)) - 30.0), 1.0, detail)
        _, metrics = await self.get(gateway, "/metrics")
        skew = next(
            float(line.split()[1])
            for line in metrics.decode().splitlines()
            if line.startswith("ctrlgw_instance_clock_skew_seconds ")
        )
        self.assertLess(abs(skew - 30.0), 1.0)

    @deferred
    async def test_skewBeyondLimit(self) -> None:
        """
        Readiness follows the last measured skew against C{max_instance_skew}.
        """
        # No clock check of its own between setting the skew and asking /readyz.
        gateway = await startGateway(
            self, self.dsn, self.schema, "gw-limit",
            {"timestamps": {"max_instance_skew": "500ms", "clock_check_interval": "30s"}},
        )
        gateway.instanceSkew = -0.6
        code, body = await self.ready(gateway)
        self.assertEqual((code, body["failing"]), (503, ["clock"]))
        gateway.instanceSkew = 0.4
        code, body = await self.ready(gateway)
        self.assertEqual((code, body["failing"]), (200, []))


class DatabaseReadinessTests(ProbeTestCase):
    @deferred
    async def test_databaseStopped(self) -> None:
        """
        When the database goes away the gateway turns unready, naming the database, while
        staying alive; it turns ready again by itself when the database is back.
        """
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(deferToThread, server.destroy)
        gateway = await startGateway(
            self, server.dsn, "ctrlgw", "gw-db-stopped", QUICK_DATABASE_TIMEOUTS
        )
        await self.waitForReadiness(gateway, 200)

        await deferToThread(server.stop)
        body = await self.waitForReadiness(gateway, 503)
        self.assertIn("database", body["failing"])
        self.assertEqual(body["checks"]["database"], {"ok": False, "detail": "unreachable"})
        code, _ = await self.get(gateway, "/healthz")
        self.assertEqual(code, 200)
        _, metrics = await self.get(gateway, "/metrics")
        self.assertIn("ctrlgw_db_up 0.0", metrics.decode().splitlines())

        await deferToThread(server.start)
        body = await self.waitForReadiness(gateway, 200)
        self.assertEqual(body["failing"], [])
        _, metrics = await self.get(gateway, "/metrics")
        self.assertIn("ctrlgw_db_up 1.0", metrics.decode().splitlines())
