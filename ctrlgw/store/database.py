"""
PostgreSQL access through txpostgres: a small pool that heals itself.

Every call is named; its latency and errors are metrics by name.  A call made while no
connection is healthy fails at once with L{Unavailable} instead of waiting; broken
connections are replaced in the background with capped exponential backoff.  Every
connection sets C{statement_timeout}, C{idle_in_transaction_session_timeout} and the
schema's C{search_path}, and TCP keepalives, so a server that vanished is noticed.

libpq resolves host names synchronously even in an asynchronous connect, which would freeze
the reactor for as long as DNS takes.  So the DSN's host names are resolved first, in the
reactor's thread pool, and handed to libpq as C{hostaddr} (L{pinHostAddresses}); C{host}
stays, for TLS verification and C{.pgpass}.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

# Exception classes only: every call goes through txpostgres, never blocking.
from psycopg2 import Error as DatabaseError
from psycopg2 import InterfaceError, OperationalError
from psycopg2 import errors as sqlstate
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
    gatherResults,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from ctrlgw.clock import Sleeper
from ctrlgw.config import DatabaseConfig
from ctrlgw.interfaces import Unavailable
from ctrlgw.metrics import Metrics

log = Logger()

T = TypeVar("T")

# Errors that mean the connection, not the statement, is broken.
_CONNECTION_ERRORS = (OperationalError, InterfaceError)
# Errors after which the same transaction may simply be run again (as Synapse does).
_RETRYABLE = (sqlstate.SerializationFailure, sqlstate.DeadlockDetected)
_MAX_RETRIES = 5
# Our own bound on a call (addTimeout) fired: the server did not answer.  A CancelledError
# alone is the server cancelling the statement (txpostgres turns QueryCanceled, e.g. from
# statement_timeout, into CancelledError): the connection is sound.
_TIMEOUTS = (TimeoutError,)


GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


# --- host names resolved off the reactor thread ---


def _needsResolving(host: str) -> bool:
    """
    Whether libpq would look C{host} (one entry of a C{host} list) up in DNS: not for an
    empty entry (the default), a Unix-socket directory or an abstract socket, or a
    literal IP address.
    """
    if not host or host.startswith(("/", "@")):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _hostList(params: Mapping[str, str], environ: Mapping[str, str]) -> list[str] | None:
    """
    The DSN's C{host} entries, or L{None} when libpq is not to be second-guessed: a
    C{hostaddr} is given already, or the hosts come from a service file.
    """
    if "hostaddr" in params or environ.get("PGHOSTADDR"):
        return None
    if "host" in params:
        host = params["host"]
    elif "service" in params or environ.get("PGSERVICE"):
        return None
    else:
        host = environ.get("PGHOST", "")
    return host.split(",")


def hostNamesToResolve(dsn: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """
    The host names in C{dsn} (a key/value string or a URI) that libpq would resolve itself,
    each once, in order.  C{PGHOST} counts when the DSN names no host, as it does for libpq.
    """
    hosts = _hostList(parse_dsn(dsn), environ)
    names: list[str] = []
    for host in hosts or ():
        if _needsResolving(host) and host not in names:
            names.append(host)
    return names


def pinHostAddresses(
    dsn: str, addresses: Mapping[str, Sequence[str]], environ: Mapping[str, str] = os.environ
) -> str:
    """
    C{dsn} rewritten so that libpq connects to C{addresses[name]} for every host name
    instead of resolving it: C{hostaddr} gets one entry per C{host} entry, empty for a
    Unix socket or a literal IP.  A name with several addresses is repeated once per
    address (libpq would try each of them too), with its C{port} entry if ports are a list.
    A name with no address is dropped, as libpq would skip it.  A DSN with nothing to
    resolve comes back unchanged.

    @raise OperationalError: if no host is left to try.
    """
    params = parse_dsn(dsn)
    hosts = _hostList(params, environ)
    if hosts is None or not any(_needsResolving(h) for h in hosts):
        return dsn
    portText = params.get("port", environ.get("PGPORT", ""))
    ports = portText.split(",")
    perHost = len(ports) > 1
    if perHost and len(ports) != len(hosts):
        return dsn  # libpq refuses the mismatch itself, with a better message.
    newHosts: list[str] = []
    newAddresses: list[str] = []
    newPorts: list[str] = []
    for index, host in enumerate(hosts):
        found = addresses.get(host, ()) if _needsResolving(host) else ("",)
        for address in found:
            newHosts.append(host)
            newAddresses.append(address)
            if perHost:
                newPorts.append(ports[index])
    if not newHosts:
        raise OperationalError(
            "could not translate host name "
            + ", ".join(f'"{h}"' for h in hosts)
            + " to address"
        )
    params["host"] = ",".join(newHosts)
    params["hostaddr"] = ",".join(newAddresses)
    if perHost:
        params["port"] = ",".join(newPorts)
    return str(make_dsn(**params))


def _addresses(infos: Sequence[tuple[Any, ...]]) -> list[str]:
    found: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in found:
            found.append(str(sockaddr[0]))
    return found


class _Connection(txpostgres.Connection):
    """
    A txpostgres connection that reports a server going away while the connection is idle
    (txpostgres would raise it into the reactor as an unhandled error).
    """

    onLost: Callable[[_Connection], object] | None = None

    def doRead(self) -> None:
        try:
            super().doRead()
        except DatabaseError as e:
            self._lostWhileIdle(e)
        except ValueError as e:
            # libpq read the server's goodbye and closed its socket (fileno -1) before
            # psycopg2 marked the connection closed, so txpostgres cannot watch it again.
            if self._socketOpen():
                raise
            self._lostWhileIdle(e)

    def _socketOpen(self) -> bool:
        try:
            return bool(self._connection.fileno() >= 0)
        except DatabaseError:
            return False

    def _lostWhileIdle(self, e: Exception) -> None:
        self.reactor.removeReader(self)
        log.info("database connection lost while idle: {error}", error=str(e).strip().splitlines()[0])
        if self.onLost is not None:
            self.onLost(self)


def withDeadline(d: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """
    A Deferred that fires like C{d}, or fails with L{TimeoutError} after C{seconds}.

    C{d} itself is never cancelled: cancelling a txpostgres call runs libpq's blocking
    cancel request on the reactor thread, which against a server that does not answer
    freezes the whole gateway.  The caller closes the connection instead, and C{d}'s late
    result is dropped.
    """
    result: Deferred[T] = Deferred()

    def expired() -> None:
        result.errback(TimeoutError(f"no answer within {seconds:g}s"))

    timer = clock.callLater(seconds, expired)

    def done(outcome: object) -> None:
        if timer.active():
            timer.cancel()
        if result.called:
            return  # Too late: the caller has given up on this call.
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)  # type: ignore[arg-type]  # outcome is d's T

    d.addBoth(done)
    return result


def _isConnectionError(e: BaseException) -> bool:
    # A lock not granted (lock_timeout, NOWAIT) is an OperationalError too, on a sound
    # connection.
    if isinstance(e, sqlstate.QueryCanceled | sqlstate.LockNotAvailable):
        return False
    return isinstance(e, _CONNECTION_ERRORS) and not isinstance(e, _RETRYABLE)


def _closeQuietly(conn: txpostgres.Connection) -> None:
    try:
        conn.close()
    except Exception:
        pass  # Already closed or never opened: nothing left to release.


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")


class Prepared:
    """
    A statement each pool connection parses and plans once (C{PREPARE}) and then only
    executes: for the hot statements, whose planning costs the server several times
    their execution.  Written with psycopg2's placeholders, all named (C{%(name)s}) or
    all positional (C{%s}), and run with the same arguments as the plain text would be.
    C{durable=False}: its commit does not wait for the WAL flush (C{SET LOCAL
    synchronous_commit = off}), for a statement whose loss in a server crash only
    repeats work (a claim: the command is sent again, at least once).
    """

    def __init__(self, name: str, sql: str, durable: bool = True) -> None:
        self.name = name
        self.sql = sql
        named: list[str] = []
        positional = 0

        def number(m: re.Match[str]) -> str:
            nonlocal positional
            if m.group(0) == "%%":
                return "%"
            if m.group(1) is None:
                positional += 1
                return f"${positional}"
            if m.group(1) not in named:
                named.append(m.group(1))
            return f"${named.index(m.group(1)) + 1}"

        body = _PLACEHOLDER.sub(number, sql)
        if named and positional:
            raise ValueError(f"statement {name}: named and positional placeholders mixed")
        self.prepare = f"PREPARE {name} AS {body}"
        arguments = [f"%({k})s" for k in named] if named else ["%s"] * positional
        execute = f"EXECUTE {name}({', '.join(arguments)})" if arguments else f"EXECUTE {name}"
        self.execute = execute if durable else "SET LOCAL synchronous_commit = off; " + execute


class Database:
    """
    A pool of C{size} txpostgres connections to one server, for one schema.
    """

    def __init__(
        self,
        reactor: Any,
        config: DatabaseConfig,
        metrics: Metrics,
        applicationName: str = "ctrlgw",
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """
        @param getaddrinfo: resolves the DSN's host names; always called in the
            reactor's thread pool, never on the reactor thread.
        @param environ: the libpq environment (C{PGHOST} and friends).
        """
        self.reactor = reactor
        self._getaddrinfo = getaddrinfo
        self._environ = environ
        self.clock: IReactorTime = reactor
        self.config = config
        self.schema = config.schema
        self.metrics = metrics
        self.applicationName = applicationName
        self.dsn: str | None = None
        self._idle: list[txpostgres.Connection] = []
        self._waiters: deque[Deferred[txpostgres.Connection]] = deque()
        self._healthy = 0
        self._connecting = 0
        self._settled: list[Deferred[None]] = []
        self._stopped = False
        self._upObservers: list[Callable[[bool], object]] = []
        self._sleeper = Sleeper(reactor)
        # The statements each connection has prepared (a new connection starts with none).
        self._prepared: weakref.WeakKeyDictionary[txpostgres.Connection, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        metrics.dbUp.set(0)

    # --- lifecycle ---

    @property
    def up(self) -> bool:
        return self._healthy > 0

    def onUpChanged(self, observer: Callable[[bool], object]) -> None:
        self._upObservers.append(observer)

    def start(self, dsn: str) -> Deferred[None]:
        """
        Open the pool.  Fires when the first connection is up; the others (and any that
        fail now) keep trying in the background.
        """
        self.dsn = dsn
        self._stopped = False
        first: Deferred[None] = Deferred()

        def whenUp(up: bool) -> None:
            if up and not first.called:
                first.callback(None)

        self.onUpChanged(whenUp)
        for _ in range(self.config.pool_size):
            self._keepConnecting()
        return first

    def stop(self) -> Deferred[None]:
        """
        Close the pool.  The Deferred fires once no connection attempt is under way any
        more (callers that do not care may ignore it).
        """
        self._stopped = True
        self._sleeper.cancelAll()
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        while self._waiters:
            self._waiters.popleft().errback(Unavailable("database pool stopped"))
        self._setHealthy(0)
        settled: Deferred[None] = Deferred()
        if self._connecting:
            self._settled.append(settled)
        else:
            settled.callback(None)
        return settled

    def _setHealthy(self, count: int) -> None:
        was = self.up
        self._healthy = count
        self._announce(was)

    def _announce(self, was: bool) -> None:
        self.metrics.dbUp.set(1 if self.up else 0)
        if was != self.up:
            log.info("database {state}", state="up" if self.up else "DOWN")
            for observer in list(self._upObservers):
                observer(self.up)

    async def connect(
        self, onLost: Callable[[txpostgres.Connection], object] | None = None
    ) -> txpostgres.Connection:
        """
        One new connection with ctrlgw's session settings.  Also used for LISTEN;
        C{onLost} is called if the server drops it while it is idle.
        """
        assert self.dsn is not None
        # Before the connection exists: a resolution that times out leaves nothing open.
        dsn = await withDeadline(
            Deferred.fromCoroutine(self._resolvedDsn(self.dsn)),
            self.config.connect_timeout,
            self.clock,
        )
        conn = _Connection(reactor=self.reactor)
        conn.onLost = onLost
        try:
            # libpq's connect_timeout does not apply to an asynchronous connect: bound it
            # here.
            await withDeadline(
                conn.connect(
                    dsn,
                    connect_timeout=max(1, int(self.config.connect_timeout)),
                    application_name=self.applicationName,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                    # Written data unacknowledged this long kills the socket, so a server
                    # that vanished mid-query is noticed in bounded time.
                    tcp_user_timeout=int(self.callLimit * 1000),
                ),
                self.config.connect_timeout,
                self.clock,
            )
            await withDeadline(self._configure(conn), self.callLimit, self.clock)
        except BaseException:
            _closeQuietly(conn)
            raise
        return conn

    async def _resolvedDsn(self, dsn: str) -> str:
        """
        C{dsn} with its host names resolved in the reactor's thread pool and pinned as
        C{hostaddr}, so that libpq does no DNS lookup on the reactor thread.
        """
        names = hostNamesToResolve(dsn, self._environ)
        if not names:
            return dsn
        found = await gatherResults(
            [Deferred.fromCoroutine(self._resolve(n)) for n in names], consumeErrors=True
        )
        return pinHostAddresses(dsn, dict(zip(names, found, strict=True)), self._environ)

    async def _resolve(self, name: str) -> list[str]:
        try:
            infos = await deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                self._getaddrinfo,
                name,
                None,
                0,
                socket.SOCK_STREAM,
            )
        except (OSError, UnicodeError) as e:  # UnicodeError: not a valid IDNA name.
            log.warn("cannot resolve database host {host}: {error}", host=name, error=str(e))
            return []
        return _addresses(infos)

    def _configure(self, conn: txpostgres.Connection) -> Deferred[None]:
        return conn.runOperation(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false),"
            " set_config('search_path', %s, false)",
            (
                f"{int(self.config.statement_timeout * 1000)}ms",
                f"{int(self.config.idle_in_transaction_timeout * 1000)}ms",
                f"{self.schema}, public",
            ),
        )

    @property
    def callLimit(self) -> float:
        """
        How long this side waits for any call: the server's statement_timeout cannot fire
        when the server is unreachable.
        """
        return self.config.statement_timeout + self.config.connect_timeout

    def _keepConnecting(self) -> None:
        self._connecting += 1
        ensureDeferred(self._connectWithBackoff()).addErrback(
            lambda f: log.failure("connect loop failed", f)
        )

    async def _connectWithBackoff(self) -> None:
        delay = 0.1
        try:
            while not self._stopped:
                try:
                    conn = await self.connect(onLost=self._lostWhileIdle)
                except Exception as e:
                    log.warn(
                        "cannot connect to the database ({error}); retrying in {delay:.1f}s",
                        error=str(e).strip().splitlines()[0] if str(e).strip() else repr(e),
                        delay=delay,
                    )
                    try:
                        await self._sleeper.sleep(delay)
                    except CancelledError:
                        return
                    delay = min(self.config.reconnect_max_delay, delay * 2)
                    continue
                if self._stopped:
                    conn.close()
                    return
                # In the pool before anyone hears the database is up, so that a call made
                # on that news finds the connection idle.
                wasUp = self.up
                self._healthy += 1
                self._checkin(conn)
                self._announce(wasUp)
                return
        finally:
            self._connecting -= 1
            if not self._connecting:
                settled, self._settled = self._settled, []
                for d in settled:
                    d.callback(None)

    def _lostWhileIdle(self, conn: txpostgres.Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._broken(conn)

    def _checkout(self) -> Deferred[txpostgres.Connection]:
        if self._stopped:
            raise Unavailable("database pool stopped")
        if self._idle:
            d: Deferred[txpostgres.Connection] = Deferred()
            d.callback(self._idle.pop())
            return d
        if not self.up:
            raise Unavailable("database unavailable")
        if len(self._waiters) >= self.config.max_waiting:
            # Shed load instead of queueing without bound (a reconnect storm of hellos):
            # callers answer "unavailable" and controllers retry later.
            raise Unavailable("database busy")
        d = Deferred(lambda cancelled: self._waiters.remove(cancelled))
        self._waiters.append(d)
        return d

    def _checkin(self, conn: txpostgres.Connection) -> None:
        if self._stopped:
            conn.close()
            return
        if self._waiters:
            self._waiters.popleft().callback(conn)
        else:
            self._idle.append(conn)

    def _broken(self, conn: txpostgres.Connection) -> None:
        _closeQuietly(conn)
        self._setHealthy(max(0, self._healthy - 1))
        if not self.up:
            # Nobody can be served now: fail the waiters instead of leaving them hanging.
            while self._waiters:
                self._waiters.popleft().errback(Unavailable("database unavailable"))
        if not self._stopped:
            self._keepConnecting()

    # --- calls ---

    async def _run(self, name: str, call: Callable[[txpostgres.Connection], Deferred[T]]) -> T:
        histogram = self.metrics.dbQuerySeconds.labels(name)
        for attempt in range(_MAX_RETRIES):
            conn = await self._checkout()
            started = self.clock.seconds()
            try:
                result = await withDeadline(call(conn), self.callLimit, self.clock)
            except Exception as e:
                self.metrics.dbQueryErrors.labels(name).inc()
                if isinstance(e, _RETRYABLE) and attempt + 1 < _MAX_RETRIES:
                    self._checkin(conn)
                    continue
                if _isConnectionError(e) or isinstance(e, _TIMEOUTS):
                    self._broken(conn)
                    raise Unavailable(f"database unavailable ({name})") from e
                self._checkin(conn)
                raise
            histogram.observe(self.clock.seconds() - started)
            self._checkin(conn)
            return result
        raise AssertionError("unreachable")

    def runQuery(
        self, name: str, sql: str | Prepared, args: Any = None
    ) -> Deferred[list[tuple[Any, ...]]]:
        return ensureDeferred(self._run(name, self._call(sql, args, fetch=True)))

    def runOperation(self, name: str, sql: str | Prepared, args: Any = None) -> Deferred[None]:
        return ensureDeferred(self._run(name, self._call(sql, args, fetch=False)))

    def _call(
        self, sql: str | Prepared, args: Any, fetch: bool
    ) -> Callable[[txpostgres.Connection], Deferred[Any]]:
        if isinstance(sql, Prepared):
            return lambda c: Deferred.fromCoroutine(self._executePrepared(c, sql, args, fetch))
        if fetch:
            return lambda c: c.runQuery(sql, args)
        return lambda c: c.runOperation(sql, args)

    async def _executePrepared(
        self, conn: txpostgres.Connection, statement: Prepared, args: Any, fetch: bool
    ) -> Any:
        prepared = self._prepared.setdefault(conn, set())
        if statement.name not in prepared:
            # Its own round-trip, once per connection: a PREPARE outlives a failed
            # transaction, so it is recorded only once it has succeeded on its own.
            await conn.runOperation(statement.prepare)
            prepared.add(statement.name)
        if fetch:
            return await conn.runQuery(statement.execute, args)
        return await conn.runOperation(statement.execute, args)

    def runInteraction(
        self, name: str, interaction: Callable[..., Deferred[T]], *args: Any
    ) -> Deferred[T]:
        """
        Run C{interaction(cursor, *args)} in a transaction; retried as a whole on a
        serialization failure or deadlock.
        """
        return ensureDeferred(self._run(name, lambda c: c.runInteraction(interaction, *args)))
