"""
Start-up and its end: controller listeners accept connections only once the instance can
serve them (refused at TCP level before), a listener that fails to listen late stops the
process, and the embedded PostgreSQL stops with C{twistd ctrlgw} on SIGINT and SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ctrlgw.metrics import Metrics
from ctrlgw.service import MIN_BACKLOG, Gateway, ListenerService
from ctrlgw.store.database import Database
from ctrlgw.store.migrate import applyMigrations
from tests.gateways import (
    QUICK_DATABASE_TIMEOUTS,
    TwistdProcess,
    connectController,
    freePort,
    httpPort,
    sample,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase, PrivatePostgres, databaseConfig


async def connectionRefused(port: int) -> bool:
    """
    Whether a TCP connection to 127.0.0.1:C{port} is refused (else it is accepted, and
    closed again at once).
    """
    try:
        controller = await connectController(port)
    except ConnectionRefusedError:
        return True
    controller.close()
    return False


class ControllerPortGateTests(PostgresTestCase):
    """
    A controller listener refuses connections (TCP) until the instance can serve them:
    database up, schema current, instance registered, LISTEN running.
    """

    timeout = 120

    async def assertRefusedWhile(self, gateway: Gateway, port: int, what: str) -> None:
        self.assertTrue(await connectionRefused(port), f"accepted while {what}")
        self.assertEqual(
            gateway.readiness.evaluate()["listener:main"],
            {"ok": False, "detail": "not listening yet: the instance cannot serve yet"},
        )

    @deferred
    async def test_refusedUntilMigrated(self) -> None:
        """
        With C{migrate = off} on a schema not migrated yet, the database is up but the
        controller port refuses connections, through heartbeats; once C{ctrlgw migrate}
        has run, the instance joins and the port accepts and welcomes.
        """
        schema = "t_" + uuid.uuid4().hex[:12]
        self.addCleanup(self.db.runOperation, "drop", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        port = freePort()
        gateway = await startGateway(
            self, self.dsn, schema, "gw-gate-migrate",
            {"database": {"migrate": "off"},
             "listener:main": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
            waitReady=False,
        )
        await waitUntil(lambda: gateway.db.up and gateway.instanceSkew is not None, 30,
                        what="the database")
        await self.assertRefusedWhile(gateway, port, "not migrated")
        # A heartbeat (1s) looks again, and finds the schema still behind.
        looks = {"query": "schema_exists"}
        looked = sample(gateway, "ctrlgw_db_query_seconds_count", looks)
        await waitUntil(
            lambda: sample(gateway, "ctrlgw_db_query_seconds_count", looks) > looked, 10,
            what="the schema checked again",
        )
        await self.assertRefusedWhile(gateway, port, "not migrated, after a heartbeat")

        db = Database(reactor, databaseConfig(schema), Metrics())
        await db.start(self.dsn)
        self.addCleanup(db.stop)
        await applyMigrations(db)
        await waitUntil(gateway.readiness.ready, 30,
                        what=lambda: f"ready: {gateway.readiness.evaluate()}")
        controller = await connectController(port)
        self.addCleanup(controller.close)
        await controller.hello("after-migrate")

    @deferred
    async def test_refusedWhileDatabaseUnreachable(self) -> None:
        """
        While the database cannot be reached, HTTP answers (503) and the controller port
        refuses connections; once the database is there, it accepts and welcomes.
        """
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(deferToThread, server.destroy)
        await deferToThread(server.stop)
        port = freePort()
        gateway = await startGateway(
            self, server.dsn, "ctrlgw", "gw-gate-down",
            {**QUICK_DATABASE_TIMEOUTS,
             "listener:main": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
            waitReady=False,
        )
        await waitUntil(lambda: gateway.service.getServiceNamed("http").port is not None, 30,
                        what="http")
        self.assertGreater(httpPort(gateway), 0)
        await sleep(1.0)  # A few connection attempts fail meanwhile.
        self.assertFalse(gateway.db.up)
        await self.assertRefusedWhile(gateway, port, "the database is unreachable")

        await deferToThread(server.start)
        await waitUntil(gateway.readiness.ready, 30,
                        what=lambda: f"ready: {gateway.readiness.evaluate()}")
        controller = await connectController(port)
        self.addCleanup(controller.close)
        await controller.hello("after-outage")


class ListenerServiceTests(TestCase):
    """
    L{ListenerService} on real sockets: bound early, listening only once ready.
    """

    def listener(
        self, port: int, ready: Deferred[None], fatal: list[str]
    ) -> ListenerService:
        service = ListenerService(
            reactor, f"tcp:{port}:interface=127.0.0.1", Factory.forProtocol(Protocol),
            "listener t", ready=lambda: ready, fatal=fatal.append,
        )
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    @deferred
    async def test_boundEarlyListensWhenReady(self) -> None:
        """
        After C{privilegedStartService} the port is held (a plain bind fails), yet
        connections are refused until C{ready} fires; then they are accepted.
        """
        port, ready, fatal = freePort(), Deferred[None](), []
        service = self.listener(port, ready, fatal)
        service.privilegedStartService()
        service.startService()
        with socket.socket() as other, self.assertRaises(OSError):
            other.bind(("127.0.0.1", port))
        self.assertTrue(await connectionRefused(port))
        ready.callback(None)
        self.assertIsNotNone(service.port)
        self.assertFalse(await connectionRefused(port))
        self.assertEqual(fatal, [])
        self.assertEqual(service.check(), (True, str(service.port.getHost())))  # type: ignore[union-attr]

    @deferred
    async def test_backlogHoldsAConnectStorm(self) -> None:
        """
        The port listens with a backlog of at least MIN_BACKLOG, as the kernel reports it
        (C{ss}: Send-Q of a listening socket), not Twisted's default of 50, which
        overflows when a fleet reconnects at once.
        """
        if shutil.which("ss") is None:
            self.skipTest("ss (iproute2) is not installed")
        port, ready, fatal = freePort(), Deferred[None](), []
        service = self.listener(port, ready, fatal)
        service.privilegedStartService()
        service.startService()
        ready.callback(None)
        listing = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        self.assertEqual(int(listing[2]), min(MIN_BACKLOG, somaxconn))
        self.assertGreater(int(listing[2]), 50)

    @deferred
    async def test_stopBeforeReady(self) -> None:
        """
        Stopped before it was ready, the listener never listens and lets go of the port.
        """
        port, ready, fatal = freePort(), Deferred[None](), []
        service = self.listener(port, ready, fatal)
        service.privilegedStartService()
        service.startService()
        await maybeDeferred(service.stopService)
        self.assertTrue(ready.called)  # Cancelled.
        with socket.socket() as other:
            other.bind(("127.0.0.1", port))
        self.assertIsNone(service.port)

    def test_lateFailureIsFatal(self) -> None:
        """
        If the port cannot be listened on when the instance becomes ready (another socket
        took it meanwhile), C{fatal} gets one line naming the listener, its endpoint and
        the error, and the listener reports the error.
        """
        port, ready, fatal = freePort(), Deferred[None](), []
        service = self.listener(port, ready, fatal)
        service.privilegedStartService()
        service.startService()
        thief = socket.socket()
        self.addCleanup(thief.close)
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", port))
        thief.listen()
        ready.callback(None)
        self.assertIsNone(service.port)
        self.assertEqual(len(fatal), 1, fatal)
        self.assertTrue(
            fatal[0].startswith(f"listener t: cannot listen on tcp:{port}:interface=127.0.0.1: "),
            fatal[0],
        )
        self.assertIn("in use", fatal[0])
        self.assertEqual(service.check()[0], False)

    def test_bindFailureAtStartup(self) -> None:
        """
        A port that cannot be bound ends C{privilegedStartService} with one line on the
        process's standard error and exit status 1.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = self.listener(port, Deferred(), [])
        stderr = io.StringIO()
        with mock.patch.object(sys, "__stderr__", stderr), self.assertRaises(SystemExit) as e:
            service.privilegedStartService()
        self.assertEqual(e.exception.code, 1)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(
            f"ctrlgw: listener t: cannot listen on tcp:{port}:interface=127.0.0.1: "
        ), lines[0])


def postmasterPid(dataDir: Path) -> int | None:
    """
    The PID in C{dataDir}/postmaster.pid, if there is one.
    """
    try:
        return int((dataDir / "postmaster.pid").read_text().splitlines()[0])
    except FileNotFoundError:
        return None


def running(pid: int) -> bool:
    """
    Whether process C{pid} runs (a zombie, exited but not reaped yet, does not).
    """
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def deadPid() -> int:
    """
    The PID of a process that has exited.
    """
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True, capture_output=True, text=True,
    )
    return int(child.stdout)


class EmbeddedPostgresShutdownTests(TestCase):
    """
    C{twistd -n ctrlgw} with an empty C{[database] dsn} (C{make run}) stops the embedded
    PostgreSQL it started when it is stopped by a signal.
    """

    timeout = 180

    def setUp(self) -> None:
        # Short: the server's socket lives in the data directory if its path fits.
        self.workdir = Path(tempfile.mkdtemp(prefix="ctrlgw-emb-"))
        self.dataDir = self.workdir / "pgdata"
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.addCleanup(self._killPostgres)

    def _killPostgres(self) -> None:
        # Whatever a failed test left behind.
        pid = postmasterPid(self.dataDir)
        if pid is not None and running(pid):
            os.kill(pid, signal.SIGQUIT)

    async def runAndStop(self, signum: int, staleHandle: bool = False) -> None:
        port, http = freePort(), freePort()
        config = self.workdir / "gw.ini"
        config.write_text(
            f"[listener:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
            f"[http]\nendpoint = tcp:{http}:interface=127.0.0.1\n"
            f"[database]\ndsn =\ndata_dir = {self.dataDir}\n"
        )
        child = TwistdProcess.spawn(
            self, ["-n", "--pidfile=", "ctrlgw", "--config", str(config)], str(self.workdir)
        )
        await child.waitReady(http, timeout=120)
        pid = postmasterPid(self.dataDir)
        assert pid is not None, child.text()
        self.assertTrue(running(pid))
        if staleHandle:
            # A user of the server that died without letting go (an older ctrlgw killed
            # by a signal): it must not keep the server running.
            handles = self.dataDir / ".handle_pids.json"
            handles.write_text(json.dumps([deadPid(), *json.loads(handles.read_text())]))

        child.signal(signum)
        code = await child.waitForExit(60)
        self.assertIn(code, [(0, None), (None, signum)], child.text())
        await waitUntil(lambda: not running(pid), 10, what=f"postgres {pid} to exit")
        self.assertIsNone(postmasterPid(self.dataDir), child.text())
        self.assertNotIn(b"Traceback", child.output, child.text())

    @deferred
    async def test_sigintStopsEmbeddedPostgres(self) -> None:
        """
        Ctrl-C (SIGINT): twistd exits and the embedded server is stopped, not left behind.
        """
        await self.runAndStop(signal.SIGINT)

    @deferred
    async def test_sigtermStopsEmbeddedPostgres(self) -> None:
        """
        SIGTERM likewise, even though the server's list of users still names a process
        that died without letting go.
        """
        await self.runAndStop(signal.SIGTERM, staleHandle=True)
