"""
A consumer process for the kill -9 test: C{python -m tests.streamconsumer DSN SCHEMA GROUP
OUT}.  An L{ctrlgw.client.AsyncioConsumer} whose callback appends each entry id to OUT
(flushed and fsynced: the line is there when the process dies) and takes 50 ms per entry.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from ctrlgw.client import AsyncioConsumer, Entry


async def main(dsn: str, schema: str, group: str, out: str) -> None:
    connection = await asyncpg.connect(dsn)
    with open(out, "a", encoding="utf-8") as f:

        async def handle(entry: Entry) -> None:
            f.write(entry.entry_id + "\n")
            f.flush()
            os.fsync(f.fileno())
            await asyncio.sleep(0.05)

        await AsyncioConsumer(connection, schema, group, handle, batch=20, lease=1.0).run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
