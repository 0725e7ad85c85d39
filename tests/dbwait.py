"""
Order the steps of a race by what the database says, not by sleeps.

A race test holds a lock on one connection, starts a statement on another, and must know
the statement is I{waiting on that lock} -- not merely "not finished yet", which on a slow
machine is also true of a statement that has not reached the lock, or took another path --
before it lets the first side go.  L{waitUntilBlocked} polls C{pg_stat_activity} until a
backend's statement waits on a C{Lock} (held by a given backend, if named).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor

from ctrlgw.store.database import Database
from tests.gateways import sleep

_BLOCKED = """
SELECT pid, pg_blocking_pids(pid), query FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND datname = current_database()
  AND position(%(query)s IN query) > 0
"""


async def backendPid(connection: Any) -> int:
    """
    The server process id of one connection (a L{Database.connect} connection).
    """
    rows = await connection.runQuery("SELECT pg_backend_pid()")
    return int(rows[0][0])


async def waitUntilBlocked(
    db: Database, query: str = "", blockedBy: int | None = None,
    timeout: float = 10.0, interval: float = 0.005,
) -> int:
    """
    Poll until some other backend's statement containing C{query} waits on a lock (held
    by the backend C{blockedBy}, if given); return that backend's pid.  Fail after
    C{timeout} seconds with what was waiting then.

    C{db} is any pool on the same server that is not itself part of the race: its
    connection only reads C{pg_stat_activity}.
    """
    started = reactor.seconds()
    while True:
        rows = await db.runQuery("wait_until_blocked", _BLOCKED, {"query": query})
        for pid, blockers, _ in rows:
            if blockedBy is None or blockedBy in blockers:
                return int(pid)
        if reactor.seconds() - started > timeout:
            waiting = [(pid, blockers, text[:80]) for pid, blockers, text in rows]
            raise AssertionError(
                f"timed out after {timeout}s waiting for a statement containing {query!r}"
                f" to wait on a lock{f' held by {blockedBy}' if blockedBy else ''};"
                f" waiting on locks then: {waiting}"
            )
        await sleep(interval)


async def waitUntilListening(db: Database, channel: str, timeout: float = 15.0) -> int:
    """
    Poll until some other backend has run C{LISTEN "channel"} and is idle after it (its
    last statement): a process that listens before it acts is then ready to hear.  Return
    that backend's pid.
    """
    started = reactor.seconds()
    statement = f'LISTEN "{channel}"'
    while True:
        rows = await db.runQuery(
            "wait_until_listening",
            "SELECT pid FROM pg_stat_activity WHERE query = %s AND state = 'idle'"
            " AND pid <> pg_backend_pid()",
            (statement,),
        )
        if rows:
            return int(rows[0][0])
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {statement}")
        await sleep(0.01)
