"""
Prepared statements (ctrlgw.store.database.Prepared): the text each connection prepares
and executes, and what the server does with it.
"""

from __future__ import annotations

from psycopg2.errors import DivisionByZero
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.store.database import Prepared
from tests.helpers import deferred
from tests.pg import PostgresTestCase


class PreparedTextTests(SynchronousTestCase):
    def test_namedPlaceholdersAreNumberedOnce(self) -> None:
        statement = Prepared("s", "SELECT %(a)s::int + %(b)s::int, %(a)s::int, '100%%'")
        self.assertEqual(statement.prepare, "PREPARE s AS SELECT $1::int + $2::int, $1::int, '100%'")
        self.assertEqual(statement.execute, "EXECUTE s(%(a)s, %(b)s)")

    def test_positionalPlaceholders(self) -> None:
        statement = Prepared("s", "SELECT %s::int, %s::text")
        self.assertEqual(statement.prepare, "PREPARE s AS SELECT $1::int, $2::text")
        self.assertEqual(statement.execute, "EXECUTE s(%s, %s)")

    def test_noPlaceholders(self) -> None:
        self.assertEqual(Prepared("s", "SELECT 1").execute, "EXECUTE s")

    def test_notDurableSkipsTheFlushWaitOfItsOwnTransactionOnly(self) -> None:
        self.assertEqual(
            Prepared("s", "SELECT %s::int", durable=False).execute,
            "SET LOCAL synchronous_commit = off; EXECUTE s(%s)",
        )

    def test_mixedPlaceholdersAreRefused(self) -> None:
        self.assertRaises(ValueError, Prepared, "s", "SELECT %s, %(a)s")


class PreparedOnTheServerTests(PostgresTestCase):
    @deferred
    async def test_preparedOncePerConnection(self) -> None:
        """
        The first call on a connection prepares; later ones only execute, with their own
        arguments; a statement that is not durable leaves the connection's
        synchronous_commit as it was.
        """
        db = await self.openDatabase(pool_size=1)
        statement = Prepared("t_twice", "SELECT %(n)s::int * 2, current_setting('synchronous_commit')",
                             durable=False)
        self.assertEqual(await db.runQuery("twice", statement, {"n": 2}), [(4, "off")])
        self.assertEqual(await db.runQuery("twice", statement, {"n": 5}), [(10, "off")])
        prepared = await db.runQuery(
            "p", "SELECT name, statement FROM pg_prepared_statements"
        )
        self.assertEqual([name for name, _ in prepared], ["t_twice"])
        self.assertEqual(await db.runQuery("p", "SHOW synchronous_commit"), [("on",)])

    @deferred
    async def test_aFailedExecutionKeepsThePreparedStatement(self) -> None:
        """
        An execution that fails (here, division by zero) does not make the next call
        prepare again (which would fail: the statement exists).
        """
        db = await self.openDatabase(pool_size=1)
        statement = Prepared("t_div", "SELECT 10 / %s::int")
        with self.assertRaises(DivisionByZero):
            await db.runQuery("div", statement, (0,))
        self.assertEqual(await db.runQuery("div", statement, (2,)), [(5,)])
        self.assertEqual(await db.runQuery("div", statement, (5,)), [(2,)])
