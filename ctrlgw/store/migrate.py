"""
Versioned SQL migrations shipped in the package.

Files are C{migrations/NNNN_name.sql}, applied in order, all pending ones in one
transaction under an advisory lock per schema, so two instances starting at once apply each
file exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ctrlgw.store.database import Database

log = Logger()

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class DuplicateMigration(Exception):
    """
    Two files of the migrations folder have one version number: an install that kept a
    file its package no longer has (a stale C{build/} reused by C{pip install .} does).
    """


def migrations(folder: Traversable | None = None) -> list[Migration]:
    if folder is None:
        folder = resources.files("ctrlgw.store").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            migration = Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8"))
            other = found.setdefault(migration.version, migration)
            if other is not migration:
                first, second = sorted([other.name, migration.name])
                raise DuplicateMigration(
                    f"{folder}: two migrations numbered {migration.version:04d}"
                    f" ({first}, {second}); reinstall ctrlgw from a clean tree"
                )
    return sorted(found.values(), key=lambda m: m.version)


def latestVersion() -> int:
    return max(m.version for m in migrations())


def _lockKey(schema: str) -> str:
    return f"ctrlgw.migrate.{schema}"


async def applyMigrations(db: Database, upTo: int | None = None) -> list[int]:
    """
    Apply every pending migration to C{db.schema} (only those up to version C{upTo} if
    given: tests build a database of an older version so).

    @return: the versions applied now (empty when already current).
    """
    schema = db.schema
    pending = [m for m in migrations() if upTo is None or m.version <= upTo]

    def interaction(cursor: Any) -> Any:
        applied: list[int] = []

        async def run() -> list[int]:
            await cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_lockKey(schema),))
            await cursor.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await cursor.execute(f'SET LOCAL search_path TO "{schema}", public')
            await cursor.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await cursor.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cursor.fetchall()}
            for migration in pending:
                if migration.version in done:
                    continue
                await cursor.execute(migration.sql)
                await cursor.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied.append(migration.version)
            return applied

        return Deferred.fromCoroutine(run())

    applied: list[int] = await db.runInteraction("migrate", interaction)
    for version in applied:
        log.info("schema {schema}: applied migration {version}", schema=schema, version=version)
    return applied


async def currentVersion(db: Database) -> int:
    """
    The newest applied migration, 0 when none is.
    """
    table = f'"{db.schema}".schema_migrations'
    rows = await db.runQuery("schema_exists", "SELECT to_regclass(%s) IS NOT NULL", (table,))
    if not rows[0][0]:
        return 0
    rows = await db.runQuery("schema_version", f"SELECT coalesce(max(version), 0) FROM {table}")
    return int(rows[0][0])
