"""
The PgQueuer side of the benchmark, in its own process (PgQueuer is asyncio; the bench is
Twisted).  Prints one JSON object on standard output.

  latency --dsn URI --database DB --rate R --seconds S
      single enqueue() calls paced at R/s for S seconds, each issued on schedule on the next
      free connection of a pool of 8 (as the gateway's side sends); latency = just before
      the enqueue call to the handler's start (the payload carries the time it was sent)
  drain --dsn URI --database DB --jobs N --batch B
      N jobs enqueued first (batched inserts, not timed), then one worker drains them at
      batch size B: jobs per second from the worker's start to the queue empty

PgQueuer's tables live in their own database DB (created by the bench), so they cannot
collide with the gateway's schema.  Uses PgQueuer's public API only (PgQueuer, Queries,
AsyncpgDriver, entrypoint, enqueue).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, Job, PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode

ENTRYPOINT = "bench"


def percentile(values: Sequence[float], share: float) -> float | None:
    # Same rule as ctrlgw.sim.percentile (nearest rank), so both sides are read alike.
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


async def connect(args: argparse.Namespace) -> asyncpg.Connection:
    return await asyncpg.connect(dsn=args.dsn, database=args.database)


async def install(connection: asyncpg.Connection) -> None:
    queries = Queries(AsyncpgDriver(connection))
    if not await queries.schema_is_installed():
        await queries.install()
    # A clean queue for every run (the bench repeats each figure).
    await connection.execute("TRUNCATE pgqueuer, pgqueuer_log")


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    consumer = await connect(args)
    producers = [await connect(args) for _ in range(args.connections)]
    await install(producers[0])
    pgq = PgQueuer(AsyncpgDriver(consumer))
    latencies: list[float] = []
    handledMs: dict[int, float] = {}  # by job id: when the handler started
    returnedMs: dict[int, float] = {}  # by job id: when its enqueue() returned

    @pgq.entrypoint(ENTRYPOINT)
    async def handle(job: Job) -> None:
        assert job.payload is not None
        now = time.time() * 1000
        latencies.append(now - json.loads(job.payload)["sent_ms"])
        handledMs[int(job.id)] = now

    worker = asyncio.create_task(pgq.run(batch_size=args.batch))
    await asyncio.sleep(0.5)  # the worker's LISTEN is in place before the first job
    # As the gateway's side sends: each call issued on schedule, whether or not earlier
    # ones have returned, on the next free connection of the pool.  Awaiting each call
    # before the next would start every call after a slow commit late, and leave the
    # time it waited out of its latency.
    free: asyncio.Queue[Queries] = asyncio.Queue()
    for producer in producers:
        free.put_nowait(Queries(AsyncpgDriver(producer)))

    callMs: list[float] = []

    async def enqueueOne(i: int) -> None:
        sentMs = time.time() * 1000
        queries = await free.get()
        try:
            ids = await queries.enqueue(ENTRYPOINT, json.dumps({"sent_ms": sentMs, "i": i}).encode())
        finally:
            free.put_nowait(queries)
        now = time.time() * 1000
        callMs.append(now - sentMs)
        returnedMs[int(ids[0])] = now

    count = int(args.rate * args.seconds)
    calls: list[asyncio.Task[None]] = []
    started = time.monotonic()
    for i in range(count):
        due = started + i / args.rate
        delay = due - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(enqueueOne(i)))
    await asyncio.gather(*calls)
    deadline = time.monotonic() + 10
    while len(latencies) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    pgq.shutdown.set()
    await worker
    afterCall = [handledMs[i] - returnedMs[i] for i in handledMs if i in returnedMs]
    await consumer.close()
    for producer in producers:
        await producer.close()
    return {
        "jobs": count, "handled": len(latencies), "rate": args.rate, "seconds": args.seconds,
        "batch": args.batch, "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies, default=None),
        "call_p50_ms": percentile(callMs, 0.50), "call_p99_ms": percentile(callMs, 0.99),
        "after_call_p50_ms": percentile(afterCall, 0.50), "after_call_p99_ms": percentile(afterCall, 0.99),
        "latencies_ms": latencies,
    }


async def drain(args: argparse.Namespace) -> dict[str, Any]:
    connection = await connect(args)
    await install(connection)
    queries = Queries(AsyncpgDriver(connection))
    for start in range(0, args.jobs, 1000):
        n = min(1000, args.jobs - start)
        await queries.enqueue([ENTRYPOINT] * n, [b'{"x":1}'] * n, [0] * n)
    pgq = PgQueuer(AsyncpgDriver(connection))
    handled = 0

    @pgq.entrypoint(ENTRYPOINT)
    async def handle(job: Job) -> None:
        nonlocal handled
        handled += 1

    started = time.monotonic()
    await pgq.run(batch_size=args.batch, mode=QueueExecutionMode.drain,
                  dequeue_timeout=timedelta(seconds=1))
    elapsed = time.monotonic() - started
    await connection.close()
    return {"jobs": args.jobs, "handled": handled, "batch": args.batch,
            "seconds": round(elapsed, 3), "per_second": round(handled / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PgQueuer side of make bench")
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("latency", "drain"):
        p = sub.add_parser(name)
        p.add_argument("--dsn", required=True, help="a postgresql:// URI")
        p.add_argument("--database", default=None, help="database holding PgQueuer's tables")
        if name == "latency":
            p.add_argument("--rate", type=float, default=500.0)
            p.add_argument("--seconds", type=float, default=10.0)
            p.add_argument("--batch", type=int, default=10)
            p.add_argument("--connections", type=int, default=8, help="the producers' pool")
        else:
            p.add_argument("--jobs", type=int, default=100_000)
            p.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    result = asyncio.run(latency(args) if args.mode == "latency" else drain(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
