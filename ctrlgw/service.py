"""
The gateway's service tree: one service per concern, stopped one after another in reverse
order of start (listeners first, the database last), so a shutdown drains in a safe order.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from ctrlgw.api import ApiResource
from ctrlgw.cluster import Cluster
from ctrlgw.config import GatewayConfig
from ctrlgw.inbox import Inbox
from ctrlgw.interfaces import Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.outbox import Outbox, commandsChannel
from ctrlgw.ownership import EventLog, PostgresOwnership
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import ConnectionContext
from ctrlgw.protocol.factory import ControllerFactory
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.database import Database
from ctrlgw.store.embedded import startEmbedded
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.migrate import applyMigrations, currentVersion, latestVersion
from ctrlgw.store.postgres import ClaimPolicy, Store
from ctrlgw.web import Readiness, makeRoot, makeSite

log = Logger()


class SequentialMultiService(MultiService):
    """
    Stops its children one at a time, last started first, each after the previous one has
    finished stopping.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stopInOrder())

    async def _stopInOrder(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name)


class ListenerService(Service):
    """
    One endpoint listening with one factory; reports whether it is up.
    """

    def __init__(self, reactor: Any, description: str, factory: Any, label: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.port: IListeningPort | None = None
        self.error: str | None = None

    def privilegedStartService(self) -> None:
        # twistd binds here, before the reactor runs: a listener that cannot bind stops
        # start-up with one line and a non-zero exit instead of a gateway that never
        # becomes ready.
        super().privilegedStartService()
        self._listen()
        if self.error is not None:
            sys.stderr.write(f"ctrlgw: {self.label}: cannot listen on {self.description}: {self.error}\n")
            raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        if self.port is None and self.error is None:
            self._listen()

    def _listen(self) -> None:
        self.error = None
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        log.info("{label} listening on {address}", label=self.label, address=port.getHost())

    def _failed(self, failure: Any) -> None:
        self.error = failure.getErrorMessage()
        log.critical(
            "{label}: cannot listen on {description}: {error}",
            label=self.label,
            description=self.description,
            error=self.error,
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def check(self) -> tuple[bool, str]:
        if self.port is not None:
            return True, str(self.port.getHost())
        return False, self.error or "not listening yet"


class CallbackService(Service):
    """
    A service made of an async start and an async stop.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], Coroutine[Any, Any, None]] | None = None,
        stop: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        if self._start is not None:
            ensureDeferred(self._start()).addErrback(
                lambda f: log.failure("starting {name} failed", f, name=self.name)
            )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._stop is not None:
            return ensureDeferred(self._stop())
        return None


class PeriodicService(Service):
    """
    Runs an async job every C{interval} seconds (never two at once), logging failures.
    """

    def __init__(
        self, name: str, clock: IReactorTime, interval: float, job: Callable[[], Awaitable[None]]
    ) -> None:
        self.setName(name)
        self._job = job
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock
        self.interval = interval

    async def _runJob(self) -> None:
        try:
            await self._job()
        except Unavailable as e:
            # The database layer already says loudly when it goes down.
            log.debug("{name} skipped: {error}", name=self.name, error=e)
        except Exception as e:
            log.warn("{name}: {error}", name=self.name, error=e)

    def _run(self) -> Deferred[None]:
        return ensureDeferred(self._runJob())

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return None


async def _bounded(clock: IReactorTime, d: Deferred[Any], seconds: float, what: str) -> None:
    d.addTimeout(seconds, clock)
    try:
        await d
    except Exception as e:
        log.warn("{what} did not finish: {error}", what=what, error=e)


def generateInstanceId() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Gateway:
    """
    The objects of one gateway instance, wired together.  C{service} is the tree to run.
    """

    def __init__(self, config: GatewayConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.instance = config.instance_id or generateInstanceId()
        self.metrics = Metrics()
        self.readiness = Readiness()
        self.db = Database(reactor, config.database, self.metrics, f"ctrlgw {self.instance}")
        cluster = config.cluster
        self.store = Store(
            self.db,
            self.instance,
            ClaimPolicy(
                flapThreshold=cluster.flap_threshold,
                flapWindow=cluster.flap_window,
                flapCooldown=cluster.flap_cooldown,
                refuseFlapping=cluster.flap_policy == "refuse",
                instanceTtl=cluster.instance_ttl,
            ),
        )
        self.events = EventLog(reactor, self.store, self.metrics)
        self.ownership = PostgresOwnership(
            reactor, self.store, self.events, config.auth, self.metrics, admitting=False
        )
        self.inbox = Inbox(reactor, self.store, config.inbox, self.metrics)
        self.registry = ConnectionRegistry()
        self.outbox = Outbox(
            reactor, self.store, self.registry, config.outbox, self.metrics,
            lambda: self.instanceSkew,
        )
        self.context = ConnectionContext(
            clock=reactor,
            liveness=config.liveness,
            timestamps=config.timestamps,
            registry=self.registry,
            ownership=self.ownership,
            sink=self.inbox,
            settler=self.outbox,
            metrics=self.metrics,
            maxUnacked=config.inbox.max_unacked_per_connection,
        )
        self.notifications = NotificationListener(reactor, self.db, cluster.heartbeat_interval)
        self.cluster = Cluster(
            reactor, self.store, self.registry, self.ownership, cluster, self.metrics,
            self.notifications, lambda: self.instanceSkew,
        )
        self.notifications.subscribe(
            commandsChannel(self.db.schema), self.outbox.doorbell,
            lambda: self.outbox.wake(None, "poll"),
        )
        self.schemaVersion = 0
        self.instanceSkew: float | None = None
        self._joining: Deferred[None] | None = None
        self.service = self._buildTree()

    def _buildTree(self) -> SequentialMultiService:
        reactor, config = self.reactor, self.config
        top = SequentialMultiService()
        CallbackService("database", self._startDatabase, self._stopDatabase).setServiceParent(top)
        self.readiness.add("database", lambda: (self.db.up, "up" if self.db.up else "unreachable"))
        self.readiness.add("migrations", self._migrationsCheck)

        self.api = ApiResource(config.http.api_token, self.store, config.outbox.default_ttl)
        root = makeRoot(self.metrics.registry, self.readiness, self.api)
        http = ListenerService(reactor, config.http.endpoint, makeSite(root), "http")
        http.setName("http")
        http.setServiceParent(top)

        CallbackService("cluster", stop=self._leaveCluster).setServiceParent(top)
        self.readiness.add("cluster", self._clusterCheck)
        CallbackService("writers", stop=self._drainWriters).setServiceParent(top)
        PeriodicService(
            "clock-check", reactor, config.timestamps.clock_check_interval, self._checkClock
        ).setServiceParent(top)
        self.readiness.add("clock", self._clockCheck)
        PeriodicService(
            "retention", reactor, config.retention.prune_interval, self._prune
        ).setServiceParent(top)

        PeriodicService(
            "heartbeat", reactor, config.cluster.heartbeat_interval, self._heartbeat
        ).setServiceParent(top)
        PeriodicService(
            "reconcile", reactor, config.cluster.reconcile_interval, self._reconcile
        ).setServiceParent(top)
        PeriodicService(
            "outbox-poll", reactor, config.outbox.poll_interval, self._pollOutbox
        ).setServiceParent(top)
        CallbackService("connections", stop=self._byeEveryone).setServiceParent(top)
        for listener in config.listeners:
            factory = ControllerFactory(self.context, listener.name, listener.makeFraming)
            service = ListenerService(reactor, listener.endpoint, factory, f"listener {listener.name}")
            service.setName(f"listener:{listener.name}")
            service.setServiceParent(top)
            self.readiness.add(f"listener:{listener.name}", service.check)
        return top

    # --- database ---

    async def _startDatabase(self) -> None:
        log.info("ctrlgw instance {instance} starting", instance=self.instance)
        dsn = self.config.database.dsn or await startEmbedded(self.reactor, self.config.database.data_dir)
        self.db.onUpChanged(self._databaseUpChanged)
        await self.db.start(dsn)

    def _databaseUpChanged(self, up: bool) -> None:
        if up:
            ensureDeferred(self._refreshSchema()).addErrback(
                lambda f: log.failure("schema check failed", f)
            )
            ensureDeferred(self._checkClock()).addErrback(
                lambda f: log.warn("clock check failed: {error}", error=f.getErrorMessage())
            )

    async def _refreshSchema(self) -> None:
        if self.config.database.migrate == "auto":
            await applyMigrations(self.db)
        self.schemaVersion = await currentVersion(self.db)
        if self.schemaVersion != latestVersion():
            log.error(
                "schema {schema} is at version {have}, this release needs {want}: run ctrlgw migrate",
                schema=self.db.schema, have=self.schemaVersion, want=latestVersion(),
            )
            return
        await self._joinCluster()

    async def _joinCluster(self) -> None:
        # Single flight: the database-up callback and the heartbeat may both ask; two
        # registrations could mark a session claimed in between as a restart's leftover.
        joining = self._joining
        if joining is None:
            joining = self._joining = Deferred.fromCoroutine(self._join())
            joining.addBoth(self._joined)
        await joining

    async def _join(self) -> None:
        if not self.cluster.registered:
            await self.cluster.register()
        if not self.notifications.running:
            self.notifications.start()

    def _joined(self, result: object) -> object:
        self._joining = None
        return result

    def _migrationsCheck(self) -> tuple[bool, str]:
        want = latestVersion()
        return self.schemaVersion == want, f"schema version {self.schemaVersion}, need {want}"

    async def _stopDatabase(self) -> None:
        await self.db.stop()

    # --- cluster ---

    def _clusterCheck(self) -> tuple[bool, str]:
        if not self.cluster.registered:
            return False, "instance not registered yet"
        if not self.notifications.listening:
            return False, "not listening for takeovers"
        return True, f"instance {self.instance}"

    async def _heartbeat(self) -> None:
        if self.schemaVersion == latestVersion() and self.cluster.registered:
            await self.cluster.heartbeat()
        else:
            # Not joined yet (e.g. not migrated when the database came up, migrate = off):
            # look again, and join the cluster once `ctrlgw migrate` has run.
            await self._refreshSchema()

    async def _reconcile(self) -> None:
        if self.cluster.registered:
            await self.cluster.reconcile()

    async def _pollOutbox(self) -> None:
        if self.cluster.registered:
            await self.outbox.poll()

    async def _leaveCluster(self) -> None:
        self.notifications.stop()
        try:
            await self.cluster.unregister()
        except Exception as e:
            log.warn("could not unregister instance {instance}: {error}", instance=self.instance, error=e)

    # --- periodic jobs ---

    async def _checkClock(self) -> None:
        before = self.reactor.seconds()
        databaseNow = await self.store.databaseTime()
        after = self.reactor.seconds()
        self.instanceSkew = (before + after) / 2 - databaseNow
        self.metrics.instanceSkew.set(self.instanceSkew)
        if abs(self.instanceSkew) > self.config.timestamps.max_instance_skew:
            log.error(
                "this instance's clock is {skew:+.3f}s off the database's: not ready",
                skew=self.instanceSkew,
            )

    def _clockCheck(self) -> tuple[bool, str]:
        if self.instanceSkew is None:
            return False, "not measured yet"
        limit = self.config.timestamps.max_instance_skew
        return abs(self.instanceSkew) <= limit, f"skew {self.instanceSkew:+.3f}s, limit {limit:g}s"

    async def _prune(self) -> None:
        retention = self.config.retention
        for table, days in (
            ("events", retention.events_days),
            ("sessions", retention.events_days),
            ("inbox", retention.inbox_days),
            ("commands", retention.commands_days),
            ("command_events", retention.commands_days),
        ):
            while True:
                removed = await self.store.prune(table, days, retention.prune_batch)
                self.metrics.pruned.labels(table).inc(removed)
                if removed < retention.prune_batch:
                    break

    # --- shutdown ---

    async def _byeEveryone(self) -> None:
        """
        Refuse new hellos, then say bye (shutdown) in batches so the fleet does not come
        back as one herd, then wait (bounded) for the sockets to close.
        """
        context, shutdown = self.context, self.config.shutdown
        context.accepting = False
        connections = list(context.connections)
        if connections:
            log.info("saying bye to {count} connections", count=len(connections))
        for start in range(0, len(connections), shutdown.bye_batch):
            for connection in connections[start : start + shutdown.bye_batch]:
                connection.close(v1.BYE_SHUTDOWN)
            if start + shutdown.bye_batch < len(connections):
                await deferLater(self.reactor, shutdown.bye_interval, lambda: None)
        if context.connections:
            await deferLater(self.reactor, self.config.liveness.close_grace + 0.1, lambda: None)

    async def _drainWriters(self) -> None:
        await _bounded(
            self.reactor,
            # consumeErrors: drains cut short by the bound fail with CancelledError, which
            # is expected here, not an unhandled error.
            DeferredList([
                self.inbox.drain(), self.outbox.stop(), self.ownership.drain(), self.events.drain()
            ], consumeErrors=True),
            10.0,
            "draining the inbox and history",
        )
        # What could not be written in time was never confirmed (nothing acked is lost):
        # stop retrying it, or the writers would go on after the service stopped.
        self.inbox.abandon()
        self.outbox.abandon()
        self.ownership.abandon()
        self.events.abandon()
