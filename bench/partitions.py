"""
Sustained inbound with retention running: time partitions against the DELETE retention of
an unpartitioned inbox (docs/scaling.md).  `make bench-partitions`, or
`python bench/partitions.py` (`--smoke` for a tiny run).

Each mode gets a schema of its own on a private PostgreSQL (pgserver, or --dsn), holding
--old-rows inbox rows 31-40 days old (past [retention] inbox_days = 30) before its gateways
start, with [retention] prune_interval = 1s.  Then the inbound fleet of bench.py (`ctrlgw
sim`, closed loop) offers messages for --seconds while retention removes the old rows:

  delete       an inbox as before migration 11 (unpartitioned): retention DELETEs them,
               prune_batch rows a statement
  partitions   a partitioned inbox: retention drops the old partitions
  partitions3  the same with three instances on the one database, the fleet spread over them

Reported per mode: acked msgs/s and msg -> ack latency (the simulator's), how many old rows
retention removed while the fleet ran and how long it took, and the WAL the run wrote.
Writes var/bench-partitions.json and docs/bench/partitions.md, and splices that page into
docs/benchmarks.md (bench/report.py includes it too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread

from ctrlgw.store.migrate import migrations

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (bench/bench.py: the gateway processes and the inbound fleet)

MODES = ("delete", "partitions", "partitions3")
BEGIN = "<!-- bench/partitions.py -->"
END = "<!-- /bench/partitions.py -->"


def prepare(dsn: str, schema: str, partitioned: bool, oldRows: int) -> None:
    """
    The schema as migrations leave it (before 11 an events row keeps it unpartitioned,
    as in a database that held rows), then the old rows.  Runs in a thread.
    """
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
            cur.execute(f'SET search_path TO "{schema}", public')
            cur.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in migrations():
                if m.version == 11 and not partitioned:
                    cur.execute(
                        "INSERT INTO events (controller_id, kind, instance_id) VALUES ('-', '-', '-')"
                    )
                cur.execute(m.sql)
                cur.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (m.version, m.name))
            if partitioned:
                cur.execute("SELECT create_partitions('inbox', '1 day', 3, now() - interval '41 days')")
            # No stream entries for the fill: the stream has a retention of its own.
            cur.execute("SET session_replication_role = replica")
            cur.execute(
                "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch,"
                " body, received_at)"
                " SELECT 'old' || (n %% 1000), 'o' || n, now(), 'bench', 1,"
                " jsonb_build_object('ts', n, 'lat', 52.1, 'lon', 4.3),"
                " now() - interval '31 days' - make_interval(secs => n %% 777600)"
                " FROM generate_series(1, %s) n",
                (oldRows,),
            )
            cur.execute("SET session_replication_role = DEFAULT")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'VACUUM ANALYZE "{schema}".inbox')
    finally:
        conn.close()


def sql(dsn: str, statement: str) -> Any:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchone() if cur.description is not None else None
    finally:
        conn.close()


def counter(text: str, name: str, table: str) -> float:
    m = re.search(rf'^{name}\{{table="{table}"\}} (\S+)$', text, re.M)
    return float(m[1]) if m else 0.0


async def runMode(ctx: bench.Context, mode: str, oldRows: int) -> dict[str, Any]:
    schema = f"bench_{mode}_{uuid.uuid4().hex[:6]}"
    ctx.schema = schema
    bench.log(f"{mode}: preparing {oldRows:,} old rows in {schema}")
    await deferToThread(prepare, ctx.dsn, schema, mode != "delete", oldRows)
    walBefore = (await deferToThread(sql, ctx.dsn, "SELECT pg_current_wal_lsn()"))[0]
    started = time.monotonic()
    gateways = [await ctx.gateway(f"{mode}-{i}") for i in range(3 if mode == "partitions3" else 1)]
    removedAt: float | None = None
    polling = True

    async def poll() -> None:
        nonlocal removedAt
        while polling and removedAt is None:
            [(left,)] = await ctx.pool.runQuery(
                f'SELECT EXISTS (SELECT 1 FROM "{schema}".inbox'
                " WHERE received_at < now() - interval '30 days')"
            )
            if not left:
                removedAt = time.monotonic() - started
            await bench.sleep(0.5)

    watcher = Deferred.fromCoroutine(poll())
    summary, _ = await bench.scenarioInbound(ctx, *gateways)
    polling = False
    await watcher
    texts = [await g.metrics() for g in gateways]
    for g in gateways:
        await ctx.stopGateway(g)
    wal = (await deferToThread(
        sql, ctx.dsn, f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{walBefore}')"))[0]
    remaining = (await deferToThread(
        sql, ctx.dsn,
        f"SELECT count(*) FROM \"{schema}\".inbox WHERE received_at < now() - interval '30 days'"))[0]
    await deferToThread(sql, ctx.dsn, f'DROP SCHEMA "{schema}" CASCADE')
    return {
        "mode": mode, "instances": len(gateways), "old_rows": oldRows,
        "old_rows_left": remaining,
        "pruned_rows": sum(counter(t, "ctrlgw_pruned_rows_total", "inbox") for t in texts),
        "partitions_dropped": sum(counter(t, "ctrlgw_partitions_dropped_total", "inbox") for t in texts),
        "retention_done_s": None if removedAt is None else round(removedAt, 1),
        "wal_mb": round(float(wal) / 1e6, 1), **summary,
    }


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def page(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    lines = [
        BEGIN,
        "## 8. Inbound with retention running (`make bench-partitions`)",
        "",
        f"{result['date']}, commit {result['commit']}{' with uncommitted changes' if result['dirty'] else ''},"
        f" {result['cpus']} cores, PostgreSQL "
        f"{result['postgresql']}. Each mode: a schema holding {sizes['old_rows']:,} inbox rows "
        "31-40 days old (past `inbox_days = 30`) before its gateways start with "
        "`prune_interval = 1s`; then `ctrlgw sim` "
        f"({sizes['inboundProcs']} processes, {sizes['inboundControllers']:,} controllers, each at "
        f"most {sizes['inboundWindow']} unacked) offers {sizes['inboundRate']:,.0f} msgs/s for "
        f"{sizes['inboundSeconds']:g} s while retention removes the old rows. `delete`: an inbox "
        "as before migration 11, pruned by `DELETE` in batches of 5,000; `partitions`: "
        "partitioned, the old partitions dropped; `partitions3`: the same with three instances "
        "on the one database, the fleet spread over them. One run per mode, on a machine "
        "shared with other work (2 cores for PostgreSQL, the gateways and the simulator).",
        "",
        "| mode | instances | acked msgs/s | msg→ack p50 ms | p99 ms | unanswered | old rows removed "
        "during the run | retention done, s after start | old rows left | WAL MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["modes"]:
        removed = r["old_rows"] - r["old_rows_left"]
        lines.append(
            f"| {r['mode']} | {r['instances']} | {fmt(r['per_second'])} | {fmt(r['p50_ms'])} | "
            f"{fmt(r['p99_ms'])} | {fmt(r['unanswered'])} | {fmt(removed)} | "
            f"{fmt(r['retention_done_s'])} | {fmt(r['old_rows_left'])} | {fmt(r['wal_mb'])} |"
        )
    lines += ["", END, ""]
    return "\n".join(lines)


def splice(docs: str, text: str) -> None:
    path = os.path.join(docs, "benchmarks.md")
    if not os.path.exists(path):
        return
    with open(path) as f:
        current = f.read()
    if BEGIN in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        current = head + text.rstrip("\n") + tail
    elif "\n## Plots\n" in current:
        head, _, tail = current.partition("\n## Plots\n")
        current = head.rstrip("\n") + "\n\n" + text + "\n## Plots\n" + tail
    else:
        current = current.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(current)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from txpostgres.txpostgres import ConnectionPool

    server = None
    dsn = args.dsn
    if dsn is None:
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="ctrlgw-bench-pg-"), cleanup_mode="delete")
        dsn = server.get_uri()
    sizes = bench.Sizes(inboundControllers=args.controllers, inboundRate=args.rate,
                        inboundSeconds=args.seconds, inboundProcs=args.procs)
    settings = json.loads(json.dumps(bench.BASE_SETTINGS))
    settings["retention"] = {"prune_interval": "1s"}
    ctx = bench.Context(dsn=dsn, schema="", pgqueuerDatabase="", settings=settings, sizes=sizes,
                        workdir=tempfile.mkdtemp(prefix="ctrlgw-bench-"))
    ctx.pool = ConnectionPool(None, dsn, min=1)
    try:
        await ctx.pool.start()
        version = (await ctx.pool.runQuery("SHOW server_version"))[0][0]
        modes = [await runMode(ctx, mode, args.old_rows) for mode in args.modes]
    finally:
        for gw in list(ctx.gateways):
            await gw.stop()
        ctx.pool.close()
        if server is not None:
            server.cleanup()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": bench.git()["commit"][:12], "dirty": bench.git()["dirty"], "cpus": os.cpu_count(),
        "postgresql": f"{version} ({'embedded' if server is not None else '--dsn'})",
        "sizes": {"old_rows": args.old_rows, "inboundControllers": args.controllers,
                  "inboundRate": args.rate, "inboundSeconds": args.seconds,
                  "inboundProcs": args.procs, "inboundWindow": sizes.inboundWindow},
        "modes": modes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; writes under var/ only")
    p.add_argument("--dsn", default=None)
    p.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES))
    p.add_argument("--old-rows", type=int, default=None, help="(default 3,000,000)")
    p.add_argument("--controllers", type=int, default=None, help="(default 1,000)")
    p.add_argument("--rate", type=float, default=33_000.0)
    p.add_argument("--seconds", type=float, default=None, help="(default 20)")
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    args.old_rows = args.old_rows or (20_000 if args.smoke else 3_000_000)
    args.controllers = args.controllers or (20 if args.smoke else 1000)
    args.seconds = args.seconds or (1.5 if args.smoke else 20.0)
    if args.smoke:
        args.rate, args.procs = 500.0, 1
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}")

    async def go(_: Any) -> None:
        result = await run(args)
        out = os.path.join(bench.ROOT, "var", "bench-partitions-smoke.json" if args.smoke
                           else "bench-partitions.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        text = page(result)
        docs = os.path.join(bench.ROOT, "var" if args.smoke else "docs")
        os.makedirs(os.path.join(docs, "bench"), exist_ok=True)
        with open(os.path.join(docs, "bench", "partitions.md"), "w") as f:
            f.write(text)
        if not args.smoke:
            splice(docs, text)
        print(text)

    react(lambda r: Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
