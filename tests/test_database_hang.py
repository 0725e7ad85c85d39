"""
A database that stops answering (not refusing: silent) must never stall the gateway.
"""

from __future__ import annotations

import os
import signal

import psutil
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ctrlgw.interfaces import Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database
from tests.gateways import waitUntil
from tests.helpers import deferred
from tests.pg import PrivatePostgres, databaseConfig


def serverProcesses(server: PrivatePostgres) -> list[psutil.Process]:
    postmaster = psutil.Process(server.server.get_pid())
    return [postmaster, *postmaster.children(recursive=True)]


class SilentDatabaseTests(TestCase):
    timeout = 60

    @deferred
    async def test_silentServerDoesNotFreezeTheReactor(self) -> None:
        """
        With every server process stopped (SIGSTOP: sockets open, nothing answers), a
        call fails with Unavailable within the call limit, the pool says down, and the
        reactor keeps turning meanwhile (no blocking cancel request on its thread).
        """
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(lambda: deferToThread(server.destroy))
        db = Database(
            reactor,
            databaseConfig(
                "public", pool_size=1, statement_timeout=0.5, connect_timeout=0.5,
                reconnect_max_delay=0.5,
            ),
            Metrics(),
        )
        await db.start(server.dsn)
        self.addCleanup(db.stop)
        self.assertEqual(await db.runQuery("t", "SELECT 1"), [(1,)])

        ticks: list[float] = []
        loop = LoopingCall(lambda: ticks.append(reactor.seconds()))
        loop.start(0.05)
        self.addCleanup(lambda: loop.running and loop.stop())
        stopped = serverProcesses(server)
        for process in stopped:
            os.kill(process.pid, signal.SIGSTOP)
        try:
            started = reactor.seconds()
            with self.assertRaises(Unavailable):
                await db.runQuery("t", "SELECT 1")
            took = reactor.seconds() - started
            self.assertFalse(db.up)
        finally:
            for process in stopped:
                os.kill(process.pid, signal.SIGCONT)
        loop.stop()
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
        self.assertLess(took, db.callLimit + 0.5)
        self.assertLess(max(gaps), 0.5, f"the reactor stalled for {max(gaps):.2f}s")
        # And the pool comes back by itself once the server answers again.
        await waitUntil(lambda: db.up, 15, what="the pool reconnecting")
        self.assertEqual(await db.runQuery("t", "SELECT 2"), [(2,)])
