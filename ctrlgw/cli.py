"""
C{ctrlgw}: the administration command (migrations, controllers, connection history).

C{main} is the console script: it imports the global reactor and runs L{run} under
L{react}.  Everything else takes the reactor and the output streams as arguments, so tests
call C{await run(reactor, argv, out=..., err=...)} directly.

Exit codes: 0 success, 1 the command could not be carried out (database unreachable,
schema not migrated, unknown controller), 2 a usage or configuration error.  An expected
failure is one line C{ctrlgw: ...} on the error stream, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

import psycopg2  # exception classes and DSN parsing only: every query goes through Database
import psycopg2.extensions
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater

from ctrlgw import kick, partitions, sim
from ctrlgw.api import isoTime, presenceJson
from ctrlgw.auth import hashToken, newToken
from ctrlgw.config import ConfigError, Overrides, loadConfig, parseDuration, parseIdentifier
from ctrlgw.interfaces import Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.outbox import FINAL_STATES, resultsChannel
from ctrlgw.protocol.messages import COMMAND_ID, CONTROLLER_ID
from ctrlgw.store.database import Database
from ctrlgw.store.embedded import startEmbedded
from ctrlgw.store.migrate import applyMigrations, currentVersion, latestVersion
from ctrlgw.store.postgres import Store
from ctrlgw.talk import talk

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_CONFIG = "etc/ctrlgw.ini"
# The instance name the command's Store acts as (only written by gateway code paths).
_CLI_INSTANCE = "ctrlgw-cli"


class CommandFailed(Exception):
    """
    An expected failure: C{message} is printed as one line, C{code} is the exit code.
    """

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _firstLine(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


# --- command line ---


def _positiveInt(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100000, got {raw!r}")
    return value


def _commonOptions(suppress: bool) -> argparse.ArgumentParser:
    """
    The options every command takes.  They are accepted before and after the command name;
    after it, their default is suppressed so they do not undo a value given before it.
    """
    default: Any = argparse.SUPPRESS
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default if suppress else DEFAULT_CONFIG,
        help=f"the ini file to read (default: {DEFAULT_CONFIG})",
    )
    group.add_argument(
        "--dsn",
        metavar="DSN",
        default=default if suppress else None,
        help="PostgreSQL DSN, overriding [database] dsn; empty uses the embedded server "
        "in [database] data_dir",
    )
    group.add_argument(
        "--schema",
        metavar="NAME",
        default=default if suppress else None,
        help="the schema to use, overriding [database] schema",
    )
    return parser


def makeParser() -> argparse.ArgumentParser:
    after = [_commonOptions(suppress=True)]
    parser = argparse.ArgumentParser(
        prog="ctrlgw",
        description="Administer a ctrlgw database: migrations, controllers, history, presence, commands.",
        parents=[_commonOptions(suppress=False)],
        epilog="Exit status: 0 success, 1 failure (database, unknown controller), "
        "2 usage or configuration error.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    migrate = commands.add_parser("migrate", parents=after, help="apply pending schema migrations")
    migrate.set_defaults(handler=_migrate, needsSchema=False)

    controllers = commands.add_parser(
        "controllers", parents=after, help="register, enable, disable and list controllers"
    )
    actions = controllers.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        parents=after,
        help="register a controller (or re-key it: its session ends) with a new token, shown once",
    )
    add.add_argument("controller", metavar="ID")
    add.add_argument("--note", default="", help="free text stored with the controller")
    add.set_defaults(handler=_add, needsSchema=True)

    for name, enabled in (("disable", False), ("enable", True)):
        action = actions.add_parser(
            name, parents=after,
            help="disable a controller: its session ends at once, its hellos are refused"
            if name == "disable" else "enable a controller (admitted at its next hello)",
        )
        action.add_argument("controller", metavar="ID")
        action.set_defaults(handler=_setEnabled, enabled=enabled, needsSchema=True)

    listing = actions.add_parser("list", parents=after, help="list registered controllers")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=_list, needsSchema=True)

    history = commands.add_parser(
        "history", parents=after, help="a controller's connection history, newest first"
    )
    history.add_argument("controller", metavar="CONTROLLER")
    history.add_argument(
        "--limit", type=_positiveInt, default=50, help="most events to show (default: 50)"
    )
    history.add_argument("--json", action="store_true", help="print a JSON array")
    history.set_defaults(handler=_history, needsSchema=True)

    sessions = commands.add_parser(
        "sessions", parents=after,
        help="presence: whether controllers are online, where, since when, with which epoch",
    )
    sessions.add_argument("controller", metavar="CONTROLLER", nargs="?")
    sessions.add_argument("--json", action="store_true", help="print a JSON array")
    sessions.set_defaults(handler=_sessions, needsSchema=True)

    send = commands.add_parser(
        "send", parents=after, help="queue a command for a controller (prints its id)"
    )
    send.add_argument("controller", metavar="CONTROLLER")
    send.add_argument("body", metavar="JSON", help="the command body, a JSON document")
    send.add_argument("--ttl", type=_duration,
                      help="how long the command may wait to be written"
                      " (default: [outbox] default_ttl)")
    send.add_argument("--wait", action="store_true",
                      help="wait for the outcome (acked, nacked, expired, failed) and print it")
    send.set_defaults(handler=_send, needsSchema=True)

    status = commands.add_parser(
        "status", parents=after, help="a command's state and full history, as JSON"
    )
    status.add_argument("command", metavar="COMMAND_ID")
    status.set_defaults(handler=_status, needsSchema=True)

    tail = commands.add_parser(
        "tail", parents=after, help="follow outcomes as they happen, until interrupted"
    )
    what = tail.add_mutually_exclusive_group(required=True)
    what.add_argument("--commands", action="store_true",
                      help="command outcomes (acked, nacked, expired, failed)")
    # The application stream (docs/consuming.md).
    what.add_argument("--group", metavar="NAME", default=None,
                      help="consume the application stream as group NAME: one JSON entry a line")
    tail.set_defaults(handler=_tail, needsSchema=True)

    talkParser = commands.add_parser(
        "talk", parents=after,
        help="be a controller by hand: hello, print frames, send what you type",
    )
    talkParser.add_argument("address", metavar="HOST:PORT", nargs="?", default="127.0.0.1:7000")
    talkParser.add_argument("--controller", default="dev-1", help="the id to say hello as")
    talkParser.add_argument("--token", default=None, help="the controller's token ([auth] token)")
    talkParser.add_argument("--no-ack", dest="autoAck", action="store_false",
                            help="do not ack commands (answer them by hand)")
    talkParser.add_argument("--dialect", choices=("v1", "ocpp1.6"), default="v1",
                            help="v1 frames over lines, or an OCPP 1.6J charge point over WebSocket")
    talkParser.add_argument("--path", default="/ocpp/",
                            help="ocpp1.6: the listener's path before the charge point id")
    talkParser.set_defaults(handler=None, needsSchema=False)

    simParser = commands.add_parser(
        "sim", parents=after,
        help="simulate a fleet of controllers against one or more gateway endpoints",
    )
    sim.addArguments(simParser)
    simParser.set_defaults(handler=None, needsSchema=False)
    _addOperations(commands, after)
    _addPartition(commands, after)
    return parser


# --- kick and drain (ctrlgw/kick.py, ctrlgw/drain.py) ---


def _addOperations(commands: Any, after: list[argparse.ArgumentParser]) -> None:
    kickParser = commands.add_parser(
        "kick", parents=after,
        help="close a controller's live connection, wherever it is (it may reconnect)",
    )
    kickParser.add_argument("controller", metavar="ID")
    kickParser.add_argument("--reason", default="ctrlgw kick",
                            help="recorded in its history (default: ctrlgw kick)")
    kickParser.set_defaults(handler=_kick, needsSchema=True)

    drainParser = commands.add_parser(
        "drain", parents=after,
        help="make an instance stop accepting and hand its controllers over, then exit",
    )
    drainParser.add_argument("instance", metavar="INSTANCE", help="its [gateway] instance_id")
    drainParser.add_argument("--stay", action="store_true",
                             help="stay up, idle and not ready, once drained (default: exit)")
    drainParser.add_argument("--wait", action="store_true",
                             help="return once the instance is drained (or has exited)")
    drainParser.add_argument("--timeout", type=_duration, default=300.0,
                             help="with --wait, give up after this long (default: 5m)")
    drainParser.set_defaults(handler=_drain, needsSchema=True)


async def _kick(ctx: Context) -> int:
    try:
        kicked = await kick.kick(ctx.store, ctx.args.controller, ctx.args.reason)
    except ValueError as e:
        raise CommandFailed(str(e), EXIT_USAGE) from None
    if kicked is None:
        raise CommandFailed(f"controller {ctx.args.controller} is not connected")
    ctx.out.write(
        f"kicked {kicked.controller}: session epoch {kicked.epoch} on instance {kicked.instance}\n"
    )
    return EXIT_OK


async def _drain(ctx: Context) -> int:
    instance: str = ctx.args.instance
    if not await ctx.store.requestDrain(instance, not ctx.args.stay):
        raise CommandFailed(f"no instance {instance!r} is registered in schema {ctx.schema}")
    if not ctx.args.wait:
        ctx.out.write(f"instance {instance} draining\n")
        return EXIT_OK
    # Without --stay the instance exits once drained: wait for that, or a poll that falls
    # between the two would report it drained when it has gone.
    waitForExit = not ctx.args.stay
    waited = 0.0
    while (state := await ctx.store.drainState(instance)) is not None and (
        waitForExit or not state[1]
    ):
        if waited >= ctx.args.timeout:
            raise CommandFailed(f"instance {instance} not drained after {ctx.args.timeout:g}s")
        await deferLater(ctx.db.clock, 0.2, lambda: None)
        waited += 0.2
    ctx.out.write(f"instance {instance} {'drained' if state is not None else 'has exited'}\n")
    return EXIT_OK


# --- time partitions (ctrlgw/partitions.py, docs/scaling.md) ---


def _addPartition(commands: Any, after: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "partition", parents=after,
        help="partition inbox and events by time, keeping their rows (live; see docs/scaling.md)",
    )
    parser.add_argument("--table", choices=["inbox", "events", "all"], default="all",
                        help="which table (default: all)")
    parser.add_argument("--within", type=_duration, default=86400.0,
                        help="the old table takes rows until the first partition boundary at"
                        " least this far ahead; validation and swap must finish by then"
                        " (default: 1d)")
    parser.add_argument("--abort", action="store_true",
                        help="undo an unfinished conversion (before its swap)")
    parser.add_argument("--force", action="store_true",
                        help="convert although live instances run code older than migration 11")
    parser.set_defaults(handler=_partition, needsSchema=True, partition_hours=None,
                        partitions_ahead=None)


async def _partition(ctx: Context) -> int:
    tables = ["inbox", "events"] if ctx.args.table == "all" else [ctx.args.table]
    if ctx.args.abort:
        for table in tables:
            undone = await ctx.store.partitionAbort(table)
            ctx.out.write(f"{table}: {'conversion undone' if undone else 'nothing to undo'}\n")
        return EXIT_OK
    outdated = await ctx.store.outdatedInstances(ctx.args.instance_ttl)
    if outdated and not ctx.args.force:
        raise CommandFailed(
            f"live instances run code older than migration 11 (their inbox writes need an"
            f" unpartitioned inbox): {', '.join(outdated)}; upgrade them first, or --force"
        )

    def say(line: str) -> None:
        ctx.out.write(line + "\n")
        ctx.out.flush()

    for table in tables:
        done = await partitions.convert(
            ctx.db.clock, ctx.store, table, ctx.args.partition_hours * 3600.0,
            ctx.args.partitions_ahead, ctx.args.within, say,
        )
        if not done:
            say(f"{table}: already partitioned")
    return EXIT_OK


def _duration(raw: str) -> float:
    try:
        seconds = parseDuration(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return seconds


def parseArguments(argv: Sequence[str], out: TextIO, err: TextIO) -> argparse.Namespace | int:
    """
    Parse C{argv}; returns the namespace, or the exit code when argparse has already
    answered (C{--help}: 0, a usage error: 2) on C{out}/C{err}.
    """
    parser = makeParser()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(list(argv))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else EXIT_USAGE


# --- running ---


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    db: Database
    store: Store
    out: TextIO

    @property
    def schema(self) -> str:
        return self.db.schema


async def run(
    reactor: Any,
    argv: Sequence[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """
    Run one C{ctrlgw} command line (without the program name); returns the exit code.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parsed = parseArguments(argv, out, err)
    if isinstance(parsed, int):
        return parsed
    try:
        if parsed.command == "talk":
            return await _talk(reactor, parsed, out)
        if parsed.command == "sim":
            return await sim.simCommand(reactor, parsed, out, err)
        return await _execute(reactor, parsed, out, err)
    except ConfigError as e:
        err.write(f"ctrlgw: {e}\n")
        return EXIT_USAGE
    except CommandFailed as e:
        err.write(f"ctrlgw: {e.message}\n")
        return e.code


async def _talk(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise CommandFailed(f"expected HOST:PORT, got {args.address!r}", EXIT_USAGE)
    try:
        await talk(reactor, host, int(port), args.controller, args.token, args.autoAck, out,
                   dialect=args.dialect, path=args.path)
    except ConnectError as e:
        raise CommandFailed(f"cannot connect to {args.address}: {_firstLine(e)}") from None
    return EXIT_OK


async def _execute(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = loadConfig(args.config, Overrides(dsn=args.dsn))
    schema = config.database.schema
    if args.schema is not None:
        try:
            schema = parseIdentifier(args.schema)
        except ValueError as e:
            raise ConfigError("command line", None, "--schema", str(e)) from None
    if getattr(args, "ttl", 0) is None:
        args.ttl = config.outbox.default_ttl
    if getattr(args, "partition_hours", 0) is None:
        args.partition_hours = config.retention.partition_hours
        args.partitions_ahead = config.retention.partitions_ahead
        args.instance_ttl = config.cluster.instance_ttl
    controller = getattr(args, "controller", None)
    if controller is not None and not CONTROLLER_ID.fullmatch(controller):
        raise CommandFailed(
            f"invalid controller id {controller!r}: expected 1-128 characters of [A-Za-z0-9._:-]",
            EXIT_USAGE,
        )

    # One connection is all a command needs.
    dbConfig = dataclasses.replace(config.database, schema=schema, pool_size=1)
    dsn = dbConfig.dsn
    if not dsn:
        err.write(
            f"ctrlgw: note: [database] dsn is empty: using the embedded PostgreSQL in "
            f"{dbConfig.data_dir} (development only)\n"
        )
        try:
            dsn = await startEmbedded(reactor, dbConfig.data_dir)
        except Exception as e:
            raise CommandFailed(
                f"cannot start the embedded PostgreSQL in {dbConfig.data_dir}: {_firstLine(e)}"
            ) from None

    db = Database(reactor, dbConfig, Metrics(), "ctrlgw cli")
    await _open(reactor, db, dsn)
    try:
        context = Context(args, db, Store(db, _CLI_INSTANCE), out)
        if args.needsSchema:
            await _requireSchema(db)
        handler: Callable[[Context], Awaitable[int]] = args.handler
        return await handler(context)
    except Unavailable as e:
        cause = f": {_firstLine(e.__cause__)}" if e.__cause__ is not None else ""
        raise CommandFailed(f"{_firstLine(e)}{cause}") from None
    except psycopg2.Error as e:
        raise CommandFailed(f"database error: {_firstLine(e)}") from None
    except CancelledError:
        # txpostgres reports a statement the server cancelled (statement_timeout) so.
        raise CommandFailed(
            f"the database cancelled a statement (statement_timeout is "
            f"{dbConfig.statement_timeout:g}s)"
        ) from None
    finally:
        db.stop()


async def _open(reactor: Any, db: Database, dsn: str) -> None:
    """
    Open C{db}, failing at once with one line if the server cannot be reached.

    L{Database.start} keeps retrying an unreachable server forever, as a gateway should; a
    command should not.  So one connection is tried first, bounded in time, and the pool is
    only started once that worked.
    """
    timeout = db.config.connect_timeout + 1
    cannot = f"cannot connect to the database{_where(dsn)}"
    db.dsn = dsn
    try:
        # Database.connect bounds its own wait (connect_timeout, then the call limit).
        conn = await db.connect()
    except (TimeoutError, CancelledError):
        raise CommandFailed(f"{cannot}: no answer within {timeout:g}s") from None
    except Exception as e:
        raise CommandFailed(f"{cannot}: {_firstLine(e)}") from None
    conn.close()
    try:
        await db.start(dsn).addTimeout(timeout, reactor)
    except (TimeoutError, CancelledError):
        db.stop()
        raise CommandFailed(f"{cannot}: no answer within {timeout:g}s") from None


def _where(dsn: str) -> str:
    """
    " at HOST:PORT/DBNAME" for messages: never the password, nothing if C{dsn} is garbage.
    """
    try:
        # Parsing only: libpq's own DSN parser, no connection.
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return ""
    host = parts.get("host", "localhost")
    port = f":{parts['port']}" if "port" in parts else ""
    dbname = f"/{parts['dbname']}" if "dbname" in parts else ""
    return f" at {host}{port}{dbname}"


async def _requireSchema(db: Database) -> None:
    version = await currentVersion(db)
    latest = latestVersion()
    if version < latest:
        state = "has no ctrlgw tables" if version == 0 else f"is at version {version}"
        raise CommandFailed(
            f"schema {db.schema} {state}; this ctrlgw needs version {latest}: "
            f"run `ctrlgw migrate` first"
        )
    if version > latest:
        raise CommandFailed(
            f"schema {db.schema} is at version {version}, newer than this ctrlgw "
            f"(version {latest}): upgrade ctrlgw"
        )


# --- the commands ---


async def _migrate(ctx: Context) -> int:
    before = await currentVersion(ctx.db)
    latest = latestVersion()
    if before > latest:
        raise CommandFailed(
            f"schema {ctx.schema} is at version {before}, newer than this ctrlgw "
            f"(version {latest}): upgrade ctrlgw"
        )
    applied = await applyMigrations(ctx.db)
    if applied:
        ctx.out.write(f"schema {ctx.schema}: applied versions {applied}\n")
    else:
        ctx.out.write(f"schema {ctx.schema}: already at version {await currentVersion(ctx.db)}\n")
    return EXIT_OK


async def _add(ctx: Context) -> int:
    controller: str = ctx.args.controller
    existing = await ctx.store.controllerCredentials(controller)
    token = newToken()
    await ctx.store.addController(controller, hashToken(token), ctx.args.note)
    if existing is None:
        ctx.out.write(f"controller {controller} added\n")
    else:
        ctx.out.write(
            f"controller {controller} re-keyed and enabled: its previous token no longer works\n"
        )
    ctx.out.write(f"token: {token}\n")
    ctx.out.write(
        "This token is not stored (only its SHA-256 hash is) and cannot be shown again: "
        "give it to the controller now.\n"
    )
    return EXIT_OK


async def _setEnabled(ctx: Context) -> int:
    controller: str = ctx.args.controller
    enabled: bool = ctx.args.enabled
    if not await ctx.store.setControllerEnabled(controller, enabled):
        raise CommandFailed(
            f"no controller {controller!r} in schema {ctx.schema}: "
            f"register it with `ctrlgw controllers add {controller}`"
        )
    ctx.out.write(f"controller {controller} {'enabled' if enabled else 'disabled'}\n")
    return EXIT_OK


async def _list(ctx: Context) -> int:
    rows = await ctx.store.listControllers()
    if ctx.args.json:
        _writeJson(
            ctx.out,
            [
                {
                    "id": controller,
                    "enabled": bool(enabled),
                    "online": bool(online),
                    "instance": instance,
                    "last_seen": isoTime(lastSeen),
                    "created": isoTime(created),
                    "note": note,
                }
                for controller, enabled, created, note, online, instance, lastSeen in rows
            ],
        )
        return EXIT_OK
    if not rows:
        ctx.out.write("no controllers registered\n")
        return EXIT_OK
    _writeTable(
        ctx.out,
        ("ID", "ENABLED", "ONLINE", "INSTANCE", "LAST SEEN", "NOTE"),
        [
            (controller, _yesNo(enabled), _yesNo(online), instance, _time(lastSeen), note)
            for controller, enabled, created, note, online, instance, lastSeen in rows
        ],
    )
    return EXIT_OK


async def _history(ctx: Context) -> int:
    controller: str = ctx.args.controller
    rows = await ctx.store.history(controller, ctx.args.limit)
    if ctx.args.json:
        _writeJson(
            ctx.out,
            [
                {
                    "time": isoTime(at),
                    "kind": kind,
                    "reason": reason,
                    "instance": instance,
                    "epoch": epoch,
                    "peer": peer,
                }
                for at, kind, reason, instance, epoch, peer in rows
            ],
        )
        return EXIT_OK
    if not rows:
        ctx.out.write(f"no history for controller {controller}\n")
        return EXIT_OK
    _writeTable(
        ctx.out,
        ("TIME", "KIND", "REASON", "INSTANCE", "EPOCH", "PEER"),
        [
            (_time(at), kind, reason, instance, epoch, peer)
            for at, kind, reason, instance, epoch, peer in rows
        ],
    )
    return EXIT_OK


async def _sessions(ctx: Context) -> int:
    rows = await ctx.store.presence(ctx.args.controller)
    if ctx.args.json:
        _writeJson(ctx.out, [presenceJson(row[0], row) for row in rows])
        return EXIT_OK
    if not rows:
        ctx.out.write("no sessions\n" if ctx.args.controller is None
                      else f"controller {ctx.args.controller} has never connected\n")
        return EXIT_OK
    _writeTable(
        ctx.out,
        ("CONTROLLER", "ONLINE", "INSTANCE", "EPOCH", "SINCE", "LAST HEARD", "PEER", "LAST REASON"),
        [
            (controller, _yesNo(online), instance, epoch, _time(connected), _time(lastSeen), peer,
             reason)
            for (controller, online, instance, epoch, _session, _listener, peer, connected,
                 lastSeen, _disconnected, reason) in rows
        ],
    )
    return EXIT_OK


async def _send(ctx: Context) -> int:
    try:
        body = json.loads(ctx.args.body)
    except ValueError as e:
        raise CommandFailed(f"the command body is not JSON: {e}", EXIT_USAGE) from None
    if not ctx.args.wait:
        command = await ctx.store.sendCommand(ctx.args.controller, body, ctx.args.ttl)
        ctx.out.write(f"{command}\n")
        return EXIT_OK
    # Listen before sending, so the outcome cannot slip past; poll the status as well, in
    # case the notification is lost.
    outcomes: dict[str, str] = {}
    listening = await ctx.db.connect()
    try:
        listening.addNotifyObserver(lambda n: _noteOutcome(outcomes, n.payload))
        await listening.runOperation(f'LISTEN "{resultsChannel(ctx.schema)}"')
        command = await ctx.store.sendCommand(ctx.args.controller, body, ctx.args.ttl)
        ctx.out.write(f"{command}\n")
        ctx.out.flush()
        state = await _awaitOutcome(ctx, command, outcomes)
    finally:
        listening.close()
    status = await ctx.store.commandStatus(command)
    detail = (status or {}).get("detail") or ""
    ctx.out.write(f"{state}{': ' + detail if detail else ''}\n")
    result = (status or {}).get("result")
    if result is not None:
        # What the device answered, where its dialect carries an answer (OCPP).
        ctx.out.write(json.dumps(result, sort_keys=True) + "\n")
    return EXIT_OK if state == "acked" else EXIT_FAILURE


def _noteOutcome(outcomes: dict[str, str], payload: str) -> None:
    try:
        note = json.loads(payload)
        outcomes[note["id"]] = note["state"]
    except (ValueError, KeyError, TypeError):
        pass


async def _awaitOutcome(ctx: Context, command: str, outcomes: dict[str, str]) -> str:
    polled = 0.0
    while command not in outcomes:
        await deferLater(ctx.db.clock, 0.05, lambda: None)
        polled += 0.05
        if polled >= 1.0:
            polled = 0.0
            status = await ctx.store.commandStatus(command)
            if status is not None and status["state"] in FINAL_STATES:
                return str(status["state"])
    return outcomes[command]


async def _status(ctx: Context) -> int:
    if not COMMAND_ID.fullmatch(ctx.args.command):
        raise CommandFailed(f"not a command id: {ctx.args.command!r}", EXIT_USAGE)
    status = await ctx.store.commandStatus(ctx.args.command)
    if status is None:
        raise CommandFailed(f"no command {ctx.args.command}")
    _writeJson(ctx.out, status)
    return EXIT_OK


async def _tail(ctx: Context) -> int:
    if ctx.args.group is not None:
        return await _tailGroup(ctx)
    reactor = ctx.db.reactor
    listening = await ctx.db.connect()
    done: Deferred[None] = Deferred()

    def printOutcome(notify: Any) -> None:
        ctx.out.write(notify.payload + "\n")
        ctx.out.flush()

    listening.addNotifyObserver(printOutcome)
    await listening.runOperation(f'LISTEN "{resultsChannel(ctx.schema)}"')
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: None if done.called else done.callback(None)
    )
    try:
        await done
    finally:
        listening.close()
    return EXIT_OK


async def _tailGroup(ctx: Context) -> int:
    """
    C{ctrlgw tail --group NAME}: a consumer of the group (entries printed are acked).
    """
    from ctrlgw.client import Entry, TwistedConsumer
    from ctrlgw.sse import GROUP, entryJson

    group = ctx.args.group
    if not GROUP.fullmatch(group):
        raise CommandFailed(f"not a group name: {group!r}: 1-128 of A-Z a-z 0-9 . _ : -", EXIT_USAGE)
    reactor = ctx.db.reactor
    connection = await ctx.db.connect()

    def show(entry: Entry) -> None:
        ctx.out.write(json.dumps(entryJson(entry), sort_keys=True) + "\n")
        ctx.out.flush()

    consumer = TwistedConsumer(reactor, connection, ctx.schema, group, show, batch=500)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", consumer.stop)
    try:
        await consumer.run()
    finally:
        reactor.removeSystemEventTrigger(trigger)
        connection.close()
    return EXIT_OK


# --- output ---


def _yesNo(value: object) -> str:
    return "yes" if value else "no"


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


_CONTROL = {c: " " for c in range(32)} | {127: " "}


def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = str(value).translate(_CONTROL)
    return text if text else "-"


def _writeTable(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _writeJson(out: TextIO, value: object) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


# --- the console script ---


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{ctrlgw} console script: exits with L{run}'s exit code.
    """
    # react imports (and so installs) the global reactor: nothing else in ctrlgw does.
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        # react exits 0 when main succeeds, and with SystemExit's code when it raises one.
        raise SystemExit(await run(reactor, arguments))

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":
    main()
