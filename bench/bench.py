"""
ctrlgw benchmarks: `make bench` (or `python bench/bench.py`; `--smoke` for a tiny run).

Starts a private PostgreSQL (pgserver, or uses --dsn), gateway instances as real
`twistd ctrlgw` processes and the simulated fleet (ctrlgw.sim) in this process or as
`ctrlgw sim` subprocesses, and PgQueuer in its own process (bench/pgqueuer_side.py) on the
same PostgreSQL.  Each figure is measured --repeat times and the median is reported.
Writes the run as JSON (var/bench.json) and renders the benchmark page from it
(bench/report.py: docs/benchmarks.md and docs/bench/*.png).

Scenarios:
  commands  command latency against fleet size, and PgQueuer at the same paced rate
  backlog   a backlog of commands drained to acked, and PgQueuer draining the same count
  inbound   durable inbound messages per second and msg -> ack latency
  idle      gateway RSS per idle connection and CPU with the fleet connected
  storm     the whole fleet connecting at once: welcomes per second
  takeover  a fleet moving from instance A to instance B: claim -> old socket aborted
  stream    the application stream: 3 instances x 4 consumers of one group (nothing missed or
            duplicated), one consumer's read rate in batches of 1,000, msg -> callback latency
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from ctrlgw.sim import Fleet, SimController, SimOptions, percentile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
CTRLGW = os.path.join(BIN, "ctrlgw")


@dataclass
class Sizes:
    fleets: list[int] = field(default_factory=lambda: [200, 1000, 5000, 10000])
    referenceFleet: int = 1000  # the fleet the largest one's p99 is compared with
    commandRate: float = 500.0
    commandSeconds: float = 10.0
    commandProcs: int = 2  # simulator processes holding the fleet
    backlog: int = 100_000
    backlogControllers: int = 10_000
    pgqueuerBatch: int = 100
    inboundControllers: int = 1000
    inboundRate: float = 33_000.0  # open-loop offer: the target and 10% headroom
    inboundSeconds: float = 10.0
    inboundProcs: int = 2
    # Each controller leaves at most this many msgs unacked (closed loop): the figure is the
    # gateway's capacity, not what piles up in socket buffers past it.
    inboundWindow: int = 20
    idle: int = 15_000
    idleWindow: float = 30.0
    storm: int = 15_000
    takeover: int = 1000
    takeoverRate: float = 200.0  # moves per second (hellos on B)
    # The application stream (scenario stream).
    streamControllers: int = 150  # over 3 instances
    streamMessages: int = 15_000
    streamBacklog: int = 200_000
    streamBatch: int = 1000
    streamRate: float = 5000.0
    streamSeconds: float = 10.0


SMOKE = Sizes(
    fleets=[10, 20], referenceFleet=10, commandRate=50.0, commandSeconds=1.0, commandProcs=1, backlog=200,
    backlogControllers=20, inboundControllers=20, inboundRate=500.0, inboundSeconds=1.5, inboundProcs=1,
    idle=20, idleWindow=1.0, storm=20, takeover=20, takeoverRate=100.0,
    streamControllers=15, streamMessages=300, streamBacklog=2000, streamBatch=100,
    streamRate=200.0, streamSeconds=1.5,
)

# Gateway settings every instance runs with (plus --set); ports and names are added per
# instance.  ping_interval 15s is what the idle scenario asks for; max_buffered lets an
# offer above capacity queue rather than be refused; flap_policy log, because the takeover
# scenario moves every controller on purpose; max_entries above what three repeats of the
# stream scenarios write (1.4 million entries and more), so retention never removes
# entries the read scenario waits for (with the default million, its third repeat waited
# for entries that were gone).
SCENARIOS = ("commands", "backlog", "inbound", "idle", "storm", "takeover", "stream")

BASE_SETTINGS: dict[str, dict[str, str]] = {
    "inbox": {"max_buffered": "200000"},
    "cluster": {"flap_policy": "log"},
    "liveness": {"ping_interval": "15s"},
    "stream": {"max_entries": "10000000"},
}


# Every port freePort handed out in this run.
_handedOut: set[int] = set()


def freePort() -> int:
    """
    A loopback port free a moment ago, and never one handed out before in this run: two
    picks in a row can get the same port back (an instance's listener and its HTTP port
    collided once, and the instance could not start).
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handedOut:
            _handedOut.add(port)
            return port


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def paced(count: int, rate: float, call: Callable[[int], object]) -> None:
    """
    call(0) .. call(count - 1) on schedule at rate a second, none waiting for another.
    """
    started = time.time()
    for i in range(count):
        delay = started + i / rate - time.time()
        if delay > 0.001:
            await sleep(delay)
        call(i)


async def waitFor(check: Callable[[], bool], timeout: float, what: str | Callable[[], str],
                  step: float = 0.01) -> float:
    """
    Poll C{check} until true; returns the time it became true.  Raises after C{timeout},
    saying C{what} it waited for (a callable: as things stand then).
    """
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            said = what() if callable(what) else what
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {said}")
        await sleep(step)
    return time.time()


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# --- processes ---


class GatewayProcess(ProcessProtocol):
    """
    One gateway instance: C{twistd -n ctrlgw} with its own config file.
    """

    def __init__(self, name: str, dsn: str, schema: str, workdir: str,
                 settings: dict[str, dict[str, str]]) -> None:
        self.name = name
        self.port = freePort()
        self.http = freePort()
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        sections: dict[str, dict[str, str]] = {
            "gateway": {"instance_id": name},
            "listener:main": {"endpoint": f"tcp:{self.port}:interface=127.0.0.1:backlog=4096"},
            "http": {"endpoint": f"tcp:{self.http}:interface=127.0.0.1"},
        }
        for section, values in settings.items():
            sections.setdefault(section, {}).update(values)
        sections.setdefault("database", {})["schema"] = schema
        config = os.path.join(workdir, f"{name}.ini")
        with open(config, "w") as f:
            for section, values in sections.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        self.process = reactor.spawnProcess(
            self, TWISTD, [TWISTD, "-n", "--pidfile=", "ctrlgw", "--config", config, "--dsn", dsn],
            env=dict(os.environ), path=workdir,
        )

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    async def ready(self) -> None:
        agent = Agent(reactor)
        for _ in range(1200):
            try:
                response = await agent.request(b"GET", b"http://127.0.0.1:%d/readyz" % self.http)
                await readBody(response)
                if response.code == 200:
                    return
            except Exception:
                pass
            if self.ended.called:
                break
            await sleep(0.1)
        text = self.output.decode(errors="replace")
        last = ([line for line in text.splitlines() if line.strip()] or ["no output"])[-1]
        raise RuntimeError(f"{self.name} never became ready: {last}\n{text}")

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpuSeconds(self) -> float:
        """
        utime + stime of the gateway process, from /proc/PID/stat.
        """
        with open(f"/proc/{self.process.pid}/stat") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self) -> str:
        response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % self.http)
        return (await readBody(response)).decode()

    async def stop(self) -> None:
        if not self.ended.called:
            self.process.signalProcess(signal.SIGTERM)
            await self.ended


class Collect(ProcessProtocol):
    """
    A helper subprocess: its standard output and error, and its exit.
    """

    def __init__(self, onErrLine: Callable[[str], object] | None = None) -> None:
        self.out = b""
        self.err = b""
        self.onErrLine = onErrLine
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data
        if self.onErrLine is not None:
            *lines, rest = self.err.split(b"\n")
            for line in lines:
                self.onErrLine(line.decode(errors="replace"))
            self.err = rest

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", 0) or 0)


async def runProcess(argv: list[str], onErrLine: Callable[[str], object] | None = None) -> str:
    proto = Collect(onErrLine)
    reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ), path=ROOT)
    code = await proto.ended
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {code}:\n{proto.err.decode(errors='replace')[-3000:]}")
    return proto.out.decode()


async def pgqueuer(ctx: Context, *args: str) -> dict[str, Any]:
    out = await runProcess([sys.executable, os.path.join(HERE, "pgqueuer_side.py"), *args,
                            "--dsn", ctx.dsn, "--database", ctx.pgqueuerDatabase])
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- the fleet ---


class TimedFleet(Fleet):
    """
    The sim's fleet, also recording when each controller was welcomed and lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.welcomedAt: dict[str, float] = {}
        self.lostAt: dict[str, float] = {}

    def welcomed(self, protocol: SimController) -> None:
        self.welcomedAt[protocol.controller] = self.reactor.seconds()
        super().welcomed(protocol)

    def lost(self, protocol: SimController) -> None:
        if protocol.live:
            self.lostAt[protocol.controller] = self.reactor.seconds()
        super().lost(protocol)


def startFleet(ctx: Context, gw: GatewayProcess, n: int, prefix: str, **options: Any) -> TimedFleet:
    fleet = TimedFleet(reactor, SimOptions(endpoints=[("127.0.0.1", gw.port)], controllers=n,
                                           prefix=prefix, duration=0, **options))
    ctx.fleets.append(fleet)
    fleet.start()
    return fleet


async def connectFleet(ctx: Context, gw: GatewayProcess, n: int, prefix: str, **options: Any) -> TimedFleet:
    fleet = startFleet(ctx, gw, n, prefix, **options)
    await waitFor(lambda: fleet.stats.welcomes >= n, 60 + n / 100, f"{n} welcomes on {gw.name}")
    return fleet


async def stopFleet(ctx: Context, fleet: Fleet) -> None:
    if fleet in ctx.fleets:
        ctx.fleets.remove(fleet)
    fleet.stop()
    await waitFor(lambda: fleet.stats.connected == 0, 30, "the fleet to hang up")
    await sleep(0.2)


def latencySummary(values: list[float]) -> dict[str, float | None]:
    return {"p50_ms": percentile(values, 0.50), "p99_ms": percentile(values, 0.99),
            "max_ms": max(values, default=None)}


def quantiles(values: list[float], points: int = 500) -> list[float]:
    """
    At most C{points} evenly spaced order statistics: enough for a CDF plot.
    """
    ordered = sorted(values)
    if len(ordered) <= points:
        return [round(v, 3) for v in ordered]
    return [round(ordered[round(i * (len(ordered) - 1) / (points - 1))], 3) for i in range(points)]


# --- the run ---


@dataclass
class Context:
    dsn: str
    schema: str
    pgqueuerDatabase: str
    workdir: str
    settings: dict[str, dict[str, str]]
    sizes: Sizes
    pool: Any = None
    poolStarted: bool = False
    gateways: list[GatewayProcess] = field(default_factory=list)
    fleets: list[Fleet] = field(default_factory=list)
    serial: int = 0

    async def gateway(self, name: str) -> GatewayProcess:
        self.serial += 1
        gw = GatewayProcess(f"{name}-{self.serial}", self.dsn, self.schema, self.workdir, self.settings)
        self.gateways.append(gw)
        await gw.ready()
        return gw

    async def stopGateway(self, gw: GatewayProcess) -> None:
        await gw.stop()
        self.gateways.remove(gw)

    def prefix(self, name: str) -> str:
        self.serial += 1
        return f"{name}{self.serial}-"

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.pool.runQuery(sql.replace("ctrlgw.", f"{self.schema}."), params)
        return rows


async def scenarioCommands(ctx: Context, gw: GatewayProcess, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    N idle controllers connected (`ctrlgw sim` subprocesses, so this process only paces
    the sends, as PgQueuer's side only enqueues); send() paced over them, sent_ms in the
    body; the simulators record enqueue -> read of each cmd frame.
    """
    sizes = ctx.sizes
    prefix = ctx.prefix("cmd")
    connected: list[int] = []

    def onLine(line: str) -> None:
        m = _PROGRESS.search(line)
        if m:
            connected.append(int(m[1]))

    count = int(sizes.commandRate * sizes.commandSeconds)
    # Long enough to connect (a storm of N hellos), send and drain; the run waits for
    # the simulators to end so that they report every latency.
    connectAllowance = 10 + n / 500
    duration = connectAllowance + 1 + sizes.commandSeconds + 5
    raw = os.path.join(ctx.workdir, f"commands-{uuid.uuid4().hex[:6]}.json")
    ended = Deferred.fromCoroutine(runProcess([
        CTRLGW, "sim", f"127.0.0.1:{gw.port}", "-n", str(n), "--prefix", prefix, "--rate", "0",
        "--duration", str(duration), "--procs", str(min(sizes.commandProcs, n)), "--json", raw,
    ], onLine))
    await waitFor(lambda: bool(connected) and connected[-1] >= n or ended.called,
                  connectAllowance, f"{n} controllers connected")
    await sleep(1.0)
    ids = [row[0] for row in await ctx.query(
        "SELECT controller_id FROM ctrlgw.sessions WHERE online AND controller_id LIKE %s"
        " ORDER BY controller_id", (prefix + "%",))]
    if len(ids) != n:
        raise RuntimeError(f"{len(ids)} of {n} simulated controllers online")
    errors: list[Failure] = []
    # Each send() from the call to its result: the application's own commit, which every
    # command's latency includes (and PgQueuer's enqueue its own); and when it returned, by
    # command id, for what comes after it.
    sendMs: list[float] = []
    returnedMs: dict[str, float] = {}

    def returned(rows: list[tuple[Any, ...]], sentAt: float) -> None:
        now = time.time()
        sendMs.append((now - sentAt) * 1000)
        returnedMs[str(rows[0][0])] = now * 1000

    def sendOne(i: int) -> None:
        sentAt = time.time()
        body = json.dumps({"sent_ms": sentAt * 1000, "i": i})
        d = ctx.pool.runQuery(f"SELECT {ctx.schema}.send(%s, %s::jsonb, interval '30 seconds')",
                              (ids[i % n], body))
        d.addCallback(returned, sentAt)
        d.addErrback(errors.append)

    await paced(count, sizes.commandRate, sendOne)
    if errors:
        errors[0].raiseException()
    await ended
    with open(raw) as f:
        fleetRecord = json.load(f)
    latencies: list[float] = fleetRecord["cmd_ms"]
    afterCall = [readMs - returnedMs[i] for i, readMs in fleetRecord["cmd_reads"] if i in returnedMs]
    if len(latencies) != count:
        raise RuntimeError(f"{len(latencies)} of {count} commands reached the simulated fleet")
    return ({"controllers": n, "commands": count, **latencySummary(latencies),
             "call_p50_ms": percentile(sendMs, 0.50), "call_p99_ms": percentile(sendMs, 0.99),
             "after_call_p50_ms": percentile(afterCall, 0.50), "after_call_p99_ms": percentile(afterCall, 0.99)},
            {"cmd_ms": quantiles(latencies)})


async def scenarioCommitProbe(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The floor under every command's latency: what send() commits without the gateway, an
    INSERT and a NOTIFY in one transaction, at the same rate and on the same pool, with no
    fleet connected and no one listening.
    """
    sizes = ctx.sizes
    table = f"{ctx.schema}.bench_commit_probe"
    await ctx.pool.runOperation(f"CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, body jsonb)")
    commitMs: list[float] = []
    errors: list[Failure] = []

    calls: list[Deferred[None]] = []

    def commitOne(i: int) -> None:
        startedAt = time.time()
        d: Deferred[None] = ctx.pool.runOperation(
            f"INSERT INTO {table} (body) VALUES ('{{}}'); SELECT pg_notify('{ctx.schema}_probe', '')")
        d.addCallback(lambda _: commitMs.append((time.time() - startedAt) * 1000))
        d.addErrback(errors.append)
        calls.append(d)

    count = int(sizes.commandRate * sizes.commandSeconds)
    await paced(count, sizes.commandRate, commitOne)
    for d in calls:
        await d
    if errors:
        errors[0].raiseException()
    return {"commits": count, **latencySummary(commitMs)}, {}


async def scenarioBacklog(ctx: Context, gw: GatewayProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The fleet connected, then the backlog enqueued with send_many (10,000 per statement) in
    one transaction; from its commit to no command of the fleet pending or sent.
    """
    sizes = ctx.sizes
    prefix = ctx.prefix("bl")
    fleet = await connectFleet(ctx, gw, sizes.backlogControllers, prefix)
    await sleep(1.0)
    ids = fleet.controllers()
    series: list[tuple[float, int]] = []

    # As on PgQueuer's side, the backlog is in place when the clock starts: committed at
    # once, it is all visible (and its doorbells ring) at the commit.
    def enqueue(cursor: Any) -> Deferred[None]:
        async def statements() -> None:
            for start in range(0, sizes.backlog, 10_000):
                chunk = range(start, min(sizes.backlog, start + 10_000))
                await cursor.execute(
                    f"SELECT count(*) FROM {ctx.schema}.send_many(%s::text[], %s::jsonb[], interval '1 hour')",
                    ([ids[i % len(ids)] for i in chunk], [json.dumps({"i": i}) for i in chunk]),
                )
        return Deferred.fromCoroutine(statements())

    began = time.time()
    await ctx.pool.runInteraction(enqueue)
    started = time.time()
    enqueued = started - began

    async def open_() -> int:
        rows = await ctx.query(
            "SELECT count(*) FROM ctrlgw.commands WHERE state IN ('pending', 'sent')"
            " AND controller_id LIKE %s", (prefix + "%",))
        return int(rows[0][0])

    deadline = time.time() + 60 + sizes.backlog / 500
    while True:
        series.append((round(time.time() - started, 3), fleet.stats.cmds))
        if fleet.stats.cmds >= sizes.backlog and await open_() == 0:
            break
        if time.time() > deadline:
            raise RuntimeError(f"backlog not drained: {fleet.stats.cmds} of {sizes.backlog} delivered")
        await sleep(0.1)
    elapsed = time.time() - started
    await stopFleet(ctx, fleet)
    return ({"commands": sizes.backlog, "controllers": sizes.backlogControllers,
             "enqueue_seconds": round(enqueued, 3), "seconds": round(elapsed, 3),
             "per_second": round(sizes.backlog / elapsed, 1)},
            {"delivered_over_time": series})


_PROGRESS = re.compile(r"connected (\d+)\s+msgs/s (\d+)\s+acks/s (\d+)")


async def scenarioInbound(ctx: Context, gw: GatewayProcess, *others: GatewayProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    `ctrlgw sim` as a subprocess (its pacer at a rate above the target); acks/s from its
    per-second progress lines once the whole fleet is connected.  With C{others}, the
    controllers are spread over every instance (bench/partitions.py).
    """
    sizes = ctx.sizes
    lines: list[tuple[int, int, int]] = []

    def onLine(line: str) -> None:
        m = _PROGRESS.search(line)
        if m:
            lines.append((int(m[1]), int(m[2]), int(m[3])))

    raw = os.path.join(ctx.workdir, f"inbound-{uuid.uuid4().hex[:6]}.json")
    out = await runProcess([
        CTRLGW, "sim", *(f"127.0.0.1:{g.port}" for g in (gw, *others)), "-n", str(sizes.inboundControllers),
        "--prefix", ctx.prefix("in"), "--rate", str(sizes.inboundRate),
        "--duration", str(sizes.inboundSeconds), "--procs", str(sizes.inboundProcs),
        "--window", str(sizes.inboundWindow), "--json", raw,
    ], onLine)
    summary = json.loads(out)
    with open(raw) as f:
        ackMs: list[float] = json.load(f)["msg_ack_ms"]
    # Whole seconds with the fleet connected and the pacer running (the last one may be cut
    # short); the seconds after it only drain.
    full = [(sent, acks) for connected, sent, acks in lines if connected >= sizes.inboundControllers and sent > 0][:-1]
    if not full:
        full = [(sent, acks) for _, sent, acks in lines] or [(0, 0)]
    return ({"controllers": sizes.inboundControllers, "offered_per_second": sizes.inboundRate,
             "acked": summary["acks"], "unanswered": summary["unanswered"],
             "errors": summary["errors"], "sent_per_second": round(statistics.mean(x for x, _ in full), 1),
             "per_second": round(statistics.mean(a for _, a in full), 1), **latencySummary(ackMs)},
            {"acks_per_second": [acks for _, _, acks in lines], "msgs_per_second": [sent for _, sent, _ in lines],
             "msg_ack_ms": quantiles(ackMs)})


async def scenarioIdle(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A fresh gateway; RSS before and after the fleet connects; CPU over the window.
    """
    sizes = ctx.sizes
    gw = await ctx.gateway("idle")
    await sleep(1.0)
    before = gw.rss()
    fleet = await connectFleet(ctx, gw, sizes.idle, ctx.prefix("idle"))
    await sleep(2.0)
    after = gw.rss()
    cpu0, t0 = gw.cpuSeconds(), time.time()
    await sleep(sizes.idleWindow)
    cpu1, t1 = gw.cpuSeconds(), time.time()
    lost = fleet.stats.disconnects
    await stopFleet(ctx, fleet)
    await ctx.stopGateway(gw)
    return ({"connections": sizes.idle, "rss_before_mb": round(before / 2**20, 1),
             "rss_after_mb": round(after / 2**20, 1),
             "kb_per_connection": round((after - before) / sizes.idle / 1024, 2),
             "window_seconds": round(t1 - t0, 1), "cpu_percent": round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
             "pongs_expected": round(sizes.idle * (t1 - t0) / 15), "disconnects": lost}, {})


async def scenarioStorm(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A fresh gateway; the whole fleet dials at once; until the last welcome.
    """
    sizes = ctx.sizes
    gw = await ctx.gateway("storm")
    await sleep(1.0)
    started = time.time()
    fleet = startFleet(ctx, gw, sizes.storm, ctx.prefix("storm"))
    await waitFor(lambda: fleet.stats.welcomes >= sizes.storm, 60 + sizes.storm / 100, "the storm's welcomes")
    last = max(fleet.welcomedAt.values())
    welcomeMs = list(fleet.stats.welcomeMs)
    errors = fleet.stats.errors
    await stopFleet(ctx, fleet)
    await ctx.stopGateway(gw)
    return ({"controllers": sizes.storm, "seconds": round(last - started, 3),
             "per_second": round(sizes.storm / (last - started), 1), "errors": errors,
             "welcome_p50_ms": percentile(welcomeMs, 0.5), "welcome_p99_ms": percentile(welcomeMs, 0.99)},
            {"welcome_ms": quantiles(welcomeMs)})


def histogram(text: str, name: str) -> dict[str, float]:
    """
    A Prometheus histogram's cumulative buckets (by upper bound), _sum and _count.
    """
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line[line.index('le="') + 4:].split('"')[0]
            values[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((name + "_sum", name + "_count")):
            values[line.split()[0][len(name) + 1:]] = float(line.rsplit(" ", 1)[1])
    return values


def histogramP99(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, int]:
    """
    The upper bound of the bucket holding the 99th percentile of what was observed between
    the two scrapes, and that count.
    """
    count = int(after.get("count", 0) - before.get("count", 0))
    if count == 0:
        return None, 0
    bounds = sorted((float(k), after[k] - before.get(k, 0)) for k in after if k not in ("sum", "count"))
    for bound, cumulative in bounds:
        if cumulative >= 0.99 * count:
            return bound, count
    return float("inf"), count


async def scenarioTakeover(ctx: Context, a: GatewayProcess, b: GatewayProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The fleet on A (told not to come back for an hour), then the same ids say hello on B at
    the takeover rate.  Gateway view: ctrlgw_takeover_convergence_seconds on A; controller
    view: B's welcome read to A's socket closed.
    """
    sizes = ctx.sizes
    name = "ctrlgw_takeover_convergence_seconds"
    prefix = ctx.prefix("move")
    old = await connectFleet(ctx, a, sizes.takeover, prefix, backoffMin=3600.0, backoffMax=3600.0)
    await sleep(1.0)
    before = histogram(await a.metrics(), name)
    new = startFleet(ctx, b, sizes.takeover, prefix, connectRate=sizes.takeoverRate)
    await waitFor(lambda: len(new.welcomedAt) >= sizes.takeover and len(old.lostAt) >= sizes.takeover,
                  60 + sizes.takeover / sizes.takeoverRate * 2, "the takeovers")
    await sleep(0.5)
    after = histogram(await a.metrics(), name)
    p99, count = histogramP99(before, after)
    seen = [(old.lostAt[c] - new.welcomedAt[c]) * 1000 for c in new.welcomedAt if c in old.lostAt]
    await stopFleet(ctx, old)
    await stopFleet(ctx, new)
    mean = (after["sum"] - before.get("sum", 0)) / count * 1000 if count else None
    return ({"controllers": sizes.takeover, "moves_per_second": sizes.takeoverRate,
             "gateway_p99_ms_bucket": None if p99 is None else p99 * 1000,
             "gateway_mean_ms": None if mean is None else round(mean, 3), "gateway_observed": count,
             "seen_p50_ms": percentile(seen, 0.5), "seen_p99_ms": percentile(seen, 0.99),
             "seen_max_ms": max(seen, default=None)},
            {"seen_ms": quantiles(seen)})


# --- the application stream (docs/consuming.md) ---


async def streamConsumers(ctx: Context, group: str, count: int, handle: Callable[[Any], object],
                          batch: int, lease: float = 300.0) -> tuple[list[Any], list[Deferred[None]], list[Any]]:
    """
    C{count} L{ctrlgw.client.TwistedConsumer}s of C{group}, each on a connection of its own.
    """
    from txpostgres import txpostgres

    from ctrlgw.client import TwistedConsumer

    connections, consumers = [], []
    for _ in range(count):
        connection = txpostgres.Connection(reactor=reactor)
        await connection.connect(ctx.dsn)
        connections.append(connection)
        consumers.append(TwistedConsumer(reactor, connection, ctx.schema, group, handle,
                                         batch=batch, lease=lease, wait=1.0))
    return consumers, [c.run() for c in consumers], connections


async def streamExecute(ctx: Context, sql: str) -> None:
    await ctx.pool.runOperation(sql.replace("ctrlgw.", f"{ctx.schema}."))


async def stopConsumers(consumers: list[Any], running: list[Deferred[None]], connections: list[Any]) -> None:
    for consumer in consumers:
        consumer.stop()
    for d in running:
        await d
    for connection in connections:
        connection.close()


async def groupAtTheEnd(ctx: Context, group: str) -> None:
    """
    A group that starts at the end of the stream (created, then its cursor moved), so that
    it reads only what the scenario sends, not what the ones before it left.
    """
    await ctx.query(f"SELECT ctrlgw.read_stream('{group}', 1)")
    await streamExecute(ctx, f"DELETE FROM ctrlgw.stream_held WHERE group_name = '{group}'")
    await streamExecute(ctx, f"DELETE FROM ctrlgw.stream_leases WHERE group_name = '{group}'")
    await streamExecute(ctx, "UPDATE ctrlgw.stream_groups g SET cursor_xid = s.xid, cursor_position = s.position"
                    " FROM (SELECT xid, position FROM ctrlgw.stream ORDER BY xid DESC, position DESC LIMIT 1) s"
                    f" WHERE g.group_name = '{group}'")


async def scenarioStreamGroup(ctx: Context, gateways: list[GatewayProcess]) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    Controllers spread over 3 instances send; 4 consumers of one group read at the same
    time (lease 5 min: no lease runs out).  Every stored message must be handled once.
    """
    sizes = ctx.sizes
    group = f"g{uuid.uuid4().hex[:8]}"
    prefix = ctx.prefix("sg")
    handled: list[str] = []

    def handle(entry: Any) -> None:
        if entry.kind == "message" and entry.controller_id.startswith(prefix):
            handled.append(entry.entry_id)

    # (From the stream's oldest entry, four consumers first read whatever the scenarios
    # before left: after a full run with three repeats, about a million entries.)
    await groupAtTheEnd(ctx, group)
    consumers, running, connections = await streamConsumers(ctx, group, 4, handle, 100)
    per = sizes.streamControllers // len(gateways)
    rate = sizes.streamMessages / sizes.streamSeconds
    fleets = [await connectFleet(ctx, gw, per, f"{prefix}{i}-", rate=rate / len(gateways))
              for i, gw in enumerate(gateways)]
    await waitFor(lambda: sum(f.stats.acks for f in fleets) >= sizes.streamMessages,
                  60 + sizes.streamSeconds * 3, f"{sizes.streamMessages} msgs acked")
    for fleet in fleets:
        await stopFleet(ctx, fleet)
    stored = (await ctx.query("SELECT count(*) FROM ctrlgw.inbox WHERE controller_id LIKE %s",
                              (prefix + "%",)))[0][0]
    await waitFor(lambda: len(handled) >= stored, 60,
                  lambda: f"{stored} entries handled ({len(handled)} so far)")
    await sleep(1.0)  # anything extra would show now
    await stopConsumers(consumers, running, connections)
    redelivered = (await ctx.query(
        "SELECT count(*) FROM ctrlgw.stream_pending WHERE group_name = %s AND deliveries > 1", (group,)))[0][0]
    return ({"instances": len(gateways), "consumers": 4, "stored": stored, "handled": len(handled),
             "missed": stored - len(set(handled)), "duplicated": len(handled) - len(set(handled)),
             "redelivered_by_lease": redelivered,
             "per_consumer": [c.handled for c in consumers]}, {})


async def scenarioStreamRead(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A backlog of message entries; one consumer reads it in batches of streamBatch.
    """
    sizes = ctx.sizes
    tag = uuid.uuid4().hex[:6]
    # A new group starts at the oldest retained entry: it reads the whole stream.
    group = f"r{tag}"
    for start in range(0, sizes.streamBacklog, 50_000):
        n = min(50_000, sizes.streamBacklog - start)
        await streamExecute(
            ctx, "INSERT INTO ctrlgw.inbox (controller_id, message_id, device_ts, instance_id, epoch, body)"
            f" SELECT 'rd{tag}-' || (i % 1000), '{tag}-' || i, now(), 'bench', 0, '{{\"v\": 1}}'"
            f" FROM generate_series({start}, {start + n - 1}) i")
    await streamExecute(ctx, "VACUUM ANALYZE ctrlgw.stream")
    total = (await ctx.query("SELECT count(*) FROM ctrlgw.stream"))[0][0]
    count = [0]

    def handle(entry: Any) -> None:
        count[0] += 1

    started = time.time()
    consumers, running, connections = await streamConsumers(ctx, group, 1, handle, sizes.streamBatch)
    await waitFor(lambda: count[0] >= total, 600, f"{total} entries read")
    elapsed = time.time() - started
    await stopConsumers(consumers, running, connections)
    return ({"entries": count[0], "batch": sizes.streamBatch, "seconds": round(elapsed, 2),
             "per_second": round(count[0] / elapsed, 1)}, {})


async def scenarioStreamLatency(ctx: Context, gw: GatewayProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A fleet sending streamRate msgs/s through one instance; one consumer; the latency from
    the controller's ts (device_ts) to the consumer's callback.
    """
    sizes = ctx.sizes
    prefix = ctx.prefix("sl")
    group = f"l{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    # The same entries in two parts: the controller's ts to the entry's `at` (the inbox
    # flush's transaction start: the gateway's share), and `at` to the callback (the flush's
    # commit, the notification, the horizon, the read: the stream's share).
    stored: list[float] = []
    delivered: list[float] = []
    await groupAtTheEnd(ctx, group)

    # The consumer's reads: (start, end, entries) each; and per entry, `at` to the start of
    # the read that returned it (commit, notification, horizon, the reads before it).
    reads: list[tuple[float, float, int]] = []
    waited: list[float] = []
    # (xid, at, read start, callback) per entry, for the commit times below.
    seen: list[tuple[str, float, float, float]] = []

    def handle(entry: Any) -> None:
        if entry.kind == "message" and entry.controller_id.startswith(prefix):
            sent = datetime.datetime.fromisoformat(entry.body["device_ts"].replace("Z", "+00:00")).timestamp()
            now, at = time.time(), entry.at.timestamp()
            latencies.append((now - sent) * 1000)
            stored.append((at - sent) * 1000)
            delivered.append((now - at) * 1000)
            waited.append((reads[-1][0] - at) * 1000)
            seen.append((entry.entry_id.partition("-")[0], at, reads[-1][0], now))

    consumers, running, connections = await streamConsumers(ctx, group, 1, handle, sizes.streamBatch)
    runQuery = connections[0].runQuery

    async def timedQuery(sql: str, *args: Any, **kwargs: Any) -> Any:
        if "read_stream" not in sql:
            return await runQuery(sql, *args, **kwargs)
        start = time.time()
        rows = await runQuery(sql, *args, **kwargs)
        reads.append((start, time.time(), len(rows)))
        return rows

    connections[0].runQuery = timedQuery
    # The fleet in processes of its own (as in the inbound scenario): this one only consumes.
    out = await runProcess([
        CTRLGW, "sim", f"127.0.0.1:{gw.port}", "-n", str(sizes.streamControllers), "--prefix", prefix,
        "--rate", str(sizes.streamRate), "--duration", str(sizes.streamSeconds), "--procs", "2",
    ])
    summary = json.loads(out)
    sent = summary["msgs"]
    count = (await ctx.query("SELECT count(*) FROM ctrlgw.inbox WHERE controller_id LIKE %s",
                             (prefix + "%",)))[0][0]
    await waitFor(lambda: len(latencies) >= count, 60, f"{count} stored msgs handled")
    await stopConsumers(consumers, running, connections)
    # The first second warms up (connections, plans): measured from the second second on.
    warm = int(sizes.streamRate)
    steady = latencies[warm:] or latencies
    # With track_commit_timestamp on (an external server, --dsn), where the stream's share
    # goes: `at` -> commit (the flush transaction), commit -> the read that returned the entry
    # (notification, horizon, reads before), read -> callback.
    commits: dict[str, Any] = {}
    if (await ctx.query("SELECT current_setting('track_commit_timestamp')"))[0][0] == "on":
        xids = sorted({x for x, *_ in seen[warm:]})
        rows = await ctx.query("SELECT x::text, extract(epoch FROM pg_xact_commit_timestamp(x::xid8::xid))"
                               " FROM unnest(%s::text[]) x", (xids,))
        committed = {x: float(t) for x, t in rows if t is not None}
        parts = [((committed[x] - at) * 1000, (start - committed[x]) * 1000, (now - start) * 1000)
                 for x, at, start, now in seen[warm:] if x in committed]
        for i, name in enumerate(("at_commit", "commit_read", "read_callback")):
            values = [p[i] for p in parts]
            commits[f"{name}_p50_ms"] = percentile(values, 0.5)
            commits[f"{name}_p99_ms"] = percentile(values, 0.99)
    ack = summary.get("msg_ack_ms") or {}
    # The same msgs' msg -> ack latency, as the controllers saw it: the inbox's share.
    return ({"rate": sizes.streamRate, "sent": sent, "handled": len(latencies),
             **latencySummary(steady), "ack_p50_ms": ack.get("p50"), "ack_p99_ms": ack.get("p99"),
             "stored_p50_ms": percentile(stored[warm:] or stored, 0.5),
             "stored_p99_ms": percentile(stored[warm:] or stored, 0.99),
             "delivered_p50_ms": percentile(delivered[warm:] or delivered, 0.5),
             "delivered_p99_ms": percentile(delivered[warm:] or delivered, 0.99),
             "waited_p50_ms": percentile(waited[warm:] or waited, 0.5),
             "waited_p99_ms": percentile(waited[warm:] or waited, 0.99),
             "reads": len(reads), "empty_reads": sum(1 for r in reads if not r[2]),
             "read_p50_ms": percentile([(r[1] - r[0]) * 1000 for r in reads if r[2]], 0.5),
             "read_p99_ms": percentile([(r[1] - r[0]) * 1000 for r in reads if r[2]], 0.99),
             **commits},
            {"msg_callback_ms": quantiles(steady)})


async def scenarioStream(ctx: Context, main: GatewayProcess | None, repeatTimes: int) -> dict[str, Any]:
    assert main is not None
    others = [await ctx.gateway("s1"), await ctx.gateway("s2")]
    try:
        return {
            "groups": await repeat("stream 3x4", repeatTimes, lambda: scenarioStreamGroup(ctx, [main, *others])),
            "read": await repeat("stream read", repeatTimes, lambda: scenarioStreamRead(ctx)),
            "latency": await repeat("stream latency", repeatTimes, lambda: scenarioStreamLatency(ctx, main)),
        }
    finally:
        for gw in others:
            await ctx.stopGateway(gw)


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Per key, the median over the runs of the numeric figures (other values: the last run's).
    """
    out: dict[str, Any] = {}
    for key in runs[-1]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
        if len(values) == len(runs):
            m = statistics.median(values)
            out[key] = round(m, 3) if isinstance(m, float) else m
        else:
            out[key] = runs[-1][key]
    return out


async def repeat(label: str, times: int, step: Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]) -> dict[str, Any]:
    runs = []
    series: dict[str, Any] = {}
    for i in range(times):
        figures, series = await step()
        log(f"{label} run {i + 1}/{times}: {json.dumps(figures)}")
        runs.append(figures)
    return {"median": median(runs), "runs": runs, "series": series}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def verdicts(scenarios: dict[str, Any], sizes: Sizes, only: list[str]) -> list[dict[str, Any]]:
    """
    One row per target of the scenarios run: the figure, the target and whether it was met
    (C{None}: no figure, the scenario failed).
    """
    rows = []

    def row(scenario: str, what: str, value: Callable[[], float | None], unit: str, target: str,
            met: Callable[[float], bool]) -> None:
        if scenario not in only:
            return
        try:
            v = value()
        except (KeyError, TypeError, ZeroDivisionError):
            v = None
        rows.append({"scenario": scenario, "what": what, "value": v, "unit": unit,
                     "target": target, "met": None if v is None else bool(met(v))})

    def m(*path: str) -> Any:
        node: Any = scenarios
        for key in path:
            node = node[key]
        return node

    for n in sizes.fleets:
        row("commands", f"ctrlgw p99 / PgQueuer p99, {n:,} controllers",
            lambda n=n: _ratio(m("commands", "fleets", str(n), "median", "p99_ms"),  # type: ignore[misc]
                               m("commands", "pgqueuer", "median", "p99_ms")), "×", "≤ 0.7", lambda v: v <= 0.7)
    largest = max(sizes.fleets)
    if sizes.referenceFleet in sizes.fleets and largest != sizes.referenceFleet:
        row("commands", f"p99 at {largest:,} / p99 at {sizes.referenceFleet:,} controllers",
            lambda: _ratio(m("commands", "fleets", str(largest), "median", "p99_ms"),
                           m("commands", "fleets", str(sizes.referenceFleet), "median", "p99_ms")),
            "×", "0.8 – 1.2 (±20%)", lambda v: 0.8 <= v <= 1.2)
    row("backlog", "ctrlgw drain rate / PgQueuer drain rate",
        lambda: _ratio(m("backlog", "ctrlgw", "median", "per_second"), m("backlog", "pgqueuer", "median", "per_second")),
        "×", "≥ 1", lambda v: v >= 1)
    row("inbound", "durably acked msgs/s", lambda: m("inbound", "median", "per_second"), "/s",
        "≥ 30,000", lambda v: v >= 30_000)
    row("idle", "gateway RSS per connection", lambda: m("idle", "median", "kb_per_connection"), "KiB",
        "≤ 5", lambda v: v <= 5)
    row("idle", "gateway CPU, % of one core", lambda: m("idle", "median", "cpu_percent"), "%",
        "≤ 10", lambda v: v <= 10)
    row("storm", "welcomes per second", lambda: m("storm", "median", "per_second"), "/s",
        "≥ 3,000", lambda v: v >= 3000)
    row("takeover", "claim → old socket aborted p99 (gateway metric, bucket bound)",
        lambda: m("takeover", "median", "gateway_p99_ms_bucket"), "ms", "≤ 10", lambda v: v <= 10)
    row("takeover", "B's welcome → A's socket closed p99 (controller view)",
        lambda: m("takeover", "median", "seen_p99_ms"), "ms", "≤ 10", lambda v: v <= 10)
    row("stream", "3 instances, 4 consumers: entries missed + duplicated (no lease expiry)",
        lambda: max(r["missed"] + r["duplicated"] for r in m("stream", "groups", "runs")), "entries",
        "0", lambda v: v == 0)
    row("stream", f"one consumer, batches of {sizes.streamBatch:,}", lambda: m("stream", "read", "median", "per_second"),
        "entries/s", "≥ 30,000", lambda v: v >= 30_000)
    row("stream", f"msg → consumer callback p99 at {sizes.streamRate:,.0f} msgs/s",
        lambda: m("stream", "latency", "median", "p99_ms"), "ms", "≤ 20", lambda v: v <= 20)
    return rows


# --- what the run ran on ---


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def git() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    # The pages and plots a run writes are its output, not part of what it measures.
    outputs = (":(exclude)docs/benchmarks.md", ":(exclude)docs/bench")
    return {"commit": run("rev-parse", "HEAD") or "unknown",
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs))}


async def versions(ctx: Context) -> dict[str, str]:
    from importlib.metadata import version

    import twisted

    rows = await ctx.query("SHOW server_version")
    return {"python": platform.python_version(), "twisted": twisted.__version__,
            "postgresql": str(rows[0][0]), "pgqueuer": version("pgqueuer"), "ctrlgw": version("ctrlgw")}


# --- main ---


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from txpostgres.txpostgres import ConnectionPool

    sizes: Sizes = args.sizes
    server = None
    dsn = args.dsn
    if dsn is None:
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="ctrlgw-bench-pg-", dir=args.pg_dir), cleanup_mode="delete")
        dsn = server.get_uri()
    tag = uuid.uuid4().hex[:8]
    ctx = Context(dsn=dsn, schema="bench_" + tag, pgqueuerDatabase="bench_pgqueuer_" + tag, workdir=tempfile.mkdtemp(prefix="ctrlgw-bench-"),
                  settings=args.settings, sizes=sizes)
    ctx.pool = ConnectionPool(None, dsn, min=8)
    try:
        where = "--dsn" if server is None else (
            "embedded (pgserver)" if args.pg_dir is None else f"embedded (pgserver), its data in {args.pg_dir}")
        return await runScenarios(ctx, args, where)
    finally:
        for gw in list(ctx.gateways):
            await gw.stop()
        if server is None and ctx.poolStarted:
            # Someone else's server: leave nothing behind.
            await ctx.pool.runOperation(f"DROP SCHEMA IF EXISTS {ctx.schema} CASCADE")
            await ctx.pool.runOperation(f"DROP DATABASE IF EXISTS {ctx.pgqueuerDatabase}")
        ctx.pool.close()
        if server is not None:
            server.cleanup()
        shutil.rmtree(ctx.workdir, ignore_errors=True)


async def runScenarios(ctx: Context, args: argparse.Namespace, where: str) -> dict[str, Any]:
    sizes = ctx.sizes
    await ctx.pool.start()
    ctx.poolStarted = True
    # PgQueuer's tables in a database of their own: no collision with the gateway's schema.
    await ctx.pool.runOperation(f"CREATE DATABASE {ctx.pgqueuerDatabase}")
    result: dict[str, Any] = {
        "smoke": args.smoke, "repeat": args.repeat, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git(), "machine": machine(), "versions": await versions(ctx),
        "sizes": dataclasses.asdict(sizes), "gateway_settings": args.settings,
        "postgresql": where,
    }
    scenarios: dict[str, Any] = {}
    only = args.only

    async def attempt(name: str, step: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """
        Run one scenario; a failure is recorded (and the fleets it left are hung up), and
        the run goes on with the next.
        """
        if name not in only:
            return
        try:
            scenarios[name] = await step()
        except Exception as e:
            log(f"{name} FAILED:\n{traceback.format_exc()}")
            scenarios[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            for fleet in list(ctx.fleets):
                try:
                    await stopFleet(ctx, fleet)
                except RuntimeError as stuck:
                    log(f"after {name}: {stuck}")

    main: GatewayProcess | None = None
    if {"commands", "backlog", "inbound", "takeover", "stream"} & set(only):
        main = await ctx.gateway("a")
        log(f"gateway {main.name} ready (schema {ctx.schema})")

    async def commands() -> dict[str, Any]:
        assert main is not None
        cmd: dict[str, Any] = {"fleets": {}}
        for n in sizes.fleets:
            cmd["fleets"][str(n)] = await repeat(f"commands n={n}", args.repeat,
                                                 lambda n=n: scenarioCommands(ctx, main, n))  # type: ignore[misc]

        async def pgqLatency() -> tuple[dict[str, Any], dict[str, Any]]:
            r = await pgqueuer(ctx, "latency", "--rate", str(sizes.commandRate), "--seconds", str(sizes.commandSeconds))
            samples = r.pop("latencies_ms")
            return r, {"latency_ms": quantiles(samples)}

        cmd["pgqueuer"] = await repeat("commands pgqueuer", args.repeat, pgqLatency)
        cmd["commit"] = await repeat("commands commit probe", args.repeat, lambda: scenarioCommitProbe(ctx))
        return cmd

    async def backlog() -> dict[str, Any]:
        assert main is not None

        async def pgqDrain() -> tuple[dict[str, Any], dict[str, Any]]:
            return await pgqueuer(ctx, "drain", "--jobs", str(sizes.backlog), "--batch", str(sizes.pgqueuerBatch)), {}

        return {"ctrlgw": await repeat("backlog ctrlgw", args.repeat, lambda: scenarioBacklog(ctx, main)),
                "pgqueuer": await repeat("backlog pgqueuer", args.repeat, pgqDrain)}

    async def takeover() -> dict[str, Any]:
        assert main is not None
        b = await ctx.gateway("b")
        return await repeat("takeover", args.repeat, lambda: scenarioTakeover(ctx, main, b))

    await attempt("commands", commands)
    await attempt("backlog", backlog)
    await attempt("inbound", lambda: repeat("inbound", args.repeat, lambda: scenarioInbound(ctx, main)))  # type: ignore[arg-type]
    await attempt("idle", lambda: repeat("idle", args.repeat, lambda: scenarioIdle(ctx)))
    await attempt("storm", lambda: repeat("storm", args.repeat, lambda: scenarioStorm(ctx)))
    await attempt("takeover", takeover)
    await attempt("stream", lambda: scenarioStream(ctx, main, args.repeat))
    result["scenarios"] = scenarios
    result["verdicts"] = verdicts(scenarios, sizes, only)
    result["only"] = only
    return result


def parseArgs(argv: list[str] | None = None) -> argparse.Namespace:
    d = Sizes()
    p = argparse.ArgumentParser(description="ctrlgw benchmarks (writes var/bench.json and docs/benchmarks.md)")
    p.add_argument("--smoke", action="store_true", help="every scenario at tiny sizes, repeat 1; writes under var/")
    p.add_argument("--dsn", default=None, help="a postgresql:// URI instead of the embedded PostgreSQL")
    p.add_argument("--pg-dir", default=None, metavar="DIR",
                   help="where the embedded PostgreSQL's data directory goes (the system's temporary"
                   " folder); /dev/shm takes the disk's flushes out of every figure")
    p.add_argument("--repeat", type=int, default=None, help="runs per figure; the median is reported (3)")
    p.add_argument("--json", default=None, help="where the run's JSON goes (var/bench.json)")
    p.add_argument("--docs", default=None, help="folder for benchmarks.md and bench/*.png (docs)")
    p.add_argument("--only", type=lambda v: v.split(","), default=list(SCENARIOS),
                   help=f"scenarios to run, comma-separated ({','.join(SCENARIOS)})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a gateway setting for every instance (repeatable)")
    p.add_argument("--fleets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help=f"command scenario fleet sizes ({','.join(map(str, d.fleets))})")
    for f in dataclasses.fields(Sizes):
        if f.name == "fleets":
            continue
        flag = "--" + re.sub(r"([A-Z])", r"-\1", f.name).lower()
        p.add_argument(flag, dest=f.name, type=type(getattr(d, f.name)), default=None,
                       help=f"(default {getattr(d, f.name)})")
    args = p.parse_args(argv)
    sizes = dataclasses.replace(SMOKE) if args.smoke else Sizes()
    if args.fleets is not None:
        sizes.fleets = args.fleets
    for f in dataclasses.fields(Sizes):
        if f.name != "fleets" and getattr(args, f.name) is not None:
            setattr(sizes, f.name, getattr(args, f.name))
    args.sizes = sizes
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        p.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    args.repeat = args.repeat if args.repeat is not None else (1 if args.smoke else 3)
    args.json = args.json or os.path.join(ROOT, "var", "bench-smoke.json" if args.smoke else "bench.json")
    args.docs = args.docs or (os.path.join(ROOT, "var", "bench-smoke-docs") if args.smoke else os.path.join(ROOT, "docs"))
    settings = json.loads(json.dumps(BASE_SETTINGS))
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        if not section or not name or not _:
            p.error(f"--set wants SECTION.KEY=VALUE, got {item!r}")
        settings.setdefault(section, {})[name] = value
    args.settings = settings
    return args


def main(argv: list[str] | None = None) -> None:
    args = parseArgs(argv)
    # Agent's readBody on plain loopback HTTP: harmless here.
    warnings.filterwarnings("ignore", message="Using readBody with a transport", category=DeprecationWarning)
    # Thousands of connections need file descriptors on both sides (children inherit this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(args.sizes.idle, args.sizes.storm, max(args.sizes.fleets), args.sizes.backlogControllers) + 500
    if hard < need:
        sys.exit(f"bench: the open-file hard limit is {hard}; the sizes asked for need {need}")

    async def go(_: Any) -> None:
        result = await run(args)
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        sys.path.insert(0, HERE)
        from report import render

        page = render(result, args.docs)
        log(f"wrote {args.json} and {page}")
        for v in result["verdicts"]:
            met = {True: "met", False: "NOT met", None: "no figure"}[v["met"]]
            print(f"{v['scenario']:9} {v['what']}: {v['value']} {v['unit']} (target {v['target']}: {met})")
        failed = [name for name, entry in result["scenarios"].items() if "error" in entry]
        if failed:
            print(f"FAILED scenarios: {', '.join(failed)}")
            raise SystemExit(1)

    react(lambda r: Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
