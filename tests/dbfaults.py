"""
Helpers for the database and crash fault tests: real faults, injected for real.

L{TcpPostgres} is a PostgreSQL server built from pgserver's binaries (initdb, pg_ctl,
pg_basebackup) listening on a loopback TCP port, which a test may crash (immediate stop),
restart, clone as a streaming replica and promote.  L{FreezableProxy} forwards TCP and can
stop forwarding while keeping every socket open (a network stall).  L{Device} is a
controller as a real device behaves: it sends messages at a steady rate, each with a
unique id, reconnects after losing its connection, retransmits what was not acked, and
acks the commands it receives.  L{TickMonitor} measures how late the reactor's timers run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from tests.gateways import Frame, LineController, connectController, freePort, nowMs

# --- a TCP PostgreSQL server of the test's own ---


def _systemUser() -> str | None:
    """
    The user the server runs as: PostgreSQL refuses to run as root (as pgserver does).
    """
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return "pgserver"


class TcpPostgres:
    """
    A PostgreSQL 16 server in a directory of its own, on C{127.0.0.1:port}, trust
    authentication.  Every method blocks: call them with C{deferToThread}.
    """

    def __init__(self, path: Path, port: int | None = None) -> None:
        self.path = path
        self.data = path / "data"
        self.port = port if port is not None else freePort()
        self.user = _systemUser()
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"

    @classmethod
    def fresh(cls, settings: dict[str, str] | None = None) -> TcpPostgres:
        """
        A new cluster (initdb), started.
        """
        from pgserver import initdb

        server = cls(_ownedDirectory("ctrlgw-tcp-pg-"))
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-sync"],
               pgdata=server.data, user=server.user)
        server.configure(settings or {})
        server.start()
        return server

    def replica(self) -> TcpPostgres:
        """
        A streaming replica of this (running) server: C{pg_basebackup -R}, started.
        """
        from pgserver import pg_basebackup

        replica = TcpPostgres(_ownedDirectory("ctrlgw-tcp-replica-"))
        pg_basebackup(
            ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-D", str(replica.data),
             "-R", "-X", "stream", "--no-sync"],
            user=self.user, timeout=60,
        )
        replica.configure({"synchronous_standby_names": "''"})
        replica.start()
        return replica

    def configure(self, settings: dict[str, str]) -> None:
        base = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data}'",
            # A crash here is a process crash (pg_ctl stop -m immediate), not a power cut:
            # what was written reaches the kernel either way.
            "fsync": "off",
            "max_connections": "100",
            "log_min_messages": "warning",
        }
        base.update(settings)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("".join(f"\n{k} = {v}" for k, v in base.items()) + "\n")

    def start(self) -> None:
        from pgserver import pg_ctl

        pg_ctl(["-w", "-t", "60", "-l", str(self.path / "log"), "start"],
               pgdata=self.data, user=self.user, timeout=70)

    def crash(self) -> None:
        """
        Stop the hard way (C{-m immediate}: like a crash, no checkpoint).
        """
        from pgserver import pg_ctl

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.data, user=self.user, timeout=30)

    def promote(self) -> None:
        from pgserver import pg_ctl

        pg_ctl(["-w", "-t", "60", "promote"], pgdata=self.data, user=self.user, timeout=70)

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return query(self.dsn, sql, args)

    def destroy(self) -> None:
        from pgserver import pg_ctl

        if (self.data / "postmaster.pid").exists():
            try:
                pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.data, user=self.user,
                       timeout=30)
            except Exception:
                pass  # Already gone.
        shutil.rmtree(self.path, ignore_errors=True)

    def logText(self) -> str:
        try:
            return (self.path / "log").read_text(errors="replace")
        except OSError:
            return ""


def _ownedDirectory(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user = _systemUser()
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def query(dsn: str, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """
    Run one statement on a connection of its own (blocking: use C{deferToThread}).
    """
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, tuple(args))
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


# --- a TCP proxy that can stall ---


class _Pipe(Protocol):
    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy
        self.other: _Pipe | None = None
        self.early: list[bytes] = []
        self.gone = False

    def connectionMade(self) -> None:
        self.proxy._pipes.add(self)
        if self.proxy.frozen:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.other is not None and not self.other.gone:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone = True
        self.proxy._pipes.discard(self)
        if self.other is not None and not self.other.gone:
            self.other.transport.loseConnection()

    def join(self, other: _Pipe) -> None:
        self.other, other.other = other, self
        for pipe in (self, other):
            for data in pipe.early:
                pipe.other.transport.write(data)  # type: ignore[union-attr]
            pipe.early = []


class _Front(_Pipe):
    def connectionMade(self) -> None:
        super().connectionMade()
        if self.proxy.frozen:
            self.proxy._stalledConnects.append(self)
        else:
            self.connectBack()

    def connectBack(self) -> None:
        back = _Pipe(self.proxy)
        d = connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.targetPort, timeout=5), back
        )

        def connected(_: object) -> None:
            if self.gone:
                back.transport.loseConnection()
            else:
                self.join(back)

        def failed(_: Failure) -> None:
            if not self.gone:
                self.transport.loseConnection()

        d.addCallbacks(connected, failed)


class FreezableProxy:
    """
    A TCP proxy on 127.0.0.1 in front of C{127.0.0.1:targetPort}.  L{freeze} stops
    forwarding in both directions while every socket stays open (nothing is read, so no
    data, no close and no new connection gets through); L{unfreeze} carries on.
    """

    def __init__(self, targetPort: int) -> None:
        self.targetPort = targetPort
        self.frozen = False
        self.port: IListeningPort | None = None
        self._pipes: set[_Pipe] = set()
        self._stalledConnects: list[_Front] = []

    async def start(self) -> int:
        factory = Factory.forProtocol(lambda: _Front(self))
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return int(self.port.getHost().port)

    def freeze(self) -> None:
        self.frozen = True
        for pipe in self._pipes:
            pipe.transport.pauseProducing()

    def unfreeze(self) -> None:
        self.frozen = False
        for pipe in list(self._pipes):
            pipe.transport.resumeProducing()
        stalled, self._stalledConnects = self._stalledConnects, []
        for front in stalled:
            if not front.gone:
                front.connectBack()

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for pipe in list(self._pipes):
            pipe.transport.abortConnection()


# --- a controller that behaves like a device ---


class Device:
    """
    A controller that sends a message every C{1 / rate} seconds (ids C{controller-N}),
    keeps every message not acked yet and resends all of them (with their original
    C{ts}) after each welcome, and resends one refused with C{unavailable} half a second
    later.  It reconnects (trying C{ports} in turn) 0.2 s after losing its connection.
    Commands are recorded (C{commands}: id, arrival time) and, with C{autoAck}, acked.
    """

    def __init__(self, controller: str, ports: Sequence[int], rate: float = 0.0,
                 autoAck: bool = True, padding: int = 0) -> None:
        self.controller = controller
        self.ports = list(ports)
        self.rate = rate
        self.autoAck = autoAck
        self.padding = "x" * padding
        self.unacked: dict[str, Frame] = {}
        self.acked: set[str] = set()
        self.sent = 0
        self.commands: list[tuple[str, float]] = []
        self.welcomes: list[tuple[int, float]] = []  # (port, time)
        self.connection: LineController | None = None
        self.port: int | None = None
        self.online = False
        self.running = False
        self._next = 0
        self._loop: LoopingCall | None = None
        self._stopped: Deferred[None] | None = None
        self._timers: set[Any] = set()

    def _later(self, seconds: float, f: Callable[[], object]) -> None:
        def run() -> None:
            self._timers.discard(call)
            f()

        call = reactor.callLater(seconds, run)
        self._timers.add(call)

    def start(self) -> None:
        self.running = True
        self._connect()
        if self.rate > 0:
            self._loop = LoopingCall(self._tick)
            self._loop.start(1.0 / self.rate, now=False)

    def pauseSending(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        self.sent += 1
        messageId = f"{self.controller}-{self.sent}"
        frame = {"type": "msg", "id": messageId, "ts": nowMs(), "body": {"n": self.sent, "pad": self.padding}}
        self.unacked[messageId] = frame
        if self.online:
            self._write(frame)

    def _write(self, frame: Frame) -> None:
        if self.connection is not None and not self.connection.isClosed:
            self.connection.send(frame)

    def _connect(self) -> None:
        if not self.running:
            return
        port = self.ports[self._next % len(self.ports)]
        self._next += 1
        d = Deferred.fromCoroutine(connectController(port))

        def connected(connection: LineController) -> None:
            if not self.running:
                connection.close()
                return
            self.connection, self.port = connection, port
            connection.onFrame = self._frame
            connection.closed.addCallback(lambda _: self._lost(connection))
            connection.send({"type": "hello", "controller": self.controller})

        def failed(_: Failure) -> None:
            self._retry()

        d.addCallbacks(connected, failed)

    def _retry(self) -> None:
        if self.running:
            self._later(0.2, self._connect)

    def _lost(self, connection: LineController) -> None:
        if connection is self.connection:
            self.online = False
            self.connection = None
        if self.running:
            self._retry()
        elif self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            self.online = True
            self.welcomes.append((self.port or 0, reactor.seconds()))
            for pending in list(self.unacked.values()):
                self._write(pending)
        elif kind == "ack":
            ref = frame.get("ref")
            if ref in self.unacked:
                del self.unacked[ref]
            self.acked.add(str(ref))
        elif kind == "cmd":
            self.commands.append((str(frame["id"]), reactor.seconds()))
            if self.autoAck:
                self._write({"type": "ack", "ref": frame["id"]})
        elif kind == "error" and frame.get("code") == "unavailable" and frame.get("ref"):
            ref = str(frame["ref"])
            connection = self.connection

            def resend() -> None:
                if ref in self.unacked and self.online and self.connection is connection:
                    self._write(self.unacked[ref])

            self._later(0.5, resend)

    def ackCommand(self, commandId: str) -> None:
        self._write({"type": "ack", "ref": commandId})

    def commandIds(self) -> list[str]:
        return [c for c, _ in self.commands]

    def stop(self) -> Deferred[None]:
        """
        Stop sending and reconnecting, and close the connection; fires once it is closed.
        """
        self.running = False
        self.pauseSending()
        done: Deferred[None] = Deferred()
        if self.connection is None or self.connection.isClosed:
            self._cancelTimers()
            done.callback(None)
            return done
        self._stopped = done
        connection = self.connection
        connection.leave()
        self._later(2, connection.close)
        done.addCallback(self._cancelTimers)
        return done

    def _cancelTimers(self, result: object = None) -> object:
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        return result


# --- watching the reactor and HTTP ---


class TickMonitor:
    """
    A timer every C{interval} seconds; C{maxLate} is the worst lateness seen, i.e. how
    long the reactor stopped turning at most.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.ticks: list[float] = []
        self._loop = LoopingCall(lambda: self.ticks.append(reactor.seconds()))

    def start(self) -> None:
        self._loop.start(self.interval)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @property
    def maxLate(self) -> float:
        gaps = [b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False)]
        return max(gaps, default=0.0) - self.interval


async def httpGet(port: int, path: str, timeout: float = 5.0,
                  token: str | None = None) -> tuple[int, Any]:
    """
    GET C{path} on C{127.0.0.1:port}: the status and the decoded JSON body.
    """
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, connectTimeout=timeout)
    headers = Headers({b"Authorization": [f"Bearer {token}".encode()]}) if token else None
    d = agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode(), headers)
    d.addTimeout(timeout, reactor)
    response = await d
    body = await readBody(response)
    return response.code, json.loads(body) if body else None


async def readyStatus(port: int) -> int | None:
    """
    The status of C{/readyz}, or C{None} if it did not answer.
    """
    try:
        code, _ = await httpGet(port, "/readyz", timeout=2.0)
        return code
    except Exception:
        return None


# --- gateways as twistd child processes ---


class TwistdGateway:
    """
    A C{twistd -n ctrlgw} child with its own ini file, on known loopback ports.
    """

    def __init__(self, child: Any, instance: str, port: int, http: int) -> None:
        self.child = child
        self.instance = instance
        self.port = port
        self.http = http

    @classmethod
    async def start(cls, testCase: Any, dsn: str, schema: str, instance: str,
                    sections: dict[str, dict[str, object]] | None = None) -> TwistdGateway:
        from tests.gateways import TwistdProcess, gatewayConfigText, mergeSections

        port, http = freePort(), freePort()
        layers = mergeSections(
            {"listener:main": {"endpoint": f"tcp:{port}:interface=127.0.0.1"},
             "http": {"endpoint": f"tcp:{http}:interface=127.0.0.1"}},
            sections or {},
        )
        workdir = Path(testCase.mktemp()).absolute()
        workdir.mkdir(parents=True)
        config = workdir / f"{instance}.ini"
        config.write_text(gatewayConfigText(dsn, schema, instance, layers))
        child = TwistdProcess.spawn(
            testCase, ["-n", "--pidfile=", "ctrlgw", "--config", str(config)], str(workdir)
        )
        gateway = cls(child, instance, port, http)
        await child.waitReady(http, timeout=60)
        return gateway

    async def stop(self) -> None:
        import signal

        if not self.child.ended.called:
            self.child.signal(signal.SIGTERM)
            await self.child.waitForExit(60)


class ReadinessWatch:
    """
    Polls C{/readyz} of some gateways every C{interval}; C{codes[port]} is the list of
    C{(time, status)} seen (C{None}: no answer).
    """

    def __init__(self, ports: Sequence[int], interval: float = 0.1) -> None:
        self.ports = list(ports)
        self.interval = interval
        self.codes: dict[int, list[tuple[float, int | None]]] = {p: [] for p in self.ports}
        self.running = False
        self._done: Deferred[None] | None = None

    def start(self) -> None:
        self.running = True
        self._done = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        from tests.gateways import sleep

        while self.running:
            for port in self.ports:
                # Stamped when the answer came: a request sent before an event and answered
                # after it says how things stood after it.
                status = await readyStatus(port)
                self.codes[port].append((reactor.seconds(), status))
            await sleep(self.interval)

    def last(self, port: int) -> int | None:
        return self.codes[port][-1][1] if self.codes[port] else None

    def firstSince(self, port: int, since: float, ready: bool) -> float | None:
        for at, code in self.codes[port]:
            if at >= since and (code == 200) == ready:
                return at
        return None

    async def stop(self) -> None:
        self.running = False
        if self._done is not None:
            await self._done


def inboxCounts(dsn: str, schema: str) -> dict[str, int]:
    """
    Stored rows per message id (blocking).
    """
    rows = query(dsn, f'SELECT message_id, count(*) FROM "{schema}".inbox GROUP BY 1')
    return {str(m): int(n) for m, n in rows}


def deliveryFigures(devices: Sequence[Device], counts: dict[str, int]) -> dict[str, int]:
    """
    Acked, stored, lost (acked but not stored), duplicates (ids stored more than once)
    and stored-but-never-acked, over C{devices}.
    """
    acked: set[str] = set().union(*(d.acked for d in devices))
    ours = {m: n for m, n in counts.items() if any(m.startswith(d.controller + "-") for d in devices)}
    return {
        "sent": sum(d.sent for d in devices),
        "acked": len(acked),
        "stored": len(ours),
        "lost": len(acked - set(ours)),
        "duplicates": sum(1 for n in ours.values() if n > 1),
        "stored_unacked": len(set(ours) - acked),
    }
