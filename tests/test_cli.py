"""
The C{ctrlgw} admin command: every command against a real schema through L{cli.run}, and
the console script as a real process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from ctrlgw import cli
from ctrlgw.auth import hashToken, tokenMatches
from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database
from ctrlgw.store.migrate import currentVersion, latestVersion, migrations
from ctrlgw.store.postgres import Event, Store
from tests.helpers import iniText
from tests.pg import PostgresTestCase, databaseConfig

# The ini file names a server and a schema the tests never use: every test passes --dsn and
# --schema, so a command that ignored either would fail.
_INI = iniText(
    {
        "listener:main": {"endpoint": "tcp:0"},
        "database": {
            "dsn": "host=/nonexistent-ctrlgw-test port=1",
            "schema": "not_the_test_schema",
            "connect_timeout": "2s",
        },
    }
)


def consoleScript() -> str:
    """
    The installed C{ctrlgw} console script of this Python.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "ctrlgw")
    if os.path.exists(beside):
        return beside
    found = shutil.which("ctrlgw")
    if found is None:
        raise AssertionError("the ctrlgw console script is not installed")
    return found


def closedPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliTestCase(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        self.configPath = self.mktemp()
        with open(self.configPath, "w", encoding="utf-8") as f:
            f.write(_INI)
        self.store = Store(self.db, "gw-a")

    async def cli(self, *argv: str, common: bool = True) -> tuple[int, str, str]:
        """
        Run C{ctrlgw [--config .. --dsn .. --schema ..] *argv}; returns (code, out, err).
        """
        out, err = io.StringIO(), io.StringIO()
        prefix = (
            ["--config", self.configPath, "--dsn", self.dsn, "--schema", self.schema]
            if common
            else []
        )
        code = await cli.run(reactor, [*prefix, *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def assertOneErrorLine(self, err: str, *fragments: str) -> None:
        """
        C{err} is exactly one line C{ctrlgw: ...} containing every fragment.
        """
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("ctrlgw: ") and err.endswith("\n"), err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)

    async def openSchema(self, schema: str) -> Database:
        db = Database(reactor, databaseConfig(schema), Metrics())
        await db.start(self.dsn)
        self.addCleanup(db.stop)
        return db

    async def dropSchema(self, schema: str) -> None:
        await self.db.runOperation("drop_schema", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    async def addToken(self, controller: str, note: str = "") -> str:
        code, out, err = await self.cli("controllers", "add", controller, "--note", note)
        self.assertEqual((code, err), (0, ""))
        [token] = [
            line[len("token: ") :] for line in out.splitlines() if line.startswith("token: ")
        ]
        return token


class MigrateTests(CliTestCase):
    async def test_freshSchema(self) -> None:
        """
        migrate creates and migrates a schema that does not exist yet, and says which
        versions it applied; a second run says the schema is current.
        """
        other = self.schema + "_fresh"
        self.addCleanup(self.dropSchema, other)
        code, out, err = await self.cli("migrate", "--schema", other)
        self.assertEqual((code, err), (0, ""))
        versions = [m.version for m in migrations()]
        self.assertEqual(out, f"schema {other}: applied versions {versions}\n")
        self.assertEqual(await currentVersion(await self.openSchema(other)), latestVersion())

        code, out, err = await self.cli("migrate", "--schema", other)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"schema {other}: already at version {latestVersion()}\n")

    async def test_alreadyMigrated(self) -> None:
        code, out, err = await self.cli("migrate")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"schema {self.schema}: already at version {latestVersion()}\n")

    async def test_otherCommandsNeedMigratedSchema(self) -> None:
        """
        A command other than migrate on a schema without ctrlgw's tables fails with one line
        telling to run ctrlgw migrate, and creates nothing.
        """
        other = self.schema + "_empty"
        self.addCleanup(self.dropSchema, other)
        for argv in (("controllers", "list"), ("controllers", "add", "dev-1"), ("history", "x")):
            code, out, err = await self.cli(*argv, "--schema", other)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertOneErrorLine(err, f"schema {other}", "ctrlgw migrate")
        self.assertEqual(await currentVersion(await self.openSchema(other)), 0)


class ControllerTests(CliTestCase):
    async def test_addPrintsTokenOnce(self) -> None:
        """
        add prints a new token exactly once, says it is not stored, and stores its hash.
        """
        code, out, err = await self.cli("controllers", "add", "dev-1", "--note", "hall 3")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], "controller dev-1 added")
        tokenLines = [line for line in lines if line.startswith("token: ")]
        self.assertEqual(len(tokenLines), 1)
        token = tokenLines[0][len("token: ") :]
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(out.count(token), 1)
        self.assertTrue(
            any("not stored" in line and "cannot be shown again" in line for line in lines), out
        )

        credentials = await self.store.controllerCredentials("dev-1")
        assert credentials is not None
        tokenHash, enabled = credentials
        self.assertTrue(tokenMatches(token, tokenHash))
        self.assertTrue(enabled)
        self.assertNotEqual(tokenHash, token.encode("utf-8"))
        [row] = await self.store.listControllers()
        self.assertEqual(row[3], "hall 3")

    async def test_addAgainRekeysAndEnables(self) -> None:
        first = await self.addToken("dev-1")
        await self.cli("controllers", "disable", "dev-1")
        code, out, err = await self.cli("controllers", "add", "dev-1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("re-keyed", out.splitlines()[0])
        second = out.splitlines()[1][len("token: ") :]
        self.assertNotEqual(first, second)
        credentials = await self.store.controllerCredentials("dev-1")
        assert credentials is not None
        self.assertFalse(tokenMatches(first, credentials[0]))
        self.assertTrue(tokenMatches(second, credentials[0]))
        self.assertTrue(credentials[1])

    async def test_disableEnable(self) -> None:
        await self.addToken("dev-1")
        code, out, err = await self.cli("controllers", "disable", "dev-1")
        self.assertEqual((code, out, err), (0, "controller dev-1 disabled\n", ""))
        self.assertEqual((await self.store.controllerCredentials("dev-1") or (b"", None))[1], False)

        code, out, err = await self.cli("controllers", "enable", "dev-1")
        self.assertEqual((code, out, err), (0, "controller dev-1 enabled\n", ""))
        self.assertEqual((await self.store.controllerCredentials("dev-1") or (b"", None))[1], True)

    async def test_unknownController(self) -> None:
        for action in ("disable", "enable"):
            code, out, err = await self.cli("controllers", action, "nope")
            self.assertEqual((code, out), (1, ""), action)
            self.assertOneErrorLine(err, "'nope'", "ctrlgw controllers add nope")
        self.assertEqual(await self.store.listControllers(), [])

    async def test_invalidId(self) -> None:
        """
        An id the protocol would refuse is refused before anything is stored.
        """
        for argv in (
            ("controllers", "add", "bad id"),
            ("controllers", "disable", "x" * 129),
            ("history", "a/b"),
        ):
            code, out, err = await self.cli(*argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertOneErrorLine(err, "invalid controller id", "[A-Za-z0-9._:-]")
        self.assertEqual(await self.store.listControllers(), [])

    async def test_list(self) -> None:
        """
        list shows one aligned row per controller with its session state; --json too.
        """
        await self.addToken("dev-1", note="hall 3")
        await self.addToken("pump.7")
        await self.cli("controllers", "disable", "pump.7")
        # dev-1 is connected to instance gw-a.
        await self.db.runOperation(
            "test_session",
            "INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)"
            " VALUES (%s, 1, %s, 'gw-a', true)",
            ("dev-1", str(uuid.uuid4())),
        )

        code, out, err = await self.cli("controllers", "list")
        self.assertEqual((code, err), (0, ""))
        header, *rows = out.splitlines()
        self.assertEqual(
            header.split(), ["ID", "ENABLED", "ONLINE", "INSTANCE", "LAST", "SEEN", "NOTE"]
        )
        self.assertEqual(len(rows), 2)
        dev, pump = rows
        self.assertEqual(dev.split()[:4], ["dev-1", "yes", "yes", "gw-a"])
        self.assertTrue(dev.endswith("hall 3"), dev)
        self.assertEqual(pump.split(), ["pump.7", "no", "no", "-", "-", "-"])
        # Aligned: every column starts at the same offset on every line.
        for name in ("ENABLED", "ONLINE", "INSTANCE", "LAST SEEN", "NOTE"):
            offset = header.index(name)
            for row in rows:
                self.assertEqual(row[offset - 2 : offset], "  ", (name, row))
                self.assertNotEqual(row[offset], " ", (name, row))

        code, out, err = await self.cli("controllers", "list", "--json")
        self.assertEqual((code, err), (0, ""))
        listed = json.loads(out)
        self.assertEqual([c["id"] for c in listed], ["dev-1", "pump.7"])
        self.assertEqual(
            {k: listed[0][k] for k in ("enabled", "online", "instance", "note")},
            {"enabled": True, "online": True, "instance": "gw-a", "note": "hall 3"},
        )
        self.assertIsInstance(listed[0]["last_seen"], str)
        self.assertEqual(
            {k: listed[1][k] for k in ("enabled", "online", "instance", "last_seen")},
            {"enabled": False, "online": False, "instance": None, "last_seen": None},
        )

    async def test_listEmpty(self) -> None:
        self.assertEqual(
            await self.cli("controllers", "list"), (0, "no controllers registered\n", "")
        )
        self.assertEqual(await self.cli("controllers", "list", "--json"), (0, "[]\n", ""))

    async def test_optionsAfterCommand(self) -> None:
        """
        The common options may also follow the command.
        """
        await self.store.addController("dev-1", hashToken("t"), "")
        code, out, err = await self.cli(
            "controllers",
            "list",
            "--json",
            "--config",
            self.configPath,
            "--dsn",
            self.dsn,
            "--schema",
            self.schema,
            common=False,
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([c["id"] for c in json.loads(out)], ["dev-1"])


class HistoryTests(CliTestCase):
    async def writeHistory(self) -> None:
        # One statement per event, so their order in time is certain.
        for event in (
            Event("dev-1", "connect", "main", 7, "192.0.2.1:4000"),
            Event("other", "connect", "main", 8, "192.0.2.2:4000"),
            Event("dev-1", "disconnect", "idle_timeout", 7, "192.0.2.1:4000"),
            Event("dev-1", "auth_failed", "bad_token", None, "192.0.2.9:5000"),
        ):
            await self.store.writeEvents([event])

    async def test_table(self) -> None:
        await self.writeHistory()
        code, out, err = await self.cli("history", "dev-1")
        self.assertEqual((code, err), (0, ""))
        header, *rows = out.splitlines()
        self.assertEqual(header.split(), ["TIME", "KIND", "REASON", "INSTANCE", "EPOCH", "PEER"])
        self.assertEqual(
            [row.split()[2:] for row in rows],
            [
                ["auth_failed", "bad_token", "gw-a", "-", "192.0.2.9:5000"],
                ["disconnect", "idle_timeout", "gw-a", "7", "192.0.2.1:4000"],
                ["connect", "main", "gw-a", "7", "192.0.2.1:4000"],
            ],
        )
        times = [" ".join(row.split()[:2]) for row in rows]
        self.assertEqual(times, sorted(times, reverse=True))
        self.assertTrue(all(t.endswith("Z") for t in times), times)

    async def test_limitAndJson(self) -> None:
        await self.writeHistory()
        code, out, err = await self.cli("history", "dev-1", "--limit", "2", "--json")
        self.assertEqual((code, err), (0, ""))
        events = json.loads(out)
        self.assertEqual(
            [{k: e[k] for k in ("kind", "reason", "instance", "epoch", "peer")} for e in events],
            [
                {
                    "kind": "auth_failed",
                    "reason": "bad_token",
                    "instance": "gw-a",
                    "epoch": None,
                    "peer": "192.0.2.9:5000",
                },
                {
                    "kind": "disconnect",
                    "reason": "idle_timeout",
                    "instance": "gw-a",
                    "epoch": 7,
                    "peer": "192.0.2.1:4000",
                },
            ],
        )
        self.assertGreaterEqual(events[0]["time"], events[1]["time"])

    async def test_none(self) -> None:
        await self.writeHistory()
        self.assertEqual(
            await self.cli("history", "dev-2"), (0, "no history for controller dev-2\n", "")
        )

    async def test_badLimit(self) -> None:
        code, out, err = await self.cli("history", "dev-1", "--limit", "0")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--limit", err)


class ErrorTests(CliTestCase):
    async def test_missingConfigFile(self) -> None:
        path = os.path.join(self.mktemp(), "missing.ini")
        code, out, err = await self.cli(
            "--config", path, "--dsn", self.dsn, "controllers", "list", common=False
        )
        self.assertEqual((code, out), (2, ""))
        self.assertOneErrorLine(err, path, "cannot read")

    async def test_badConfigValue(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(_INI.replace("connect_timeout = 2s", "connect_timeout = soon"))
        code, out, err = await self.cli("--config", path, "migrate", common=False)
        self.assertEqual((code, out), (2, ""))
        self.assertOneErrorLine(err, path, "[database] connect_timeout")

    async def test_badSchemaName(self) -> None:
        code, out, err = await self.cli("migrate", "--schema", "Robert'); DROP")
        self.assertEqual((code, out), (2, ""))
        self.assertOneErrorLine(err, "--schema")

    async def test_databaseUnreachable(self) -> None:
        """
        A server that refuses connections: one line naming where (never the password), exit 1.
        """
        dsn = f"postgresql://ctrlgw:s3cret@127.0.0.1:{closedPort()}/ctrlgw"
        code, out, err = await self.cli("controllers", "list", "--dsn", dsn)
        self.assertEqual((code, out), (1, ""))
        self.assertOneErrorLine(err, "cannot connect to the database at 127.0.0.1:")
        self.assertNotIn("s3cret", err)

    async def test_statementTimeout(self) -> None:
        """
        A statement the server cancels (statement_timeout) is one line, exit 1.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(_INI.replace("connect_timeout = 2s", "statement_timeout = 200ms"))
        locked: Deferred[None] = Deferred()
        release: Deferred[None] = Deferred()

        def hold(cursor: Any) -> Deferred[None]:
            async def holding() -> None:
                await cursor.execute("LOCK TABLE controllers IN ACCESS EXCLUSIVE MODE")
                locked.callback(None)
                await release

            return Deferred.fromCoroutine(holding())

        holder = self.db.runInteraction("test_hold_lock", hold)
        await locked
        try:
            code, out, err = await self.cli(
                "--config",
                path,
                "--dsn",
                self.dsn,
                "--schema",
                self.schema,
                "controllers",
                "list",
                common=False,
            )
        finally:
            release.callback(None)
            await holder
        self.assertEqual((code, out), (1, ""))
        self.assertOneErrorLine(err, "statement_timeout is 0.2s")

    async def test_usage(self) -> None:
        code, out, err = await self.cli()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: ctrlgw", err)

        code, out, err = await self.cli("--help", common=False)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("controllers", out)


class ConsoleScriptTests(CliTestCase):
    async def runScript(self, *argv: str) -> tuple[bytes, bytes, int]:
        result: Any = await getProcessOutputAndValue(
            consoleScript(), list(argv), env=dict(os.environ), reactor=reactor
        )
        return result

    async def test_controllersList(self) -> None:
        """
        The installed ctrlgw script runs a command with the options of its command line.
        """
        await self.store.addController("dev-" + uuid.uuid4().hex[:6], hashToken("t"), "via script")
        [(controller, *_)] = await self.store.listControllers()
        out, err, code = await self.runScript(
            "--config",
            self.configPath,
            "--dsn",
            self.dsn,
            "--schema",
            self.schema,
            "controllers",
            "list",
        )
        self.assertEqual((code, err), (0, b""), err.decode(errors="replace"))
        header, row = out.decode().splitlines()
        self.assertTrue(header.startswith("ID "), header)
        self.assertEqual(row.split()[0], controller)
        self.assertTrue(row.endswith("via script"), row)

    async def test_exitCode(self) -> None:
        """
        The script exits with the command's code, and an expected failure is one line.
        """
        out, err, code = await self.runScript(
            "--config",
            self.configPath,
            "--dsn",
            self.dsn,
            "--schema",
            self.schema,
            "controllers",
            "enable",
            "nope",
        )
        self.assertEqual((code, out), (1, b""))
        self.assertOneErrorLine(err.decode(), "'nope'")
