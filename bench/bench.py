"""
ctrlgw benchmarks: `make bench` (or `python bench/bench.py`).

Starts a private PostgreSQL (pgserver) and gateway instances as real `twistd ctrlgw`
processes, drives them from this process over loopback, and prints one table (also written
to var/bench.json).  Everything talks to 127.0.0.1 only and stops by itself.

Measured:
  inbound   durable inbound throughput: controllers pipelining msgs, acks counted
  cmd-one   command latency: single send() calls, paced; send() call to cmd frame received
  cmd-batch one send_many() of N commands; call to last cmd frame received
  enqueue   send() statements vs one send_many(), nobody connected
  takeover  a controller moves from instance A to B: B's welcome to A's socket closed
  memory    RSS of the gateway per idle, welcomed connection
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater, react
from twisted.web.client import Agent, readBody

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nowMs() -> int:
    return int(time.time() * 1000)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Controller(Protocol):
    """
    A benchmark controller: counts acks, records when each cmd arrived, acks commands.
    """

    def __init__(self, autoAck: bool = True) -> None:
        self.buffer = b""
        self.welcome: Deferred[dict[str, Any]] = Deferred()
        self.acks = 0
        self.commands: dict[str, float] = {}
        self.autoAck = autoAck
        self.closedAt: float | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            frame = json.loads(line)
            kind = frame["type"]
            if kind == "ack":
                self.acks += 1
            elif kind == "welcome" and not self.welcome.called:
                self.welcome.callback(frame)
            elif kind == "cmd":
                self.commands[frame["id"]] = time.time()
                if self.autoAck:
                    self.send({"type": "ack", "ref": frame["id"]})
            elif kind == "ping":
                self.send({"type": "pong", "echo": frame["ts"]})

    def connectionLost(self, reason: object = None) -> None:
        self.closedAt = time.time()

    def send(self, frame: dict[str, Any]) -> None:
        frame.setdefault("ts", nowMs())
        self.transport.write(json.dumps(frame).encode() + b"\n")


async def connect(port: int, controllerId: str, autoAck: bool = True) -> Controller:
    controller = Controller(autoAck)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), controller)
    controller.send({"type": "hello", "controller": controllerId})
    await controller.welcome
    return controller


class GatewayProcess(ProcessProtocol):
    def __init__(self, name: str, dsn: str, schema: str, workdir: str) -> None:
        self.name = name
        self.port = freePort()
        self.http = freePort()
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        config = os.path.join(workdir, f"{name}.ini")
        with open(config, "w") as f:
            f.write(
                f"[gateway]\ninstance_id = {name}\n"
                f"[listener:main]\nendpoint = tcp:{self.port}:interface=127.0.0.1:backlog=4096\n"
                f"[http]\nendpoint = tcp:{self.http}:interface=127.0.0.1\n"
                f"[database]\nschema = {schema}\npool_size = 4\n"
                f"[inbox]\nmax_buffered = 200000\n"
                f"[cluster]\nflap_policy = log\n"
            )
        self.process = reactor.spawnProcess(
            self, TWISTD, [TWISTD, "-n", "--pidfile=", "ctrlgw", "--config", config, "--dsn", dsn],
            env=dict(os.environ), path=workdir,
        )

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)

    async def ready(self) -> None:
        agent = Agent(reactor)
        for _ in range(600):
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
        raise RuntimeError(f"{self.name} never became ready:\n{self.output.decode(errors='replace')}")

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    async def stop(self) -> None:
        if not self.ended.called:
            self.process.signalProcess(signal.SIGTERM)
            await self.ended


async def benchInbound(gw: GatewayProcess, controllers: int, messages: int, window: int) -> dict[str, Any]:
    clients = [await connect(gw.port, f"in-{uuid.uuid4().hex[:8]}") for _ in range(controllers)]
    perClient = messages // controllers
    started = time.time()

    async def pump(client: Controller) -> None:
        sent = 0
        while sent < perClient:
            while sent - client.acks < window and sent < perClient:
                client.send({"type": "msg", "id": f"m{sent}", "body": {"v": sent}})
                sent += 1
            await sleep(0.001)
        while client.acks < perClient:
            await sleep(0.001)

    await gatherResults([Deferred.fromCoroutine(pump(c)) for c in clients])
    elapsed = time.time() - started
    for c in clients:
        c.transport.loseConnection()
    total = perClient * controllers
    return {"messages": total, "seconds": round(elapsed, 3), "per_second": round(total / elapsed)}


async def benchCommands(gw: GatewayProcess, db: Any, count: int, rate: float) -> dict[str, Any]:
    client = await connect(gw.port, "cmd-one")
    latencies = []
    for i in range(count):
        started = time.time()
        rows = await db.runQuery("bench", "SELECT send('cmd-one', %s::jsonb)::text", (json.dumps({"i": i}),))
        command = rows[0][0]
        while command not in client.commands:
            await sleep(0.0005)
        latencies.append((client.commands[command] - started) * 1000)
        await sleep(max(0.0, 1 / rate - (time.time() - started)))
    client.transport.loseConnection()
    return {
        "commands": count,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
    }


async def benchBatch(gw: GatewayProcess, db: Any, controllers: int, perController: int) -> dict[str, Any]:
    clients = [await connect(gw.port, f"batch-{i}") for i in range(controllers)]
    ids = [f"batch-{i}" for i in range(controllers) for _ in range(perController)]
    started = time.time()
    await db.runQuery(
        "bench",
        "SELECT count(*) FROM send_many(%s::text[], %s::jsonb[], interval '60 seconds')",
        (ids, [json.dumps({"n": n}) for n in range(len(ids))]),
    )
    while sum(len(c.commands) for c in clients) < len(ids):
        await sleep(0.001)
    elapsed = time.time() - started
    for c in clients:
        c.transport.loseConnection()
    return {"commands": len(ids), "seconds": round(elapsed, 3), "per_second": round(len(ids) / elapsed)}


async def benchEnqueue(db: Any, count: int, concurrency: int) -> dict[str, Any]:
    """
    Enqueue throughput with nobody connected: single send() statements from `concurrency`
    connections, then one send_many() of the same size.  Each statement rings the doorbell
    once (a NOTIFY per statement, not per row).
    """
    started = time.time()

    async def worker(n: int) -> None:
        for i in range(n, count, concurrency):
            await db.runQuery("bench", "SELECT send(%s, %s::jsonb)", (f"offline-{i % 100}", '{"x":1}'))

    await gatherResults([Deferred.fromCoroutine(worker(n)) for n in range(concurrency)])
    single = time.time() - started
    started = time.time()
    await db.runQuery(
        "bench", "SELECT count(*) FROM send_many(%s::text[], %s::jsonb[])",
        ([f"offline-{i % 100}" for i in range(count)], ['{"x":1}'] * count),
    )
    batch = time.time() - started
    return {"commands": count, "single_per_second": round(count / single),
            "send_many_per_second": round(count / batch)}


async def benchTakeover(a: GatewayProcess, b: GatewayProcess, rounds: int) -> dict[str, Any]:
    delays = []
    for i in range(rounds):
        controllerId = f"move-{i}"
        old = await connect(a.port, controllerId)
        new = await connect(b.port, controllerId)
        welcomed = time.time()
        while old.closedAt is None:
            await sleep(0.0005)
        delays.append((old.closedAt - welcomed) * 1000)
        new.transport.loseConnection()
    # The gateway's own view: claim committed (database clock) to old socket dropped.
    agent = Agent(reactor)
    response = await agent.request(b"GET", b"http://127.0.0.1:%d/metrics" % a.http)
    text = (await readBody(response)).decode()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines()
        if line.startswith("ctrlgw_takeover_convergence_seconds_")
        and not line.startswith("ctrlgw_takeover_convergence_seconds_bucket")
    )
    count = float(samples.get("ctrlgw_takeover_convergence_seconds_count", 0))
    total = float(samples.get("ctrlgw_takeover_convergence_seconds_sum", 0))
    return {
        "rounds": rounds,
        "welcome_to_old_closed_p50_ms": round(statistics.median(delays), 2),
        "welcome_to_old_closed_p99_ms": round(percentile(delays, 99), 2),
        "claim_to_abort_mean_ms": round(total / count * 1000, 2) if count else None,
    }


async def benchMemory(gw: GatewayProcess, connections: int) -> dict[str, Any]:
    before = gw.rss()
    clients = []
    for start in range(0, connections, 200):
        clients += await gatherResults(
            [Deferred.fromCoroutine(connect(gw.port, f"idle-{n}")) for n in range(start, min(connections, start + 200))]
        )
    await sleep(1.0)
    after = gw.rss()
    for c in clients:
        c.transport.loseConnection()
    return {"connections": connections, "rss_delta_mb": round((after - before) / 2**20, 1),
            "bytes_per_connection": round((after - before) / connections)}


async def main(reactor_: Any, args: argparse.Namespace) -> None:
    import pgserver

    from ctrlgw.config import DatabaseConfig
    from ctrlgw.metrics import Metrics
    from ctrlgw.store.database import Database

    data = tempfile.mkdtemp(prefix="ctrlgw-bench-pg-")
    server = pgserver.get_server(data, cleanup_mode="delete")
    dsn = server.get_uri()
    schema = "bench_" + uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="ctrlgw-bench-")
    a = GatewayProcess("bench-a", dsn, schema, workdir)
    results: dict[str, Any] = {}
    b: GatewayProcess | None = None
    try:
        await a.ready()
        b = GatewayProcess("bench-b", dsn, schema, workdir)
        await b.ready()
        db = Database(reactor, DatabaseConfig(dsn, "", schema, "off", 8, 5, 30, 30, 1, 100_000), Metrics())
        await db.start(dsn)
        results["inbound"] = await benchInbound(a, args.controllers, args.messages, args.window)
        print("inbound", results["inbound"], flush=True)
        results["cmd-one"] = await benchCommands(a, db, args.commands, args.rate)
        print("cmd-one", results["cmd-one"], flush=True)
        results["cmd-batch"] = await benchBatch(a, db, 100, args.batch // 100)
        print("cmd-batch", results["cmd-batch"], flush=True)
        results["enqueue"] = await benchEnqueue(db, args.enqueue, 8)
        print("enqueue", results["enqueue"], flush=True)
        results["takeover"] = await benchTakeover(a, b, args.takeovers)
        print("takeover", results["takeover"], flush=True)
        results["memory"] = await benchMemory(b, args.idle)
        print("memory", results["memory"], flush=True)
        db.stop()
    finally:
        await a.stop()
        if b is not None:
            await b.stop()
    os.makedirs("var", exist_ok=True)
    with open("var/bench.json", "w") as f:
        json.dump(results, f, indent=2)
    print("\n| benchmark | result |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{k} {v}' for k, v in values.items())} |")


if __name__ == "__main__":
    import resource

    # Idle connections need file descriptors on both sides (the gateway inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--controllers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--enqueue", type=int, default=5000)
    parser.add_argument("--takeovers", type=int, default=100)
    parser.add_argument("--idle", type=int, default=5000)
    options = parser.parse_args()
    react(lambda r: Deferred.fromCoroutine(main(r, options)))
