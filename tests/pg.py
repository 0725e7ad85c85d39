"""
A real PostgreSQL for tests.

By default one embedded server (pgserver) per test process, started on first use, deleted
at exit; C{CTRLGW_TEST_DSN} names an external server instead.  Every test gets a schema of
its own, so tests never see each other's rows.  L{PrivatePostgres} is a server a test may
stop and start again (to take the database away under a live gateway).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ctrlgw.config import DatabaseConfig
from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database
from ctrlgw.store.migrate import applyMigrations

_shared: Any = None


def sharedDsn() -> str:
    global _shared
    dsn = os.environ.get("CTRLGW_TEST_DSN")
    if dsn:
        return dsn
    if _shared is None:
        import pgserver

        _shared = pgserver.get_server(tempfile.mkdtemp(prefix="ctrlgw-test-pg-"), cleanup_mode="delete")
    return str(_shared.get_uri())


def databaseConfig(schema: str, **overrides: Any) -> DatabaseConfig:
    values: dict[str, Any] = dict(
        dsn="",
        data_dir="",
        schema=schema,
        migrate="auto",
        pool_size=2,
        connect_timeout=2.0,
        statement_timeout=5.0,
        idle_in_transaction_timeout=10.0,
        reconnect_max_delay=0.5,
        max_waiting=10_000,
    )
    values.update(overrides)
    return DatabaseConfig(**values)


class PostgresTestCase(TestCase):
    """
    A trial test case with a migrated schema of its own: C{self.db}, C{self.dsn},
    C{self.schema}, C{self.metrics}.
    """

    timeout = 60
    # True: inbox and events stay unpartitioned, as in a database from before migration 11
    # that held rows (which the migration leaves for `ctrlgw partition`).
    unpartitioned = False

    async def _setUp(self) -> None:
        self.dsn = await deferToThread(sharedDsn)
        self.schema = "t_" + uuid.uuid4().hex[:12]
        self.metrics = Metrics()
        self.db = await self.openDatabase()
        self.addCleanup(self._dropSchema)
        await self.migrate()

    async def migrate(self) -> None:
        """
        Bring the test's schema to the current version (subclasses may load older rows on
        the way).
        """
        if self.unpartitioned:
            await applyMigrations(self.db, upTo=10)
            await self.db.runOperation(
                "held_rows", "INSERT INTO events (controller_id, kind, instance_id) VALUES ('-', '-', '-')"
            )
        await applyMigrations(self.db)
        if self.unpartitioned:
            await self.db.runOperation("held_rows", "DELETE FROM events")

    def setUp(self) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._setUp())

    async def openDatabase(self, dsn: str | None = None, **overrides: Any) -> Database:
        db = Database(reactor, databaseConfig(self.schema, **overrides), self.metrics)
        await db.start(dsn or self.dsn)
        self.addCleanup(db.stop)
        return db

    async def other(self) -> Any:
        """
        A connection of its own, outside the pool: a second transaction for a race.
        """
        connection = await self.db.connect()
        self.addCleanup(connection.close)
        return connection

    async def _dropSchema(self) -> None:
        db = Database(reactor, databaseConfig(self.schema), Metrics())
        await db.start(self.dsn)
        try:
            await db.runOperation("drop_schema", f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await db.stop()


class PrivatePostgres:
    """
    An embedded server of one test's own, which the test may stop and start.
    """

    def __init__(self) -> None:
        import pgserver

        self._pgserver = pgserver
        self.path = Path(tempfile.mkdtemp(prefix="ctrlgw-private-pg-"))
        self.server = pgserver.get_server(self.path, cleanup_mode="delete")
        self.dsn = str(self.server.get_uri())
        # The directory the server's socket lives in (postmaster.pid), not the socket file.
        socketDir = self.server.get_postmaster_info().socket_dir
        self.socketDir = str(socketDir) if socketDir is not None else str(self.path)

    def stop(self) -> None:
        """
        Stop the server the hard way (immediate mode: like a crash, no checkpoint).
        """
        self._pgserver.pg_ctl(
            ["-w", "-m", "immediate", "stop"], pgdata=self.path, user=self.server.system_user
        )

    def crash(self) -> int:
        """
        What L{stop} does, at once: immediate mode is C{SIGQUIT} to the postmaster, which
        is all C{pg_ctl} sends, but this lands in the reactor turn that calls it (not after
        a process start), so a test can aim it at a statement in flight.  Returns the
        postmaster's pid, for L{waitStopped}.
        """
        pid = int((self.path / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)
        return pid

    def waitStopped(self, pid: int, timeout: float = 30.0) -> None:
        """
        Block until the postmaster C{pid} (from L{crash}) has exited.
        """
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.NoSuchProcess:
            pass

    def start(self) -> None:
        self._pgserver.pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socketDir}", "-l", str(self.path / "log"), "start"],
            pgdata=self.path,
            user=self.server.system_user,
            timeout=30,
        )

    def destroy(self) -> None:
        try:
            self.server.cleanup()
        except psutil.NoSuchProcess:
            # Stopped by stop() (or crashed): pgserver's own stop finds no server and kills
            # the postmaster it remembers, which may have exited in between.  Gone is what
            # destroy wants.
            pass
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
