"""
The gateway's service tree: one service per concern, started in order and stopped one
after another in reverse order (listeners first, the database last), so a shutdown drains
in a safe order.

Start-up waits where it must: L{MembershipService} waits for L{DatabaseService.whenUp},
and the controller listeners wait for L{MembershipService.whenJoined}, so a controller
port accepts connections only once the instance can serve them.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ctrlgw.api import ApiResource
from ctrlgw.cluster import Cluster
from ctrlgw.config import DatabaseConfig, GatewayConfig
from ctrlgw.drain import Drain, byeInBatches
from ctrlgw.gcpolicy import ScheduledCollection
from ctrlgw.inbox import Inbox
from ctrlgw.interfaces import Unavailable
from ctrlgw.kick import Kicks
from ctrlgw.metrics import Metrics
from ctrlgw.outbox import Outbox, commandsChannel
from ctrlgw.ownership import EventLog, PostgresOwnership
from ctrlgw.partitions import PartitionJob
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import ConnectionContext
from ctrlgw.protocol.factory import ControllerFactory
from ctrlgw.protocol.session import FIRST_PING_PHASE
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.replies import Replies, repliesChannel
from ctrlgw.revocation import Revocations
from ctrlgw.sse import StreamApi
from ctrlgw.store.database import Database
from ctrlgw.store.embedded import EmbeddedPostgres
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.migrate import applyMigrations, currentVersion, latestVersion
from ctrlgw.store.postgres import ClaimPolicy, Store
from ctrlgw.stream import StreamDoorbell, StreamReader, StreamRetention, streamChannel
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


def writeToStderr(line: str) -> None:
    """
    Write C{ctrlgw: line} to the process's own standard error.  Under twistd, C{sys.stderr}
    is redirected into the log (which C{--logfile=-} sends to standard output).
    """
    stream = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    stream.write(f"ctrlgw: {line}\n")
    stream.flush()


class Latch:
    """
    Set once; L{wait} fires when it is set, at once if it already is.
    """

    def __init__(self) -> None:
        self.isSet = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        if self.isSet:
            return succeed(None)
        d: Deferred[None] = Deferred(self._forget)
        self._waiters.append(d)
        return d

    def _forget(self, d: Deferred[None]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    def set(self) -> None:
        if self.isSet:
            return
        self.isSet = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


@dataclass(frozen=True)
class _Plan:
    """
    What a TCP-like endpoint listens on, and the factory its port would serve (wrapped by
    the endpoint: PROXY protocol, TLS).
    """

    port: int
    interface: str
    backlog: int
    factory: Any


class _DryRun:
    """
    A stand-in reactor that records what an endpoint would listen on, for the endpoints
    built on C{listenTCP} and C{listenSSL} (C{tcp:}, C{tcp6:}, C{ssl:}, C{haproxy:...}).
    """

    def __init__(self) -> None:
        self.plan: _Plan | None = None

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self.plan = _Plan(port, interface, backlog, factory)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
        interface: str = "",
    ) -> None:
        # What the reactor's own listenSSL does: TLS in memory over a TCP port.
        self.plan = _Plan(port, interface, backlog, TLSMemoryBIOFactory(contextFactory, False, factory))


def _plan(reactor: Any, description: str, factory: Any) -> _Plan | None:
    """
    Where C{description} would listen, or C{None} for an endpoint that is not TCP-like
    (C{unix:}, C{systemd:}).  Raises for a description that cannot be used at all (a TLS
    key that cannot be read, say).
    """
    dryRun = _DryRun()
    endpoint = serverFromString(dryRun, description)
    try:
        endpoint.listen(factory).addErrback(lambda _: None)
    except AttributeError:
        pass  # Not TCP-like: it asked the dry run for what it lacks (listenUNIX, say).
    return dryRun.plan


# The smallest listen backlog of a controller port (the kernel caps it at somaxconn).
MIN_BACKLOG = 4096


def _bindWithoutListening(interface: str, port: int) -> socket.socket:
    """
    A socket bound as Twisted's own TCP port binds it (C{SO_REUSEADDR} on POSIX), without
    listen(): connection attempts are refused until it listens.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        if family == socket.AF_INET6:
            address = socket.getaddrinfo(
                interface, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0][4]
        else:
            address = (interface, port)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerService(Service):
    """
    One endpoint listening with one factory: at once, or once C{ready()} has fired.

    A TCP-like endpoint (C{tcp:}, C{tcp6:}, C{ssl:}, C{haproxy:...}) is bound early, in
    L{privilegedStartService} (before twistd sheds privileges), without listening: until
    it listens a connection attempt is refused by the kernel, not accepted and bounced.
    When the time comes the bound socket listens and the reactor adopts it.  Another kind
    of endpoint simply listens when the time comes.

    A listener that cannot bind at start-up stops twistd with one line on standard error
    and exit status 1.  One that fails to listen later calls C{fatal} with one line (twistd:
    the same line, then a stop with a non-zero exit), or, without C{fatal}, logs it.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        label: str,
        name: str | None = None,
        ready: Callable[[], Deferred[None]] | None = None,
        fatal: Callable[[str], object] | None = None,
    ) -> None:
        if name is not None:
            self.setName(name)
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self._ready = ready
        self._fatal = fatal
        self.port: IListeningPort | None = None
        self.error: str | None = None
        self._prepared = False
        self._plan: _Plan | None = None
        self._socket: socket.socket | None = None
        self._waiting: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._prepare()
        if self.error is not None:
            # Once, on standard error; the reactor is not running yet.
            writeToStderr(f"{self.label}: cannot listen on {self.description}: {self.error}")
            raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        if not self._prepared:
            # Not started by twistd (tests, tools): bind now.
            self._prepare()
        if self.error is not None:
            log.critical(
                "{label}: cannot listen on {description}: {error}",
                label=self.label, description=self.description, error=self.error,
            )
            return
        if self._ready is None:
            self._listen()
            return
        waiting = self._waiting = self._ready()
        waiting.addCallback(lambda _: self._listen())
        waiting.addErrback(self._notListening)

    def _prepare(self) -> None:
        self._prepared = True
        self.error = None
        try:
            plan = _plan(self.reactor, self.description, self.factory)
            if plan is not None:
                self._socket = _bindWithoutListening(plan.interface, plan.port)
            self._plan = plan
        except Exception as e:
            self.error = str(e) or type(e).__name__

    def _listen(self) -> None:
        self._waiting = None
        if not self.running:
            return
        sock, self._socket = self._socket, None
        if sock is None or self._plan is None:
            d = serverFromString(self.reactor, self.description).listen(self.factory)
            d.addCallbacks(self._listening, lambda f: self._cannotListen(f.getErrorMessage()))
            return
        try:
            # Twisted's default backlog (50) overflows in a connect storm: the kernel then
            # drops SYNs and each controller retries after 1 s, 3 s, 7 s...
            sock.listen(max(self._plan.backlog, MIN_BACKLOG))
            port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, self._plan.factory)
        except Exception as e:
            self._cannotListen(str(e) or type(e).__name__)
            return
        finally:
            sock.close()  # The reactor's port has a socket of its own (a duplicate).
        self._listening(port)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        log.info("{label} listening on {address}", label=self.label, address=port.getHost())

    def _cannotListen(self, error: str) -> None:
        self.error = error
        if self._fatal is not None:
            self._fatal(f"{self.label}: cannot listen on {self.description}: {error}")
        else:
            log.critical(
                "{label}: cannot listen on {description}: {error}",
                label=self.label, description=self.description, error=error,
            )

    def _notListening(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("{label}: waiting to listen failed", failure, label=self.label)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._prepared = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def check(self) -> tuple[bool, str]:
        if self.port is not None:
            return True, str(self.port.getHost())
        if self.error is not None:
            return False, self.error
        if self._waiting is not None:
            return False, "not listening yet: the instance cannot serve yet"
        return False, "not listening yet"


class DatabaseService(Service):
    """
    The database pool, after the embedded server when C{[database] dsn} is empty.

    L{whenUp} fires once the database is first up.  Stopping closes the pool, then lets go
    of the embedded server, which stops it unless another live process still uses it.
    """

    def __init__(self, reactor: Any, db: Database, config: DatabaseConfig) -> None:
        self.setName("database")
        self.reactor = reactor
        self.db = db
        self.config = config
        self.embedded: EmbeddedPostgres | None = None
        self._up = Latch()
        self._starting: Deferred[None] | None = None

    def whenUp(self) -> Deferred[None]:
        return self._up.wait()

    def check(self) -> tuple[bool, str]:
        return self.db.up, "up" if self.db.up else "unreachable"

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(
            lambda f: log.failure("starting the database failed", f)
        )

    async def _start(self) -> None:
        dsn = self.config.dsn
        if not dsn:
            self.embedded = EmbeddedPostgres(self.reactor, self.config.data_dir)
            dsn = await self.embedded.start()
            if not self.running:
                return  # Stopped meanwhile; stopService stops the embedded server.
        # Fires once the first connection is up: that is whenUp.
        self.db.start(dsn).addCallback(lambda _: self._up.set())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.db.stop()
        starting = self._starting
        if starting is not None:
            # The embedded server may still be starting (in a thread): let it, then stop it.
            await starting
        if self.embedded is not None:
            await self.embedded.stop()


class MembershipService(Service):
    """
    This instance's membership of the cluster.

    Once the database is up: migrate (C{migrate = auto}), check the schema version, and
    if it is current register the instance and start C{LISTEN}; L{whenJoined} fires then
    (the controller listeners wait for it).  The same check runs again each time the
    database comes back, and at every L{heartbeat} until joined, so with C{migrate = off}
    the instance joins once someone has run C{ctrlgw migrate}.  Stopping stops C{LISTEN}
    and deletes the instance's row.
    """

    def __init__(
        self,
        database: DatabaseService,
        migrate: str,
        cluster: Cluster,
        notifications: NotificationListener,
    ) -> None:
        self.setName("membership")
        self.database = database
        self.db = database.db
        self.migrate = migrate
        self.cluster = cluster
        self.notifications = notifications
        self.schemaVersion = 0
        self._joined = Latch()
        # One check at a time: two registrations could mark a session claimed in between
        # as a restart's leftover.
        self._lock = DeferredLock()
        self._waitingForDatabase: Deferred[None] | None = None
        self._watching = False

    def whenJoined(self) -> Deferred[None]:
        return self._joined.wait()

    def startService(self) -> None:
        super().startService()
        waiting = self._waitingForDatabase = self.database.whenUp()
        waiting.addCallback(self._databaseUp)
        waiting.addErrback(lambda f: f.trap(CancelledError))

    def _databaseUp(self, _: object) -> None:
        self._waitingForDatabase = None
        if not self._watching:
            # From the second time on (this is the first).
            self._watching = True
            self.db.onUpChanged(lambda up: self._check() if up else None)
        self._check()

    def _check(self) -> None:
        self.refresh().addErrback(self._refreshFailed)

    def _refreshFailed(self, failure: Failure) -> None:
        if failure.check(Unavailable):
            log.warn("schema check failed: {error}", error=failure.getErrorMessage())
        else:
            log.failure("schema check failed", failure)

    def refresh(self) -> Deferred[None]:
        """
        Check the schema (after migrating, with C{migrate = auto}); join if it is current.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._refresh()))

    async def _refresh(self) -> None:
        if not self.running:
            return
        if self.migrate == "auto":
            await applyMigrations(self.db)
        self.schemaVersion = await currentVersion(self.db)
        if self.schemaVersion != latestVersion():
            log.error(
                "schema {schema} is at version {have}, this release needs {want}: run ctrlgw migrate",
                schema=self.db.schema, have=self.schemaVersion, want=latestVersion(),
            )
            return
        if not self.running:
            return
        if not self.cluster.registered:
            await self.cluster.register()
        if not self.notifications.running:
            self.notifications.start()
        self._joined.set()

    async def heartbeat(self) -> None:
        if self.schemaVersion == latestVersion() and self.cluster.registered:
            await self.cluster.heartbeat()
        else:
            # Not joined yet (e.g. not migrated when the database came up, migrate = off):
            # look again, and join once `ctrlgw migrate` has run.
            await self.refresh()

    def migrationsCheck(self) -> tuple[bool, str]:
        want = latestVersion()
        return self.schemaVersion == want, f"schema version {self.schemaVersion}, need {want}"

    def clusterCheck(self) -> tuple[bool, str]:
        if not self.cluster.registered:
            return False, "instance not registered yet"
        if not self.notifications.listening:
            return False, "not listening for takeovers"
        return True, f"instance {self.cluster.instance}"

    def stopService(self) -> Deferred[None]:
        super().stopService()
        waiting, self._waitingForDatabase = self._waitingForDatabase, None
        if waiting is not None:
            waiting.cancel()
        # After a check under way, so that it cannot register behind our back.
        return self._lock.run(lambda: Deferred.fromCoroutine(self._leave()))

    async def _leave(self) -> None:
        self.notifications.stop()
        try:
            await self.cluster.unregister()
        except Exception as e:
            log.warn(
                "could not unregister instance {instance}: {error}",
                instance=self.cluster.instance, error=e,
            )


class CallbackService(Service):
    """
    A service that does its work when it stops (an async C{stop}).
    """

    def __init__(self, name: str, stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.setName(name)
        self._stop = stop

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


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


class GatewayService(SequentialMultiService):
    """
    The root of one gateway's service tree.
    """

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def startService(self) -> None:
        log.info("ctrlgw instance {instance} starting", instance=self.instance)
        super().startService()


class Gateway:
    """
    The objects of one gateway instance, wired together.  C{service} is the tree to run.
    """

    def __init__(
        self, config: GatewayConfig, reactor: Any, fatal: Callable[[str], object] | None = None,
        exit: Callable[[], object] | None = None,
    ) -> None:
        """
        @param fatal: Called with one line when a listener fails to listen after start-up
            (twistd: say it on standard error and exit non-zero); without it, logged.
        @param exit: Called when a drain asks the process to exit (twistd: stop the
            reactor); without it, the service tree stops.
        """
        self.config = config
        self.reactor = reactor
        self.instance = config.instance_id or generateInstanceId()
        self.metrics = Metrics()
        self.readiness = Readiness()
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness.ready() else 0.0)
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
            dedupeWindow=config.retention.partition_hours * 3600.0,
        )
        self.partitions = PartitionJob(self.store, self.metrics, config.retention)
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
            firstPingPhase=lambda: FIRST_PING_PHASE + random.random() * (1 - FIRST_PING_PHASE),
            # The pongs of one slot come back together and are read in one reactor turn:
            # on a 0.5 s grid the 330 of a slot at 10,000 controllers held commands up
            # (docs/architecture.md, "Periodic work"); finer than 0.1 s costs idle CPU.
            pingGrid=0.1,
        )
        self.notifications = NotificationListener(reactor, self.db, cluster.heartbeat_interval)
        self.cluster = Cluster(
            reactor, self.store, self.registry, self.ownership, cluster, self.metrics,
            self.notifications, lambda: self.instanceSkew,
        )
        self.revocations = Revocations(
            self.store, self.registry, self.ownership, self.metrics, self.notifications
        )
        self.notifications.subscribe(
            commandsChannel(self.db.schema), self.outbox.doorbell,
            lambda: self.outbox.wake(None, "poll"),
        )
        self.replies = Replies(reactor, self.store, self.registry, self.metrics)
        self.notifications.subscribe(
            repliesChannel(self.db.schema), self.replies.doorbell,
            lambda: ensureDeferred(self.replies.poll()).addErrback(
                lambda f: log.warn("polling replies failed: {error}", error=f.getErrorMessage())
            ),
        )
        # The application stream (docs/consuming.md): readers woken by its notification.
        self.streamDoorbell = StreamDoorbell(reactor)
        self.notifications.subscribe(
            streamChannel(self.db.schema), self.streamDoorbell.ring, self.streamDoorbell.ring
        )
        self.streamReader = StreamReader(self.store, self.streamDoorbell, self.metrics)
        self.streamRetention = StreamRetention(
            self.store, self.metrics, config.stream.keep, config.stream.max_entries,
            config.retention.prune_batch,
        )
        self.instanceSkew: float | None = None
        self.db.onUpChanged(self._databaseUpChanged)

        self.database = DatabaseService(reactor, self.db, config.database)
        self.membership = MembershipService(
            self.database, config.database.migrate, self.cluster, self.notifications
        )
        self.api = ApiResource(config.http.api_token, self.store, config.outbox.default_ttl)
        StreamApi(self.store, self.streamReader, config.stream).install(self.api)
        self.http = ListenerService(
            reactor, config.http.endpoint,
            makeSite(makeRoot(self.metrics.registry, self.readiness, self.api)),
            "http", name="http", fatal=fatal,
        )
        self.listeners = [
            ListenerService(
                reactor, listener.endpoint,
                ControllerFactory.fromConfig(self.context, listener),
                f"listener {listener.name}", name=f"listener:{listener.name}",
                ready=self.membership.whenJoined, fatal=fatal,
            )
            for listener in config.listeners
        ]
        self.readiness.add("database", self.database.check)
        self.readiness.add("migrations", self.membership.migrationsCheck)
        self.readiness.add("cluster", self.membership.clusterCheck)
        self.readiness.add("clock", self._clockCheck)
        self.readiness.add("stream", self.streamRetention.check)
        for listener, service in zip(config.listeners, self.listeners, strict=True):
            self.readiness.add(f"listener:{listener.name}", service.check)
        # Kick and drain (ctrlgw/kick.py, ctrlgw/drain.py).
        self.kicks = Kicks(self.store, self.registry, self.metrics, self.notifications)
        self.api.addRoute(b"DELETE", 3, self.kicks.deleteConnection)
        self.drain = Drain(
            reactor, self.store, self.registry, self._stopAccepting,
            config.shutdown, config.liveness.close_grace, self.metrics, self.notifications,
            exit if exit is not None else lambda: self.service.stopService(),
        )
        self.readiness.add("drain", self.drain.check)
        self.service = self._buildTree()

    def _buildTree(self) -> SequentialMultiService:
        """
        The start order; stopping runs it backwards, one service after another.

        The database first, then HTTP (probes answer from the start), then membership
        (waits for the database), the writers and the timers, and the controller listeners
        last: they listen only once the instance has joined the cluster.
        """
        reactor, config = self.reactor, self.config
        top = GatewayService(self.instance)
        if config.gc_full_interval > 0:
            ScheduledCollection(reactor, self.metrics, config.gc_full_interval).setServiceParent(top)
        for service in [
            self.database,
            self.http,
            self.membership,
            CallbackService("writers", stop=self._drainWriters),
            PeriodicService(
                "clock-check", reactor, config.timestamps.clock_check_interval, self._checkClock
            ),
            PeriodicService("retention", reactor, config.retention.prune_interval, self._prune),
            PeriodicService(
                "partitions", reactor, config.retention.prune_interval, self._partitions
            ),
            PeriodicService(
                "stream-retention", reactor, config.stream.retain_interval,
                self.streamRetention.run,
            ),
            PeriodicService(
                "heartbeat", reactor, config.cluster.heartbeat_interval, self.membership.heartbeat
            ),
            PeriodicService(
                "reconcile", reactor, config.cluster.reconcile_interval, self._reconcile
            ),
            PeriodicService("outbox-poll", reactor, config.outbox.poll_interval, self._pollOutbox),
            CallbackService("connections", stop=self._byeEveryone),
            *self.listeners,
        ]:
            service.setServiceParent(top)
        return top

    def _databaseUpChanged(self, up: bool) -> None:
        if up:
            ensureDeferred(self._checkClock()).addErrback(
                lambda f: log.warn("clock check failed: {error}", error=f.getErrorMessage())
            )

    async def _reconcile(self) -> None:
        if self.cluster.registered:
            await self.cluster.reconcile()

    async def _pollOutbox(self) -> None:
        if self.cluster.registered:
            await self.outbox.poll()
            await self.replies.poll()

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

    async def _partitions(self) -> None:
        # The first run waits for the schema (migration 11 holds the functions).
        await self.membership.whenJoined()
        await self.partitions.run()

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
        self.drain.stop()
        context.accepting = False
        connections = list(context.connections)
        if connections:
            log.info("saying bye to {count} connections", count=len(connections))
        await byeInBatches(
            self.reactor, connections, shutdown.bye_batch, shutdown.bye_interval, v1.BYE_SHUTDOWN
        )
        if context.connections:
            await deferLater(self.reactor, self.config.liveness.close_grace + 0.1, lambda: None)

    def _stopAccepting(self) -> Deferred[Any]:
        """
        For a drain: refuse new hellos, and stop the controller listeners.
        """
        self.context.accepting = False
        return DeferredList(
            [maybeDeferred(listener.stopService) for listener in self.listeners if listener.running],
            consumeErrors=True,
        )

    async def _drainWriters(self) -> None:
        await _bounded(
            self.reactor,
            # consumeErrors: drains cut short by the bound fail with CancelledError, which
            # is expected here, not an unhandled error.
            DeferredList([
                self.inbox.drain(), self.outbox.stop(), self.ownership.drain(), self.events.drain()
            ], consumeErrors=True),
            self.config.shutdown.drain_timeout,
            "draining the inbox and history",
        )
        # What could not be written in time was never confirmed (nothing acked is lost):
        # stop retrying it, or the writers would go on after the service stopped.
        self.inbox.abandon()
        self.outbox.abandon()
        self.replies.stop()
        self.ownership.abandon()
        self.events.abandon()
